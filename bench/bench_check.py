"""Benchmarks of the engine: wall time of `mlx-verify check` per architecture (interpreter
start included, checkpoint cache warm and cold) and the cost of capturing every module's
input/output against a plain forward of the same model.

    .venv/bin/python bench/bench_check.py [--types llama,qwen3,...] [--repeat 5]

Writes a Markdown table to stdout; docs/benchmarks.md holds the latest results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_TYPES = "llama,qwen3,gemma3_text,mixtral,deepseek_v3,mamba,falcon_h1"
ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "mlx-verify")


def wall_time(model_type: str, cache: str) -> tuple[float, int]:
    env = {**os.environ, "MLX_VERIFY_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([CLI, "check", model_type, "--json", os.devnull], env=env,
                          capture_output=True)
    return time.perf_counter() - start, done.returncode


def capture_overhead(model_type: str, repeat: int) -> tuple[float, float, float, float]:
    """(plain, captured) medians in ms for transformers and MLX."""
    from checks import engine, hf_side, mlx_side, synth

    source, _ = engine.source_config(model_type, None)
    variant = engine.make_variants(source, from_file=False)[0]
    checkpoint = synth.write_checkpoint(variant.config, 0)
    hf_model = hf_side.load(checkpoint)
    mlx_model, _, _ = mlx_side.load(checkpoint)
    ids = synth.token_ids(variant.config["vocab_size"], engine.PARITY_TOKENS, 0)

    def median_ms(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    return (
        median_ms(lambda: hf_side.plain_forward(hf_model, ids)),
        median_ms(lambda: hf_side.forward(hf_model, ids)),
        median_ms(lambda: mlx_side.plain_forward(mlx_model, ids)),
        median_ms(lambda: mlx_side.forward(mlx_model, ids)),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    print("| model_type | check, cold cache (s) | check, warm cache (s) | exit |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for model_type in types:
            cold, code = wall_time(model_type, cache)
            warm = statistics.median(wall_time(model_type, cache)[0] for _ in range(3))
            print(f"| {model_type} | {cold:.1f} | {warm:.1f} | {code} |", flush=True)
        os.environ["MLX_VERIFY_CACHE"] = cache
        from checks.mlx_side import use_mlx_lm

        use_mlx_lm(None)
        print()
        print("| model_type | transformers plain (ms) | captured (ms) | ratio "
              "| MLX plain (ms) | captured (ms) | ratio |")
        print("|---|---|---|---|---|---|---|")
        for model_type in types:
            hp, hc, mp, mc = capture_overhead(model_type, args.repeat)
            print(f"| {model_type} | {hp:.1f} | {hc:.1f} | {hc / hp:.2f} | {mp:.1f} | {mc:.1f} "
                  f"| {mc / mp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
