"""`mlx-verify worker --queue report`: the report worker, beside the server.

It does every GitHub write, so it needs the App settings (app/settings.py) and runs only
the report job's functions (workers/jobs.py ReportJob); runners use workers/worker.py.
"""

from __future__ import annotations

import argparse
import sys

from mlx_verify.workers.jobs import REPORT_QUEUE
from mlx_verify.workers.worker import serve

from .settings import SettingsError, connect_redis, load_app_settings


def worker(args: argparse.Namespace) -> int:
    """Run the report worker until stopped (or until its queue is empty with --burst)."""
    queues = args.queue if isinstance(args.queue, list) else [args.queue]
    if queues != [REPORT_QUEUE]:
        print(f"mlx-verify: error: the report worker takes only --queue {REPORT_QUEUE} "
              "(runner queues run on runners)", file=sys.stderr)
        return 2
    try:
        connection = connect_redis(load_app_settings().redis_url)
    except SettingsError as e:
        print(f"mlx-verify: error: {e}", file=sys.stderr)
        return 2
    return serve(queues, connection, bool(getattr(args, "burst", False)))
