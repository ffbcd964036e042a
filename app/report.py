"""Report jobs: run beside the server, the only place that holds the App key.

`handle_event` turns a webhook delivery into GitHub reads (PR, changed files,
permissions), Check Runs and verify jobs. `verify_started` / `verify_finished` /
`verify_failed` / `verify_requeued` are enqueued by the server's collector
(app/collector.py) from what the runners' verify jobs did, and do the GitHub writes for
them: the Check Run of the job and the one sticky comment per PR.

State kept in Redis (prefix mlxv:), per PR and per verify job:
  mlxv:head:{repo}#{n}    the PR's head SHA as last seen
  mlxv:heads:{repo}#{n}   head SHA -> when the server last saw it become the PR's head
                          (epoch seconds; set on webhook receipt, see note_head_seen)
  mlxv:sha:{repo}:{sha}   PR number of a head SHA (check-suite events of forks lack it)
  mlxv:prjobs:{repo}#{n}  verify job ids of the PR
  mlxv:job:{job_id}       repo, number, sha, base_sha, installation, request, check_run_id,
                          state (the job's lifecycle; written only by store.set_job_state,
                          after the GitHub writes it stands for)
  mlxv:pr:{repo}#{n}      comment_id, current (latest report), history (earlier SHAs)
The results themselves are kept once, in the run store (app.store).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis
from githubkit import GitHub
from githubkit.exception import RequestFailed
from rq import Callback, Queue, Retry, get_current_job
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from mlx_verify.app import collector, comment, github, store
from mlx_verify.app.commands import (
    USAGE,
    Command,
    CommandError,
    VerifyRequest,
    find_command_line,
    parse,
)
from mlx_verify.app.settings import AppSettings, connect_redis, load_app_settings
from mlx_verify.workers import planning
from mlx_verify.workers.jobs import (
    REPORT_QUEUE,
    JobSpecError,
    RequestSpec,
    VerifyOutcome,
    VerifySpec,
)

VERIFY_QUEUE = "verify"
LARGE_VERIFY_QUEUE = "verify-large"  # runners with the memory for real checkpoints
VERIFY_QUEUES_KEY = "mlxv:verify-queues"
CHECK_NAME = "mlx-verify"
VERIFY_JOB_TIMEOUT = 3 * 3600  # backstop above the runner's own VERIFY_TIMEOUT
STATE_TTL = 90 * 86400
ACTIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
PR_ACTIONS = ("opened", "synchronize", "reopened", "ready_for_review")
HELP = ("mlx-verify commands, each on its own line of a PR comment (write access needed):\n\n"
        f"- `{USAGE}`: check these model_types (default: the ones the PR's changed files "
        "affect) on the PR's current head commit\n"
        "- `/verify help`: this message\n")


@lru_cache(maxsize=1)
def context() -> tuple[AppSettings, redis.Redis, GitHub]:
    settings = load_app_settings()
    connection = connect_redis(settings.redis_url)
    return settings, connection, github.app_client(settings, connection)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pr_key(repo: str, number: int) -> str:
    return f"{repo}#{number}"


def verify_job_id(repo: str, number: int, sha: str, request: VerifyRequest) -> str:
    """Deterministic per (repository, PR, head SHA, request): repeats dedupe on it."""
    digest = hashlib.sha256(f"{repo}\n{number}\n{sha}\n{request.key()}".encode()).hexdigest()
    return f"verify-{number}-{sha[:12]}-{digest[:16]}"


def installation_gh(settings: AppSettings, connection: redis.Redis, app_gh: GitHub,
                    payload: dict[str, Any]) -> tuple[GitHub, int]:
    owner, name = payload["repository"]["full_name"].split("/", 1)
    installation_id = (payload.get("installation") or {}).get("id")
    if not installation_id:
        installation_id = github.repo_installation(app_gh, owner, name)
    return github.installation_client(settings, connection, int(installation_id)), \
        int(installation_id)


def _split(repo: str) -> tuple[str, str]:
    owner, name = repo.split("/", 1)
    return owner, name


def _heads_key(repo: str, number: int) -> str:
    return f"mlxv:heads:{_pr_key(repo, number)}"


def note_head_seen(connection: redis.Redis, payload: dict[str, Any]) -> None:
    """On receipt of a pull_request delivery (in the server, before it is queued): the
    time its head SHA became the PR's head, as this server saw it. A later delivery of
    the same SHA moves the time on (a force-push back to an old head is new again); an
    earlier time is never recorded, so a head is never taken to predate a command
    that was written before it appeared."""
    pull = payload.get("pull_request") or {}
    repo = (payload.get("repository") or {}).get("full_name")
    sha = (pull.get("head") or {}).get("sha")
    number = pull.get("number")
    if payload.get("action") not in PR_ACTIONS or not isinstance(repo, str) or \
            not isinstance(sha, str) or not isinstance(number, int):
        return
    key = _heads_key(repo, number)
    pipe = connection.pipeline()
    pipe.hset(key, sha, f"{time.time():.3f}")
    pipe.expire(key, STATE_TTL)
    pipe.execute()


def _pushers_key(repo: str, number: int) -> str:
    return f"mlxv:pushers:{_pr_key(repo, number)}"


def untrusted_code(gh: GitHub, connection: redis.Redis, repo: str, number: int, sha: str,
                   author: str) -> str | None:
    """Who wrote code of this head without write access to the repository: "author
    LOGIN", "pusher LOGIN", "pusher unknown", or None when both have it. The PR's code
    runs in the process that computes its results, so a pass from such code is not a
    gate (docs/deploy.md, section 4, "Trust")."""
    owner, name = _split(repo)
    if not author or not github.has_write_permission(gh, owner, name, author):
        return f"author {author or 'unknown'}"
    raw = connection.hget(_pushers_key(repo, number), sha)
    if raw is None:  # the head arrived unseen (or before pushers were recorded)
        return "pusher unknown"
    pusher = raw.decode()
    if pusher != author and not github.has_write_permission(gh, owner, name, pusher):
        return f"pusher {pusher}"
    return None


def head_seen(connection: redis.Redis, repo: str, number: int, sha: str) -> float | None:
    raw = connection.hget(_heads_key(repo, number), sha)
    return float(raw) if raw else None


def _timestamp(text: Any) -> float | None:
    """GitHub's ISO 8601 time (2019-05-15T15:20:21Z) as epoch seconds."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- webhook events -------------------------------------------------------------------

