"""The server's collector (app/collector.py): what runners' verify jobs did becomes report
jobs, each event once, with real Redis, real rq workers and the fake GitHub. The session's
server runs its own collector thread beside the calls here: a concurrent collector."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from mlx_verify.app import collector
from tests.app.conftest import runner_finishes
from tests.app.test_webhook import queue_verify_job

OUTCOME = {"status": "done", "results": None, "errors": {"llama": "ImportError: boom"},
           "skipped": [], "planned": ["llama"], "model_types": ["llama"]}


def report_jobs(env, function: str) -> list[Job]:
    return [job for job in Queue("report", connection=env.redis,
                                 serializer=JSONSerializer).get_jobs()
            if job.func_name == f"mlx_verify.app.report.{function}"]


def test_concurrent_collectors_enqueue_each_finished_job_once(env):
    job_ids = [queue_verify_job(env, 60 + i)[1] for i in range(10)]
    for job_id in job_ids:
        runner_finishes(env.redis, job_id, OUTCOME)
    with ThreadPoolExecutor(4) as pool:  # and the server's own thread, every second
        enqueued = sum(pool.map(lambda _: collector.collect_outcomes(env.redis), range(8)))
    assert enqueued <= len(job_ids)
    finished = [job.args[0] for job in report_jobs(env, "verify_finished")]
    assert sorted(finished) == sorted(job_ids)  # each once, whoever enqueued it
    env.run_queue("report")
    for job_id in job_ids:
        assert env.redis.hget(f"mlxv:job:{job_id}", "state") == b"completed"
        run = env.github.check_runs[int(env.redis.hget(f"mlxv:job:{job_id}",
                                                       "check_run_id"))]
        assert (run["status"], run["conclusion"]) == ("completed", "failure")
    collector.collect_outcomes(env.redis)  # a round drops the jobs whose state ended
    assert not env.redis.smembers(collector.COLLECT_KEY)  # nothing left to watch
    # The verify job's result is cut to its summary once the run store holds it.
    summary = Job.fetch(job_ids[0], connection=env.redis,
                        serializer=JSONSerializer).return_value()
    assert summary["errors"] == OUTCOME["errors"] and "results" not in summary


def test_a_last_report_that_is_gone_is_enqueued_again(env):
    """A report job that failed for good or vanished (GitHub away past its retries, an
    operator's cleanup): the job is still active, so the next round enqueues it again and
    no Check Run is left in progress."""
    sha, job_id = queue_verify_job(env, 71)
    runner_finishes(env.redis, job_id, OUTCOME)
    collector.collect_outcomes(env.redis)
    (first,) = report_jobs(env, "verify_finished")
    first.delete()
    collector.collect_outcomes(env.redis)
    (again,) = report_jobs(env, "verify_finished")
    assert again.id != first.id
    collector.collect_outcomes(env.redis)  # pending now: not enqueued a third time
    assert len(report_jobs(env, "verify_finished")) == 1
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "failure")


def test_a_verify_job_gone_from_redis_is_reported_failed(env):
    sha, job_id = queue_verify_job(env, 72)
    Job.fetch(job_id, connection=env.redis, serializer=JSONSerializer).delete()
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "neutral")
    assert "gone from Redis" in run["output"]["summary"]
    assert env.redis.hget(f"mlxv:job:{job_id}", "state") == b"failed"


def test_jobs_queued_before_the_collector_are_adopted(env):
    sha, job_id = queue_verify_job(env, 73)
    env.redis.srem(collector.COLLECT_KEY, job_id)  # as start_verify did before 2026-12-04
    runner_finishes(env.redis, job_id, OUTCOME)
    assert collector.collect_outcomes(env.redis) == 0
    assert collector.adopt_active_jobs(env.redis) == 1
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "failure")


def test_a_job_being_enqueued_is_not_reported_gone(env):
    """start_verify watches a job before it enqueues it (so a failed enqueue is still
    reported): a collector round in between saw no rq job and failed a job about to be
    queued, which completed its Check Run with no runner (seen in CI). Within the grace
    and not yet enqueued it waits; past the grace it is reported gone."""
    job_id = "verify-99-being-enqueued"
    env.redis.hset(f"mlxv:job:{job_id}", mapping={"state": "queued", "repo": "o/r"})
    collector.watch(env.redis, job_id)
    assert collector.collect_outcomes(env.redis) == 0
    assert [job for job in report_jobs(env, "verify_failed") if job.args[0] == job_id] == []
    # an enqueue that never happened: past the grace the job is gone, and said so
    env.redis.hset(f"mlxv:job:{job_id}", collector.WATCHED_FIELD,
                   str(float(env.redis.hget(f"mlxv:job:{job_id}", collector.WATCHED_FIELD))
                       - collector.ENQUEUE_GRACE_S - 1))
    collector.collect_outcomes(env.redis)  # this round or the server's enqueues it, once
    (failed,) = [job for job in report_jobs(env, "verify_failed") if job.args[0] == job_id]
    env.redis.delete(f"mlxv:job:{job_id}")
    failed.delete()
