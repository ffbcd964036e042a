"""The read-only pages: PR list, PR, runs, run (with its JSON and Markdown), queue and
the sweep matrix. With DASHBOARD_REQUIRE_LOGIN every one of them needs a login."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from mlx_verify.checks import render
from mlx_verify.checks import report as markdown
from mlx_verify.workers.jobs import VERIFY_FUNCTION, current_name

from .. import store
from . import PREFIX, Dashboard, DashboardRoute
from .auth import signed_in_to_read

PAGE_SIZE = 50


def router(dash: Dashboard) -> APIRouter:
    """Every GET page but sign-in."""
    connection = dash.connection
    routes = APIRouter(prefix=PREFIX, route_class=DashboardRoute,
                       dependencies=[Depends(signed_in_to_read(dash))])

    @routes.get("", response_class=HTMLResponse, include_in_schema=False)
    @routes.get("/", response_class=HTMLResponse)
    def pr_list_page(request: Request, repository: str = "", state: str = "",
                     verdict: str = "", page: int = 1) -> Response:
        page = max(1, page)
        rows, total = store.pr_list(
            connection, repository=repository or None,
            state=state if state in store.RUN_STATES else None,
            verdict=verdict if verdict in store.VERDICTS else None,
            offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        filters = {"repository": repository, "state": state, "verdict": verdict}
        return dash.render(request, "prs.html", rows=rows, total=total, page=page,
                           pages=max(1, math.ceil(total / PAGE_SIZE)), filters=filters,
                           repositories=store.repositories(connection),
                           states=store.RUN_STATES, verdicts=store.VERDICTS, now=time.time(),
                           filter_query=urlencode({k: v for k, v in filters.items() if v}))

    @routes.get("/prs/{owner}/{name}/{number}", response_class=HTMLResponse)
    def pr_page(request: Request, owner: str, name: str, number: int) -> Response:
        repository = f"{owner}/{name}"
        pr = store.get_pr(connection, repository, number)
        runs = store.runs_for_pr(connection, repository, number)
        if pr is None and not runs:
            return dash.message(request, "Not found", f"No runs of {repository}#{number}.", 404)
        # One row per pushed SHA (its newest run), newest push first.
        by_sha: dict[str, dict[str, Any]] = {}
        for run in runs:
            by_sha.setdefault(run.get("head_sha") or "", {**run, "attempts": 0, "regressed": []})
            by_sha[run.get("head_sha") or ""]["attempts"] += 1
        pushes = list(by_sha.values())
        columns = sorted({(mt, c) for run in pushes for mt, checks in run["matrix"].items()
                          for c in checks})
        # A regression: a cell that passed on the previous (older) push and not now.
        for newer, older in zip(pushes, pushes[1:], strict=False):
            newer["regressed"] = [
                f"{mt}/{c}" for mt, c in columns
                if older["matrix"].get(mt, {}).get(c) == "pass"
                and newer["matrix"].get(mt, {}).get(c) in ("fail", "error")]
        return dash.render(request, "pr.html", repository=repository, number=number,
                           pr=pr or {}, pushes=pushes, columns=columns, runs=runs, now=time.time())

    @routes.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request, model_type: str = "", page: int = 1) -> Response:
        page = max(1, page)
        offset = (page - 1) * PAGE_SIZE
        if model_type:
            runs = store.runs_for_model_type(connection, model_type, offset, PAGE_SIZE)
        else:
            runs = store.recent_runs(connection, offset, PAGE_SIZE)
        return dash.render(request, "runs.html", runs=runs, model_type=model_type, page=page,
                           has_more=len(runs) == PAGE_SIZE, now=time.time())

    @routes.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> Response:
        run = store.get_run(connection, run_id)
        if run is None:
            return dash.message(request, "Not found", f"No stored run {run_id}.", 404)
        charts = {}
        if run.results is not None:
            for r_index, report in enumerate(run.results.reports):
                for c_index, check in enumerate(report.checks):
                    if check.layers:
                        charts[(r_index, c_index)] = render.layer_chart(check)
        reproduce = run.results.command if run.results is not None else ""
        if run.kind == "pr" and run.repository and run.head_sha and run.pr is not None:
            from ..comment import reproduce as reproduce_lines

            lines = reproduce_lines(run.repository, run.pr, run.head_sha,
                                    run.model_types(), run.request)
            reproduce = "\n".join(line for line in lines if not line.startswith("```"))
        return dash.render(request, "run.html", run=run, meta=run.meta(), charts=charts,
                           reproduce=reproduce, attempts=attempts_of(connection, run),
                           now=time.time())

    @routes.get("/runs/{run_id}/results.json")
    def run_json(request: Request, run_id: str) -> Response:
        run = store.get_run(connection, run_id)
        if run is None or run.results is None:
            return JSONResponse({"error": "no results for this run"}, status_code=404)
        return Response(run.results.model_dump_json(indent=2), media_type="application/json",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{_safe(run_id)}.json"'})

    @routes.get("/runs/{run_id}/report.md")
    def run_markdown(request: Request, run_id: str) -> Response:
        run = store.get_run(connection, run_id)
        if run is None or run.results is None:
            return Response("no results for this run\n", status_code=404,
                            media_type="text/plain")
        return Response(markdown.render(run.results), media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{_safe(run_id)}.md"'})

    @routes.get("/queue", response_class=HTMLResponse)
    def queue_page(request: Request) -> Response:
        queues = []
        for name in queue_names(connection):
            queue = Queue(name, connection=connection, serializer=JSONSerializer)
            sections = []
            for label, ids, total in (
                ("queued", queue.get_job_ids(0, 49), queue.count),
                ("running", queue.started_job_registry.get_job_ids(0, 49),
                 queue.started_job_registry.count),
                ("failed", queue.failed_job_registry.get_job_ids(0, 49),
                 queue.failed_job_registry.count),
                ("finished", queue.finished_job_registry.get_job_ids(0, 49),
                 queue.finished_job_registry.count),
            ):
                jobs = [job_row(j) for j in Job.fetch_many(ids, connection=connection,
                                                           serializer=JSONSerializer) if j]
                sections.append({"label": label, "jobs": jobs, "total": total})
            queues.append({"name": name, "sections": sections})
        workers = []
        for worker in Worker.all(connection=connection, serializer=JSONSerializer):
            names = worker.queue_names()
            workers.append({"name": worker.name, "hostname": worker.hostname or "",
                            "pid": worker.pid, "queues": names,
                            "memory_class": memory_class(names), "state": worker.get_state(),
                            "heartbeat": worker.last_heartbeat.timestamp()
                            if worker.last_heartbeat else None,
                            "job": worker.get_current_job_id() or ""})
        known = set(store.get_run_ids(connection, [j["id"] for q in queues
                                                   for s in q["sections"] for j in s["jobs"]]))
        return dash.render(request, "queue.html", queues=queues, workers=workers, known=known,
                           now=time.time())

    @routes.get("/matrix", response_class=HTMLResponse)
    def matrix_page(request: Request, sweep: str = "", compare: str = "") -> Response:
        sweeps = store.list_sweeps(connection)
        chosen = next((s for s in sweeps if s["id"] == sweep), sweeps[0] if sweeps else None)
        matrix, checks, changes, previous, other_environments = {}, [], [], None, []
        if chosen is not None:
            matrix = store.sweep_matrix(connection, chosen)
            checks = sorted({c for row in matrix.values() for c in row["checks"]})
            index = sweeps.index(chosen)
            # the same mlx-lm tree swept under another environment (a newer transformers)
            other_environments = [s for s in sweeps if s["id"] != chosen["id"]
                                  and s["mlx_lm"] == chosen["mlx_lm"]
                                  and s["transformers"] != chosen["transformers"]]
            previous = next((s for s in sweeps if s["id"] == compare and s is not chosen),
                            sweeps[index + 1] if index + 1 < len(sweeps) else None)
            if previous is not None:
                before = store.sweep_matrix(connection, previous)
                for model_type in sorted(set(matrix) | set(before)):
                    old = before.get(model_type, {"checks": {}, "run": None})
                    new = matrix.get(model_type, {"checks": {}, "run": None})
                    for check in sorted(set(old["checks"]) | set(new["checks"])):
                        a, b = old["checks"].get(check), new["checks"].get(check)
                        if a != b:
                            changes.append({"model_type": model_type, "check": check,
                                            "before": a or "absent", "after": b or "absent",
                                            "before_run": old["run"], "after_run": new["run"]})
        return dash.render(request, "matrix.html", sweeps=sweeps, chosen=chosen, matrix=matrix,
                           checks=checks, changes=changes, previous=previous,
                           other_environments=other_environments)

    return routes


def attempts_of(connection: redis.Redis, run: store.Run) -> list[tuple[int, str]]:
    """(attempt, run id) of every kept attempt of this run's job, oldest first; the
    job id itself holds the latest (store.record_job)."""
    if run.kind != "pr":
        return []
    job_id = run.id.split(".", 1)[0]
    latest = store.get_metas(connection, [job_id])
    count = int(latest[0].get("attempt") or 1) if latest else run.attempt
    if count <= 1:
        return []
    ids = [f"{job_id}.{n}" for n in range(1, count)] + [job_id]
    kept = set(store.get_run_ids(connection, ids))
    return [(n, i) for n, i in enumerate(ids, start=1) if i in kept]


# ---- queue helpers ---------------------------------------------------------------------

def queue_names(connection: redis.Redis) -> list[str]:
    from .. import report

    names = {report.REPORT_QUEUE, report.VERIFY_QUEUE}
    names |= {raw.decode() for raw in connection.smembers(report.VERIFY_QUEUES_KEY)}
    return sorted(names)


def memory_class(queues: list[str]) -> str:
    from .. import report

    if report.LARGE_VERIFY_QUEUE in queues:
        return "large"
    if any(q != report.REPORT_QUEUE for q in queues):
        return "standard"
    return "server (report jobs)"


def job_repository(connection: redis.Redis, job: Job) -> str | None:
    """The repository a job acts on, from its own arguments or the report job's state."""
    args = list(job.args or [])
    if current_name(job.func_name) == VERIFY_FUNCTION and args and isinstance(args[0], dict):
        return args[0].get("repo")
    if current_name(job.func_name) == "mlx_verify.app.report.handle_event" \
            and len(args) >= 3:
        return ((args[2] or {}).get("repository") or {}).get("full_name")
    if args and isinstance(args[0], str):
        repo = connection.hget(f"mlxv:job:{args[0]}", "repo")
        return repo.decode() if repo else None
    return None


def job_row(job: Job) -> dict[str, Any]:
    def ts(value: datetime | None) -> float | None:
        return value.timestamp() if value else None

    return {"id": job.id, "description": job.description or job.func_name,
            "func": job.func_name, "status": job.get_status(refresh=False),
            "enqueued": ts(job.enqueued_at), "started": ts(job.started_at),
            "ended": ts(job.ended_at), "worker": job.worker_name or "",
            "verify": current_name(job.func_name) == VERIFY_FUNCTION}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]