def handle_event(event: str, delivery: str, payload: dict[str, Any]) -> str:
    """Entry point for one webhook delivery; returns what it did, for the job record."""
    settings, connection, app_gh = context()
    if event == "pull_request":
        return on_pull_request(settings, connection, app_gh, payload)
    if event == "issue_comment":
        return on_comment(settings, connection, app_gh, payload)
    if event == "check_run":
        run = payload["check_run"]
        return on_rerequest(settings, connection, app_gh, payload, run["head_sha"],
                            run.get("pull_requests") or [], run.get("external_id") or "")
    if event == "check_suite":
        suite = payload["check_suite"]
        return on_rerequest(settings, connection, app_gh, payload, suite["head_sha"],
                            suite.get("pull_requests") or [], "")
    return "ignored"


def on_pull_request(settings, connection, app_gh, payload) -> str:
    pull = payload["pull_request"]
    if payload.get("action") == "closed":
        gh, _ = installation_gh(settings, connection, app_gh, payload)
        cancel_jobs(connection, gh, payload["repository"]["full_name"], int(pull["number"]),
                    keep_sha=None, reason="The PR was closed; this run was cancelled.")
        return "closed: jobs cancelled"
    if payload.get("action") not in PR_ACTIONS:
        return "ignored action"
    if pull.get("draft"):
        return "draft: skipped until ready for review"
    if pull.get("state", "open") != "open":
        return "closed"
    repo = payload["repository"]["full_name"]
    number, sha = int(pull["number"]), pull["head"]["sha"]
    base_sha = (pull.get("base") or {}).get("sha")
    owner, name = _split(repo)
    gh, installation_id = installation_gh(settings, connection, app_gh, payload)
    # A late or retried delivery of an older push must not cancel the run of the
    # newer head: act only when the event's SHA is still the PR's head.
    current = github.get_pull(gh, owner, name, number)
    if current is None:  # GitHub's API can lag behind its webhooks: retried
        raise LookupError(f"GitHub does not know {repo}#{number} yet")
    if current.get("state", "open") != "open":
        return "not an open pull request"
    if current["head"]["sha"] != sha:
        return f"stale event: the PR's head is now {current['head']['sha'][:12]}"
    store.note_pr(connection, repo, number, current.get("title") or pull.get("title"))
    record_head(settings, connection, gh, repo, number, sha)
    sender = (payload.get("sender") or {}).get("login", "")
    if payload.get("action") in ("opened", "synchronize") and sender:
        # whoever put this head there (reopen and ready-for-review are not pushes)
        connection.hset(_pushers_key(repo, number), sha, sender)
        connection.expire(_pushers_key(repo, number), STATE_TTL)
    files, lines = github.changed_files_and_lines(gh, owner, name, number)
    if not planning.touches_models(files):
        github.create_check_run(
            gh, owner, name, name=CHECK_NAME, head_sha=sha, status="completed",
            conclusion="neutral", completed_at=_now(),
            output={"title": "no model code changed",
                    "summary": "No Python file of the `mlx_lm` package changed (docs, tests "
                               "or other files only): nothing to verify."})
        return "no model code changed"
    # Both the PR's author and whoever sent this event (the pusher, for synchronize)
    # must have write access; any doubt is a no.
    author = (pull.get("user") or {}).get("login", "")
    untrusted = [(role, login) for role, login in (("author", author), ("pusher", sender))
                 if login and not github.has_write_permission(gh, owner, name, login)]
    if untrusted or not author or not sender:
        role, login = untrusted[0] if untrusted else ("author", author or sender)
        who = "author of this PR" if role == "author" else \
            "user who pushed this commit" if payload.get("action") == "synchronize" \
            else "user who sent this event"
        github.create_check_run(
            gh, owner, name, name=CHECK_NAME, head_sha=sha, status="completed",
            conclusion="neutral", completed_at=_now(),
            output={"title": "waiting for a maintainer",
                    "summary": f"The {who} has no write access to the repository, "
                               "so its code is not run automatically. A maintainer can start "
                               "the checks with a comment holding the line `/verify`."})
        return f"{role} not trusted: waiting for /verify"
    return start_verify(settings, connection, gh, installation_id, repo, number, sha,
                        VerifyRequest(), files, rerun=False, base_sha=base_sha,
                        changed_lines=lines,
                        untrusted=untrusted_code(gh, connection, repo, number, sha, author))


