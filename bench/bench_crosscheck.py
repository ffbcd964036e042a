"""Benchmark of the runner's cross-check (workers/crosscheck.py): the extra wall time a
verify job spends measuring each model_type's default final logits outside the sandbox
(config and checkpoint built by the runner, one transformers forward, one sandboxed MLX
capture, the comparison), or, with --all-variants, the final logits of every variant the
runner builds (one transformers forward each, one capture process for them all). The
first model_type pays the imports of torch and transformers in the runner's process; the
verdicts and relative L2 are shown too.

    .venv/bin/python bench/bench_crosscheck.py [--types llama,qwen3,mixtral,gemma3_text,mamba]
        [--repeat N] [--all-variants]

The PR tree is a copy of the installed mlx_lm; the sandbox is the runner's (bubblewrap
on Linux, VERIFY_SANDBOX=0 to measure without it). Writes a Markdown table to stdout;
docs/benchmarks.md holds the latest results.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="llama,qwen3,mixtral,gemma3_text,mamba")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per model_type, each with its own random weights and ids")
    parser.add_argument("--all-variants", action="store_true",
                        help="every variant the runner builds, each claimed to pass")
    args = parser.parse_args()

    import mlx_lm

    from mlx_verify.workers import crosscheck, verify

    work = Path(tempfile.mkdtemp(prefix="bench-crosscheck-"))
    try:
        env = verify.scrubbed_env(work)
        src = work / "src"
        src.mkdir()
        shutil.copytree(Path(mlx_lm.__file__).parent, src / "mlx_lm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        print("| model_type | variants | verdicts | max rel L2 | bound "
              "| wall time (s), each run |")
        print("|---|---|---|---|---|---|")
        for model_type in args.types.split(","):
            verdicts, rels, walls = [], [], []
            count = 1
            for index in range(args.repeat):
                run = work / f"run-{model_type}-{index}"
                run.mkdir()
                start = time.perf_counter()
                if args.all_variants:
                    built = crosscheck.runner_variants(model_type, None)
                    checked_all = crosscheck.cross_check_model(
                        model_type=model_type, claims={v: ("pass", None) for v in built},
                        built=built, src=src, work=run, writable=verify.scratch_dir(work),
                        env=env, dtype="float32", memory_mb=8192, timeout_s=600,
                        file_size=1 << 29)
                else:
                    checked_all = [crosscheck.cross_check(
                        model_type=model_type, claimed="pass", claimed_config=None, src=src,
                        work=run, writable=verify.scratch_dir(work), env=env,
                        dtype="float32", memory_mb=8192, timeout_s=600, file_size=1 << 29)]
                walls.append(time.perf_counter() - start)
                count = len(checked_all)
                for checked in checked_all:
                    verdicts.append(checked.verdict + (f" ({checked.variant}: "
                                                       f"{checked.reason[:80]})"
                                                       if checked.reason else ""))
                    if checked.rel_l2 is not None:
                        rels.append(checked.rel_l2)
            rel = f"{max(rels):.2e}" if rels else "–"
            said = ", ".join(f"{v} x{verdicts.count(v)}" for v in sorted(set(verdicts)))
            print(f"| {model_type} | {count} | {said} | {rel} | {checked.bound:.0e} | "
                  f"{' '.join(f'{w:.2f}' for w in walls)} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
