"""The webhook server: `mlx-verify serve`.

POST /webhook checks the signature over the raw body before anything else, drops
redelivered deliveries (X-GitHub-Delivery, SET NX in Redis), and hands every event it
acts on to a `report` job: the reply comes in milliseconds and nothing slow (GitHub
reads, planning, checks) runs inline. GET /healthz reports Redis and the queues.

Three background threads: the collector (app/collector.py) turns what runners' verify
jobs did into report jobs, every second; the sweeper cleans the started-job registries of
the verify and report queues, so a job whose worker died mid-job is retried or has its
Check Run completed within about two minutes; the scheduler moves due retries to their
queues whenever rq's scheduler lock of a queue is free (a worker that died keeps it about
a minute, and rq's workers try again only every 10 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from githubkit.webhooks import verify as verify_signature
from rq import Queue, Retry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from . import collector, report
from .commands import find_command_line
from .dashboard import DashboardSettings, dashboard_router, load_dashboard_settings
from .settings import AppSettings, SettingsError, connect_redis, load_app_settings

log = logging.getLogger("mlx-verify.server")

MAX_BODY_BYTES = 5 * 1024 * 1024  # GitHub caps payloads at 25 MB; ours are far smaller
DELIVERY_TTL = 7 * 86400
SWEEP_INTERVAL_S = 30.0
COLLECT_INTERVAL_S = 1.0
HANDLED_EVENTS = ("pull_request", "issue_comment", "check_run", "check_suite")
SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")


def wanted(event: str, payload: dict[str, Any]) -> bool:
    """Whether a delivery needs a report job at all (cheap checks on the payload)."""
    action = payload.get("action")
    if event == "pull_request":
        return action in report.PR_ACTIONS or action == "closed"
    if event == "issue_comment":
        return action == "created" and \
            find_command_line((payload.get("comment") or {}).get("body")) is not None
    if event in ("check_run", "check_suite"):
        return action == "rerequested"
    return False


def create_app(settings: AppSettings, connection: redis.Redis,
               sweep_interval_s: float = SWEEP_INTERVAL_S,
               dashboard: DashboardSettings | None = None,
               collect_interval_s: float = COLLECT_INTERVAL_S) -> FastAPI:
    """The webhook server with the dashboard under /dashboard (its settings from the
    environment unless given)."""
    report_queue = Queue(report.REPORT_QUEUE, connection=connection, serializer=JSONSerializer)
    stop = threading.Event()

    def sweeper() -> None:
        while not stop.wait(sweep_interval_s):
            try:
                report.sweep_abandoned(connection)
            except Exception as e:  # Redis away for a moment: try again next round
                log.warning("sweep failed: %s", e)

    def schedule() -> None:
        scheduler, queues = None, []
        while not stop.wait(collect_interval_s):
            try:
                if report.job_queues(connection) != queues:
                    if scheduler is not None:
                        scheduler.release_locks()
                    queues = report.job_queues(connection)
                    scheduler = RQScheduler(queues, connection=connection,
                                            serializer=JSONSerializer)
                report.enqueue_due_jobs(scheduler)
            except Exception as e:  # Redis away for a moment: try again next round
                log.warning("scheduling failed: %s", e)
        if scheduler is not None:
            with contextlib.suppress(redis.RedisError):
                scheduler.release_locks()

    def collect() -> None:
        adopted = False
        while not stop.wait(collect_interval_s):
            try:
                if not adopted:  # jobs queued before the collector existed
                    collector.adopt_active_jobs(connection)
                    adopted = True
                collector.collect_outcomes(connection)
            except Exception as e:  # Redis away for a moment: try again next round
                log.warning("collect failed: %s", e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = [threading.Thread(target=sweeper, name="mlx-verify-sweeper", daemon=True),
                   threading.Thread(target=collect, name="mlx-verify-collector", daemon=True),
                   threading.Thread(target=schedule, name="mlx-verify-scheduler", daemon=True)]
        for thread in threads:
            thread.start()
        yield
        stop.set()

    app = FastAPI(title="mlx-verify", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"error": "body too large"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
        signature = request.headers.get("x-hub-signature-256", "")
        # Only "sha256=" and hex digits: anything else (non-ASCII, sha1=) is refused before
        # hmac.compare_digest, which raises on non-ASCII text.
        if not SIGNATURE.fullmatch(signature) or \
                not verify_signature(settings.webhook_secret, body, signature):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        event = request.headers.get("x-github-event", "")
        delivery = request.headers.get("x-github-delivery", "")
        if not event or not delivery or len(delivery) > 100:
            return JSONResponse({"error": "missing event or delivery header"},
                                status_code=400)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "body is not a JSON object"}, status_code=400)
        if event == "ping":
            return JSONResponse({"status": "pong"})
        if event.startswith("installation"):
            log.info("installation event %s/%s", event, payload.get("action"))
            return JSONResponse({"status": "acknowledged"})
        if event not in HANDLED_EVENTS or not wanted(event, payload):
            return JSONResponse({"status": "ignored"})
        delivery_key = f"mlxv:delivery:{delivery}"
        try:
            if event == "pull_request":
                # When each head SHA became the PR's head, as seen here: /verify runs
                # only on a head that was there before the command was written.
                report.note_head_seen(connection, payload)
            if not connection.set(delivery_key, 1, nx=True, ex=DELIVERY_TTL):
                return JSONResponse({"status": "duplicate delivery"})
        except redis.RedisError as e:
            log.error("webhook %s not accepted: %s", delivery, e)
            return JSONResponse({"error": "queue unavailable"}, status_code=503)
        safe_delivery = "".join(c if c.isalnum() or c in "-_" else "_" for c in delivery)
        try:
            job = report_queue.enqueue(
                "mlx_verify.app.report.handle_event", event, delivery, payload,
                job_id=f"event-{safe_delivery}", retry=Retry(max=3, interval=[5, 30, 120]),
                job_timeout=600, result_ttl=86400, failure_ttl=7 * 86400,
                description=f"{event}.{payload.get('action')} {delivery}")
        except redis.RedisError as e:
            # Not queued: forget the delivery, so that a redelivery is taken.
            log.error("webhook %s not queued: %s", delivery, e)
            try:
                connection.delete(delivery_key)
            except redis.RedisError:
                log.error("delivery key %s left behind: redelivery is dropped until it "
                          "expires", delivery_key)
            return JSONResponse({"error": "queue unavailable"}, status_code=503)
        return JSONResponse({"status": "queued", "job": job.id}, status_code=202)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            connection.ping()
        except redis.RedisError as e:
            return JSONResponse({"redis": f"down: {e}"}, status_code=503)
        queues = {report.REPORT_QUEUE: report_queue.count}
        for raw in sorted(connection.smembers(report.VERIFY_QUEUES_KEY)):
            name = raw.decode()
            queue = Queue(name, connection=connection, serializer=JSONSerializer)
            queues[name] = queue.count
            queues[f"{name}:started"] = queue.started_job_registry.count
            queues[f"{name}:failed"] = queue.failed_job_registry.count
        return JSONResponse({"redis": "ok", "queues": queues})

    app.include_router(dashboard_router(settings, connection, dashboard))
    return app


def serve(args: argparse.Namespace) -> int:
    """`mlx-verify serve [--host H] [--port P]`; 2 with one line on a bad setting."""
    try:
        settings = load_app_settings()
        connection = connect_redis(settings.redis_url)
        dashboard = load_dashboard_settings()  # a bad one stops start-up with one line
    except SettingsError as e:
        print(f"mlx-verify: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(settings, connection, dashboard=dashboard),
                host=getattr(args, "host", "127.0.0.1"),
                port=int(getattr(args, "port", 8000)), log_level="info",
                timeout_graceful_shutdown=10)
    return 0
