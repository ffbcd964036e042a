"""Typed, versioned job arguments (workers/jobs.py): the verify spec the server queues for
runners and the outcome runners queue back. A job whose arguments a worker cannot read
fails with one line, is recorded as failed, and can be re-run; it never reaches the
checks. Jobs go through real Redis, real rq workers and the webhook server."""

from __future__ import annotations

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from mlx_verify.app import store
from mlx_verify.workers.jobs import (
    JOB_SPEC_VERSION,
    OUTCOME_VERSION,
    JobSpecError,
    VerifyOutcome,
    VerifySpec,
)

LLAMA = "mlx_lm/models/llama.py"
HARMLESS = ("import mlx.core as mx", "import mlx.core as mx  # ok")


def queued_job(env, number: int) -> tuple[str, dict, Job]:
    """An opened PR whose verify job waits for a runner: (sha, its check run, the job)."""
    sha, files = env.git_host.make_pr(number, {LLAMA: HARMLESS})
    env.open_pr(number, sha, files)
    assert env.send("pull_request", env.payload("pull_request.opened.payload.json",
                                                number=number, sha=sha)).status_code == 202
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    return sha, run, Job.fetch(run["external_id"], connection=env.redis,
                               serializer=JSONSerializer)


def rewrite_spec(job: Job, **changes: object) -> None:
    """What an older or newer server (or a hand-edited queue) leaves in Redis."""
    spec = dict(job.args[0])
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    job.args = [spec]
    job.save()


@pytest.mark.parametrize(("changes", "expected"), [
    ({"version": 2}, "JobSpecError: verify job spec has version 2; this worker reads "
                     f"version {JOB_SPEC_VERSION}"),
    ({"sha": "not-a-sha"}, "JobSpecError: verify job spec: sha: String should match pattern"),
    ({"request": {"dtype": "float64"}}, "JobSpecError: verify job spec: request.dtype: "
                                        "Input should be 'float32', 'bfloat16' or 'float16'"),
    ({"runner_shell": "rm -rf /"}, "JobSpecError: verify job spec: runner_shell: Extra "
                                   "inputs are not permitted"),
], ids=["unknown-version", "bad-sha", "bad-dtype", "unknown-field"])
def test_a_spec_the_runner_cannot_read_fails_once_with_one_line_and_can_be_rerun(
        env, changes, expected):
    sha, run, job = queued_job(env, 40)
    assert job.args[0]["version"] == JOB_SPEC_VERSION  # the server writes the version
    rewrite_spec(job, **changes)
    env.run_queue("verify")
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    verify = Queue("verify", connection=env.redis, serializer=JSONSerializer)
    assert verify.scheduled_job_registry.get_job_ids() == []  # not retried: same spec, same end
    env.run_queue("report")
    done = env.github.check_runs[run["id"]]
    assert (done["status"], done["conclusion"]) == ("completed", "neutral")
    summary = done["output"]["summary"]
    assert expected in summary, summary
    reason = summary.split("The checks could not run: ", 1)[1].split(". Nothing is known")[0]
    assert "\n" not in reason and "Traceback" not in summary
    assert env.redis.hget(f"mlxv:job:{job.id}", "state") == b"failed"
    assert store.get_run(env.redis, job.id).state == "failed"
    assert env.comments(40) == []

    # The Re-run button queues the job again, with a spec the runner reads.
    rerun = env.payload("check_run.rerequested.payload.json")
    rerun["check_run"].update(head_sha=sha, external_id=job.id,
                              pull_requests=[{"number": 40}])
    env.send("check_run", rerun)
    env.run_queue("report")
    again = Job.fetch(job.id, connection=env.redis, serializer=JSONSerializer)
    assert again.get_status() == JobStatus.QUEUED
    VerifySpec.read(again.args[0], "verify job spec")  # valid again


def test_an_outcome_the_report_worker_cannot_read_is_recorded_as_failed(env):
    from tests.app.conftest import runner_finishes

    _, run, job = queued_job(env, 41)
    runner_finishes(env.redis, job.id, {"status": "exploded", "results": None})
    env.run_queue("report")
    done = env.github.check_runs[run["id"]]
    assert (done["status"], done["conclusion"]) == ("completed", "neutral")
    assert "could not run: the runner's outcome: status: Input should be 'done'" in \
        done["output"]["summary"]
    assert env.redis.hget(f"mlxv:job:{job.id}", "state") == b"failed"
    assert env.comments(41) == []


def test_report_jobs_runners_queued_before_the_collector_still_report(env):
    """Before 2026-12-04 runners enqueued verify_started / verify_finished themselves, with
    the outcome as an argument: such jobs, already in the report queue, still run."""
    _, run, job = queued_job(env, 42)
    report = Queue("report", connection=env.redis, serializer=JSONSerializer)
    report.enqueue("mlx_verify.app.report.verify_started", job.id,
                   job_id="runner-report-old-1")
    report.enqueue("mlx_verify.app.report.verify_finished", job.id,
                   {"status": "done", "results": None, "errors": {"llama": "E: boom"},
                    "skipped": [], "planned": ["llama"], "model_types": ["llama"]},
                   job_id="runner-report-old-2")
    env.run_queue("report")
    done = env.github.check_runs[run["id"]]
    assert done["_history"][:3] == ["queued", "in_progress", "completed"]
    assert done["conclusion"] == "failure"
    assert "E: boom" in env.comments(42)[0]["body"]
    assert env.redis.hget(f"mlxv:job:{job.id}", "state") == b"completed"


def test_specs_queued_before_versioning_still_read_and_reads_are_one_line():
    old = {"job_id": "verify-1-abc", "repo": "o/r", "number": 1, "sha": "a" * 40,
           "base_sha": None, "baseline": True, "changed_files": [LLAMA],
           "request": {"model_types": [], "hub": [], "checks": ["layers"],
                       "dtype": "float32", "source": "auto"},
           "auto_model_types": None, "max_model_types": 24}
    spec = VerifySpec.read(old, "verify job spec")
    assert spec.version == JOB_SPEC_VERSION and spec.request.checks == ["layers"]
    # an outcome of a runner before versioning (v1): no cross-checks, and it stays v1
    assert VerifyOutcome.read({"status": "stale"}, "outcome").to_json() == \
        {"version": 1, "status": "stale", "errors": {}, "skipped": [],
         "planned": [], "model_types": [], "truncated": False, "base_errors": {},
         "cross_checks": []}
    # v2 carries the final logits measured outside the sandbox; v3 is refused, in one line
    checked = {"model_type": "llama", "verdict": "pass", "claimed": "pass", "rel_l2": 1e-7,
               "bound": 1e-5, "tokens": 48}
    read = VerifyOutcome.read({"version": OUTCOME_VERSION, "status": "done",
                               "cross_checks": [checked]}, "outcome")
    assert OUTCOME_VERSION == 2 and read.version == 2
    assert read.cross_checks[0].verdict == "pass" and not read.cross_checks[0].contradicts
    assert VerifyOutcome.model_validate({"status": "done"}).version == OUTCOME_VERSION
    with pytest.raises(JobSpecError, match="^outcome has version 3; this worker reads "
                                           "version 1 or 2 "):
        VerifyOutcome.read({"version": 3, "status": "done"}, "outcome")
    for bad, message in ((["a list"], "verify job spec: expected a JSON object, got list"),
                         ({**old, "number": "many"}, "verify job spec: number: Input should "
                                                     "be a valid integer")):
        with pytest.raises(JobSpecError) as caught:
            VerifySpec.read(bad, "verify job spec")
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
