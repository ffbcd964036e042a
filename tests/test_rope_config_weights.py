"""The rope, config and weights checks and the bug-finding variants, on the installed
mlx-lm (clean runs and its known findings) and on copies with one injected bug each
that the plain parity check on the default variant does not see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import CliRun, Edit, copy_mlx_lm, run_cli


def checks_of(run: CliRun, model_type: str, check: str, variant: str = "default"
              ) -> list[dict[str, Any]]:
    found = [c for c in run.report(model_type)["checks"]
             if c["check"] == check and c["variant"] == variant]
    assert found, f"{model_type}: no {check} result on variant {variant}"
    return found


@pytest.fixture(scope="module")
def clean(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    out = tmp_path_factory.mktemp("clean") / "results.json"
    return run_cli(["check", "llama", "qwen3", "--checks", "layers,rope,config,weights",
                    "--variants", "default,rope-theta,rope-yarn,eps"], cache_dir, out)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_clean_ports_pass_every_check(clean: CliRun, model_type: str) -> None:
    assert clean.returncode == 0, clean.stderr[-2000:]
    for check in clean.report(model_type)["checks"]:
        assert check["verdict"] == "pass", (check["check"], check["variant"], check["summary"])


def test_rope_read_off_that_outputs_contradict_is_not_a_failure(cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    """deepseek_v3 hands its layers half-split cos/sin and interleaves q/k itself: the
    read-off layouts differ, the outputs agree at every far position."""
    run = run_cli(["check", "deepseek_v3", "--checks", "rope", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode == 0, run.stderr[-2000:]
    rotation, *far = checks_of(run, "deepseek_v3", "rope")
    assert rotation["verdict"] == "pass"
    assert rotation["details"]["unconfirmed"] == [
        f"layer {i}: MLX layout interleaved, transformers half-split" for i in range(4)]
    assert f"outputs agree at all {len(far)} far positions" in rotation["summary"]
    assert len(far) == 3 and all(c["verdict"] == "pass" for c in far)


def test_rope_states_the_base_each_side_applies(clean: CliRun) -> None:
    rotation = checks_of(clean, "llama", "rope", "rope-theta")[0]
    assert "MLX applies base 500000" in rotation["summary"]
    assert "transformers applies base 500000" in rotation["summary"]
    yarn = checks_of(clean, "llama", "rope", "rope-yarn")[0]
    assert "scale 1.139" in yarn["summary"]  # yarn's attention factor, measured on both sides
    far = [c for c in checks_of(clean, "llama", "rope") if c["metrics"].get("position")]
    assert len(far) == 3 and max(c["metrics"]["position"] for c in far) >= 2000


@pytest.fixture(scope="module")
def released_findings(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    out = tmp_path_factory.mktemp("findings") / "results.json"
    return run_cli(["check", "gemma2", "mistral", "llama", "--checks", "layers,config,weights",
                    "--variants", "default,config-format-rope_parameters"], cache_dir, out)


def test_released_findings_are_reported(released_findings: CliRun) -> None:
    """Disagreements of released mlx-lm with transformers (docs/known-findings.md)."""
    assert released_findings.returncode == 1
    gemma2 = checks_of(released_findings, "gemma2", "config")[0]
    assert gemma2["verdict"] == "fail" and "sliding_window" in gemma2["summary"]
    assert "ModelArgs at mlx_lm/models/gemma2.py:" in gemma2["summary"]
    assert "has no field sliding_window: from_dict drops it" in gemma2["summary"]
    mistral = checks_of(released_findings, "mistral", "config")[0]
    assert mistral["verdict"] == "fail" and "sliding_window" in mistral["summary"]
    assert "declared by ModelArgs at mlx_lm/models/llama.py:" in mistral["summary"]
    assert "but unused" in mistral["summary"]
    tied = checks_of(released_findings, "gemma2", "weights")[0]
    assert tied["verdict"] == "fail" and "lm_head.weight" in tied["summary"]
    # transformers 5 writes the RoPE base under rope_parameters; llama.py reads rope_theta
    v5 = checks_of(released_findings, "llama", "layers", "config-format-rope_parameters")[0]
    assert v5["verdict"] == "fail" and v5["first_divergent_layer"] == "layers.0"
    assert v5["localization"]["part"] == "attention"
    assert checks_of(released_findings, "llama", "layers")[0]["verdict"] == "pass"


# Bugs that the default-variant parity check cannot see, each in its own file.
HIDDEN_BUGS = [
    # dynamic NTK scaled from the prompt length only, not the position: wrong past the
    # trained length, invisible to a short prompt at position 0
    Edit("models/rope_utils.py",
         "        seq_len = max(x.shape[-2] + offset, self.max_position_embeddings)\n",
         "        seq_len = max(x.shape[-2], self.max_position_embeddings)\n"),
    # sanitize transposes conv weights on every call: convert-then-reload breaks
    Edit("models/mamba.py",
         '            if "conv1d.weight" in k and v.shape[-1] != 1:\n',
         '            if "conv1d.weight" in k:\n'),
    # interleaved RoPE flipped to half-split
    Edit("models/cohere.py",
         "self.rope = nn.RoPE(head_dim, traditional=True, base=args.rope_theta)",
         "self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)"),
    # norm eps from the config ignored: the default eps equals the hard-coded one
    Edit("models/qwen3.py",
         "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)",
         "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=1e-6)"),
]


@pytest.fixture(scope="module")
def hidden(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    root = copy_mlx_lm(tmp_path_factory.mktemp("hidden-bugs"), HIDDEN_BUGS)
    out = root / "results.json"
    return run_cli(["check", "llama", "mamba", "cohere", "qwen3", "--mlx-lm", str(root),
                    "--checks", "layers,rope,weights,config",
                    "--variants", "default,eps,rope-dynamic"], cache_dir, out)


def test_hidden_bugs_pass_default_parity(hidden: CliRun) -> None:
    assert hidden.returncode == 1, hidden.stderr[-2000:]
    for model_type in ("llama", "mamba", "qwen3"):
        assert checks_of(hidden, model_type, "layers")[0]["verdict"] == "pass", model_type


def test_rope_catches_dynamic_ntk_without_the_offset(hidden: CliRun) -> None:
    assert checks_of(hidden, "llama", "layers", "rope-dynamic")[0]["verdict"] == "pass"
    far = {c["metrics"]["position"]: c for c in checks_of(hidden, "llama", "rope", "rope-dynamic")
           if c["metrics"].get("position")}
    beyond = max(far)  # past max_position_embeddings: the only place dynamic NTK acts
    assert far[beyond]["verdict"] == "fail"
    assert far[beyond]["first_divergent_layer"] == "layers.0"
    assert far[beyond]["localization"]["part"] == "attention"
    assert all(c["verdict"] == "pass" for p, c in far.items() if p < beyond)


def test_rope_names_the_layout(hidden: CliRun) -> None:
    rotation = next(c for c in checks_of(hidden, "cohere", "rope")
                    if c["metrics"].get("check_part") == "rotation")
    assert rotation["verdict"] == "fail"
    assert "MLX layout half-split, transformers interleaved" in rotation["summary"]


def test_weights_catches_sanitize_not_idempotent(hidden: CliRun) -> None:
    weights = checks_of(hidden, "mamba", "weights")[0]
    assert weights["verdict"] == "fail"
    assert "not idempotent" in weights["summary"] and "conv1d.weight" in weights["summary"]


def test_eps_variant_and_config_catch_hard_coded_eps(hidden: CliRun) -> None:
    eps = checks_of(hidden, "qwen3", "layers", "eps")[0]
    assert eps["verdict"] == "fail" and eps["first_divergent_layer"] == "layers.0"
    assert eps["localization"]["part"] == "norm"
    assert "input_layernorm" in eps["localization"]["module"]
    config = checks_of(hidden, "qwen3", "config")[0]
    assert config["verdict"] == "fail" and "rms_norm_eps" in config["summary"]
