"""Real configs from the Hub code path (huggingface_hub against a local cache directory,
offline) and from checkpoint directories; several variants of one architecture diffed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_cli

# A Llama-3-8B-shaped config.json in the format Hub checkpoints carry.
BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def hub_cache(root: Path, repos: dict[str, dict[str, Any]]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/SHA/}."""
    for index, (repo_id, config) in enumerate(repos.items()):
        repo = root / ("models--" + repo_id.replace("/", "--"))
        sha = f"{index + 1:040x}"
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(config))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha)
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub_cache(tmp_path_factory.mktemp("hf-cache"), {
        "org/base": BASE,
        "org/instruct": {**BASE, "rope_theta": 1000000.0, "eos_token_id": 128009},
        # differs from base only in a token id that shrinks to the same value: no new check
        "org/dpo": {**BASE, "eos_token_id": 128009},
    })


def test_hub_variants_are_diffed_and_checked(hub: Path, cache_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    run = run_cli(["check", "llama", "--hub-model", "org/base", "--hub-model",
                   "org/instruct@main", "--hub-model", "org/dpo", "--checks", "layers",
                   "--variants", "default,source-1"], cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    report = run.report("llama")
    assert set(report["config_diff"]) == {"rope_theta", "eos_token_id"}
    assert report["config_diff"]["rope_theta"]["hub org/instruct@main"] == 1000000.0
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) == {"default", "source-1"}  # dpo's tiny config is base's
    assert variants["source-1"]["config"]["rope_theta"] == 1000000.0
    assert variants["default"]["config_format"] == "legacy"
    assert variants["default"]["config"]["num_key_value_heads"] == 2  # GQA kept
    assert all(c["verdict"] == "pass" for c in report["checks"])


def test_hub_repo_not_cached_offline_is_a_clear_error(hub: Path, cache_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    run = run_cli(["check", "llama", "--hub-model", "org/absent"], cache_dir)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "mlx-verify: error: org/absent: offline (HF_HUB_OFFLINE is set) and not in the "
        "local Hugging Face cache"]


def test_checkpoint_dir_and_model_type_mismatch(cache_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({**BASE, "rope_theta": 10000.0}))
    run = run_cli(["check", "llama", "--checkpoint", str(checkpoint), "--checks", "layers",
                   "--variants", "default"], cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.report("llama")["source"] == f"checkpoint {checkpoint}"
    wrong = run_cli(["check", "qwen3", "--checkpoint", str(checkpoint)], cache_dir)
    assert wrong.returncode == 2 and "model_type is 'llama', not 'qwen3'" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_full_weights_needs_a_checkpoint(cache_dir: Path) -> None:
    run = run_cli(["check", "llama", "--full-weights"], cache_dir)
    assert run.returncode == 2 and "--full-weights needs" in run.stderr
