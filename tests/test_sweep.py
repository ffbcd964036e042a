"""`mlx-verify sweep` on a copy of the installed mlx_lm with one bug and one hard crash
injected: each model_type runs in its own forked process, so the crash costs only its own
row; a finding is a finding; a second run resumes; --previous lists what changed."""

from __future__ import annotations

import glob
import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_verify.checks.mlx_side import OPENBLAS_GLOB
from mlx_verify.checks.sweep import run_one

from .conftest import Edit, copy_mlx_lm, run_cli

QWEN3_GELU = Edit("models/qwen3.py",
                  "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))",
                  "return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))")
# A native crash, as a segfault in MLX or a runaway model file would end the process.
QWEN2_SEGFAULT = Edit("models/qwen2.py",
                      "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))",
                      "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
OPTIONS = ["--checks", "layers", "--variants", "default"]


def sweep(tree: Path, out: Path, cache_dir: Path, *extra: str):
    return run_cli(["sweep", "--mlx-lm", str(tree), "--types", "llama,qwen2,qwen3",
                    *OPTIONS, "--jobs", "2", "--out", str(out), *extra], cache_dir)


def test_sweep_isolates_a_crash_and_resumes(tmp_path, cache_dir):
    tree = copy_mlx_lm(tmp_path / "tree", [QWEN3_GELU, QWEN2_SEGFAULT])
    out = tmp_path / "sweep"
    first = sweep(tree, out, cache_dir)
    assert first.returncode == 1, first.stderr[-2000:]  # a finding and an error
    state = json.loads((out / "sweep.json").read_text())
    rows = state["rows"]
    assert rows["llama"]["verdict"] == "pass" and rows["llama"]["exit"] == 0
    assert rows["qwen3"]["verdict"] == "fail" and rows["qwen3"]["exit"] == 1
    assert rows["qwen2"]["verdict"] == "error"
    assert rows["qwen2"]["error"] == "killed by signal 11", rows["qwen2"]
    assert not (out / "qwen2.json").exists()
    # the forked checks ran the tree given, not the installed mlx_lm
    qwen3 = json.loads((out / "qwen3.json").read_text())
    assert qwen3["environment"]["mlx_lm_path"] == str(tree / "mlx_lm")
    layers = next(c for c in qwen3["reports"][0]["checks"] if c["check"] == "layers")
    assert layers["localization"]["module"].endswith("mlp.act_fn") or \
        ".mlp" in layers["localization"]["module"], layers["localization"]
    # MLX's matmuls ran on OpenBLAS where it is installed (scripts/test.sh installs it)
    blas = qwen3["environment"]["blas"]
    assert blas and ("openblas" in blas) == bool(glob.glob(OPENBLAS_GLOB)), blas
    # each result carries its own reproduce command, not the sweep's
    assert qwen3["command"].startswith("mlx-verify check qwen3 --mlx-lm ")
    assert (out / "logs" / "qwen2.log").exists()
    fingerprint = state["fingerprint"]
    assert {"mlx_lm", "transformers", "mlx", "torch", "options"} <= set(fingerprint)
    summary = (out / "summary.md").read_text()
    assert "| qwen3 | fail | fail |" in summary and "| llama | pass | pass |" in summary
    assert "- qwen2: killed by signal 11" in summary
    # by reach: qwen3's GELU is a finding on transformers' default config itself
    assert "- on the config under test (transformers' default): 1 model_types" in summary
    # Resume: the finished model_types are kept, only the error runs again.
    seconds = {t: rows[t]["seconds"] for t in ("llama", "qwen3")}
    llama_mtime = (out / "llama.json").stat().st_mtime_ns
    second = sweep(tree, out, cache_dir)
    assert second.returncode == 1
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {t: rows[t]["seconds"] for t in ("llama", "qwen3")} == seconds
    assert (out / "llama.json").stat().st_mtime_ns == llama_mtime
    assert rows["qwen2"]["verdict"] == "error"
    # The crash fixed, a new sweep against the first: qwen2 changed, nothing else.
    fixed = copy_mlx_lm(tmp_path / "fixed", [QWEN3_GELU])
    third = sweep(fixed, tmp_path / "sweep2", cache_dir, "--previous", str(out))
    assert third.returncode == 1, third.stderr[-2000:]
    changes = third.stdout.split("## Changed since the previous sweep", 1)[1]
    assert "- qwen2 layers: absent -> pass" in changes
    assert "qwen3" not in changes and "llama" not in changes


def test_sweep_bad_input_is_one_line(tmp_path, cache_dir):
    bad = run_cli(["sweep", "--types", "llama,not_a_model", "--out", str(tmp_path / "s")],
                  cache_dir)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "mlx-verify: error: not in both libraries: not_a_model"
    assert not (tmp_path / "s").exists()


def exit_three(argv: list[str]) -> int:
    """A check process's main that ends at once, with a code no check returns."""
    return 3


def test_concurrent_checks_each_read_their_own_exit_code(tmp_path):
    """Eight threads starting and reaping short checks: a start() in one thread must not
    steal another's exit status (multiprocessing then reports 255; in CI a segfault read
    "exit 255"). Without the sweep's lock about 2.5% of these read 255."""
    (tmp_path / "logs").mkdir()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlx_verify.checks.sweep", __name__])
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda i: run_one(context, exit_three, f"m{i}", tmp_path, []),
                             range(1000)))
    codes = [row["exit"] for row in rows]
    assert codes == [3] * len(codes), {code: codes.count(code) for code in set(codes)}
    assert {row["error"] for row in rows} == {"exit 3"}
