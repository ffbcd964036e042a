"""Tolerance calibration: the largest relative L2 error of every check on ports that agree
with transformers, next to the smallest error of a genuine disagreement, per check and
dtype. Evidence for the tolerances in checks/compare.py and checks/rope.py.

    .venv/bin/python bench/calibrate.py [--types llama,qwen3,...] [--checks layers,rope]
        [--dtype float16] [--variants default,sliding-window]

Prints a Markdown section; docs/tolerances.md holds the latest output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

DEFAULT_TYPES = ("llama,mistral,qwen2,qwen3,gemma,gemma2,gemma3_text,phi3,olmo2,starcoder2,"
                 "cohere,mixtral,mamba")
CLI = str(Path(sys.executable).parent / "mlx-verify")
# each row's error against its bound, by the first of these its metrics hold: rel L2
# (layers, rope, long, chunked), a decode step's against transformers (kv-cache), the
# batch's log-probs against single runs, a greedy step's largest logit error / std
# (what generation.TIE_BOUND is held to)
ROW_METRICS = ("max_rel_l2", "max_step_vs_transformers_rel_l2", "max_logprobs_rel_l2",
               "max_logit_error_std")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--checks", default="layers,rope")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", default=None)
    args = parser.parse_args()
    passing: dict[str, list[tuple[float, str]]] = defaultdict(list)
    failing: dict[str, list[tuple[float, str]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([CLI, "check", *args.types.split(","), "--checks", args.checks,
                        "--dtype", args.dtype, "--json", str(out),
                        *(["--variants", args.variants] if args.variants else [])], env=env,
                       capture_output=True, check=False)
        results = json.loads(out.read_text())
    for report in results["reports"]:
        for check in report["checks"]:
            value = next((check["metrics"][k] for k in ROW_METRICS
                          if isinstance(check["metrics"].get(k), (int, float))), None)
            if value is None:
                continue
            label = f"{report['model_type']}/{check['variant']}"
            if check["metrics"].get("position"):
                label += f"@{check['metrics']['position']}"
            bucket = passing if check["verdict"] == "pass" else failing
            part = check["details"].get("part")
            bucket[check["check"] + (f" {part}" if part else "")].append((value, label))
    print(f"mlx-lm {results['environment']['mlx_lm_version']}, transformers "
          f"{results['environment']['transformers']}, dtype {args.dtype}\n")
    print("| check | runs agreeing | largest error among them | runs disagreeing "
          "| smallest error among them |")
    print("|---|---|---|---|---|")
    for check in sorted(set(passing) | set(failing)):
        ok, bad = sorted(passing[check]), sorted(failing[check])
        top = f"{ok[-1][0]:.2e} ({ok[-1][1]})" if ok else "–"
        low = f"{bad[0][0]:.2e} ({bad[0][1]})" if bad else "–"
        print(f"| {check} | {len(ok)} | {top} | {len(bad)} | {low} |")


if __name__ == "__main__":
    main()
