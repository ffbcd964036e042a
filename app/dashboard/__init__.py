"""The maintainer dashboard under /dashboard: server-rendered pages, no JavaScript needed.

This package: the settings, the signed session cookie and the shared rendering (here);
who is asking, the login and CSRF dependencies and the OAuth routes (auth.py); the
read-only pages (pages.py); the POSTed actions (actions.py).

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
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import jinja2
import redis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute

from mlx_verify.checks import render as results_render

from ..settings import AppSettings, SettingsError, secret

log = logging.getLogger("mlx-verify.dashboard")

PREFIX = "/dashboard"
COOKIE = "mlxv_session"
SESSION_MAX_AGE_S = 12 * 3600
SESSION_KEY = "mlxv:session:"  # + session id -> login; deleted on logout
RATE_KEY = "mlxv:ratelimit:"  # + who + minute -> actions posted in that minute
TEMPLATES = Path(__file__).parent.parent / "templates"
CHECK_TEMPLATES = Path(results_render.__file__).with_name("templates")
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


# ---- what every route module shares ------------------------------------------------------

class Refused(Exception):
    """Raised by a dependency (login gate, CSRF check) or a route's helper to answer with
    this page instead; DashboardRoute turns it into the response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class DashboardRoute(APIRoute):
    """An APIRoute whose dependencies may answer the request themselves (Refused), so a
    refusal is an HTML page like the rest of the dashboard, not FastAPI's JSON error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Refused as refused:
                return refused.response

        return answer


@dataclass
class Dashboard:
    """One dashboard: its settings, Redis, the App's settings (None: read-only, actions
    are refused) and the templates."""

    config: DashboardSettings
    connection: redis.Redis
    settings: AppSettings | None
    env: jinja2.Environment

    def session(self, request: Request) -> dict[str, Any]:
        """The cookie's data; a login counts only while its session id is in Redis."""
        data = read_session(self.config.session_secret, request.cookies.get(COOKIE))
        if data.get("login"):
            sid = data.get("sid")
            try:
                stored = self.connection.get(SESSION_KEY + sid) if isinstance(sid, str) \
                    else None
            except redis.RedisError as e:  # fail closed: no login without the record
                log.warning("session lookup failed: %s", e)
                stored = None
            if stored is None or stored.decode() != data["login"]:
                return {}
        return data

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any
               ) -> HTMLResponse:
        data = self.session(request)
        path, query = request.url.path, request.url.query
        if request.method != "GET":  # after a POST, sign-in returns to the page it came from
            path, query = self.back(request), ""
        html = self.env.get_template(name).render(
            user=data.get("login"), csrf=data.get("csrf", ""),
            login_enabled=self.config.login_enabled, path=path, query=query, **context)
        return HTMLResponse(html, status_code=status_code)

    def message(self, request: Request, title: str, text: str, status_code: int,
                link: str | None = None) -> HTMLResponse:
        return self.render(request, "message.html", status_code=status_code, title=title,
                           text=text, link=link)

    @staticmethod
    def back(request: Request) -> str:
        """The dashboard page a form was posted from (Referer), else the PR list."""
        referer = urlparse(request.headers.get("referer", ""))
        if referer.path.startswith(PREFIX) and referer.netloc == request.url.netloc:
            return referer.path + (f"?{referer.query}" if referer.query else "")
        return PREFIX


def dashboard_router(settings: AppSettings | None, connection: redis.Redis,
                     dashboard: DashboardSettings | None = None) -> APIRouter:
    """The /dashboard pages. settings: the App's (for GitHub permission checks and
    re-runs); None gives a read-only dashboard whose actions are refused."""
    from . import actions, auth, pages  # they import this module's names

    # checks/templates: the parts the run page shares with the standalone HTML report
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([TEMPLATES, CHECK_TEMPLATES]),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(num=results_render.num, cosine=results_render.cosine, age=fmt_age,
                       time=fmt_time, urlquote=quote)
    # shared with the standalone HTML report (checks/render.py)
    env.globals.update(duration=fmt_duration, prefix=PREFIX, shape=results_render.shape,
                       paired=results_render.paired_lists, sources=results_render.sources,
                       section_titles=SECTION_TITLES)
    dash = Dashboard(dashboard or load_dashboard_settings(), connection, settings, env)
    router = APIRouter()
    router.include_router(pages.router(dash))
    router.include_router(auth.router(dash))
    router.include_router(actions.router(dash))
    return router
