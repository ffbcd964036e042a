"""`mlx-verify sweep`: every model_type of an mlx-lm tree that transformers also has,
checked in parallel, resumable, with a Markdown matrix.

Each model_type runs `mlx-verify check` in a process of its own, so one model's crash or
memory cannot take the others down. The processes are forked from a multiprocessing
forkserver that has already imported torch, transformers, MLX, mlx_lm and the checks:
importing those takes about 6 s of CPU, which per model_type would be a third of a
sweep. A fork is a fresh copy of that state, so runs cannot leak into each other.

Results go to a directory (one results JSON and one log per model_type, plus summary.md
and sweep.json); a run whose JSON exists for the same mlx-lm, transformers, mlx, torch
and options is not run again. With --previous DIR the summary lists what changed since
that sweep.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from .mlx_side import fast_blas_env
from .schema import Results, check_verdicts

MODEL_TIMEOUT_S = 1800
CliMain = Callable[[list[str]], int]  # `mlx-verify ARGV` -> exit code
# Process.start() polls every other child multiprocessing knows of, so a thread starting
# a check can read the exit status that another thread's join() is waiting for: the
# loser reads EOF, which multiprocessing reports as exit 255 (a segfault read "exit 255"
# in CI). Starting and reaping under one lock means each status is read once.
PROCESS_LOCK = threading.Lock()


# Imported once in the forkserver; each model_type's process starts from there.
PRELOAD = ["torch", "transformers", "mlx.core", "mlx.nn", "mlx_lm", "mlx_lm.utils",
           *(f"mlx_verify.checks.{m}" for m in ("cli", "engine",
               "layers", "rope", "config_keys", "weights", "dtypes", "generation",
               "long_context", "quantize", "synth", "hf_side", "mlx_side"))]


def check_in_child(main: CliMain, argv: list[str], log_file: str) -> None:
    """The forked process: `mlx-verify check ...` (main: checks.cli.main, handed over by
    the CLI, so this module does not import it back) with stdout and stderr (native
    output included) going to the model_type's log."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["mlx-verify", *argv]  # the results' reproduce command
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_forkserver(mlx_lm_path: str | None, shim: Path) -> multiprocessing.context.BaseContext:
    """A forkserver that imports PRELOAD, mlx_lm from mlx_lm_path when given. It is a new
    interpreter (Python 3.11 ignores the parent's sys.path there), so the tree goes on
    its PYTHONPATH, through `shim` holding only a link to the mlx_lm package: the rest
    of an mlx-lm checkout (its tests/, say) cannot shadow our modules."""
    context = multiprocessing.get_context("forkserver")
    if mlx_lm_path:
        (shim / "mlx_lm").symlink_to(Path(mlx_lm_path).expanduser().resolve() / "mlx_lm")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    context.set_forkserver_preload(PRELOAD)
    return context


def run_one(context: multiprocessing.context.BaseContext, main: CliMain, model_type: str,
            out_dir: Path, options: list[str]) -> dict[str, Any]:
    """Check one model_type; returns its row for sweep.json."""
    results_file = out_dir / f"{model_type}.json"
    log_file = out_dir / "logs" / f"{model_type}.log"
    results_file.unlink(missing_ok=True)
    start = time.perf_counter()
    process = context.Process(target=check_in_child, name=f"check {model_type}", args=(
        main, ["check", model_type, *options, "--json", str(results_file)], str(log_file)))
    with PROCESS_LOCK:
        process.start()
    finished = multiprocessing.connection.wait([process.sentinel], MODEL_TIMEOUT_S)
    with PROCESS_LOCK:
        if not finished:
            process.kill()
        process.join()
    if not finished:
        code, why = 2, f"timed out after {MODEL_TIMEOUT_S} s"
    else:
        code = process.exitcode if process.exitcode is not None else 2
        why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    row: dict[str, Any] = {"model_type": model_type, "exit": code,
                           "seconds": round(time.perf_counter() - start, 1)}
    if code not in (0, 1) or not results_file.exists():
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        lines = [line for line in log.strip().splitlines() if line.strip()]
        row["verdict"] = "error"
        row["error"] = lines[-1] if code == 2 and lines else why
        results_file.unlink(missing_ok=True)
    else:
        results = Results.model_validate_json(results_file.read_text())
        verdicts = [c.verdict for report in results.reports for c in report.checks]
        # A measured disagreement is the model's verdict even where another row could
        # not be measured; those rows are counted beside it, never dropped.
        row["verdict"] = "fail" if "fail" in verdicts else results.verdict
        if verdicts.count("error"):
            row["error_rows"] = verdicts.count("error")
    return row


def checks_matrix(out_dir: Path, model_types: list[str]) -> dict[str, dict[str, str]]:
    """model_type -> check -> combined verdict over variants."""
    matrix: dict[str, dict[str, str]] = {}
    for model_type in model_types:
        file = out_dir / f"{model_type}.json"
        if not file.exists():
            continue
        results = Results.model_validate_json(file.read_text())
        matrix[model_type] = dict(check_verdicts(results.reports))
    return matrix


