"""Collects what runners did and enqueues the report jobs for it, beside the server.

Runners cannot write into the report queue (deploy/redis-acl.sh): the report worker holds
the App key, so a runner able to enqueue there could have it run any report on any job.
A runner's only output is its own verify job: its status, its return value (the
VerifyOutcome, in rq's result stream of that job) and, when an attempt fails, the reason
in the job's meta (workers/verify.py on_verify_failure). This collector, run in a thread of
the server (app/server.py), reads those and enqueues, at most once per event:

  verify_started    the job's attempt started (once per attempt: its started_at)
  verify_requeued   an attempt ended without an outcome and rq retries it
  verify_finished   the job finished: the report job reads the outcome from the job
  verify_failed     the job failed for good, or is gone from Redis

The verify jobs it watches are in COLLECT_KEY, added by start_verify and removed here once
the job's state has ended (the report job wrote it, or it was superseded or cancelled). The
event and the note that it was enqueued go in one Redis transaction, under WATCH of the
job's state: a failed enqueue loses nothing (the next round tries again), and two
collectors (two server processes) never both enqueue it. A last event whose report job
failed for good (GitHub away past its retries) is enqueued again, so no Check Run is left
in progress.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from mlx_verify.workers.jobs import REPORT_QUEUE

log = logging.getLogger("mlx-verify.collector")

COLLECT_KEY = "mlxv:collect"  # verify job ids whose events are not all enqueued yet
# In mlxv:job:{id}: the marker of the last event enqueued for the job, and its report job.
COLLECTED_FIELD = "collected"
REPORT_FIELD = "collected_report"
ACTIVE_STATES = (b"queued", b"running")
WAITING = (JobStatus.QUEUED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value)
REPORT_RETRY = Retry(max=3, interval=[5, 30, 120])
# A watched job with no rq job yet is being enqueued (start_verify watches first, so a
# failed enqueue is still reported): only past this long, or once it was enqueued, does
# a missing rq job mean it is gone. Without it a round between the two calls failed a
# job that was about to be queued (seen in CI).
ENQUEUE_GRACE_S = 60.0
WATCHED_FIELD, ENQUEUED_FIELD = "watched_at", "enqueued_at"


def watch(connection: redis.Redis, job_id: str) -> None:
    """Start collecting a verify job's events (start_verify, before it enqueues)."""
    connection.hset(f"mlxv:job:{job_id}", WATCHED_FIELD, str(time.time()))
    connection.sadd(COLLECT_KEY, job_id)


def enqueued(connection: redis.Redis, job_id: str) -> None:
    """The watched job's rq job exists (start_verify, after it enqueues)."""
    connection.hset(f"mlxv:job:{job_id}", ENQUEUED_FIELD, str(time.time()))


def adopt_active_jobs(connection: redis.Redis) -> int:
    """Watch the active jobs queued before the collector existed (their runners enqueued
    report jobs themselves): run once when the server starts. The number adopted."""
    adopted = 0
    for key in connection.scan_iter(match="mlxv:job:*", count=500):
        if connection.hget(key, "state") in ACTIVE_STATES:
            adopted += connection.sadd(COLLECT_KEY, key.decode().removeprefix("mlxv:job:"))
    return adopted


def collect_outcomes(connection: redis.Redis) -> int:
    """One round over the watched verify jobs: the number of report jobs enqueued."""
    job_ids = [raw.decode() for raw in connection.smembers(COLLECT_KEY)]
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "started_at", "retries_left")
            pipe.hmget(f"mlxv:job:{job_id}", "state", COLLECTED_FIELD, REPORT_FIELD,
                       WATCHED_FIELD, ENQUEUED_FIELD)
        seen = pipe.execute()
    enqueued_count = 0
    for index, job_id in enumerate(job_ids):
        status, started_at, retries_left = (_text(v) for v in seen[2 * index])
        state, collected, report_id, watched_at, enqueued_at = seen[2 * index + 1]
        if state not in ACTIVE_STATES:  # reported, or ended elsewhere (superseded, ...)
            connection.srem(COLLECT_KEY, job_id)
            continue
        if status is None and enqueued_at is None and watched_at is not None and \
                time.time() - float(watched_at) < ENQUEUE_GRACE_S:
            continue  # start_verify is enqueueing it
        event = next_event(status, started_at, retries_left, _text(collected))
        if event is None:
            continue
        function, marker = event
        if marker == _text(collected):  # enqueued before; the job's state is still active
            if not report_gave_up(connection, _text(report_id)):
                continue
            log.warning("%s of %s failed for good; enqueued again", function, job_id)
        args: tuple[Any, ...] = (job_id,)
        if function in ("verify_failed", "verify_requeued"):
            args = (job_id, failure_reason(connection, job_id, status))
        enqueued_count += enqueue_once(connection, job_id, function, args, marker,
                                       (_text(collected), _text(report_id)))
    return enqueued_count


