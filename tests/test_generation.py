"""The `generation` check: clean ports pass on several architectures (in process); an
injected cache-offset bug in a copy of mlx_lm fails generation while `layers` passes
(subprocess, through the CLI once the check is registered)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Edit, copy_mlx_lm, run_cli

# A real-format gemma3_text config with a window (16) shorter than the 48-token prompt:
# the sliding layers decode through RotatingKVCache.
WINDOW_OVERRIDES = {"sliding_window": 16}


def window_config(tmp_dir: Path, model_type: str, **overrides: Any) -> str:
    from mlx_verify.checks import synth

    config = synth.to_legacy_format(synth.default_config(model_type))
    config.update(overrides)
    path = tmp_dir / f"{model_type}-config.json"
    path.write_text(json.dumps(config))
    return str(path)


def run_in_process(model_type: str, cache_dir: Path, config_file: str | None = None):
    os.environ["MLX_VERIFY_CACHE"] = str(cache_dir)
    from mlx_verify.checks import engine, generation
    from mlx_verify.checks.mlx_side import use_mlx_lm

    use_mlx_lm(None)
    subject = engine.load_subject(model_type, config_file=config_file)
    return {r.details["part"]: r for r in generation.run(subject)}


def run_check_subprocess(check: str, model_type: str, mlx_lm_root: Path, cache_dir: Path,
                         tmp_path: Path, extra: list[str] | None = None) -> list[dict[str, Any]]:
    """The check's results (as JSON dicts) from a fresh process importing mlx_lm from
    `mlx_lm_root`: the real CLI when the check is registered, else the module."""
    from mlx_verify.checks import engine

    if check in engine.CHECK_MODULES:
        run = run_cli(["check", model_type, "--mlx-lm", str(mlx_lm_root),
                       "--checks", f"layers,{check}", "--variants", "default",
                       *(extra or [])],
                      cache_dir, tmp_path / "results.json")
        assert run.returncode in (0, 1), run.stderr[-2000:]
        return [c for c in run.report(model_type)["checks"] if c["variant"] == "default"]
    module = {"generation": "mlx_verify.checks.generation",
              "long": "mlx_verify.checks.long_context"}[check]
    config = extra[extra.index("--config") + 1] if extra and "--config" in extra else None
    code = (
        "import json, sys\n"
        "from checks import engine, layers\n"
        "from checks.mlx_side import use_mlx_lm\n"
        f"use_mlx_lm({str(mlx_lm_root)!r})\n"
        "import importlib\n"
        f"mod = importlib.import_module({module!r})\n"
        f"s = engine.load_subject({model_type!r}, config_file={config!r})\n"
        "out = layers.run(s) + mod.run(s)\n"
        "print(json.dumps([r.model_dump(mode='json') for r in out]))\n"
    )
    env = {**os.environ, "MLX_VERIFY_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "mamba"])
def test_clean_generation_passes(model_type: str, cache_dir: Path) -> None:
    parts = run_in_process(model_type, cache_dir)
    assert parts["greedy"].verdict == "pass", parts["greedy"].summary
    assert parts["greedy"].metrics["tokens_agreeing"] == 16
    assert parts["kv-cache"].verdict == "pass", parts["kv-cache"].summary
    assert parts["batch"].verdict in ("pass", "skip"), parts["batch"].summary
    assert parts["batch-chunked"].verdict == parts["batch"].verdict, \
        parts["batch-chunked"].summary
    if model_type == "llama":
        assert parts["batch"].verdict == "pass", parts["batch"].summary


def test_clean_sliding_window_decoding_passes(cache_dir: Path, tmp_path: Path) -> None:
    parts = run_in_process("gemma3_text", cache_dir,
                           window_config(tmp_path, "gemma3_text", **WINDOW_OVERRIDES))
    kv = parts["kv-cache"]
    assert kv.verdict == "pass", kv.summary
    assert "RotatingKVCache" in kv.metrics["caches"]
    assert parts["greedy"].verdict == "pass", parts["greedy"].summary
    assert parts["batch"].verdict == "pass", parts["batch"].summary


def test_cache_offset_bug_fails_generation_not_layers(cache_dir: Path, tmp_path: Path) -> None:
    """RoPE of the queries ignores cache.offset: invisible without a cache (layers), the
    decode steps go wrong from the first one after the prompt."""
    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/llama.py",
        "queries = self.rope(queries, offset=cache.offset)",
        "queries = self.rope(queries)",
    )])
    checks = run_check_subprocess("generation", "llama", root, cache_dir, tmp_path)
    layers = [c for c in checks if c["check"] == "layers"]
    assert layers[0]["verdict"] == "pass", layers[0]["summary"]
    parts = {c["details"]["part"]: c for c in checks if c["check"] == "generation"}
    assert parts["greedy"]["verdict"] == "fail", parts["greedy"]["summary"]
    assert parts["greedy"]["metrics"]["first_mismatch_step"] == 1
    kv = parts["kv-cache"]
    assert kv["verdict"] == "fail"
    assert kv["metrics"]["first_divergent_step"] == 1
    assert kv["metrics"]["prefill_vs_transformers_rel_l2"] < 1e-5  # the prompt pass agrees
    assert kv["first_divergent_layer"] == "layers.0"
    assert kv["localization"]["part"] == "attention"
    assert kv["localization"]["module"] == "model.layers.0.self_attn"
    assert kv["localization"]["inputs_agree"] is False  # between the projections: RoPE
    assert any("prompt pass agrees" in f for f in kv["localization"]["facts"])


def test_ssm_conv_state_bug_fails_kv_cache_not_layers(cache_dir: Path, tmp_path: Path) -> None:
    """Mamba keeps the wrong K-1 inputs as its conv state: the prompt pass (no state
    read) and `layers` agree, the first decode step reads the state and diverges in
    the first mixer."""
    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/mamba.py",
        "new_conv_cache = x_full[:, -(K - 1) :, :]",
        "new_conv_cache = x_full[:, -K : -1, :]",
    )])
    checks = run_check_subprocess("generation", "mamba", root, cache_dir, tmp_path)
    layers = [c for c in checks if c["check"] == "layers"]
    assert layers[0]["verdict"] == "pass", layers[0]["summary"]
    parts = {c["details"]["part"]: c for c in checks if c["check"] == "generation"}
    kv = parts["kv-cache"]
    assert kv["verdict"] == "fail", kv["summary"]
    assert kv["metrics"]["first_divergent_step"] == 1
    assert kv["metrics"]["caches"] == "ArraysCache"
    assert kv["first_divergent_layer"] == "layers.0"
    assert kv["localization"]["part"] == "ssm"
    assert kv["localization"]["module"] == "backbone.layers.0.mixer"
    # the batch path prefills through the same state: a real failure, not the
    # "ignores padding" skip
    assert parts["batch"]["verdict"] == "fail", parts["batch"]["summary"]


def test_missing_cache_advance_fails_batch_chunked_not_batch(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    """mlx-lm ed7884cb reverted: qwen3_5's GatedDeltaNet stores its state without
    `cache.advance(S)`, so the lengths prepare() set stay those of the first chunk. One
    padded prefill call never reads them again (batch and kv-cache pass); the chunked
    batch prefill reads them in its second chunk and the padded prompts diverge at once.
    The clean copy passes the same row."""
    clean = copy_mlx_lm(tmp_path / "clean", [])
    checks = run_check_subprocess("generation", "qwen3_5", clean, cache_dir, tmp_path)
    parts = {c["details"]["part"]: c for c in checks if c["check"] == "generation"}
    assert parts["batch-chunked"]["verdict"] == "pass", parts["batch-chunked"]["summary"]

    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/qwen3_5.py",
        "            cache[1] = state\n            cache.advance(S)\n",
        "            cache[1] = state\n",
    )])
    checks = run_check_subprocess("generation", "qwen3_5", root, cache_dir, tmp_path)
    layers = [c for c in checks if c["check"] == "layers"]
    assert layers[0]["verdict"] == "pass", layers[0]["summary"]
    parts = {c["details"]["part"]: c for c in checks if c["check"] == "generation"}
    for part in ("greedy", "kv-cache", "batch"):
        assert parts[part]["verdict"] == "pass", parts[part]["summary"]
    chunked = parts["batch-chunked"]
    assert chunked["verdict"] == "fail", chunked["summary"]
    assert chunked["details"]["side"] == "mlx-lm"
    assert chunked["first_divergent_layer"] == "step 0"
    assert chunked["details"]["prefill_step_size"] == 16
    assert "left padding" in chunked["summary"]  # a padded prompt, not the longest
    # BatchGenerator never hands prompt() more than a chunk: a latent path, said so
    assert chunked["reach"] == "latent"
    assert parts["greedy"]["reach"] == "config"


def test_quantized_kv_cache_on_a_real_mla_config_is_no_false_alarm(cache_dir, tmp_path):
    """DeepSeek-V3's real config, shrunk: its MLA cache holds values 8 wide, which MLX
    cannot quantize in groups of 32. That is a limit of the tiny sizes (the real ones are
    multiples of 64), said as a skip, never an mlx-lm fail."""
    from pathlib import Path

    from tests.conftest import run_cli

    config = Path(__file__).parent / "fixtures" / "configs" / "deepseek-v3.json"
    run = run_cli(["check", "deepseek_v3", "--config", str(config), "--checks", "generation"],
                  cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    kv = [c for c in run.report("deepseek_v3")["checks"]
          if c["details"].get("part") == "kv-quantized"]
    assert kv and kv[0]["verdict"] == "skip", kv
    assert "not a multiple" in kv[0]["summary"]


def test_a_batch_path_that_does_not_repeat_itself_is_said_and_never_read_worse(
        cache_dir: Path, tmp_path: Path) -> None:
    """mamba2's batch-chunked row (ssm.py gathers the state decay past a call shorter than
    the lengths, docs/known-findings.md) gives other log-probs each time it runs on the
    same inputs. The row says so, and a differential run of the same tree against itself
    reads it unchanged: its distance moves without a change (a bug elsewhere read
    `worse` or not by chance). llama's batch rows repeat bit for bit."""
    tree = copy_mlx_lm(tmp_path / "tree", [])
    run = run_cli(["check", "mamba2", "llama", "--checks", "generation", "--variants",
                   "default", "--mlx-lm", str(tree), "--base", str(tree)], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["model_type"], r["details"].get("part")): r for report in run.results["reports"]
            for r in [{**c, "model_type": report["model_type"]} for c in report["checks"]]}
    chunked = rows[("mamba2", "batch-chunked")]
    assert chunked["verdict"] == "fail", chunked["summary"]
    assert chunked["details"]["nondeterministic"].startswith(
        "run twice on the same inputs it differs"), chunked["details"]
    assert "nondeterministic" in chunked["summary"]
    for part in ("batch", "batch-chunked"):
        assert "nondeterministic" not in rows[("llama", part)]["details"], part
    changes = {(d["model_type"], d["part"]): d for d in run.results["differential"]
               if d["check"] == "generation"}
    row = changes[("mamba2", "batch-chunked")]
    assert row["change"] == "unchanged" and row["distance"] is None, row
