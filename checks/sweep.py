"""`mlx-verify sweep`: every model_type of an mlx-lm tree that transformers also has,
checked in parallel processes (one `mlx-verify check` each, so one model's crash or
memory cannot take the others down), resumable, with a Markdown matrix.

Results go to a directory (one results JSON per model_type, plus summary.md and
sweep.json); a run whose JSON exists for the same mlx-lm, transformers and options is
not run again. With --previous DIR the summary lists what changed since that sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .schema import Results, combine_verdicts

MODEL_TIMEOUT_S = 1800


def _cli() -> list[str]:
    return [sys.executable, "-m", "checks.cli"]


def run_one(model_type: str, out_dir: Path, options: list[str], env: dict[str, str]
            ) -> dict[str, Any]:
    """Check one model_type; returns its row for sweep.json."""
    results_file = out_dir / f"{model_type}.json"
    start = time.perf_counter()
    try:
        proc = subprocess.run([*_cli(), "check", model_type, *options, "--json",
                               str(results_file)], capture_output=True, text=True, env=env,
                              timeout=MODEL_TIMEOUT_S)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = 2, f"timed out after {MODEL_TIMEOUT_S} s"
    row: dict[str, Any] = {"model_type": model_type, "exit": code,
                           "seconds": round(time.perf_counter() - start, 1)}
    if code == 2 or not results_file.exists():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        row["verdict"] = "error"
        row["error"] = lines[-1] if lines else f"exit {code}"
        results_file.unlink(missing_ok=True)
    else:
        row["verdict"] = Results.model_validate_json(results_file.read_text()).verdict
    return row


def checks_matrix(out_dir: Path, model_types: list[str]) -> dict[str, dict[str, str]]:
    """model_type -> check -> combined verdict over variants."""
    matrix: dict[str, dict[str, str]] = {}
    for model_type in model_types:
        file = out_dir / f"{model_type}.json"
        if not file.exists():
            continue
        results = Results.model_validate_json(file.read_text())
        per_check: dict[str, list[Any]] = {}
        for report in results.reports:
            for check in report.checks:
                per_check.setdefault(check.check, []).append(check.verdict)
        matrix[model_type] = {c: combine_verdicts(v) for c, v in per_check.items()}
    return matrix


def summary(rows: list[dict[str, Any]], matrix: dict[str, dict[str, str]],
            previous: dict[str, dict[str, str]] | None, header: str) -> str:
    checks = sorted({c for verdicts in matrix.values() for c in verdicts})
    lines = ["# mlx-verify sweep", "", header, "",
             "| model_type | verdict | " + " | ".join(checks) + " | seconds |",
             "|---|---|" + "---|" * len(checks) + "---|"]
    for row in sorted(rows, key=lambda r: r["model_type"]):
        verdicts = matrix.get(row["model_type"], {})
        cells = [verdicts.get(c, "–") for c in checks]
        lines.append(f"| {row['model_type']} | {row['verdict']} | " + " | ".join(cells)
                     + f" | {row['seconds']} |")
    errors = [r for r in rows if "error" in r]  # could not run at all (exit 2, timeout)
    if errors:
        lines += ["", "## Could not run", ""]
        lines += [f"- {r['model_type']}: {r['error']}" for r in errors]
    if previous is not None:
        changes = []
        for model_type in sorted(set(matrix) | set(previous)):
            before, after = previous.get(model_type, {}), matrix.get(model_type, {})
            for check in sorted(set(before) | set(after)):
                if before.get(check) != after.get(check):
                    changes.append(f"- {model_type} {check}: {before.get(check, 'absent')} -> "
                                   f"{after.get(check, 'absent')}")
        lines += ["", "## Changed since the previous sweep", ""]
        lines += changes or ["- nothing"]
    return "\n".join(lines) + "\n"


def sweep(model_types: list[str], out_dir: Path, options: list[str], jobs: int,
          fingerprint: dict[str, Any], previous_dir: Path | None = None,
          progress: Any = None) -> tuple[list[dict[str, Any]], Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "rows": {}}  # new tree or options: start over
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    # each check process uses one core: more threads per process would only contend
    env.setdefault("OMP_NUM_THREADS", "1")

    def done(model_type: str) -> bool:
        row = state["rows"].get(model_type)
        return (row is not None and row["verdict"] != "error"
                and (out_dir / f"{model_type}.json").exists())

    todo = [t for t in model_types if not done(t)]  # errors are tried again

    def one(model_type: str) -> dict[str, Any]:
        row = run_one(model_type, out_dir, options, env)
        if progress:
            progress(f"{model_type}: {row['verdict']} ({row['seconds']} s)")
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for row in pool.map(one, todo):
            state["rows"][row["model_type"]] = row
            state_file.write_text(json.dumps(state, indent=2))  # resumable after a crash
    rows = [state["rows"][t] for t in model_types if t in state["rows"]]
    previous = None
    if previous_dir is not None:
        previous_types = [p.stem for p in previous_dir.glob("*.json") if p.stem != "sweep"]
        previous = checks_matrix(previous_dir, previous_types)
    header = (f"mlx-lm {fingerprint['mlx_lm']}, transformers {fingerprint['transformers']}, "
              f"options `{' '.join(options) or '(defaults)'}`; {len(rows)} model_types")
    summary_file = out_dir / "summary.md"
    summary_file.write_text(summary(rows, checks_matrix(out_dir, model_types), previous, header))
    return rows, summary_file
