"""Benchmark of the differential mode: wall time of `mlx-verify check MODEL_TYPE --base
TREE` against a single-tree `mlx-verify check MODEL_TYPE`, interpreter start included,
checkpoint cache warm (both runs use it the same way). The goal: a PR's wall time within
1.3x of a single-tree run, the transformers side being computed once for both trees.

    .venv/bin/python bench/bench_differential.py [--types llama,qwen3,mixtral] [--repeat 3]
                                                 [--blas runner|reference|inherit]

The base tree is a copy of the installed mlx_lm; one run of each kind comes first, untimed
(checkpoint cache and bytecode warm). Each run's CPU time (user + system, the
process and what it waited for) is reported beside its wall time: on a machine shared
with other work, wall time grows with the others' load, CPU time much less. `--blas
runner` (the default) gives each run the BLAS environment a verify runner gives its
check process (mlx_side.fast_blas_env: OpenBLAS preloaded for MLX on Linux, when
installed); `reference` the mlx[cpu] wheel's own BLAS; `inherit` this environment as it
is. Writes a Markdown table to stdout; docs/benchmarks.md holds the latest results.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_verify.checks.mlx_side import fast_blas_env

CLI = str(Path(sys.executable).parent / "mlx-verify")
GOAL = 1.3


def run_env(cache: str, blas: str) -> dict[str, str]:
    env = {**os.environ, "MLX_VERIFY_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    if blas == "runner":
        env.update(fast_blas_env())
    elif blas == "reference":
        env.pop("LD_PRELOAD", None)
        env["MLX_VERIFY_BLAS"] = "reference"
    return env


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `mlx-verify check ARGS`; raises when it could not
    run (exit 2 or worse: its time would not be a check's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([CLI, "check", *args, "--json", os.devnull], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise SystemExit(f"mlx-verify check {' '.join(args)}: exit {done.returncode}\n"
                         f"{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="llama,qwen3,mixtral")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checks", default=None, help="default: every check")
    parser.add_argument("--blas", choices=("runner", "reference", "inherit"), default="runner",
                        help="the BLAS environment of each run (default: a verify runner's)")
    args = parser.parse_args()
    spec = importlib.util.find_spec("mlx_lm")
    assert spec is not None and spec.submodule_search_locations
    installed = Path(next(iter(spec.submodule_search_locations)))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        shutil.copytree(installed, base / "mlx_lm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = run_env(str(Path(tmp) / "cache"), args.blas)
        print(f"BLAS: {args.blas} (LD_PRELOAD={env.get('LD_PRELOAD', '')}); median of "
              f"{args.repeat}; load average before: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        print("| model_type | single tree (s) | PR + base (s) | ratio | single tree CPU (s) "
              "| PR + base CPU (s) | CPU ratio | goal |")
        print("|---|---|---|---|---|---|---|---|")
        for model_type in args.types.split(","):
            extra = ["--checks", args.checks] if args.checks else []
            # warm the checkpoint cache, and the base copy's bytecode (the installed tree
            # has its own), so every timed run finds both as the others do
            timed([model_type, *extra], env)
            timed([model_type, *extra, "--base", str(base)], env)
            single, double = [], []
            for _ in range(args.repeat):
                single.append(timed([model_type, *extra], env))
                double.append(timed([model_type, *extra, "--base", str(base)], env))
            s, d = (statistics.median(w for w, _ in single),
                    statistics.median(w for w, _ in double))
            sc, dc = (statistics.median(c for _, c in single),
                      statistics.median(c for _, c in double))
            print(f"| {model_type} | {s:.1f} | {d:.1f} | {d / s:.2f} | {sc:.1f} | {dc:.1f} | "
                  f"{dc / sc:.2f} | {'met' if d / s <= GOAL else 'missed'} (≤ {GOAL}) |",
                  flush=True)
        print()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
