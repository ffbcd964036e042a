"""Clean runs: every covered architecture matches transformers with the installed mlx-lm,
and the known real findings of released mlx-lm stay findings.

One CLI run covers all of them (the imports dominate its cost); the assertions are
parametrized over its reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliRun, run_cli

# Architectures whose default tiny checkpoint matches transformers on released mlx-lm.
# Extend this tuple as coverage grows.
CLEAN_MODEL_TYPES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
    "cohere", "mixtral", "mamba",
    # multimodal configs: the decoder is described by text_config
    "gemma3", "qwen3_5",
)

# Real findings on released mlx-lm: model_type -> (first divergent stage, part, module).
# gemma and starcoder2 use exact nn.gelu where transformers uses gelu_pytorch_tanh.
KNOWN_FINDINGS: dict[str, tuple[str, str, str]] = {
    "gemma": ("layers.0", "mlp", "model.layers.0.mlp"),
    "starcoder2": ("layers.0", "mlp", "model.layers.0.mlp"),
}

FP32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def clean_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    out = tmp_path_factory.mktemp("clean") / "results.json"
    return run_cli(
        ["check", *CLEAN_MODEL_TYPES, *KNOWN_FINDINGS,
         "--variants", "default", "--checks", "layers"],
        cache_dir, out,
    )


def default_layers(run: CliRun, model_type: str) -> dict[str, Any]:
    checks = [c for c in run.report(model_type)["checks"]
              if c["check"] == "layers" and c["variant"] == "default"]
    assert len(checks) == 1, f"{model_type}: {len(checks)} default layers checks"
    return checks[0]


def test_clean_run_exits_with_the_known_findings_only(clean_run: CliRun) -> None:
    # 1: the known findings fail; everything else must pass (checked per model below)
    assert clean_run.returncode == 1, clean_run.stderr[-2000:]
    assert "Traceback" not in clean_run.stderr
    assert clean_run.results is not None
    reported = [r["model_type"] for r in clean_run.results["reports"]]
    assert reported == [*CLEAN_MODEL_TYPES, *KNOWN_FINDINGS]


@pytest.mark.parametrize("model_type", CLEAN_MODEL_TYPES)
def test_clean_architecture_matches_transformers(clean_run: CliRun, model_type: str) -> None:
    report = clean_run.report(model_type)
    check = default_layers(clean_run, model_type)
    assert check["verdict"] == "pass", check["summary"]
    assert report["verdict"] == "pass"
    assert check["first_divergent_layer"] is None
    assert check["localization"] is None

    # every stage was paired and compared: embeddings, each decoder layer, final norm, logits
    config = report["variants"][0]["config"]
    config = config.get("text_config", config)  # multimodal: the decoder's own config
    n_layers = next(config[k] for k in ("num_hidden_layers", "n_layer", "n_layers")
                    if isinstance(config.get(k), int))
    names = [row["name"] for row in check["layers"]]
    assert names == ["embeddings", *(f"layers.{i}" for i in range(n_layers)),
                     "final_norm", "logits"]
    for row in check["layers"]:
        assert row["ok"], row
        assert row["rel_l2"] <= FP32_TOLERANCE, row
        assert row["tolerance"] == FP32_TOLERANCE


@pytest.mark.parametrize("model_type", sorted(KNOWN_FINDINGS))
def test_known_gelu_finding_still_fails(clean_run: CliRun, model_type: str) -> None:
    stage, part, module = KNOWN_FINDINGS[model_type]
    check = default_layers(clean_run, model_type)
    assert check["verdict"] == "fail", check["summary"]
    assert check["first_divergent_layer"] == stage
    assert check["localization"]["part"] == part
    assert check["localization"]["module"] == module
    row = next(r for r in check["layers"] if r["name"] == stage)
    assert row["rel_l2"] > FP32_TOLERANCE
    # everything before the divergent stage agrees
    before = check["layers"][: check["layers"].index(row)]
    assert before and all(r["ok"] for r in before)


def test_reading_a_config_leaves_it_alone() -> None:
    """mlx-lm's gemma3 ModelArgs writes its default vocab (262208) into the text_config
    it is given: the engine's config, written next as the checkpoint's, must not change."""
    import copy

    from mlx_verify.checks import mlx_side, synth

    mlx_side.use_mlx_lm(None)
    config = synth.shrink_config(synth.default_config("gemma3"))
    del config["vocab_size"]  # as a real gemma3 config has it: in text_config only
    before = copy.deepcopy(config)
    assert mlx_side.config_problem(config) is None
    assert config == before