def reply(gh: GitHub, repo: str, number: int, text: str) -> None:
    owner, name = _split(repo)
    github.create_comment(gh, owner, name, number, text)


def on_comment(settings, connection, app_gh, payload) -> str:
    if payload.get("action") != "created":
        return "ignored action"
    body = (payload.get("comment") or {}).get("body")
    line = find_command_line(body)
    sender = payload.get("sender") or {}
    if line is None or sender.get("type") == "Bot":
        return "no command"
    repo = payload["repository"]["full_name"]
    owner, name = _split(repo)
    number = int(payload["issue"]["number"])
    gh, installation_id = installation_gh(settings, connection, app_gh, payload)
    pull = github.get_pull(gh, owner, name, number)
    if pull is None:
        return "not a pull request"
    store.note_pr(connection, repo, number, pull.get("title"))
    if not github.has_write_permission(gh, owner, name, sender.get("login", "")):
        reply(gh, repo, number, "mlx-verify: `/verify` needs write access to this "
                                "repository; nothing was started.")
        return "sender not authorised"
    try:
        command: Command = parse(line)
    except CommandError as e:
        reply(gh, repo, number, f"mlx-verify: could not read the command ({e}). "
                                f"Usage: `{USAGE}`")
        return "malformed command"
    if command.help:
        reply(gh, repo, number, HELP)
        return "help"
    if pull.get("state") != "open":
        return "closed"
    # Pinned: the head as read now, and only if it was the head before the command was
    # written (a push after the comment is not what the maintainer asked for).
    sha = pull["head"]["sha"]
    written = _timestamp((payload.get("comment") or {}).get("created_at"))
    seen = head_seen(connection, repo, number, sha)
    if seen is None or written is None or seen >= written:  # written: whole seconds
        if seen is None:  # never saw it arrive (e.g. the App came after the push)
            connection.hset(_heads_key(repo, number), sha, f"{time.time():.3f}")
            connection.expire(_heads_key(repo, number), STATE_TTL)
        reply(gh, repo, number,
              f"mlx-verify: the PR's head `{sha[:12]}` is not known to be the commit this "
              "command was written for (it may have been pushed after the comment); "
              f"nothing was started. Comment `/verify` again to check `{sha[:12]}`.")
        return "head not pinned: newer than the command"
    comment_id = int(payload["comment"]["id"])
    github.react(gh, owner, name, comment_id, "eyes")
    record_head(settings, connection, gh, repo, number, sha)
    files, lines = github.changed_files_and_lines(gh, owner, name, number)
    author = (pull.get("user") or {}).get("login", "")
    return start_verify(settings, connection, gh, installation_id, repo, number, sha,
                        command.request, files, rerun=False,
                        base_sha=(pull.get("base") or {}).get("sha"), changed_lines=lines,
                        untrusted=untrusted_code(gh, connection, repo, number, sha, author))


