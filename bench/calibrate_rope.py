"""Far-position RoPE calibration: how far a correct port drifts from transformers as the
position grows, against the bound `rope.far_tolerance` (docs/tolerances.md, "RoPE").

Every (config, variant) below is loaded as the `rope` check loads it, the 16-token prompt
is placed at 16k..256k (without a prefix), and per position it records the largest stage
error (rel L2) and that error in units of position x 2^-24 (the float32 angle rounding
`rope.FAR_DRIFT` is counted in). Each run is classified by the rotation itself, measured
at the same position on both sides, as the check does (`rope.angle_difference`): the
rotation agrees when no rotated pair's angle differs by more than rope.ANGLE_AGREES x
position x 2^-24 (float32 rounding on both sides). The error at position 64 (flat bound)
is shown beside: a disagreement that does not depend on the position shows there.

    MLX_VERIFY_CACHE=/tmp/mvcache .venv/bin/python bench/calibrate_rope.py [--only NAME,...]

Prints a Markdown table and the summary; docs/tolerances.md holds the latest output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_verify.checks import engine, layers, rope  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
# (label, model_type, config file under tests/fixtures/configs or None, variants)
RUNS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("llama-3.1-8b", "llama", "llama-3.1-8b-instruct.json", ("default",)),
    ("qwen2.5-7b", "qwen2", "qwen2.5-7b-instruct.json", ("default",)),
    ("qwen2.5-7b+yarn", "qwen2", "qwen2.5-7b-instruct-yarn.json", ("default",)),
    ("qwen3-8b", "qwen3", "qwen3-8b.json", ("default",)),
    ("qwen3-30b-a3b-2507", "qwen3_moe", "qwen3-30b-a3b-instruct-2507.json", ("default",)),
    ("mistral-7b-v0.3", "mistral", "mistral-7b-instruct-v0.3.json", ("default",)),
    ("gemma-3-4b text", "gemma3_text", "gemma-3-4b-it-text.json", ("default",)),
    ("phi-4-mini", "phi3", "phi-4-mini-instruct.json", ("default",)),
    ("deepseek-v3", "deepseek_v3", "deepseek-v3.json", ("default",)),
    ("llama", "llama", None, ("default", "rope-theta", "rope-linear", "rope-dynamic",
                              "rope-yarn", "rope-llama3")),
    ("qwen2", "qwen2", None, ("default", "rope-yarn")),
    ("qwen3", "qwen3", None, ("default", "rope-yarn")),
    ("mistral", "mistral", None, ("default",)),
    ("gemma3_text", "gemma3_text", None, ("default",)),
    ("phi3", "phi3", None, ("default", "rope-longrope")),
    ("mixtral", "mixtral", None, ("default", "rope-llama3", "rope-yarn")),
    ("olmo2", "olmo2", None, ("default",)),
)
# not powers of two: at 2^k..2^k+15 the two sides round p x inv_freq alike (see docs)
POSITIONS = (16000, 20000, 40000, 100000, 200000, 250000)
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated labels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    agree: list[tuple[float, str]] = []
    disagree: list[tuple[float, str]] = []
    agree_angles: list[tuple[float, str]] = []
    disagree_angles: list[tuple[float, str]] = []
    print("| config | variant | rope | theta | rel_l2 at 64 | position | max rel_l2 "
          "| / (p x 2^-24) | max angle diff / (p x 2^-24) | bound | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, model_type, file, variants in RUNS:
        if only and label not in only:
            continue
        config_file = str(FIXTURES / file) if file else None
        for variant in variants:
            start = time.perf_counter()
            try:
                subject = engine.load_subject(model_type, variant, config_file=config_file,
                                              seed=args.seed)
                near = rope.far_parity(subject, [64])[0]
                rows = rope.far_parity(subject, list(POSITIONS))
            except Exception as e:  # a port that does not load has nothing to calibrate
                print(f"| {label} | {variant} | not run: {str(e)[:120]} |||||||")
                continue
            config = layers.decoder_config(subject.config)
            theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
                "rope_theta")
            rope_type = rope._rope_type(config)
            near_error = near.metrics.get("max_rel_l2") or 0.0
            for row in rows:
                position = int(row.metrics["position"])
                last = position + rope.FAR_TOKENS - 1
                unit = last * rope.ANGLE_ULP
                error = row.metrics.get("max_rel_l2")
                angle = row.metrics.get("max_angle_diff")
                angle_units = angle / unit if isinstance(angle, float) else None
                correct = angle_units is not None and angle_units <= rope.ANGLE_AGREES
                if isinstance(error, float):
                    (agree if correct else disagree).append(
                        (error / unit, f"{label}/{variant}@{position}"))
                if angle_units is not None:
                    (agree_angles if correct else disagree_angles).append(
                        (angle_units, f"{label}/{variant}@{position}"))
                print(f"| {label} | {variant} | {rope_type} | {theta} | {near_error:.1e} | "
                      f"{position} | "
                      f"{error:.2e} | {error / unit:.4f} | "
                      f"{'n/a' if angle_units is None else f'{angle_units:.3f}'} | "
                      f"{row.metrics['tolerance_rel_l2']:.1e} | {row.verdict}"
                      f"{'' if correct else ' (rotation differs)'} |")
            print(f"<!-- {label}/{variant}: {time.perf_counter() - start:.1f} s -->",
                  file=sys.stderr)
    agree.sort()
    disagree.sort()
    print()
    print(f"runs whose rotation agrees: {len(agree)}; largest drift "
          f"{agree[-1][0]:.4f} x p x 2^-24 ({agree[-1][1]})" if agree else "no agreeing runs")
    print(f"runs whose rotation differs: {len(disagree)}; smallest error "
          f"{disagree[0][0]:.3g} x p x 2^-24 ({disagree[0][1]})" if disagree
          else "no disagreeing runs")
    agree_angles.sort()
    disagree_angles.sort()
    if agree_angles:
        print(f"largest angle difference where the rotation agrees: "
              f"{agree_angles[-1][0]:.3f} x p x 2^-24 ({agree_angles[-1][1]})")
    if disagree_angles:
        print(f"smallest angle difference where it differs: "
              f"{disagree_angles[0][0]:.3g} x p x 2^-24 ({disagree_angles[0][1]})")
    print(f"FAR_DRIFT = {rope.FAR_DRIFT}, ANGLE_AGREES = {rope.ANGLE_AGREES}")


if __name__ == "__main__":
    main()
