"""Workers run only their role's job functions and callbacks (workers/jobs.py).

Whoever can write to a queue names the function rq imports. Each hostile job below is
written into a real Redis the way rq itself writes jobs, then taken by the worker that
production runs for that queue (workers.worker.make_worker); it must fail with the
refusal, and the function it names must never run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from mlx_verify.workers.jobs import REPORT_QUEUE, JobNotAllowed, RunnerJob
from mlx_verify.workers.worker import make_worker


def enqueue(connection: redis.Redis, queue: str, function: str, *args: object,
            **options: object) -> Job:
    return Queue(queue, connection=connection, serializer=JSONSerializer).enqueue(
        function, *args, **options)


def refusal(job: Job) -> str:
    job.refresh()
    assert job.get_status() == JobStatus.FAILED, job.get_status()
    return job.latest_result().exc_string or ""


def test_a_report_worker_refuses_a_function_of_its_choice(redis_url: str,
                                                          tmp_path: Path) -> None:
    connection = redis.Redis.from_url(redis_url)
    marker = tmp_path / "ran"
    job = enqueue(connection, REPORT_QUEUE, "os.system", f"touch {marker}")
    make_worker([REPORT_QUEUE], connection).work(burst=True)
    text = refusal(job)
    assert "this report worker runs only its own jobs; refused the job function 'os.system'" \
        in text
    assert not marker.exists()


def test_a_runner_refuses_a_report_job_and_a_hostile_callback(redis_url: str,
                                                              tmp_path: Path) -> None:
    connection = redis.Redis.from_url(redis_url)
    marker = tmp_path / "ran"
    # a report function on a runner queue: the runner must not act as the report worker
    report_job = enqueue(connection, "verify", "mlx_verify.app.report.verify_finished", "x", {})
    # the runner's own function, with a failure callback of the sender's choice
    hostile = enqueue(connection, "verify", "mlx_verify.workers.verify.run_verify",
                      {"not": "a spec"},
                      on_failure=Callback("os.system"))
    make_worker(["verify"], connection).work(burst=True)
    assert "refused the job function 'mlx_verify.app.report.verify_finished'" in refusal(report_job)
    hostile.refresh()
    assert hostile.get_status() == JobStatus.FAILED
    assert not marker.exists()
    # as the runner reads it, the callback resolves to the refusal, never to os.system
    as_runner = RunnerJob.fetch(hostile.id, connection=connection, serializer=JSONSerializer)
    with pytest.raises(JobNotAllowed, match="refused the callback 'os.system'"):
        as_runner.failure_callback(as_runner, connection, None, None, None)
    assert Job.fetch(hostile.id, connection=connection,
                     serializer=JSONSerializer).failure_callback is os.system  # the control


def test_report_jobs_queued_under_their_old_paths_still_run(redis_url: str) -> None:
    """The report job moved from workers/ to app/ (it holds the App key): a job queued
    before the move names workers.report.*, and resolves to the same function."""
    from mlx_verify.app import report
    from mlx_verify.workers.jobs import ReportJob

    connection = redis.Redis.from_url(redis_url)
    for path in ("workers.report.verify_started", "app.report.verify_started"):
        old = enqueue(connection, "report-old-paths", path, "nope")
        as_report_worker = ReportJob.fetch(old.id, connection=connection,
                                           serializer=JSONSerializer)
        assert as_report_worker.func is report.verify_started
        as_runner = RunnerJob.fetch(old.id, connection=connection, serializer=JSONSerializer)
        with pytest.raises(JobNotAllowed, match=path):
            as_runner.func("nope")


def test_verify_jobs_queued_before_the_mlx_verify_namespace_still_run(redis_url: str) -> None:
    """Before the packages imported as mlx_verify.*, a verify job named
    workers.verify.run_verify and its failure callback workers.verify.on_verify_failure."""
    from mlx_verify.workers import verify

    connection = redis.Redis.from_url(redis_url)
    old = enqueue(connection, "verify", "workers.verify.run_verify", {"not": "a spec"},
                  on_failure=Callback("workers.verify.on_verify_failure"))
    as_runner = RunnerJob.fetch(old.id, connection=connection, serializer=JSONSerializer)
    assert as_runner.func is verify.run_verify
    assert as_runner.failure_callback is verify.on_verify_failure