def on_rerequest(settings, connection, app_gh, payload, sha: str,
                 pull_requests: list[dict[str, Any]], external_id: str) -> str:
    if payload.get("action") != "rerequested":
        return "ignored action"
    repo = payload["repository"]["full_name"]
    owner, name = _split(repo)
    gh, installation_id = installation_gh(settings, connection, app_gh, payload)
    sender = (payload.get("sender") or {}).get("login", "")
    if not github.has_write_permission(gh, owner, name, sender):
        return "sender not authorised"
    number = None
    if pull_requests:
        number = int(pull_requests[0]["number"])
    elif (known := connection.get(f"mlxv:sha:{repo}:{sha}")) is not None:
        number = int(known)
    else:  # a fork PR: its check suite carries no pull_requests
        for pull in github.open_pulls(gh, owner, name):
            if pull["head"]["sha"] == sha:
                number = int(pull["number"])
                break
    if number is None:
        return "no open PR has this head SHA"
    pull = github.get_pull(gh, owner, name, number)
    if pull is None or pull["head"]["sha"] != sha or pull.get("state") != "open":
        return "not the PR's current head"
    store.note_pr(connection, repo, number, pull.get("title"))
    request = VerifyRequest()
    job = connection.hgetall(f"mlxv:job:{external_id}") if external_id else {}
    if job.get(b"request"):
        request = VerifyRequest.from_dict(json.loads(job[b"request"]))
    record_head(settings, connection, gh, repo, number, sha)
    files, lines = github.changed_files_and_lines(gh, owner, name, number)
    author = (pull.get("user") or {}).get("login", "")
    return start_verify(settings, connection, gh, installation_id, repo, number, sha,
                        request, files, rerun=True,
                        base_sha=(pull.get("base") or {}).get("sha"), changed_lines=lines,
                        untrusted=untrusted_code(gh, connection, repo, number, sha, author))


# ---- queue ----------------------------------------------------------------------------

def record_head(settings, connection, gh, repo: str, number: int, sha: str) -> None:
    """Remember the PR's head; cancel or stop jobs of its older SHAs (by when each became
    the head: a head newer than sha is kept, and so is the stored head)."""
    key = _pr_key(repo, number)
    stored = connection.get(f"mlxv:head:{key}")
    seen = head_seen(connection, repo, number, sha)
    stored_seen = head_seen(connection, repo, number, stored.decode()) if stored else None
    if stored is None or seen is None or stored_seen is None or stored_seen <= seen:
        connection.set(f"mlxv:head:{key}", sha, ex=STATE_TTL)
    connection.set(f"mlxv:sha:{repo}:{sha}", number, ex=STATE_TTL)
    cancel_jobs(connection, gh, repo, number, keep_sha=sha,
                reason=f"The PR's head moved to `{sha[:12]}`; this run was cancelled.")