def reach_lines(out_dir: Path, model_types: list[str]) -> list[str]:
    """Findings by reach over the whole sweep: how many model_types fail on transformers'
    default config itself, and each systemic cause once, with its architectures (each
    model_type ran in a process of its own, so only here are they seen together)."""
    from .engine import mark_systemic

    reports = []
    for model_type in model_types:
        file = out_dir / f"{model_type}.json"
        if file.exists():
            reports.extend(Results.model_validate_json(file.read_text()).reports)
    systemic = mark_systemic(reports)
    on_config = sorted({r.model_type for r in reports if r.error or any(
        c.verdict in ("fail", "error") and c.reach in ("config", None) for c in r.checks)})
    latent_only = sorted({r.model_type for r in reports if r.model_type not in on_config
                          and any(c.verdict in ("fail", "error") for c in r.checks)})
    lines = ["", "## Findings by reach", "",
             f"- on the config under test (transformers' default): {len(on_config)} "
             "model_types",
             f"- on latent variants or keys only: {len(latent_only)} model_types"
             + (f" ({', '.join(latent_only)})" if latent_only else "")]
    for (check, variant), types in sorted(systemic.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- systemic: {check} on variant {variant} fails in {len(types)} "
                     f"model_types: {', '.join(types)}")
    return lines


def summary(rows: list[dict[str, Any]], matrix: dict[str, dict[str, str]],
            previous: dict[str, dict[str, str]] | None, header: str,
            by_reach: list[str] | None = None) -> str:
    checks = sorted({c for verdicts in matrix.values() for c in verdicts})
    lines = ["# mlx-verify sweep", "", header, "",
             "| model_type | verdict | " + " | ".join(checks) + " | seconds |",
             "|---|---|" + "---|" * len(checks) + "---|"]
    for row in sorted(rows, key=lambda r: r["model_type"]):
        verdicts = matrix.get(row["model_type"], {})
        cells = [verdicts.get(c, "–") for c in checks]
        verdict = row["verdict"] + (f" (+{row['error_rows']} error rows)"
                                    if row.get("error_rows") and row["verdict"] != "error" else "")
        lines.append(f"| {row['model_type']} | {verdict} | " + " | ".join(cells)
                     + f" | {row['seconds']} |")
    lines += by_reach or []
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


def sweep(main: CliMain, model_types: list[str], out_dir: Path, options: list[str], jobs: int,
          fingerprint: dict[str, Any], previous_dir: Path | None = None,
          progress: Any = None) -> tuple[list[dict[str, Any]], Path]:
    """main: the CLI's entry point, run in each model_type's process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "rows": {}}  # new tree or options: start over
    (out_dir / "logs").mkdir(exist_ok=True)
    # The forkserver and every check forked from it inherit this environment.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # each check process uses one core: more threads per process would only contend
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(fast_blas_env())  # read when the forkserver starts
    mlx_lm_path = options[options.index("--mlx-lm") + 1] if "--mlx-lm" in options else None
    shim = Path(tempfile.mkdtemp(prefix="mlx-verify-sweep-"))
    context = start_forkserver(mlx_lm_path, shim)

    def done(model_type: str) -> bool:
        row = state["rows"].get(model_type)
        return (row is not None and row["verdict"] != "error"
                and (out_dir / f"{model_type}.json").exists())

    todo = [t for t in model_types if not done(t)]  # errors are tried again

    def one(model_type: str) -> dict[str, Any]:
        row = run_one(context, main, model_type, out_dir, options)
        if progress:
            progress(f"{model_type}: {row['verdict']} ({row['seconds']} s)")
        return row

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            # recorded as each finishes (not in order): an interrupted sweep keeps them all
            for future in as_completed([pool.submit(one, t) for t in todo]):
                row = future.result()
                state["rows"][row["model_type"]] = row
                state_file.write_text(json.dumps(state, indent=2))
    finally:
        shutil.rmtree(shim, ignore_errors=True)
    rows = [state["rows"][t] for t in model_types if t in state["rows"]]
    previous = None
    if previous_dir is not None:
        previous_types = [p.stem for p in previous_dir.glob("*.json") if p.stem != "sweep"]
        previous = checks_matrix(previous_dir, previous_types)
    header = (f"mlx-lm {fingerprint['mlx_lm']}, transformers {fingerprint['transformers']}, "
              f"mlx {fingerprint.get('mlx', '?')}, torch {fingerprint.get('torch', '?')}, "
              f"options `{' '.join(options) or '(defaults)'}`; {len(rows)} model_types")
    summary_file = out_dir / "summary.md"
    summary_file.write_text(summary(rows, checks_matrix(out_dir, model_types), previous, header,
                                    reach_lines(out_dir, model_types)))
    return rows, summary_file
