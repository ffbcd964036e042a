"""Calibration of the half-precision (`dtype`) and quantization (`quantize`) bounds: the
numbers behind LAYER_TOLERANCE's half-precision bounds and quantize's bounds by bits
(docs/tolerances.md), measured on correct ports of the installed mlx-lm.

    .venv/bin/python bench/calibrate_half.py dtype MODEL_TYPE,... SEED,...
    .venv/bin/python bench/calibrate_half.py quantize MODEL_TYPE,... SEED,...

JSON lines on stdout, one per port, seed and dtype (or bit width).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from typing import Any

from mlx_verify.checks import dtypes, engine, quantize
from mlx_verify.checks.mlx_side import use_mlx_lm
from mlx_verify.checks.schema import CheckResult


def dtype_row(r: CheckResult) -> dict[str, Any]:
    """MLX half and transformers half, max per-stage rel_l2 against transformers float32
    on the same weights."""
    m = r.metrics
    return {"dtype": m["dtype"], "verdict": r.verdict, "summary": r.summary[:200],
            "mlx_max": m.get("max_rel_l2"), "hf_max": m.get("hf_half_max_rel_l2"),
            "top1": m.get("top1_agreement")}


def quantize_row(r: CheckResult) -> dict[str, Any]:
    m = r.metrics
    return {"bits": m.get("bits"), "verdict": r.verdict, "kl_mean": m.get("kl_mean"),
            "top1": m.get("top1_agreement"), "stage_max": m.get("max_stage_rel_l2"),
            "fidelity_max": m.get("fidelity_max_rel_l2"),
            "left_unquantized": m.get("left_unquantized")}


CHECKS: dict[str, tuple[Callable[[Any], list[CheckResult]],
                        Callable[[CheckResult], dict[str, Any]]]] = {
    "dtype": (dtypes.run, dtype_row),
    "quantize": (quantize.run, quantize_row),
}


def calibrate(check: str, model_types: list[str], seeds: list[int]
              ) -> Iterator[dict[str, Any]]:
    run, row = CHECKS[check]
    for model_type, seed, results, problem in engine.calibration_runs(model_types, seeds, run):
        if results is None:
            yield {"model_type": model_type, "seed": seed, "problem": problem}
            continue
        for r in results:
            yield {"model_type": model_type, "seed": seed, **row(r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("model_types", help="comma-separated, e.g. llama,qwen3")
    parser.add_argument("seeds", help="comma-separated, e.g. 0,1,2")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"seeds must be whole numbers, not {args.seeds!r}")
    use_mlx_lm(None)
    for found in calibrate(args.check, args.model_types.split(","), seeds):
        print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
