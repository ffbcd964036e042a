"""The maintainer dashboard under /dashboard: server-rendered pages, no JavaScript needed.

Pages read the run store (app.store) and rq's registries; numbers and facts come from
the results only. Untrusted text (titles, model names, error messages from PR code) is
escaped by Jinja's autoescape.

Access: read-only pages are public unless DASHBOARD_REQUIRE_LOGIN=1. Actions (re-run,
retry, cancel) need a GitHub OAuth login of a user with write permission on the run's
repository, checked through the App's installation token at the time of the action
(fail closed), and a CSRF token from the session. The session is a cookie signed with
DASHBOARD_SESSION_SECRET holding only the login, the CSRF token and a session id; the
session id must also be in Redis (mlxv:session:{sid}), so logging out ends the session
on the server too. The user's OAuth token is used once, to read who they are, and never
stored or sent to the browser. Actions are rate limited per user (per client address
when anonymous) with counters in Redis.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlparse

import httpx
import jinja2
import redis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from rq import Queue, Worker
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from checks import render
from checks import report as markdown

from . import store
from .settings import AppSettings, SettingsError, secret

log = logging.getLogger("mlx-verify.dashboard")

PREFIX = "/dashboard"
COOKIE = "mlxv_session"
SESSION_MAX_AGE_S = 12 * 3600
SESSION_KEY = "mlxv:session:"  # + session id -> login; deleted on logout
RATE_KEY = "mlxv:ratelimit:"  # + who + minute -> actions posted in that minute
PAGE_SIZE = 50
TEMPLATES = Path(__file__).with_name("templates")
# Check names -> the section heading of the run page.
SECTION_TITLES = {"layers": "per-layer divergence", "dtype": "dtype trace",
                  "rope": "RoPE facts", "generation": "generation comparison",
                  "long": "long-sequence comparison", "quantize": "quantization table"}


# ---- settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DashboardSettings:
    require_login: bool
    oauth_client_id: str | None
    oauth_client_secret: str | None
    session_secret: str | None
    oauth_url: str  # the GitHub web host: {oauth_url}/login/oauth/authorize
    api_url: str  # {api_url}/user
    dashboard_url: str | None  # public URL of /dashboard, for the OAuth redirect
    secure_cookie: bool
    # POSTed actions (re-run, cancel, retry, sign out) per minute: per signed-in user,
    # and per client address for anonymous requests
    actions_per_minute: int = 10
    anonymous_actions_per_minute: int = 20

    @property
    def login_enabled(self) -> bool:
        return bool(self.oauth_client_id and self.oauth_client_secret and self.session_secret)


def load_dashboard_settings() -> DashboardSettings:
    """From the environment; SettingsError (one line) on an unusable combination."""
    env = {k: (os.environ.get(k) or "").strip() or None for k in (
        "DASHBOARD_REQUIRE_LOGIN", "GITHUB_OAUTH_CLIENT_ID", "GITHUB_OAUTH_CLIENT_SECRET",
        "DASHBOARD_SESSION_SECRET", "GITHUB_OAUTH_URL", "GITHUB_GIT_URL", "GITHUB_API_URL",
        "DASHBOARD_URL", "DASHBOARD_ACTIONS_PER_MINUTE",
        "DASHBOARD_ANONYMOUS_ACTIONS_PER_MINUTE")}
    limits = {}
    for name, default in (("DASHBOARD_ACTIONS_PER_MINUTE", 10),
                          ("DASHBOARD_ANONYMOUS_ACTIONS_PER_MINUTE", 20)):
        value = env[name] or str(default)
        if not value.isdigit() or int(value) < 1:
            raise SettingsError(f"{name} must be a whole number of at least 1, not {value!r}")
        limits[name] = int(value)
    require = (env["DASHBOARD_REQUIRE_LOGIN"] or "0").lower() in ("1", "true", "yes")
    git_url = env["GITHUB_GIT_URL"] or "https://github.com"
    # GITHUB_GIT_URL may be a file:// git host (tests, mirrors): OAuth needs a web host.
    oauth_url = env["GITHUB_OAUTH_URL"] or (
        git_url if urlparse(git_url).scheme in ("http", "https") else "https://github.com")
    settings = DashboardSettings(
        require_login=require, oauth_client_id=env["GITHUB_OAUTH_CLIENT_ID"],
        oauth_client_secret=env["GITHUB_OAUTH_CLIENT_SECRET"],
        session_secret=env["DASHBOARD_SESSION_SECRET"], oauth_url=oauth_url.rstrip("/"),
        api_url=(env["GITHUB_API_URL"] or "https://api.github.com").rstrip("/"),
        dashboard_url=(env["DASHBOARD_URL"] or "").rstrip("/") or None,
        secure_cookie=(env["DASHBOARD_URL"] or "").startswith("https://"),
        actions_per_minute=limits["DASHBOARD_ACTIONS_PER_MINUTE"],
        anonymous_actions_per_minute=limits["DASHBOARD_ANONYMOUS_ACTIONS_PER_MINUTE"])
    if settings.oauth_client_id and not settings.oauth_client_secret:
        raise SettingsError("GITHUB_OAUTH_CLIENT_SECRET is not set")
    if settings.oauth_client_id and not settings.session_secret:
        raise SettingsError("DASHBOARD_SESSION_SECRET is not set")
    if settings.session_secret:
        secret("DASHBOARD_SESSION_SECRET", 32, settings.session_secret)
    if settings.oauth_client_secret:
        secret("GITHUB_OAUTH_CLIENT_SECRET", 16, settings.oauth_client_secret)
    if require and not settings.login_enabled:
        raise SettingsError("DASHBOARD_REQUIRE_LOGIN needs GITHUB_OAUTH_CLIENT_ID, "
                            "GITHUB_OAUTH_CLIENT_SECRET and DASHBOARD_SESSION_SECRET")
    return settings


# ---- signed session cookie ------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_session(secret: str, data: dict[str, Any]) -> str:
    body = _b64(json.dumps({**data, "iat": int(time.time())}, separators=(",", ":")).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def read_session(secret: str | None, cookie: str | None) -> dict[str, Any]:
    """The session's data, or {} when absent, forged or expired."""
    if not secret or not cookie or "." not in cookie:
        return {}
    body, mac = cookie.rsplit(".", 1)
    expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(mac), expected):
            return {}
        data = json.loads(_unb64(body))
    except (ValueError, TypeError):
        return {}
    if not isinstance(data, dict) or time.time() - data.get("iat", 0) > SESSION_MAX_AGE_S:
        return {}
    return data


