"""The `dtype` check: checkpoint dtype inference (unit), clean half-precision runs on several
architectures, and two injected float32 contaminations in a copy of mlx_lm that `layers`
(float32) passes and `dtype` fails, naming the layer, the module and the parameter or code
line where float32 enters. The check runs in a fresh process importing the chosen mlx_lm:
the real CLI once `dtype` is registered, the module until then."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import Edit, copy_mlx_lm, run_cli

RESIDUAL_FLOAT32 = Edit(
    "models/llama.py",
    "        h = x + r\n",
    "        h = x + r * mx.array(1.0, dtype=mx.float32)\n",
)
NORMS_FLOAT32 = Edit(
    "models/llama.py",
    '            weights.pop("lm_head.weight", None)\n        return weights\n',
    '            weights.pop("lm_head.weight", None)\n'
    '        weights = {k: v.astype(mx.float32) if "norm" in k else v\n'
    "                   for k, v in weights.items()}\n"
    "        return weights\n",
)

RUNNER = """
import json, sys
from mlx_verify.checks.mlx_side import use_mlx_lm
use_mlx_lm(sys.argv[1] if sys.argv[1] != "-" else None)
import importlib
from mlx_verify.checks import engine
out = {}
for model_type in sys.argv[3].split(","):
    subject = engine.load_subject(model_type)
    out[model_type] = [r.model_dump(mode="json") for name in sys.argv[2].split(",")
                       for r in importlib.import_module("checks." + name).run(subject)]
