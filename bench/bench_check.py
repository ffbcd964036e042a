"""Benchmarks of the engine: wall time of `mlx-verify check` per architecture, interpreter
start included, with the checkpoint cache cold and warm: parity alone (`layers` on the
default variant) and every check on every variant, with the seconds of each check; and
the cost of capturing every module's input/output against a plain forward.

    .venv/bin/python bench/bench_check.py [--types llama,qwen3,...] [--repeat 5]

Writes a Markdown table to stdout; docs/benchmarks.md holds the latest results.
"""

from __future__ import annotations

import argparse
import json
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


def wall_time(model_type: str, cache: str, args: list[str],
              json_path: str = os.devnull) -> tuple[float, int]:
    env = {**os.environ, "MLX_VERIFY_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([CLI, "check", model_type, *args, "--json", json_path], env=env,
                          capture_output=True)
    return time.perf_counter() - start, done.returncode


def check_times(json_path: str) -> dict[str, float]:
    """Seconds per check, summed over variants, from a results JSON."""
    totals: dict[str, float] = {}
    results = json.loads(Path(json_path).read_text())
    for report in results["reports"]:
        for check in report["checks"]:
            totals[check["check"]] = totals.get(check["check"], 0.0) + check["duration_s"]
    return totals


def capture_overhead(model_type: str, repeat: int) -> tuple[float, float, float, float]:
    """(plain, captured) best times in ms for transformers and MLX."""
    from mlx_verify.checks import engine, hf_side, mlx_side, synth

    source, _ = engine.source_config(model_type, None)
    variant = engine.make_variants(source, from_file=False)[0]
    checkpoint = synth.write_checkpoint(variant.config, 0)
    hf_model = hf_side.load(checkpoint)
    mlx_model, _, _ = mlx_side.load(checkpoint)
    ids = synth.token_ids(variant.config["vocab_size"], engine.PARITY_TOKENS, 0)

    def best_ms(fn) -> float:
        # the minimum: on a shared machine, load only ever adds time
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return min(times)

    return (
        best_ms(lambda: hf_side.plain_forward(hf_model, ids)),
        best_ms(lambda: hf_side.forward(hf_model, ids)),
        best_ms(lambda: mlx_side.plain_forward(mlx_model, ids)),
        best_ms(lambda: mlx_side.forward(mlx_model, ids)),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the capture overhead, not the CLI wall times")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    parity = ["--checks", "layers", "--variants", "default"]
    checks = ("layers", "rope", "config", "weights", "dtype", "generation", "long", "quantize")
    print("| model_type | parity, cold cache (s) | parity, warm cache (s) "
          "| every check and variant, cold (s) | warm (s) | " + " | ".join(checks) + " |")
    print("|---|---|---|---|---|" + "---|" * len(checks))
    with tempfile.TemporaryDirectory() as cache:
        for model_type in [] if args.overhead_only else types:
            cold, _ = wall_time(model_type, cache, parity)
            warm = statistics.median(wall_time(model_type, cache, parity)[0] for _ in range(3))
            full_cold, _ = wall_time(model_type, cache, [])
            results = str(Path(cache) / f"{model_type}.json")
            full_warm, code = wall_time(model_type, cache, [], results)
            per_check = check_times(results)
            cells = " | ".join(f"{per_check[c]:.1f}" if c in per_check else "–" for c in checks)
            print(f"| {model_type} | {cold:.1f} | {warm:.1f} | {full_cold:.1f} | {full_warm:.1f} "
                  f"| {cells} |", flush=True)
        os.environ["MLX_VERIFY_CACHE"] = cache
        from mlx_verify.checks.mlx_side import use_mlx_lm

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
