"""The `quantize` check: clean ports convert at 4 and 8 bits, reload and stay within the
calibrated bounds; injected bugs that only the convert-then-reload path shows (`layers`
in float32 passes them) fail with the right localization."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import Edit, copy_mlx_lm
from tests.test_dtype import by_check, run_checks

# A tied lm_head computed from the embedding matrix itself: right in float32 and bf16,
# but after quantization `embed_tokens.weight` is the packed uint32 matrix.
TIED_HEAD_FROM_WEIGHT = Edit(
    "models/gemma2.py",
    "        out = self.model.embed_tokens.as_linear(out)\n",
    "        out = out @ self.model.embed_tokens.weight.T\n",
)
# Gemma's (1 + w) norm moved into sanitize without a guard (the pattern of qwen3_5's
# sanitize, minus its `has_unsanitized_conv1d` check): the first load is right, loading
# mlx-lm's own converted output adds 1 again.
NORM_OFFSET_IN_SANITIZE = [
    Edit("models/gemma2.py",
         "        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)\n",
         "        return mx.fast.rms_norm(x, self.weight, self.eps)\n"),
    Edit("models/gemma2.py",
         "    @property\n    def layers(self):\n        return self.model.layers\n",
         "    def sanitize(self, weights):\n"
         "        return {k: v + 1.0 if k.endswith(\"norm.weight\") else v\n"
         "                for k, v in weights.items()}\n\n"
         "    @property\n    def layers(self):\n        return self.model.layers\n"),
]
# mamba's conv1d transpose without its shape guard: converted output does not load back.
CONV_TRANSPOSE_UNGUARDED = Edit(
    "models/mamba.py",
    '            if "conv1d.weight" in k and v.shape[-1] != 1:\n',
    '            if "conv1d.weight" in k:\n',
)


def test_next_token_stats() -> None:
    from mlx_verify.checks.quantize import next_token_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 5, 32)).astype(np.float32)
    same = next_token_stats(logits, logits)
    assert same["kl_mean"] < 1e-12 and same["top1_agreement"] == 1.0
    flipped = next_token_stats(logits, -logits)
    assert flipped["kl_mean"] > 1.0 and flipped["top1_agreement"] == 0.0


def test_clean_ports_quantize(cache_dir: Path, tmp_path: Path) -> None:
    model_types = ["llama", "gemma2", "mixtral", "mamba"]
    found = run_checks(["quantize"], model_types, None, cache_dir, tmp_path)
    for model_type in model_types:
        results = by_check(found[model_type], "quantize")
        assert [r["metrics"]["bits"] for r in results] == [4, 8]
        for r in results:
            assert r["verdict"] == "pass", (model_type, r["summary"])
            assert r["metrics"]["quantized_modules"] > 0
            assert r["metrics"]["fidelity_max_rel_l2"] <= r["metrics"]["fidelity_bound"]
            assert set(r["details"]["stage_dtypes"].values()) == {"bfloat16"}
    # facts: mamba's conv1d is not a class nn.quantize handles
    (mamba4, _) = by_check(found["mamba"], "quantize")
    assert any(k.endswith("mixer.conv1d.weight") for k in mamba4["details"]["not_quantizable"])


def test_packed_tied_head_and_unguarded_sanitize_fail(cache_dir: Path, tmp_path: Path) -> None:
    # two bugs in one tree (different files): one process for both
    root = copy_mlx_lm(tmp_path / "tree", [TIED_HEAD_FROM_WEIGHT, CONV_TRANSPOSE_UNGUARDED])
    found = run_checks(["layers", "dtype", "quantize"], ["gemma2", "mamba"], root, cache_dir,
                       tmp_path)
    # gemma2: the tied head reads the packed matrix; float32 and half runs cannot see it
    assert by_check(found["gemma2"], "layers")[0]["verdict"] == "pass"
    assert [r["verdict"] for r in by_check(found["gemma2"], "dtype")] == ["pass", "pass"]
    for r in by_check(found["gemma2"], "quantize"):
        assert r["verdict"] == "fail", r["summary"]
        assert "forward fails" in r["summary"] and "gemma2.py" in r["summary"]
    # mamba: the first load is right, mlx-lm's own converted output does not load back
    assert by_check(found["mamba"], "layers")[0]["verdict"] == "pass"
    for r in by_check(found["mamba"], "quantize"):
        assert r["verdict"] == "fail", r["summary"]
        assert r["first_divergent_layer"] == "load"
        assert "does not load back" in r["summary"]


def test_sanitize_not_idempotent_is_localized(cache_dir: Path, tmp_path: Path) -> None:
    root = copy_mlx_lm(tmp_path / "tree", NORM_OFFSET_IN_SANITIZE)
    found = run_checks(["layers", "quantize"], ["gemma2"], root, cache_dir, tmp_path)["gemma2"]
    assert by_check(found, "layers")[0]["verdict"] == "pass"
    for r in by_check(found, "quantize"):
        assert r["verdict"] == "fail", r["summary"]
        # the reloaded model loads, but differs from its own weights quantized in place,
        # from the first norm on
        assert r["first_divergent_layer"] == "layers.0"
        assert r["localization"]["part"] == "norm", r["localization"]
        assert r["localization"]["module"] == "model.layers.0.input_layernorm"
        assert r["metrics"]["fidelity_max_rel_l2"] > 1e-2


def test_a_real_qwen2_config_quantizes(cache_dir: Path, tmp_path: Path) -> None:
    """Qwen2.5's real config: transformers picks Qwen2Tokenizer for the tiny tokenizer,
    which adds a default pad token unless every special token is named (it read back with
    513 tokens for 512 and the check was a driver error)."""
    from tests.conftest import run_cli

    config = Path(__file__).parent / "fixtures" / "configs" / "qwen2.5-7b-instruct.json"
    run = run_cli(["check", "qwen2", "--config", str(config), "--checks", "quantize"],
                  cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts = [c["verdict"] for c in run.report("qwen2")["checks"]]
    assert verdicts == ["pass", "pass"], run.report("qwen2")["checks"]