def cancel_jobs(connection, gh, repo: str, number: int, keep_sha: str | None,
                reason: str) -> None:
    """Cancel queued and stop running verify jobs of the PR, except those of keep_sha and
    of heads that became the head after it. keep_sha None: all of them (PR closed)."""
    key = _pr_key(repo, number)
    owner, name = _split(repo)
    heads = {k.decode(): float(v) for k, v in connection.hgetall(_heads_key(repo, number))
             .items()}
    keep_seen = heads.get(keep_sha, time.time()) if keep_sha else None
    for raw in connection.smembers(f"mlxv:prjobs:{key}"):
        job_id = raw.decode()
        info = connection.hgetall(f"mlxv:job:{job_id}")
        if not info or info[b"sha"].decode() == keep_sha:
            continue
        if keep_seen is not None and heads.get(info[b"sha"].decode(), 0.0) > keep_seen:
            continue  # a newer head than keep_sha: its run stands
        if info.get(b"state", b"").decode() in ("queued", "running"):
            try:
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
                status = job.get_status()
                if status == JobStatus.STARTED:
                    send_stop_job_command(connection, job_id, serializer=JSONSerializer)
                elif status in ACTIVE:
                    job.cancel()
            except (NoSuchJobError, InvalidJobOperation):
                pass  # finished or stopped meanwhile: the state below still holds
            # The Check Run first: if GitHub fails, the retried event finds the job
            # still active and completes it then.
            github.update_check_run(
                gh, owner, name, int(info[b"check_run_id"]), status="completed",
                conclusion="neutral", completed_at=_now(),
                output={"title": "superseded" if keep_sha else "PR closed",
                        "summary": reason})
            store.set_job_state(connection, job_id, "superseded")
        connection.srem(f"mlxv:prjobs:{key}", job_id)


def start_verify(settings: AppSettings, connection: redis.Redis, gh: GitHub,
                 installation_id: int, repo: str, number: int, sha: str,
                 request: VerifyRequest, files: list[str], rerun: bool,
                 base_sha: str | None = None,
                 changed_lines: dict[str, list[tuple[int, int]]] | None = None, *,
                 untrusted: str | None) -> str:
    """Create the Check Run and enqueue the verify job, once per job id. base_sha: the
    PR's base commit as the pull request payload gives it (the baseline's tree);
    changed_lines: the new-side line ranges of each file's diff hunks (annotations go
    only there); untrusted: who wrote the head without write access (untrusted_code),
    whose pass is then reported but is not a gate."""
    if request.source == "auto" and not request.checks and settings.auto_checks:
        request = VerifyRequest(checks=settings.auto_checks)
    job_id = verify_job_id(repo, number, sha, request)
    try:
        existing = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        status = existing.get_status()
        if status in ACTIVE or (status == JobStatus.FINISHED and not rerun):
            return f"already {status.value}: {job_id}"
        existing.delete()  # failed, stopped, canceled, or finished and re-run requested
    except NoSuchJobError:
        pass
    owner, name = _split(repo)
    queue_name = LARGE_VERIFY_QUEUE if request.hub else VERIFY_QUEUE
    check_run_id = github.create_check_run(
        gh, owner, name, name=CHECK_NAME, head_sha=sha, status="queued", external_id=job_id,
        output={"title": "queued", "summary": f"Waiting for a runner on queue `{queue_name}`."},
        **({"details_url": f"{settings.dashboard_url}/runs/{job_id}"}
           if settings.dashboard_url else {}))
    connection.hset(f"mlxv:job:{job_id}", mapping={
        "repo": repo, "number": number, "sha": sha, "installation_id": installation_id,
        "request": json.dumps(request.to_dict()), "check_run_id": check_run_id,
        "state": "queued", "changed_files": json.dumps(files[:3000]),
        "base_sha": base_sha or "", "check_run_done": "0", "untrusted_code": untrusted or "",
        **({"changed_lines": json.dumps({f: changed_lines[f] for f in files[:3000]
                                         if f in changed_lines})}
           if changed_lines is not None else {}),
    })
    connection.expire(f"mlxv:job:{job_id}", STATE_TTL)
    connection.sadd(f"mlxv:prjobs:{_pr_key(repo, number)}", job_id)
    connection.expire(f"mlxv:prjobs:{_pr_key(repo, number)}", STATE_TTL)
    connection.sadd(VERIFY_QUEUES_KEY, queue_name)
    collector.watch(connection, job_id)
    spec = VerifySpec(
        job_id=job_id, repo=repo, number=number, sha=sha, base_sha=base_sha or None,
        baseline=settings.baseline, changed_files=files[:3000],
        request=RequestSpec(**request.to_dict()),
        auto_model_types=list(settings.auto_model_types)
        if settings.auto_model_types is not None else None,
        max_model_types=settings.max_model_types,
    ).model_dump(mode="json")
    Queue(queue_name, connection=connection, serializer=JSONSerializer).enqueue(
        "mlx_verify.workers.verify.run_verify", spec, job_id=job_id, job_timeout=VERIFY_JOB_TIMEOUT,
        retry=Retry(max=2, interval=[10, 60]), result_ttl=7 * 86400,
        failure_ttl=30 * 86400, on_failure=Callback("mlx_verify.workers.verify.on_verify_failure"),
        description=f"verify {repo}#{number} @ {sha[:12]}")
    collector.enqueued(connection, job_id)
    store.record_job(connection, job_id, "queued")
    return f"enqueued {job_id}"