# ---- formatting helpers (Jinja filters) ---------------------------------------------------

# one number format for every report (checks/render.py)
fmt_num = render.num


def fmt_age(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "–"
    seconds = max(0, int((now or time.time()) - float(ts)))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "–"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(start: float | None, end: float | None) -> str:
    if not start or not end:
        return "–"
    return f"{float(end) - float(start):.1f} s"


# ---- the per-layer chart ---------------------------------------------------------------

layer_chart = render.layer_chart  # shared with the standalone HTML report


# ---- generic rendering of metrics/details whose shape is not known --------------------

# shared with the standalone HTML report (checks/render.py)
shape = render.shape
paired_lists = render.paired_lists
source_locations = render.sources


# ---- queue helpers ---------------------------------------------------------------------

def queue_names(connection: redis.Redis) -> list[str]:
    from . import report

    names = {report.REPORT_QUEUE, report.VERIFY_QUEUE}
    names |= {raw.decode() for raw in connection.smembers(report.VERIFY_QUEUES_KEY)}
    return sorted(names)


def memory_class(queues: list[str]) -> str:
    from . import report

    if report.LARGE_VERIFY_QUEUE in queues:
        return "large"
    if any(q != report.REPORT_QUEUE for q in queues):
        return "standard"
    return "server (report jobs)"


def job_repository(connection: redis.Redis, job: Job) -> str | None:
    """The repository a job acts on, from its own arguments or the report job's state."""
    args = list(job.args or [])
    if job.func_name == "workers.verify.run_verify" and args and isinstance(args[0], dict):
        return args[0].get("repo")
    if job.func_name in ("app.report.handle_event", "workers.report.handle_event") \
            and len(args) >= 3:
        return ((args[2] or {}).get("repository") or {}).get("full_name")
    if args and isinstance(args[0], str):
        repo = connection.hget(f"mlxv:job:{args[0]}", "repo")
        return repo.decode() if repo else None
    return None


def job_row(job: Job) -> dict[str, Any]:
    def ts(value: datetime | None) -> float | None:
        return value.timestamp() if value else None

    return {"id": job.id, "description": job.description or job.func_name,
            "func": job.func_name, "status": job.get_status(refresh=False),
            "enqueued": ts(job.enqueued_at), "started": ts(job.started_at),
            "ended": ts(job.ended_at), "worker": job.worker_name or "",
            "verify": job.func_name == "workers.verify.run_verify"}


# ---- the router ------------------------------------------------------------------------

def dashboard_router(settings: AppSettings | None, connection: redis.Redis,
                     dashboard: DashboardSettings | None = None) -> APIRouter:
    """The /dashboard pages. settings: the App's (for GitHub permission checks and
    re-runs); None gives a read-only dashboard whose actions are refused."""
    config = dashboard or load_dashboard_settings()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(num=fmt_num, age=fmt_age, time=fmt_time, urlquote=quote)
    env.globals.update(duration=fmt_duration, prefix=PREFIX, shape=shape, paired=paired_lists,
                       sources=source_locations,
                       section_titles=SECTION_TITLES)
    router = APIRouter(prefix=PREFIX)

    def session(request: Request) -> dict[str, Any]:
        """The cookie's data; a login counts only while its session id is in Redis."""
        data = read_session(config.session_secret, request.cookies.get(COOKIE))
        if data.get("login"):
            sid = data.get("sid")
            try:
                stored = connection.get(SESSION_KEY + sid) if isinstance(sid, str) else None
            except redis.RedisError as e:  # fail closed: no login without the record
                log.warning("session lookup failed: %s", e)
                stored = None
            if stored is None or stored.decode() != data["login"]:
                return {}
        return data

    def start_session(login_name: str) -> dict[str, Any]:
        sid = secrets.token_urlsafe(24)
        connection.set(SESSION_KEY + sid, login_name, ex=SESSION_MAX_AGE_S)
        return {"login": login_name, "csrf": secrets.token_urlsafe(32), "sid": sid}

    def rate_limited(request: Request) -> Response | None:
        """A 429 page when this user (or, anonymous, this client address) has posted too
        many actions this minute. Counted in Redis; a Redis error refuses (503)."""
        login_name = session(request).get("login")
        if login_name:
            who, limit = f"user:{login_name}", config.actions_per_minute
        else:
            host = request.client.host if request.client else "unknown"
            who, limit = f"ip:{host}", config.anonymous_actions_per_minute
        minute = int(time.time() // 60)
        key = f"{RATE_KEY}{who}:{minute}"
        try:
            pipe = connection.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
        except redis.RedisError as e:
            log.warning("rate limit unavailable: %s", e)
            return message(request, "Unavailable", "Actions are unavailable for a moment; "
                           "try again.", 503)
        if count <= limit:
            return None
        wait = 60 - int(time.time()) % 60
        answer = message(request, "Too many requests", f"At most {limit} actions a minute; "
                         f"try again in {wait} s.", 429)
        answer.headers["Retry-After"] = str(wait)
        return answer

    def render(request: Request, name: str, status_code: int = 200, **context: Any
               ) -> HTMLResponse:
        data = session(request)
        path, query = request.url.path, request.url.query
        if request.method != "GET":  # after a POST, sign-in returns to the page it came from
            path, query = back(request), ""
        html = env.get_template(name).render(
            user=data.get("login"), csrf=data.get("csrf", ""),
            login_enabled=config.login_enabled, path=path, query=query, **context)
        return HTMLResponse(html, status_code=status_code)

    def back(request: Request) -> str:
        """The dashboard page a form was posted from (Referer), else the PR list."""
        referer = urlparse(request.headers.get("referer", ""))
        if referer.path.startswith(PREFIX) and referer.netloc == request.url.netloc:
            return referer.path + (f"?{referer.query}" if referer.query else "")
        return PREFIX

    def gate(request: Request) -> Response | None:
        """With DASHBOARD_REQUIRE_LOGIN, reading needs a login too."""
        if config.require_login and not session(request).get("login"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", 303)
        return None

    def set_session(response: Response, data: dict[str, Any]) -> None:
        assert config.session_secret
        response.set_cookie(COOKIE, sign_session(config.session_secret, data),
                            max_age=SESSION_MAX_AGE_S, path=PREFIX, httponly=True,
                            secure=config.secure_cookie, samesite="lax")

    def message(request: Request, title: str, text: str, status_code: int,
                link: str | None = None) -> HTMLResponse:
        return render(request, "message.html", status_code=status_code, title=title,
                      text=text, link=link)

    # -- read-only pages --

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    @router.get("/", response_class=HTMLResponse)
    def pr_list_page(request: Request, repository: str = "", state: str = "",
                     verdict: str = "", page: int = 1) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        page = max(1, page)
        rows, total = store.pr_list(
            connection, repository=repository or None,
            state=state if state in store.RUN_STATES else None,
            verdict=verdict if verdict in store.VERDICTS else None,
            offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        filters = {"repository": repository, "state": state, "verdict": verdict}
        return render(request, "prs.html", rows=rows, total=total, page=page,
                      pages=max(1, math.ceil(total / PAGE_SIZE)), filters=filters,
                      repositories=store.repositories(connection),
                      states=store.RUN_STATES, verdicts=store.VERDICTS, now=time.time(),
                      filter_query=urlencode({k: v for k, v in filters.items() if v}))

    @router.get("/prs/{owner}/{name}/{number}", response_class=HTMLResponse)
    def pr_page(request: Request, owner: str, name: str, number: int) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        repository = f"{owner}/{name}"
        pr = store.get_pr(connection, repository, number)
        runs = store.runs_for_pr(connection, repository, number)
        if pr is None and not runs:
            return message(request, "Not found", f"No runs of {repository}#{number}.", 404)
        # One row per pushed SHA (its newest run), newest push first.
        by_sha: dict[str, dict[str, Any]] = {}
        for run in runs:
            by_sha.setdefault(run.get("head_sha") or "", {**run, "attempts": 0, "regressed": []})
            by_sha[run.get("head_sha") or ""]["attempts"] += 1
        pushes = list(by_sha.values())
        columns = sorted({(mt, c) for run in pushes for mt, checks in run["matrix"].items()
                          for c in checks})
        # A regression: a cell that passed on the previous (older) push and not now.
        for newer, older in zip(pushes, pushes[1:], strict=False):
            newer["regressed"] = [
                f"{mt}/{c}" for mt, c in columns
                if older["matrix"].get(mt, {}).get(c) == "pass"
                and newer["matrix"].get(mt, {}).get(c) in ("fail", "error")]
        return render(request, "pr.html", repository=repository, number=number,
                      pr=pr or {}, pushes=pushes, columns=columns, runs=runs, now=time.time())

    @router.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request, model_type: str = "", page: int = 1) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        page = max(1, page)
        offset = (page - 1) * PAGE_SIZE
        if model_type:
            runs = store.runs_for_model_type(connection, model_type, offset, PAGE_SIZE)
        else:
            runs = store.recent_runs(connection, offset, PAGE_SIZE)
        return render(request, "runs.html", runs=runs, model_type=model_type, page=page,
                      has_more=len(runs) == PAGE_SIZE, now=time.time())

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        run = store.get_run(connection, run_id)
        if run is None:
            return message(request, "Not found", f"No stored run {run_id}.", 404)
        charts = {}
        if run.results is not None:
            for r_index, report in enumerate(run.results.reports):
                for c_index, check in enumerate(report.checks):
                    if check.layers:
                        charts[(r_index, c_index)] = layer_chart(check)
        reproduce = run.results.command if run.results is not None else ""
        if run.kind == "pr" and run.repository and run.head_sha and run.pr is not None:
            from .comment import reproduce as reproduce_lines

            lines = reproduce_lines(run.repository, run.pr, run.head_sha,
                                    run.model_types(), run.request)
            reproduce = "\n".join(line for line in lines if not line.startswith("```"))
        return render(request, "run.html", run=run, meta=run.meta(), charts=charts,
                      reproduce=reproduce, attempts=attempts_of(run), now=time.time())

    def attempts_of(run: store.Run) -> list[tuple[int, str]]:
        """(attempt, run id) of every kept attempt of this run's job, oldest first; the
        job id itself holds the latest (store.record_job)."""
        if run.kind != "pr":
            return []
        job_id = run.id.split(".", 1)[0]
        latest = store.get_metas(connection, [job_id])
        count = int(latest[0].get("attempt") or 1) if latest else run.attempt
        if count <= 1:
            return []
        ids = [f"{job_id}.{n}" for n in range(1, count)] + [job_id]
        kept = set(store.get_run_ids(connection, ids))
        return [(n, i) for n, i in enumerate(ids, start=1) if i in kept]

    @router.get("/runs/{run_id}/results.json")
    def run_json(request: Request, run_id: str) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        run = store.get_run(connection, run_id)
        if run is None or run.results is None:
            return JSONResponse({"error": "no results for this run"}, status_code=404)
        return Response(run.results.model_dump_json(indent=2), media_type="application/json",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{_safe(run_id)}.json"'})

    @router.get("/runs/{run_id}/report.md")
    def run_markdown(request: Request, run_id: str) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        run = store.get_run(connection, run_id)
        if run is None or run.results is None:
            return Response("no results for this run\n", status_code=404,
                            media_type="text/plain")
        return Response(markdown.render(run.results), media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{_safe(run_id)}.md"'})

    @router.get("/queue", response_class=HTMLResponse)
    def queue_page(request: Request) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        queues = []
        for name in queue_names(connection):
            queue = Queue(name, connection=connection, serializer=JSONSerializer)
            sections = []
            for label, ids, total in (
                ("queued", queue.get_job_ids(0, 49), queue.count),
                ("running", queue.started_job_registry.get_job_ids(0, 49),
                 queue.started_job_registry.count),
                ("failed", queue.failed_job_registry.get_job_ids(0, 49),
                 queue.failed_job_registry.count),
                ("finished", queue.finished_job_registry.get_job_ids(0, 49),
                 queue.finished_job_registry.count),
            ):
                jobs = [job_row(j) for j in Job.fetch_many(ids, connection=connection,
                                                           serializer=JSONSerializer) if j]
                sections.append({"label": label, "jobs": jobs, "total": total})
            queues.append({"name": name, "sections": sections})
        workers = []
        for worker in Worker.all(connection=connection, serializer=JSONSerializer):
            names = worker.queue_names()
            workers.append({"name": worker.name, "hostname": worker.hostname or "",
                            "pid": worker.pid, "queues": names,
                            "memory_class": memory_class(names), "state": worker.get_state(),
                            "heartbeat": worker.last_heartbeat.timestamp()
                            if worker.last_heartbeat else None,
                            "job": worker.get_current_job_id() or ""})
        known = set(store.get_run_ids(connection, [j["id"] for q in queues
                                                   for s in q["sections"] for j in s["jobs"]]))
        return render(request, "queue.html", queues=queues, workers=workers, known=known,
                      now=time.time())

    @router.get("/matrix", response_class=HTMLResponse)
    def matrix_page(request: Request, sweep: str = "", compare: str = "") -> Response:
        if (denied := gate(request)) is not None:
            return denied
        sweeps = store.list_sweeps(connection)
        chosen = next((s for s in sweeps if s["id"] == sweep), sweeps[0] if sweeps else None)
        matrix, checks, changes, previous, other_environments = {}, [], [], None, []
        if chosen is not None:
            matrix = store.sweep_matrix(connection, chosen)
            checks = sorted({c for row in matrix.values() for c in row["checks"]})
            index = sweeps.index(chosen)
            # the same mlx-lm tree swept under another environment (a newer transformers)
            other_environments = [s for s in sweeps if s["id"] != chosen["id"]
                                  and s["mlx_lm"] == chosen["mlx_lm"]
                                  and s["transformers"] != chosen["transformers"]]
            previous = next((s for s in sweeps if s["id"] == compare and s is not chosen),
                            sweeps[index + 1] if index + 1 < len(sweeps) else None)
            if previous is not None:
                before = store.sweep_matrix(connection, previous)
                for model_type in sorted(set(matrix) | set(before)):
                    old = before.get(model_type, {"checks": {}, "run": None})
                    new = matrix.get(model_type, {"checks": {}, "run": None})
                    for check in sorted(set(old["checks"]) | set(new["checks"])):
                        a, b = old["checks"].get(check), new["checks"].get(check)
                        if a != b:
                            changes.append({"model_type": model_type, "check": check,
                                            "before": a or "absent", "after": b or "absent",
                                            "before_run": old["run"], "after_run": new["run"]})
        return render(request, "matrix.html", sweeps=sweeps, chosen=chosen, matrix=matrix,
                      checks=checks, changes=changes, previous=previous,
                      other_environments=other_environments)

    # -- login --

    @router.get("/login")
    def login(request: Request, next: str = PREFIX) -> Response:
        if not config.login_enabled:
            return message(request, "Login not configured",
                           "This dashboard has no GitHub OAuth app configured "
                           "(GITHUB_OAUTH_CLIENT_ID, GITHUB_OAUTH_CLIENT_SECRET, "
                           "DASHBOARD_SESSION_SECRET).", 503)
        state = secrets.token_urlsafe(24)
        target = next if next.startswith(PREFIX) and not next.startswith("//") else PREFIX
        query = urlencode({"client_id": config.oauth_client_id,
                           "redirect_uri": callback_url(request), "state": state,
                           "allow_signup": "false"})
        response = RedirectResponse(f"{config.oauth_url}/login/oauth/authorize?{query}", 303)
        set_session(response, {**session(request), "oauth_state": state, "next": target})
        return response

    def callback_url(request: Request) -> str:
        if config.dashboard_url:
            return f"{config.dashboard_url}/oauth/callback"
        return str(request.url_for("oauth_callback"))

    @router.get("/oauth/callback", name="oauth_callback")
    async def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
        data = session(request)
        # bytes: compare_digest raises on non-ASCII text
        if not config.login_enabled or not code or not state or \
                not hmac.compare_digest(state.encode(), (data.get("oauth_state") or "").encode()):
            return message(request, "Login failed", "The login state did not match; "
                           "start again.", 400, link=f"{PREFIX}/login")
        try:
            login_name = await run_in_threadpool(github_login, config, code,
                                                 callback_url(request))
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.warning("oauth: %s", e)
            return message(request, "Login failed", "GitHub did not confirm the login.", 502)
        response = RedirectResponse(data.get("next") or PREFIX, 303)
        # A fresh CSRF token per login; the OAuth token itself is not kept.
        set_session(response, start_session(login_name))
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        if (refused := await check_csrf(request)) is not None:
            return refused
        sid = session(request).get("sid")
        if isinstance(sid, str):
            connection.delete(SESSION_KEY + sid)  # the cookie no longer works anywhere
        response = RedirectResponse(PREFIX, 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # -- actions --

    async def check_csrf(request: Request) -> Response | None:
        """Every POST comes here first: rate limit, login, CSRF token."""
        if (limited := rate_limited(request)) is not None:
            return limited
        data = session(request)
        body = (await request.body())[:4096].decode(errors="replace")
        token = (parse_qs(body).get("csrf") or [""])[0]
        if not data.get("login"):
            return message(request, "Login required",
                           "Actions need a GitHub login with write access to the repository.",
                           401, link=f"{PREFIX}/login?{urlencode({'next': back(request)})}")
        if not token or not hmac.compare_digest(token.encode(),
                                                 (data.get("csrf") or "").encode()):
            return message(request, "Refused", "The form's CSRF token is missing or stale; "
                           "reload the page and try again.", 403)
        return None

    def authorised(login_name: str, repository: str | None) -> tuple[bool, str]:
        """Write permission of login on repository, asked of GitHub now; no on any doubt."""
        if settings is None or not repository or "/" not in repository:
            return False, "this run's repository cannot be checked for permission"
        from . import github

        owner, name = repository.split("/", 1)
        try:
            gh, _ = installation(owner, name)
            if github.has_write_permission(gh, owner, name, login_name):
                return True, ""
        except Exception as e:  # noqa: BLE001 - GitHub away: fail closed
            log.warning("permission check failed: %s", e)
        return False, f"{login_name} has no write permission on {repository}"

    def installation(owner: str, name: str):
        from . import github

        assert settings is not None
        app_gh = github.app_client(settings, connection)
        installation_id = github.repo_installation(app_gh, owner, name)
        return github.installation_client(settings, connection, installation_id), \
            installation_id

    @router.post("/runs/{run_id}/rerun")
    async def rerun(request: Request, run_id: str) -> Response:
        if (refused := await check_csrf(request)) is not None:
            return refused
        login_name = session(request)["login"]
        run = store.get_run(connection, run_id)
        if run is None or run.kind != "pr" or run.pr is None:
            return message(request, "Refused", "Only stored PR runs can be re-run here.", 404)
        ok, why = await run_in_threadpool(authorised, login_name, run.repository)
        if not ok:
            return message(request, "Refused", why, 403)
        try:
            text, job_id = await run_in_threadpool(rerun_run, run, login_name)
        except RerunRefused as e:
            return message(request, "Not re-run", str(e), 409)
        return message(request, "Re-run requested", text, 200,
                       link=f"{PREFIX}/runs/{quote(job_id)}")

    def rerun_run(run: store.Run, login_name: str) -> tuple[str, str]:
        from . import github, report
        from .commands import VerifyRequest

        assert settings is not None and run.repository and run.head_sha and run.pr is not None
        owner, name = run.repository.split("/", 1)
        gh, installation_id = installation(owner, name)
        pull = github.get_pull(gh, owner, name, run.pr)
        if pull is None or pull.get("state") != "open":
            raise RerunRefused("the pull request is not open")
        if pull["head"]["sha"] != run.head_sha:
            raise RerunRefused(f"{run.head_sha[:12]} is no longer the PR head "
                               f"({pull['head']['sha'][:12]}); re-run its latest run instead")
        files = github.changed_files(gh, owner, name, run.pr)
        fields = ("model_types", "hub", "checks", "dtype", "source")
        request = VerifyRequest.from_dict({k: v for k, v in run.request.items() if k in fields})
        text = report.start_verify(settings, connection, gh, installation_id, run.repository,
                                   run.pr, run.head_sha, request, files, rerun=True,
                                   base_sha=(pull.get("base") or {}).get("sha"))
        job_id = report.verify_job_id(run.repository, run.pr, run.head_sha, request)
        if text.startswith("enqueued"):  # "already queued/started": that run stands
            store.record_job(connection, job_id, "queued", requested_by=login_name,
                             title=run.title)
        return text, job_id

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> Response:
        if (refused := await check_csrf(request)) is not None:
            return refused
        login_name = session(request)["login"]
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return message(request, "Not found", f"No job {job_id} in the queue.", 404)
        ok, why = await run_in_threadpool(authorised, login_name,
                                          job_repository(connection, job))
        if not ok:
            return message(request, "Refused", why, 403)
        text = await run_in_threadpool(cancel_job, job, login_name)
        return message(request, "Cancel", text, 200, link=f"{PREFIX}/queue")

    def cancel_job(job: Job, login_name: str) -> str:
        status = job.get_status()
        if job.func_name == "workers.verify.run_verify" and \
                connection.hget(f"mlxv:job:{job.id}", "state") == b"cancelling":
            # cancelled before, but GitHub failed then: complete its Check Run now
            return close_or_explain(job.id, login_name,
                                    f"job {job.id} cancelled by {login_name}; its Check Run "
                                    "is completed")
        try:
            if status == JobStatus.STARTED:
                send_stop_job_command(connection, job.id, serializer=JSONSerializer)
            elif status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
            else:
                return f"job {job.id} is {status.value}: nothing to cancel"
        except InvalidJobOperation as e:
            return f"job {job.id} could not be cancelled: {e}"
        done = f"job {job.id} ({status.value}) cancelled by {login_name}"
        if job.func_name == "workers.verify.run_verify":
            return close_or_explain(job.id, login_name, done)
        return done

    def close_or_explain(job_id: str, login_name: str, done: str) -> str:
        try:
            close_check_run(job_id, login_name)
        except Exception as e:  # noqa: BLE001 - GitHub away: said, and cancel works again
            log.warning("cancel %s: Check Run not completed: %s", job_id, e)
            return (f"job {job_id} stopped, but GitHub did not take the Check Run's "
                    f"completion ({type(e).__name__}); cancel it again to retry")
        return done

    def close_check_run(job_id: str, login_name: str) -> None:
        """Complete the job's Check Run (never left queued or in progress) and mark the
        job cancelled, so a late report of it changes nothing."""
        from . import github

        info = {k.decode(): v.decode()
                for k, v in connection.hgetall(f"mlxv:job:{job_id}").items()}
        if not info or info.get("state") not in ("queued", "running", "cancelling"):
            return
        # "cancelling": late reports of the runner change nothing from here on; only
        # once GitHub has the Check Run completed is the job "cancelled" (a GitHub error
        # leaves it "cancelling", and cancelling again completes it).
        store.set_job_state(connection, job_id, "cancelling")
        if settings is not None and info.get("check_run_id"):
            owner, name = info["repo"].split("/", 1)
            gh = github.installation_client(settings, connection, int(info["installation_id"]))
            github.update_check_run(
                gh, owner, name, int(info["check_run_id"]), status="completed",
                conclusion="cancelled", completed_at=datetime.now(UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"),
                output={"title": "cancelled", "summary": "Cancelled from the dashboard by a "
                                                         "maintainer."})
        store.set_job_state(connection, job_id, "cancelled",
                            reason=f"cancelled by {login_name}")

    @router.post("/jobs/{job_id}/retry")
    async def retry(request: Request, job_id: str) -> Response:
        """A failed report job runs again; a failed verify job is re-run (new Check Run)."""
        if (refused := await check_csrf(request)) is not None:
            return refused
        login_name = session(request)["login"]
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return message(request, "Not found", f"No job {job_id} in the queue.", 404)
        ok, why = await run_in_threadpool(authorised, login_name,
                                          job_repository(connection, job))
        if not ok:
            return message(request, "Refused", why, 403)
        if job.func_name == "workers.verify.run_verify":
            run = store.get_run(connection, job_id)
            if run is None:
                return message(request, "Not re-run", "This job has no stored run.", 409)
            try:
                text, new_id = await run_in_threadpool(rerun_run, run, login_name)
            except RerunRefused as e:
                return message(request, "Not re-run", str(e), 409)
            return message(request, "Re-run requested", text, 200,
                           link=f"{PREFIX}/runs/{quote(new_id)}")
        if job.get_status() != JobStatus.FAILED:
            return message(request, "Not retried", f"job {job_id} has not failed", 409)
        job.requeue()
        return message(request, "Retried", f"job {job_id} queued again by {login_name}", 200,
                       link=f"{PREFIX}/queue")

    return router


class RerunRefused(Exception):
    """A re-run that would report on the wrong commit or a closed PR."""


def github_login(config: DashboardSettings, code: str, redirect_uri: str) -> str:
    """Exchange an OAuth code for a token, read the user's login, drop the token."""
    with httpx.Client(timeout=15.0) as client:
        answer = client.post(f"{config.oauth_url}/login/oauth/access_token",
                             headers={"Accept": "application/json"},
                             data={"client_id": config.oauth_client_id,
                                   "client_secret": config.oauth_client_secret,
                                   "code": code, "redirect_uri": redirect_uri})
        answer.raise_for_status()
        token = answer.json()["access_token"]
        user = client.get(f"{config.api_url}/user", headers={
            "Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"})
        user.raise_for_status()
        login_name = user.json()["login"]
    if not isinstance(login_name, str) or not login_name:
        raise ValueError("no login in the user answer")
    return login_name


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]

