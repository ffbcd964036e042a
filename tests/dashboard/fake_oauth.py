"""GitHub's OAuth web flow, added to the fake GitHub of tests/app (composed, not edited).

authorize "logs in" as whoever the test named in `OAuthState.login_as` and redirects
back with a code; access_token swaps the code (with the right client secret) for a
token; /user answers for that token. All of it over HTTP on loopback.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse


@dataclass
class OAuthState:
    client_id: str
    client_secret: str
    login_as: str | None = None
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # code -> (login, uri)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> login
    authorize_calls: list[dict[str, str]] = field(default_factory=list)


def add_oauth_routes(app: FastAPI, oauth: OAuthState) -> None:
    @app.get("/login/oauth/authorize")
    async def authorize(request: Request):
        params = dict(request.query_params)
        oauth.authorize_calls.append(params)
        if params.get("client_id") != oauth.client_id or oauth.login_as is None:
            raise HTTPException(404, "unknown OAuth app or nobody signed in")
        code = secrets.token_hex(10)
        oauth.codes[code] = (oauth.login_as, params.get("redirect_uri", ""))
        query = urlencode({"code": code, "state": params.get("state", "")})
        return RedirectResponse(f"{params['redirect_uri']}?{query}", 302)

    @app.post("/login/oauth/access_token")
    async def access_token(request: Request):
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("client_id") != oauth.client_id or \
                form.get("client_secret") != oauth.client_secret:
            return JSONResponse({"error": "incorrect_client_credentials"})
        login, uri = oauth.codes.pop(form.get("code", ""), (None, None))
        if login is None or uri != form.get("redirect_uri"):
            return JSONResponse({"error": "bad_verification_code"})
        token = "gho_" + secrets.token_hex(16)
        oauth.tokens[token] = login
        return {"access_token": token, "token_type": "bearer", "scope": ""}

    @app.get("/user")
    async def user(request: Request):
        auth = request.headers.get("authorization", "")
        login = oauth.tokens.get(auth.removeprefix("Bearer ").removeprefix("token "))
        if login is None:
            raise HTTPException(401, "Bad credentials")
        return {"login": login, "id": abs(hash(login)) % 100000, "type": "User"}
