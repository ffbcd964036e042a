"""Dashboard actions on real jobs: cancel a verify job while a real runner (rq worker
process) is inside `mlx-verify check`, and retry a report job that failed because GitHub
did not answer. Real redis-server, real rq workers, the fake GitHub over HTTP, a real
git host built from the installed mlx_lm; Debian Chromium clicks the buttons."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from mlx_verify.app import github, report, store
from mlx_verify.app.commands import VerifyRequest
from tests.app import fake_github
from tests.app.conftest import (
    descendants,
    start_worker_process,
    wait_until,
    webhook_payload,
)

from .conftest import MAINTAINER, REPO, screenshot, sign_in

LLAMA = "mlx_lm/models/llama.py"
# The PR's llama.py hangs on import: the runner stays inside `mlx-verify check`.
HANG = ("import mlx.core as mx", "import time as _t\n_t.sleep(3600)\nimport mlx.core as mx")


def worker_env(live, tmp_path, git_host=None) -> dict[str, str]:
    """What the report worker and the runner read (app/settings.py, workers/verify.py)."""
    port = live.connection.connection_pool.connection_kwargs["port"]
    return {
        "GITHUB_APP_ID": str(live.settings.app_id),
        "GITHUB_PRIVATE_KEY": live.settings.private_key,
        "GITHUB_WEBHOOK_SECRET": live.settings.webhook_secret,
        "GITHUB_API_URL": live.fake.url,
        "GITHUB_GIT_URL": f"file://{git_host.root}" if git_host else live.fake.url,
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "VERIFY_WORK_DIR": str(tmp_path / "jobs"),
        "VERIFY_BASELINE": "0",
    }


def run_report_queue(live) -> None:
    """An in-process burst report worker, as tests/app runs it."""
    from mlx_verify.workers.worker import make_worker

    make_worker([report.REPORT_QUEUE], live.connection).work(burst=True)


def check_processes(pid: int) -> list[int]:
    """`mlx-verify check` processes below pid."""
    found = []
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"mlx_verify.checks.cli" in open(f"/proc/{child}/cmdline", "rb").read():
                found.append(child)
    return found


def test_cancel_stops_a_running_job(page, live, git_host, monkeypatch, tmp_path):
    env = worker_env(live, tmp_path, git_host)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sha, files = git_host.make_pr(21, {LLAMA: HANG})
    live.fake.github.pulls[(REPO, 21)] = fake_github.Pull(21, sha, git_host.base_sha, files,
                                                          MAINTAINER)
    gh = github.installation_client(live.settings, live.connection,
                                    live.fake.github.installation_id)
    request = VerifyRequest(model_types=("llama",), checks=("layers",), source="command")
    started = report.start_verify(live.settings, live.connection, gh,
                                  live.fake.github.installation_id, REPO, 21, sha, request,
                                  files, rerun=False, untrusted=None)
    job_id = report.verify_job_id(REPO, 21, sha, request)
    assert started == f"enqueued {job_id}"
    job = Job.fetch(job_id, connection=live.connection, serializer=JSONSerializer)
    runner = start_worker_process(report.VERIFY_QUEUE, env)
    try:
        wait_until(lambda: job.get_status(refresh=True) == "started", 60, what="job start")
        wait_until(lambda: check_processes(runner.pid), 60, what="`mlx-verify check`")
        page.goto(f"{live.url}/queue")
        sign_in(page, live, MAINTAINER)
        page.goto(f"{live.url}/queue")
        running = page.locator('table[data-queue="verify"][data-section="running"]')
        assert job_id in running.inner_text()
        screenshot(page, "queue-running-job")
        page.get_by_role("button", name=f"Cancel job {job_id}").click()
        assert page.locator("h1").inner_text() == "Cancel", page.locator("main").inner_text()
        assert "(started) cancelled by maintainer-1" in page.locator("main").inner_text()
        # The runner killed the work horse and the check process with it; the runner
        # itself lives on for the next job.
        wait_until(lambda: job.get_status(refresh=True) == "stopped", 30, what="job stop")
        wait_until(lambda: not check_processes(runner.pid), 30, what="the check to end")
        assert runner.poll() is None
        (check_run,) = [r for r in live.fake.github.check_runs.values() if r["head_sha"] == sha]
        assert (check_run["status"], check_run["conclusion"]) == ("completed", "cancelled")
        # The reports the runner queued (started, then the stop's failure callback) come
        # late and change nothing: the run stays cancelled, the Check Run too.
        run_report_queue(live)
        assert (check_run["status"], check_run["conclusion"]) == ("completed", "cancelled")
        run = store.get_run(live.connection, job_id)
        assert run.state == "cancelled" and run.reason == "cancelled by maintainer-1"
        # A stopped job is not retried by rq: nothing is waiting for a runner.
        verify = Queue(report.VERIFY_QUEUE, connection=live.connection,
                       serializer=JSONSerializer)
        assert verify.count == 0 and verify.scheduled_job_registry.count == 0
    finally:
        # SIGTERM: the idle worker shuts down and unregisters (the queue page of later
        # tests lists no dead runner)
        os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def test_retry_runs_a_failed_report_job_again(page, live, monkeypatch, tmp_path):
    for key, value in worker_env(live, tmp_path).items():
        monkeypatch.setenv(key, value)
    sha = "5" * 40
    # GitHub does not know PR 22 yet (its files answer 404): the report job fails.
    payload = webhook_payload("pull_request.opened.payload.json",
                              live.fake.github.installation_id, number=22, sha=sha,
                              base="0" * 40)
    report_queue = Queue(report.REPORT_QUEUE, connection=live.connection,
                         serializer=JSONSerializer)
    job = report_queue.enqueue("mlx_verify.app.report.handle_event", "pull_request",
                               str(uuid.uuid4()), payload, job_id=f"event-{uuid.uuid4()}",
                               failure_ttl=3600)
    run_report_queue(live)
    assert job.get_status(refresh=True) == "failed"
    assert not [r for r in live.fake.github.check_runs.values() if r["head_sha"] == sha]
    # An anonymous visitor sees the failed job but cannot retry it.
    page.goto(f"{live.url}/queue")
    failed = page.locator('table[data-queue="report"][data-section="failed"]')
    assert job.id in failed.inner_text()
    page.get_by_role("button", name=f"Retry job {job.id}").click()
    assert page.locator("h1").inner_text() == "Login required"
    assert job.get_status(refresh=True) == "failed"
    # GitHub answers again; a maintainer retries it.
    live.fake.github.pulls[(REPO, 22)] = fake_github.Pull(22, sha, "0" * 40, [LLAMA],
                                                          MAINTAINER)
    page.goto(f"{live.url}/queue")
    sign_in(page, live, MAINTAINER)
    page.goto(f"{live.url}/queue")
    page.get_by_role("button", name=f"Retry job {job.id}").click()
    assert page.locator("h1").inner_text() == "Retried", page.locator("main").inner_text()
    screenshot(page, "action-retry")
    assert job.get_status(refresh=True) == "queued"
    run_report_queue(live)
    assert job.get_status(refresh=True) == "finished"
    (check_run,) = [r for r in live.fake.github.check_runs.values() if r["head_sha"] == sha]
    assert check_run["status"] == "queued"  # the verify job it planned waits for a runner
    verify_id = check_run["external_id"]
    assert store.get_run(live.connection, verify_id).state == "queued"
    Job.fetch(verify_id, connection=live.connection, serializer=JSONSerializer).cancel()
