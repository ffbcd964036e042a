"""Page render times of the dashboard with 1,000 and 10,000 stored runs.

Synthetic runs are built from one real results JSON (`mlx-verify check ... --json`):
PR runs (5 pushes per PR, over 3 repositories, about a fifth failing) and sweeps (the
same results renamed to 80 model_types). Each page is served by uvicorn on loopback
(the app as deployed: app.server.create_app with the dashboard router) against a
redis-server started here (AOF on), and fetched over HTTP.

    .venv/bin/python bench/bench_dashboard.py --results RESULTS.json [--runs 1000,10000]

Without --results it runs `mlx-verify check llama --checks layers --variants default`
once to get one. Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
import uvicorn
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_verify.app import store  # noqa: E402
from mlx_verify.app.dashboard import DashboardSettings, dashboard_router  # noqa: E402
from mlx_verify.checks.schema import Results  # noqa: E402

REPOS = ("ml-explore/mlx-lm", "ml-explore/mlx-lm-fork", "someone/mlx-lm")
RUNS_PER_PR = 5
SWEEP_TYPES = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_results(path: str | None, work: Path) -> Results:
    if path is None:
        path = str(work / "llama.json")
        subprocess.run([str(Path(sys.executable).with_name("mlx-verify")), "check", "llama",
                        "--checks", "layers", "--variants", "default", "--json", path],
                       check=False, capture_output=True)
    return Results.model_validate_json(Path(path).read_text())


def failing(results: Results) -> Results:
    """The same results with the last stages over tolerance (a synthetic failure)."""
    data = results.model_dump(mode="json")
    for report in data["reports"]:
        report["verdict"] = "fail"
        for check in report["checks"]:
            check["verdict"] = "fail"
            if check["layers"]:
                for row in check["layers"][len(check["layers"]) // 2:]:
                    row.update(rel_l2=0.1, ok=False)
                check["first_divergent_layer"] = check["layers"][len(check["layers"]) // 2][
                    "name"]
    return Results.model_validate(data)


def seed(connection: redis.Redis, total: int, good: Results, bad: Results) -> dict[str, str]:
    """`total` runs: two sweeps of SWEEP_TYPES model_types, the rest PR runs."""
    now = time.time()
    examples: dict[str, str] = {}
    for s in range(2):
        fingerprint = {"mlx_lm": f"0.32.{s} main", "transformers": "5.23.0", "options": []}
        for i in range(SWEEP_TYPES):
            model_type = f"arch{i:03d}"
            data = (bad if (i + s) % 7 == 0 else good).model_dump(mode="json")
            for report in data["reports"]:
                report["model_type"] = model_type
            run = store.record_sweep_result(
                connection, fingerprint, {"model_type": model_type, "seconds": 20.0},
                Results.model_validate(data))
            examples.setdefault("sweep", run.sweep_id or "")
    pr_runs = total - 2 * SWEEP_TYPES
    for i in range(pr_runs):
        number, push = 1000 + i // RUNS_PER_PR, i % RUNS_PER_PR
        repo = REPOS[number % len(REPOS)]
        results = bad if (number + push) % 5 == 0 else good
        run = store.Run(
            id=f"verify-{number}-{push:012x}-{i:016x}", repository=repo, pr=number,
            title=f"port model {number}", head_sha=f"{number:020x}{push:020x}",
            request={"model_types": ["llama"], "checks": ["layers"], "dtype": "float32",
                     "source": "auto"},
            state="done", queued_at=now - (pr_runs - i) * 60, started_at=now - 50,
            finished_at=now - 30, results=results, logs="tail of stderr\n" * 20)
        store.record_run(connection, run)
        examples["run"], examples["repo"], examples["pr"] = run.id, repo, str(number)
    return examples


class Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        pass


def measure(base: str, paths: dict[str, str], repeat: int) -> dict[str, tuple[float, float]]:
    out = {}
    with httpx.Client(timeout=30) as client:
        for name, path in paths.items():
            answer = client.get(base + path)  # warm-up (template compile, connection)
            assert answer.status_code == 200, (path, answer.status_code)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                answer = client.get(base + path)
                times.append((time.perf_counter() - start) * 1000)
                assert answer.status_code == 200
            times.sort()
            out[name] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", help="a results JSON of `mlx-verify check`")
    parser.add_argument("--runs", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    good = real_results(args.results, work)
    bad = failing(good)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--dir", str(work), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    connection = redis.Redis(port=port)
    for _ in range(100):
        try:
            connection.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    config = DashboardSettings(False, None, None, None, "https://github.com",
                               "https://api.github.com", None, False)
    app = FastAPI()
    app.include_router(dashboard_router(None, connection, config))
    http_port = free_port()
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{http_port}/dashboard"
    rows: dict[int, dict[str, tuple[float, float]]] = {}
    try:
        for total in (int(n) for n in args.runs.split(",")):
            connection.flushdb()
            start = time.perf_counter()
            ex = seed(connection, total, good, bad)
            seeded = time.perf_counter() - start
            memory = connection.info("memory")["used_memory"] / 1e6
            print(f"seeded {store.count_runs(connection)} runs in {seeded:.1f} s; "
                  f"Redis used_memory {memory:.0f} MB", file=sys.stderr)
            paths = {
                "PR list": "/",
                "PR list, filtered (repository, verdict, state)":
                    f"/?repository={ex['repo']}&verdict=fail&state=done",
                "PR list, page 10": "/?page=10",
                "PR page": f"/prs/{ex['repo']}/{ex['pr']}",
                "run page (chart, tables)": f"/runs/{ex['run']}",
                "runs, recent": "/runs",
                "runs of one model_type": "/runs?model_type=llama",
                "queue": "/queue",
                "architecture matrix (80 model_types, changes)": f"/matrix?sweep={ex['sweep']}",
                "results JSON": f"/runs/{ex['run']}/results.json",
                "Markdown report": f"/runs/{ex['run']}/report.md",
            }
            rows[total] = measure(base, paths, args.repeat)
    finally:
        server.should_exit = True
        thread.join(10)
        process.terminate()
        process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    totals = sorted(rows)
    print("| page | " + " | ".join(f"{t:,} runs: median / p95 (ms)" for t in totals) + " |")
    print("|---|" + "---|" * len(totals))
    for name in rows[totals[0]]:
        cells = [f"{rows[t][name][0]:.1f} / {rows[t][name][1]:.1f}" for t in totals]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({"results_bytes": len(good.model_dump_json())}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