# ---- reports from runners -------------------------------------------------------------

def _job_info(connection: redis.Redis, job_id: str) -> dict[str, str] | None:
    raw = connection.hgetall(f"mlxv:job:{job_id}")
    return {k.decode(): v.decode() for k, v in raw.items()} if raw else None


def _job_gh(settings, connection, info) -> GitHub:
    return github.installation_client(settings, connection, int(info["installation_id"]))


def verify_started(job_id: str) -> str:
    settings, connection, _ = context()
    info = _job_info(connection, job_id)
    if info is None or info["state"] not in ("queued", "running"):
        return "no active job"
    store.set_job_state(connection, job_id, "running")
    owner, name = _split(info["repo"])
    github.update_check_run(
        _job_gh(settings, connection, info), owner, name, int(info["check_run_id"]),
        status="in_progress", started_at=_now(),
        output={"title": "running", "summary": "A runner is checking this commit."})
    return "in progress"


def verify_requeued(job_id: str, reason: str) -> str:
    settings, connection, _ = context()
    info = _job_info(connection, job_id)
    if info is None or info["state"] not in ("queued", "running"):
        return "no active job"
    store.set_job_state(connection, job_id, "queued", reason=reason)
    owner, name = _split(info["repo"])
    github.update_check_run(
        _job_gh(settings, connection, info), owner, name, int(info["check_run_id"]),
        status="queued",
        output={"title": "queued again",
                "summary": f"The previous attempt did not finish ({reason}); it will be "
                           "retried."})
    return "requeued"


def verify_failed(job_id: str, reason: str) -> str:
    settings, connection, _ = context()
    info = _job_info(connection, job_id)
    if info is None or info["state"] not in ("queued", "running"):
        return "no active job"
    owner, name = _split(info["repo"])
    github.update_check_run(
        _job_gh(settings, connection, info), owner, name, int(info["check_run_id"]),
        status="completed", conclusion="neutral", completed_at=_now(),
        output={"title": "could not run",
                "summary": f"The checks could not run: {reason}. Nothing is known about this "
                           "commit yet. Re-run this check, or comment `/verify`."})
    # only once GitHub has it: a retry after a GitHub error finds the job still active
    store.set_job_state(connection, job_id, "failed", reason=reason)
    return "failed"