def report_gave_up(connection: redis.Redis, report_id: str | None) -> bool:
    """Whether the report job of a job's last event failed for good (GitHub away past its
    retries) or is gone: then the event is enqueued again, so that no Check Run is left
    queued or in progress while the collector runs."""
    if not report_id:
        return True
    status = _text(connection.hget(Job.key_for(report_id), "status"))
    return status is None or status in (JobStatus.FAILED.value, JobStatus.STOPPED.value,
                                         JobStatus.CANCELED.value)


def next_event(status: str | None, started_at: str | None, retries_left: str | None,
               collected: str | None) -> tuple[str, str] | None:
    """The report event the job's rq fields call for, given the marker of the last one
    enqueued: (report function, its marker), or None when there is nothing new to say."""
    if status is None:
        return "verify_failed", "failed"
    if status == JobStatus.FINISHED.value:
        return "verify_finished", "finished"
    if status in (JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value):
        return "verify_failed", "failed"
    if status == JobStatus.STARTED.value:
        marker = f"started {started_at}"
        return None if collected == marker else ("verify_started", marker)
    if status in WAITING and collected and collected.startswith("started "):
        # An attempt that started is waiting again: rq retries it after a failure.
        return "verify_requeued", f"requeued {retries_left}"
    return None


def failure_reason(connection: redis.Redis, job_id: str, status: str | None) -> str:
    """Why the job, or its last attempt, ended without an outcome, in one line."""
    if status is None:
        return "the verify job is gone from Redis (expired or deleted) before it finished"
    if status == JobStatus.STOPPED.value:
        return "the job was stopped"
    if status == JobStatus.CANCELED.value:
        return "the job was cancelled"
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return "the verify job is gone from Redis before it finished"
    noted = job.get_meta().get("failure")  # the runner's failure callback, workers/verify.py
    if isinstance(noted, str) and noted.strip():
        return noted.strip().splitlines()[0][:300]
    result = job.latest_result()
    text = (result.exc_string or "").strip() if result is not None else ""
    return text.splitlines()[-1][:300] if text else "the attempt ended without an outcome"


def enqueue_once(connection: redis.Redis, job_id: str, function: str, args: tuple[Any, ...],
                 marker: str, seen: tuple[str | None, str | None]) -> int:
    """Enqueue the report job and note it, in one transaction, if the job's note (marker,
    report job id) still reads `seen`, as this round saw it; 0 when another collector
    moved it first or the job's state ended meanwhile."""
    key = f"mlxv:job:{job_id}"
    queue = Queue(REPORT_QUEUE, connection=connection, serializer=JSONSerializer)
    with connection.pipeline() as pipe:
        try:
            pipe.watch(key)
            state, collected, report_id = pipe.hmget(key, "state", COLLECTED_FIELD,
                                                     REPORT_FIELD)
            if state not in ACTIVE_STATES or (_text(collected), _text(report_id)) != seen:
                return 0
            pipe.multi()
            report_job = queue.enqueue(
                f"mlx_verify.app.report.{function}", *args, retry=REPORT_RETRY,
                job_timeout=300, result_ttl=86400, failure_ttl=7 * 86400,
                description=f"{function} {job_id}", pipeline=pipe)
            pipe.hset(key, mapping={COLLECTED_FIELD: marker, REPORT_FIELD: report_job.id})
            pipe.execute()
        except redis.WatchError:
            return 0
    return 1


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
