"""The POSTed actions: re-run a PR run, cancel or retry a job. Each needs a signed-in user
with write permission on the run's repository (asked of GitHub at the time of the action,
fail closed) and the session's CSRF token (auth.signed_in_to_act)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from mlx_verify.workers.jobs import VERIFY_FUNCTION, current_name

from .. import store
from . import PREFIX, Dashboard, DashboardRoute, Refused
from .auth import signed_in_to_act
from .pages import job_repository

log = logging.getLogger("mlx-verify.dashboard")


class RerunRefused(Exception):
    """A re-run that would report on the wrong commit or a closed PR."""


def router(dash: Dashboard) -> APIRouter:
    act = signed_in_to_act(dash)
    routes = APIRouter(prefix=PREFIX, route_class=DashboardRoute)

    @routes.post("/runs/{run_id}/rerun")
    async def rerun(request: Request, run_id: str,
                    login_name: str = Depends(act)) -> Response:
        run = store.get_run(dash.connection, run_id)
        if run is None or run.kind != "pr" or run.pr is None:
            return dash.message(request, "Refused", "Only stored PR runs can be re-run here.",
                                404)
        ok, why = await run_in_threadpool(authorised, dash, login_name, run.repository)
        if not ok:
            return dash.message(request, "Refused", why, 403)
        return await rerun_answer(dash, request, run, login_name)

    @routes.post("/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str,
                     login_name: str = Depends(act)) -> Response:
        job = await authorised_job(dash, request, job_id, login_name)
        text = await run_in_threadpool(cancel_job, dash, job, login_name)
        return dash.message(request, "Cancel", text, 200, link=f"{PREFIX}/queue")

    @routes.post("/jobs/{job_id}/retry")
    async def retry(request: Request, job_id: str,
                    login_name: str = Depends(act)) -> Response:
        """A failed report job runs again; a failed verify job is re-run (new Check Run)."""
        job = await authorised_job(dash, request, job_id, login_name)
        if current_name(job.func_name) == VERIFY_FUNCTION:
            run = store.get_run(dash.connection, job_id)
            if run is None:
                return dash.message(request, "Not re-run", "This job has no stored run.", 409)
            return await rerun_answer(dash, request, run, login_name)
        if job.get_status() != JobStatus.FAILED:
            return dash.message(request, "Not retried", f"job {job_id} has not failed", 409)
        job.requeue()
        return dash.message(request, "Retried", f"job {job_id} queued again by {login_name}",
                            200, link=f"{PREFIX}/queue")

    return routes


async def authorised_job(dash: Dashboard, request: Request, job_id: str,
                         login_name: str) -> Job:
    """The queued job, once login may act on its repository; else Refused (404, 403)."""
    try:
        job = Job.fetch(job_id, connection=dash.connection, serializer=JSONSerializer)
    except NoSuchJobError:
        raise Refused(dash.message(request, "Not found", f"No job {job_id} in the queue.",
                                   404)) from None
    ok, why = await run_in_threadpool(authorised, dash, login_name,
                                      job_repository(dash.connection, job))
    if not ok:
        raise Refused(dash.message(request, "Refused", why, 403))
    return job


async def rerun_answer(dash: Dashboard, request: Request, run: store.Run,
                       login_name: str) -> Response:
    """Re-run a stored PR run (login's permission already checked) and say what happened."""
    try:
        text, job_id = await run_in_threadpool(rerun_run, dash, run, login_name)
    except RerunRefused as e:
        return dash.message(request, "Not re-run", str(e), 409)
    return dash.message(request, "Re-run requested", text, 200,
                        link=f"{PREFIX}/runs/{quote(job_id)}")


def authorised(dash: Dashboard, login_name: str, repository: str | None) -> tuple[bool, str]:
    """Write permission of login on repository, asked of GitHub now; no on any doubt."""
    if dash.settings is None or not repository or "/" not in repository:
        return False, "this run's repository cannot be checked for permission"
    from .. import github

    owner, name = repository.split("/", 1)
    try:
        gh, _ = installation(dash, owner, name)
        if github.has_write_permission(gh, owner, name, login_name):
            return True, ""
    except Exception as e:  # noqa: BLE001 - GitHub away: fail closed
        log.warning("permission check failed: %s", e)
    return False, f"{login_name} has no write permission on {repository}"


def installation(dash: Dashboard, owner: str, name: str):
    """The repository's installation client and id, through the App's JWT."""
    from .. import github

    assert dash.settings is not None
    app_gh = github.app_client(dash.settings, dash.connection)
    installation_id = github.repo_installation(app_gh, owner, name)
    return github.installation_client(dash.settings, dash.connection, installation_id), \
        installation_id


def rerun_run(dash: Dashboard, run: store.Run, login_name: str) -> tuple[str, str]:
    from .. import github, report
    from ..commands import VerifyRequest

    assert dash.settings is not None and run.repository and run.head_sha and run.pr is not None
    owner, name = run.repository.split("/", 1)
    gh, installation_id = installation(dash, owner, name)
    pull = github.get_pull(gh, owner, name, run.pr)
    if pull is None or pull.get("state") != "open":
        raise RerunRefused("the pull request is not open")
    if pull["head"]["sha"] != run.head_sha:
        raise RerunRefused(f"{run.head_sha[:12]} is no longer the PR head "
                           f"({pull['head']['sha'][:12]}); re-run its latest run instead")
    files = github.changed_files(gh, owner, name, run.pr)
    fields = ("model_types", "hub", "checks", "dtype", "source")
    request = VerifyRequest.from_dict({k: v for k, v in run.request.items() if k in fields})
    text = report.start_verify(dash.settings, dash.connection, gh, installation_id,
                               run.repository, run.pr, run.head_sha, request, files, rerun=True,
                               base_sha=(pull.get("base") or {}).get("sha"),
                               untrusted=report.untrusted_code(
                                   gh, dash.connection, run.repository, run.pr, run.head_sha,
                                   (pull.get("user") or {}).get("login", "")))
    job_id = report.verify_job_id(run.repository, run.pr, run.head_sha, request)
    if text.startswith("enqueued"):  # "already queued/started": that run stands
        store.record_job(dash.connection, job_id, "queued", requested_by=login_name,
                         title=run.title)
    return text, job_id


def cancel_job(dash: Dashboard, job: Job, login_name: str) -> str:
    status = job.get_status()
    if current_name(job.func_name) == VERIFY_FUNCTION and \
            dash.connection.hget(f"mlxv:job:{job.id}", "state") == b"cancelling":
        # cancelled before, but GitHub failed then: complete its Check Run now
        return close_or_explain(dash, job.id, login_name,
                                f"job {job.id} cancelled by {login_name}; its Check Run "
                                "is completed")
    try:
        if status == JobStatus.STARTED:
            send_stop_job_command(dash.connection, job.id, serializer=JSONSerializer)
        elif status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
        else:
            return f"job {job.id} is {status.value}: nothing to cancel"
    except InvalidJobOperation as e:
        return f"job {job.id} could not be cancelled: {e}"
    done = f"job {job.id} ({status.value}) cancelled by {login_name}"
    if current_name(job.func_name) == VERIFY_FUNCTION:
        return close_or_explain(dash, job.id, login_name, done)
    return done


def close_or_explain(dash: Dashboard, job_id: str, login_name: str, done: str) -> str:
    try:
        close_check_run(dash, job_id, login_name)
    except Exception as e:  # noqa: BLE001 - GitHub away: said, and cancel works again
        log.warning("cancel %s: Check Run not completed: %s", job_id, e)
        return (f"job {job_id} stopped, but GitHub did not take the Check Run's "
                f"completion ({type(e).__name__}); cancel it again to retry")
    return done


def close_check_run(dash: Dashboard, job_id: str, login_name: str) -> None:
    """Complete the job's Check Run (never left queued or in progress) and mark the
    job cancelled, so a late report of it changes nothing."""
    from .. import github

    info = {k.decode(): v.decode()
            for k, v in dash.connection.hgetall(f"mlxv:job:{job_id}").items()}
    if not info or info.get("state") not in ("queued", "running", "cancelling"):
        return
    # "cancelling": late reports of the runner change nothing from here on; only
    # once GitHub has the Check Run completed is the job "cancelled" (a GitHub error
    # leaves it "cancelling", and cancelling again completes it).
    store.set_job_state(dash.connection, job_id, "cancelling")
    if dash.settings is not None and info.get("check_run_id"):
        owner, name = info["repo"].split("/", 1)
        gh = github.installation_client(dash.settings, dash.connection,
                                        int(info["installation_id"]))
        github.update_check_run(
            gh, owner, name, int(info["check_run_id"]), status="completed",
            conclusion="cancelled", completed_at=datetime.now(UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
            output={"title": "cancelled", "summary": "Cancelled from the dashboard by a "
                                                     "maintainer."})
    store.set_job_state(dash.connection, job_id, "cancelled",
                        reason=f"cancelled by {login_name}")