def verify_finished(job_id: str, outcome: dict[str, Any] | None = None) -> str:
    """outcome: given only by report jobs that runners enqueued before 2026-12-04; the
    collector's carry the job id alone, and the outcome is the verify job's result."""
    settings, connection, _ = context()
    info = _job_info(connection, job_id)
    if info is None or info["state"] not in ("queued", "running"):
        return "no active job"
    if outcome is None:
        try:
            outcome = Job.fetch(job_id, connection=connection,
                                serializer=JSONSerializer).return_value()
        except NoSuchJobError:
            outcome = None
        except Exception as e:  # a result rq cannot decode: the runner wrote it
            return verify_failed(job_id, f"the runner's outcome cannot be read: "
                                         f"{type(e).__name__}")
        if outcome is None:
            return verify_failed(job_id, "the verify job finished without an outcome")
    try:  # what crossed the queue from the runner
        outcome = VerifyOutcome.read(outcome, "the runner's outcome").to_json()
    except JobSpecError as e:  # the same outcome fails the same way: failed, re-runnable
        return verify_failed(job_id, str(e))
    repo, number, sha = info["repo"], int(info["number"]), info["sha"]
    owner, name = _split(repo)
    gh = _job_gh(settings, connection, info)
    pr_key = _pr_key(repo, number)
    state = connection.hgetall(f"mlxv:pr:{pr_key}")
    history = json.loads(state.get(b"history", b"[]"))
    current = json.loads(state[b"current"]) if state.get(b"current") else None
    if current and current["sha"] != sha:
        history = [current] + [h for h in history if h["sha"] != current["sha"]]
    dashboard = f"{settings.dashboard_url}/runs/{job_id}" if settings.dashboard_url else None
    try:
        rendered = comment.render(
            outcome, repo=repo, number=number, sha=sha, request=json.loads(info["request"]),
            history=[h for h in history if h["sha"] != sha], dashboard_url=dashboard,
            changed_files=json.loads(info.get("changed_files", "[]")),
            # a job queued before trust was recorded: not known to be trusted
            untrusted=info.get("untrusted_code", "not recorded for this job") or None)
    except Exception as e:  # results that pass the runner's check but not ours
        rendered = comment.Rendered(
            "neutral", "unreadable results",
            f"The runner's results could not be read: {type(e).__name__}.", "", None,
            "error", [])
    head = connection.get(f"mlxv:head:{pr_key}")
    is_head = head is None or head.decode() == sha
    title = rendered.title if is_head else f"(no longer the PR head) {rendered.title}"
    output: dict[str, Any] = {"title": title[:250], "summary": rendered.summary}
    if rendered.text:
        output["text"] = rendered.text
    annotations = rendered.annotations
    if info.get("changed_lines"):  # jobs queued before 2026-12 know only the files
        annotations = in_diff(annotations, json.loads(info["changed_lines"]))
    if annotations:
        output["annotations"] = annotations
    if info.get("check_run_done") != "1":  # a retry does not append annotations again
        complete_check_run(gh, owner, name, int(info["check_run_id"]), rendered.conclusion,
                           output)
        connection.hset(f"mlxv:job:{job_id}", "check_run_done", "1")
    commented = rendered.comment is not None and is_head
    if commented:
        upsert_comment(settings, connection, gh, repo, number, rendered.comment)
        connection.hset(f"mlxv:pr:{pr_key}", mapping={
            "current": json.dumps(comment.history_entry(sha, rendered)),
            "history": json.dumps(history[:10]),
        })
        connection.expire(f"mlxv:pr:{pr_key}", STATE_TTL)
    # Completed only now that the Check Run and the comment are written: a retry after
    # a GitHub error finds the job still active and writes them again.
    store.set_job_state(connection, job_id, "completed", outcome=outcome)
    # The run store holds the results now: the verify job's result is cut to a summary
    # (the finished job stays, so a redelivered event finds it done), and this job's
    # copy, if it carried one, goes.
    with contextlib.suppress(NoSuchJobError):
        keep_summary(Job.fetch(job_id, connection=connection, serializer=JSONSerializer),
                     outcome)
    if (job := get_current_job()) is not None:
        job.result_ttl = 0
    if not commented:
        return f"completed {rendered.conclusion} (comment untouched)"
    return f"completed {rendered.conclusion}"


SUMMARY_KEYS = ("status", "planned", "model_types", "errors", "base_sha", "base_status",
                "duration_s", "cross_checks")


def keep_summary(verify_job: Job, outcome: dict[str, Any]) -> None:
    """Replace a finished verify job's result (the runner's whole outcome) with its
    summary, for as long as rq keeps the job."""
    ttl = verify_job.get_result_ttl(7 * 86400)
    with verify_job.connection.pipeline() as pipe:
        pipe.delete(Result.get_key(verify_job.id))
        Result.create(verify_job, Result.Type.SUCCESSFUL, ttl=ttl, pipeline=pipe,
                      return_value={k: outcome.get(k) for k in SUMMARY_KEYS})
        pipe.execute()