open(sys.argv[4], "w").write(json.dumps(out))
"""
MODULES = {"dtype": "dtypes", "layers": "layers", "quantize": "quantize"}


def run_checks(checks: list[str], model_types: list[str], mlx_lm_root: Path | None,
               cache_dir: Path, tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Check results by model_type from a fresh process: the CLI when every check is
    registered, else the modules called after use_mlx_lm."""
    from mlx_verify.checks import engine

    if all(c in engine.CHECK_MODULES for c in checks):
        found = {}
        for model_type in model_types:
            args = ["check", model_type, "--checks", ",".join(checks), "--variants", "default"]
            if mlx_lm_root is not None:
                args += ["--mlx-lm", str(mlx_lm_root)]
            run = run_cli(args, cache_dir, tmp_path / f"{model_type}.json")
            assert run.returncode in (0, 1), run.stderr[-2000:]
            found[model_type] = [c for c in run.report(model_type)["checks"]
                                 if c["variant"] == "default"]
        return found
    out = tmp_path / "results.json"
    env = {"MLX_VERIFY_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(mlx_lm_root) if mlx_lm_root else "-",
         ",".join(MODULES[c] for c in checks), ",".join(model_types), str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def by_check(results: list[dict[str, Any]], check: str) -> list[dict[str, Any]]:
    return [r for r in results if r["check"] == check]


# ---------------------------------------------------------------- inference (unit)


def write_checkpoint(path: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_dtype_from_config_keys_nested_and_header(tmp_path: Path) -> None:
    from mlx_verify.checks.dtypes import infer_checkpoint_dtype

    half = np.zeros((4, 4), dtype=np.float16)
    norm = np.ones((4,), dtype=np.float32)
    tensors = {"a.weight": half, "b.weight": half, "n1.weight": norm, "n2.weight": norm,
               "n3.weight": norm}
    got = infer_checkpoint_dtype(write_checkpoint(tmp_path / "t", {"torch_dtype": "bfloat16"},
                                                  tensors))
    assert (got.dtype, got.source) == ("bfloat16", "config.json torch_dtype")
    got = infer_checkpoint_dtype(write_checkpoint(tmp_path / "d", {"dtype": "float16"}, tensors))
    assert (got.dtype, got.source) == ("float16", "config.json dtype")
    got = infer_checkpoint_dtype(write_checkpoint(
        tmp_path / "n", {"text_config": {"dtype": "bfloat16"}}, tensors))
    assert (got.dtype, got.source) == ("bfloat16", "config.json text_config.dtype")
    # no dtype in the config: float16 matrices win over three stray float32 norms
    got = infer_checkpoint_dtype(write_checkpoint(tmp_path / "h", {}, tensors))
    assert got.dtype == "float16" and "safetensors header" in got.source
    assert got.header_counts == {"float16": 2, "float32": 3}
    assert any("3 1-D float32 tensors ignored" in f for f in got.facts)


# ---------------------------------------------------------------- clean ports


def test_clean_ports_stay_half_and_match(cache_dir: Path, tmp_path: Path) -> None:
    # dense, sliding-window/softcapped, MoE (CPU gather_mm emulated), SSM
    model_types = ["llama", "gemma3_text", "mixtral", "mamba"]
    found = run_checks(["dtype"], model_types, None, cache_dir, tmp_path)
    for model_type in model_types:
        results = by_check(found[model_type], "dtype")
        assert [r["metrics"]["dtype"] for r in results] == ["bfloat16", "float16"]
        for r in results:
            assert r["verdict"] == "pass", (model_type, r["summary"])
            assert r["metrics"]["parameters_not_in_dtype"] == 0
            assert set(r["details"]["stage_dtypes"].values()) == {r["metrics"]["dtype"]}
            assert r["metrics"]["max_rel_l2"] <= r["metrics"]["tolerance_rel_l2"]
            # the tiny checkpoint has no dtype in its config: read from the header
            assert r["metrics"]["checkpoint_dtype"] == "float32"
            assert "safetensors header" in r["metrics"]["checkpoint_dtype_source"]


# ---------------------------------------------------------------- injected bugs


EMBED_SCALE_FLOAT32 = Edit(
    "models/gemma2.py",
    "        h = h * (self.args.hidden_size**0.5)\n",
    "        h = h * mx.array(self.args.hidden_size**0.5, dtype=mx.float32)\n",
)
# Per bug: the stage where hidden states leave the half dtype, and where float32 enters.
EXPECT = {
    "residual": {"stage": "layers.0", "module": "model.layers.0", "class": "TransformerBlock",
                 "after": "model.layers.0.self_attn",
                 "before": "model.layers.0.post_attention_layernorm",
                 "line": "h = x + r * mx.array(1.0, dtype=mx.float32)"},
    "embed_scale": {"stage": "embeddings", "module": "model", "class": "GemmaModel",
                    "after": "model.embed_tokens", "before": "model.layers.0",
                    "line": "h = h * mx.array(self.args.hidden_size**0.5, dtype=mx.float32)"},
    "norms": {"stage": "layers.0", "module": "model.layers.0.input_layernorm",
              "class": "RMSNorm", "parameter": "model.layers.0.input_layernorm.weight"},
}


def assert_located(found: list[dict[str, Any]], expect: dict[str, str]) -> None:
    (layers,) = by_check(found, "layers")
    assert layers["verdict"] == "pass", layers["summary"]  # float32 parity cannot see it
    results = by_check(found, "dtype")
    assert len(results) == 2
    for r in results:
        dtype = r["metrics"]["dtype"]
        assert r["verdict"] == "fail", r["summary"]
        assert r["first_divergent_layer"] == expect["stage"]
        assert r["details"]["stage_dtypes"][expect["stage"]] == "float32"
        assert r["details"]["stage_dtypes"]["logits"] == "float32"
        upcast = r["details"]["upcast"]
        assert upcast["module"] == expect["module"] and upcast["class"] == expect["class"]
        assert upcast["output"] == "float32"
        assert f"float32 enters at {expect['module']}" in r["summary"]
        if "parameter" in expect:
            assert upcast["input"] == dtype
            assert upcast["parameters"] == [expect["parameter"]]
            assert r["details"]["parameters_not_in_dtype"][expect["parameter"]] == "float32"
            assert r["metrics"]["parameters_not_in_dtype"] == 5  # 4 layer norms + final norm
        else:
            assert (upcast["after"], upcast["before"]) == (expect["after"], expect["before"])
            assert any(expect["line"] in line for line in upcast["float32_lines"])
            assert r["metrics"]["parameters_not_in_dtype"] == 0


def test_float32_constants_are_located(cache_dir: Path, tmp_path: Path) -> None:
    # two bugs in one tree (different files): one process for both
    root = copy_mlx_lm(tmp_path / "tree", [RESIDUAL_FLOAT32, EMBED_SCALE_FLOAT32])
    found = run_checks(["layers", "dtype"], ["llama", "gemma2"], root, cache_dir, tmp_path)
    assert_located(found["llama"], EXPECT["residual"])
    assert_located(found["gemma2"], EXPECT["embed_scale"])


def test_float32_norm_weights_are_located(cache_dir: Path, tmp_path: Path) -> None:
    root = copy_mlx_lm(tmp_path / "tree", [NORMS_FLOAT32])
    found = run_checks(["layers", "dtype"], ["llama"], root, cache_dir, tmp_path)
    assert_located(found["llama"], EXPECT["norms"])


def test_a_float32_ssm_parameter_in_half_precision_is_located(cache_dir: Path,
                                                              tmp_path: Path) -> None:
    """An SSM parameter cast to float32 in the scan (mamba's A): the state, and with it
    the layer's output, leave bfloat16 at the mixer, between the projections."""
    cast = Edit("models/mamba.py", "        A = -mx.exp(self.A_log)\n",
                "        A = -mx.exp(self.A_log.astype(mx.float32))\n")
    run = run_cli(["check", "mamba", "--checks", "dtype", "--mlx-lm",
                   str(copy_mlx_lm(tmp_path / "tree", [cast]))], cache_dir, tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    rows = [c for c in run.report("mamba")["checks"] if c["check"] == "dtype"]
    assert {r["metrics"]["dtype"] for r in rows} == {"bfloat16", "float16"}
    for row in rows:
        assert row["verdict"] == "fail", row["summary"]
        assert row["metrics"]["first_non_half_stage"] == "layers.0"
        assert "backbone.layers.0.mixer" in row["summary"], row["summary"]
