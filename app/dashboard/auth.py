"""Who is asking: the login gate and the CSRF check as FastAPI dependencies, the rate limit
of actions, and the GitHub OAuth login and logout routes."""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from . import (
    COOKIE,
    PREFIX,
    RATE_KEY,
    SESSION_KEY,
    SESSION_MAX_AGE_S,
    Dashboard,
    DashboardRoute,
    DashboardSettings,
    Refused,
    sign_session,
)

log = logging.getLogger("mlx-verify.dashboard")


def signed_in_to_read(dash: Dashboard) -> Callable[[Request], None]:
    """With DASHBOARD_REQUIRE_LOGIN, reading needs a login too: a redirect to sign-in."""

    def gate(request: Request) -> None:
        if dash.config.require_login and not dash.session(request).get("login"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise Refused(RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}",
                                           303))

    return gate


def signed_in_to_act(dash: Dashboard) -> Callable[[Request], Awaitable[str]]:
    """Every POST passes here first: rate limit, login, CSRF token. Gives the login."""

    async def check(request: Request) -> str:
        rate_limit(dash, request)
        data = dash.session(request)
        body = (await request.body())[:4096].decode(errors="replace")
        token = (parse_qs(body).get("csrf") or [""])[0]
        if not data.get("login"):
            raise Refused(dash.message(
                request, "Login required",
                "Actions need a GitHub login with write access to the repository.", 401,
                link=f"{PREFIX}/login?{urlencode({'next': dash.back(request)})}"))
        if not token or not hmac.compare_digest(token.encode(),
                                                 (data.get("csrf") or "").encode()):
            raise Refused(dash.message(request, "Refused", "The form's CSRF token is missing "
                                       "or stale; reload the page and try again.", 403))
        return data["login"]

    return check


def rate_limit(dash: Dashboard, request: Request) -> None:
    """Refused with a 429 page when this user (or, anonymous, this client address) has
    posted too many actions this minute. Counted in Redis; a Redis error refuses (503)."""
    login_name = dash.session(request).get("login")
    if login_name:
        who, limit = f"user:{login_name}", dash.config.actions_per_minute
    else:
        host = request.client.host if request.client else "unknown"
        who, limit = f"ip:{host}", dash.config.anonymous_actions_per_minute
    minute = int(time.time() // 60)
    key = f"{RATE_KEY}{who}:{minute}"
    try:
        pipe = dash.connection.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
    except redis.RedisError as e:
        log.warning("rate limit unavailable: %s", e)
        raise Refused(dash.message(request, "Unavailable", "Actions are unavailable for a "
                                   "moment; try again.", 503)) from e
    if count <= limit:
        return
    wait = 60 - int(time.time()) % 60
    answer = dash.message(request, "Too many requests", f"At most {limit} actions a minute; "
                          f"try again in {wait} s.", 429)
    answer.headers["Retry-After"] = str(wait)
    raise Refused(answer)


def start_session(dash: Dashboard, login_name: str) -> dict[str, Any]:
    sid = secrets.token_urlsafe(24)
    dash.connection.set(SESSION_KEY + sid, login_name, ex=SESSION_MAX_AGE_S)
    return {"login": login_name, "csrf": secrets.token_urlsafe(32), "sid": sid}


def set_session(dash: Dashboard, response: Response, data: dict[str, Any]) -> None:
    assert dash.config.session_secret
    response.set_cookie(COOKIE, sign_session(dash.config.session_secret, data),
                        max_age=SESSION_MAX_AGE_S, path=PREFIX, httponly=True,
                        secure=dash.config.secure_cookie, samesite="lax")


def router(dash: Dashboard) -> APIRouter:
    """/login, /oauth/callback and /logout."""
    config = dash.config
    routes = APIRouter(prefix=PREFIX, route_class=DashboardRoute)

    def callback_url(request: Request) -> str:
        if config.dashboard_url:
            return f"{config.dashboard_url}/oauth/callback"
        return str(request.url_for("oauth_callback"))

    @routes.get("/login")
    def login(request: Request, next: str = PREFIX) -> Response:
        if not config.login_enabled:
            return dash.message(request, "Login not configured",
                                "This dashboard has no GitHub OAuth app configured "
                                "(GITHUB_OAUTH_CLIENT_ID, GITHUB_OAUTH_CLIENT_SECRET, "
                                "DASHBOARD_SESSION_SECRET).", 503)
        state = secrets.token_urlsafe(24)
        target = next if next.startswith(PREFIX) and not next.startswith("//") else PREFIX
        query = urlencode({"client_id": config.oauth_client_id,
                           "redirect_uri": callback_url(request), "state": state,
                           "allow_signup": "false"})
        response = RedirectResponse(f"{config.oauth_url}/login/oauth/authorize?{query}", 303)
        set_session(dash, response, {**dash.session(request), "oauth_state": state,
                                     "next": target})
        return response

    @routes.get("/oauth/callback", name="oauth_callback")
    async def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
        data = dash.session(request)
        # bytes: compare_digest raises on non-ASCII text
        if not config.login_enabled or not code or not state or \
                not hmac.compare_digest(state.encode(), (data.get("oauth_state") or "").encode()):
            return dash.message(request, "Login failed", "The login state did not match; "
                                "start again.", 400, link=f"{PREFIX}/login")
        try:
            login_name = await run_in_threadpool(github_login, config, code,
                                                 callback_url(request))
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.warning("oauth: %s", e)
            return dash.message(request, "Login failed", "GitHub did not confirm the login.",
                                502)
        response = RedirectResponse(data.get("next") or PREFIX, 303)
        # A fresh CSRF token per login; the OAuth token itself is not kept.
        set_session(dash, response, start_session(dash, login_name))
        return response

    @routes.post("/logout", dependencies=[Depends(signed_in_to_act(dash))])
    def logout(request: Request) -> Response:
        sid = dash.session(request).get("sid")
        if isinstance(sid, str):
            dash.connection.delete(SESSION_KEY + sid)  # the cookie no longer works anywhere
        response = RedirectResponse(PREFIX, 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    return routes


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