def in_diff(annotations: list[dict[str, Any]],
            changed_lines: dict[str, list[list[int]]]) -> list[dict[str, Any]]:
    """The annotations whose line falls inside a hunk of the PR's diff (new side). A file
    GitHub gave no `patch` for (too large to show, or binary) keeps its annotations: its
    hunks are unknown."""
    kept = []
    for item in annotations:
        ranges = changed_lines.get(item["path"])
        if ranges is None or any(first <= item["start_line"] <= last
                                 for first, last in ranges):
            kept.append(item)
    return kept


def complete_check_run(gh: GitHub, owner: str, name: str, check_run_id: int,
                       conclusion: str, output: dict[str, Any]) -> None:
    """Complete the Check Run with this output; if GitHub refuses the output itself
    (4xx other than auth and rate limits), complete it with a short one instead, so it
    is never left in progress. Server errors raise (the report job is retried)."""
    try:
        github.update_check_run(gh, owner, name, check_run_id, status="completed",
                                conclusion=conclusion, completed_at=_now(), output=output)
    except RequestFailed as e:
        status = e.response.status_code
        if status >= 500 or status in (401, 403, 404, 429):
            raise
        github.update_check_run(
            gh, owner, name, check_run_id, status="completed", conclusion=conclusion,
            completed_at=_now(),
            output={"title": output.get("title", "")[:250] or "completed",
                    "summary": f"GitHub refused the full report (HTTP {status}); the "
                               "dashboard and the PR comment hold the results."})


def upsert_comment(settings, connection, gh, repo: str, number: int, body: str) -> int:
    """Update the PR's one sticky comment, or create it."""
    owner, name = _split(repo)
    pr_key = f"mlxv:pr:{_pr_key(repo, number)}"
    known = connection.hget(pr_key, "comment_id")
    comment_id = int(known) if known else None
    if comment_id is None:
        bot_id, _ = github.bot_user(context()[2], gh, connection)
        comment_id = github.find_comment(gh, owner, name, number, comment.MARKER, bot_id)
    if comment_id is not None and github.update_comment(gh, owner, name, comment_id, body):
        connection.hset(pr_key, "comment_id", comment_id)
        return comment_id
    comment_id = github.create_comment(gh, owner, name, number, body)
    connection.hset(pr_key, "comment_id", comment_id)
    return comment_id


def job_queues(connection: redis.Redis) -> list[str]:
    """The report queue and every verify queue a job was ever sent to."""
    return sorted({REPORT_QUEUE, *(raw.decode() for raw in
                                   connection.smembers(VERIFY_QUEUES_KEY))})


def enqueue_due_jobs(scheduler: RQScheduler) -> None:
    """Move due retries (and other scheduled jobs) of the scheduler's queues to their
    queues, when this process holds (or can take) rq's scheduler lock of a queue. rq's
    scheduler runs inside a worker: a worker that dies keeps its lock until it expires
    (about a minute), and the next worker tries again only at its maintenance round,
    10 min later, so a retry of a job whose worker died would wait that long."""
    if scheduler.acquire_locks():
        scheduler.enqueue_scheduled_jobs()


def sweep_abandoned(connection: redis.Redis) -> None:
    """Move jobs of dead workers out of the started registries (retried, or failed): a
    verify job of a dead runner, which the collector then reports, so no Check Run stays
    in progress; and a report job of a dead report worker (Redis gone under it, a
    killed host), which rq's own cleanup would reach only at the next worker start or
    maintenance round, minutes later."""
    from rq.registry import StartedJobRegistry
    from rq.timeouts import TimerDeathPenalty

    for name in job_queues(connection):
        # Timer-based callback timeouts: this runs in a thread of the server, where
        # signal-based ones cannot be set.
        StartedJobRegistry(name, connection=connection, serializer=JSONSerializer,
                           death_penalty_class=TimerDeathPenalty).cleanup()
