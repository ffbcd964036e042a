"""Benchmark of the differential mode: wall time of `mlx-verify check MODEL_TYPE --base
TREE` against a single-tree `mlx-verify check MODEL_TYPE`, interpreter start included,
checkpoint cache warm (both runs use it the same way). The goal: a PR's wall time within
1.3x of a single-tree run, the transformers side being computed once for both trees.

    .venv/bin/python bench/bench_differential.py [--types llama,qwen3,mixtral] [--repeat 3]

The base tree is a copy of the installed mlx_lm. Writes a Markdown table to stdout;
docs/benchmarks.md holds the latest results.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "mlx-verify")
GOAL = 1.3


def wall_time(args: list[str], cache: str) -> tuple[float, int]:
    env = {**os.environ, "MLX_VERIFY_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([CLI, "check", *args, "--json", os.devnull], env=env,
                          capture_output=True)
    return time.perf_counter() - start, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="llama,qwen3,mixtral")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checks", default=None, help="default: every check")
    args = parser.parse_args()
    spec = importlib.util.find_spec("mlx_lm")
    assert spec is not None and spec.submodule_search_locations
    installed = Path(next(iter(spec.submodule_search_locations)))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        shutil.copytree(installed, base / "mlx_lm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        cache = str(Path(tmp) / "cache")
        print("| model_type | single tree (s) | PR + base (s) | ratio | goal |")
        print("|---|---|---|---|---|")
        for model_type in args.types.split(","):
            extra = ["--checks", args.checks] if args.checks else []
            wall_time([model_type, *extra], cache)  # warm the checkpoint cache
            single, double = [], []
            for _ in range(args.repeat):
                single.append(wall_time([model_type, *extra], cache)[0])
                double.append(wall_time([model_type, *extra, "--base", str(base)], cache)[0])
            s, d = statistics.median(single), statistics.median(double)
            print(f"| {model_type} | {s:.1f} | {d:.1f} | {d / s:.2f} | "
                  f"{'met' if d / s <= GOAL else 'missed'} (≤ {GOAL}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
