"""`mlx-verify worker --queue NAME [--queue NAME ...] [--burst]`: a runner's rq worker.

A runner queue (`verify`, `verify-large`, ...) needs only REDIS_URL and GITHUB_GIT_URL
and must not be given the App key or webhook secret; the worker refuses to start when
the sandbox of workers/sandbox.py cannot be made here. (Queue `report` runs beside the
server with the App settings: app/worker.py.)
Jobs are JSON-serialized (never pickle: whoever can write to Redis could run code on
every worker), and each worker runs only its role's job functions (workers/jobs.py).
On macOS the spawn-based worker is used: MLX and Objective-C libraries are not
fork-safe.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import Any

from rq import SpawnWorker, Worker
from rq.serializers import JSONSerializer

from . import jobs, sandbox
from .jobs import REPORT_QUEUE
from .settings import SettingsError, connect_redis, load_runner_settings

JOB_MONITORING_INTERVAL = 15  # heartbeat period: a dead runner is noticed ~75 s later


def worker(args: argparse.Namespace) -> int:
    """Run a worker until stopped (or until the queues are empty with --burst)."""
    queues = args.queue if isinstance(args.queue, list) else [args.queue]
    if REPORT_QUEUE in queues:
        print("mlx-verify: error: the report queue runs beside the server, not on a runner",
              file=sys.stderr)
        return 2
    try:
        url = load_runner_settings().redis_url
        # A runner that cannot sandbox PR code does not start (fail closed).
        sandbox.probe(sandbox.load_sandbox_settings())
        connection = connect_redis(url)
    except (SettingsError, sandbox.SandboxUnavailable) as e:
        print(f"mlx-verify: error: {e}", file=sys.stderr)
        return 2
    return serve(queues, connection, bool(getattr(args, "burst", False)))


def serve(queues: list[str], connection: Any, burst: bool) -> int:
    """Take jobs from the queues until stopped (or until they are empty, with burst)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    make_worker(queues, connection).work(burst=burst, with_scheduler=True)
    return 0


def make_worker(queues: list[str], connection: Any) -> Worker:
    """The rq worker of these queues: JSON jobs, and only the job functions of its role
    (workers/jobs.py): the report worker's when it takes `report`, a runner's otherwise."""
    worker_class = SpawnWorker if sys.platform == "darwin" else Worker
    report = REPORT_QUEUE in queues
    job_class = jobs.ReportJob if report else jobs.RunnerJob
    # A runner's name has the prefix its Redis ACL user may write (deploy/redis-acl.sh).
    name = None if report else f"{jobs.RUNNER_WORKER_PREFIX}{uuid.uuid4().hex}"
    return worker_class(queues, name=name, connection=connection, serializer=JSONSerializer,
                        job_class=job_class, job_monitoring_interval=JOB_MONITORING_INTERVAL)
