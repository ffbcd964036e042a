"""A stand-in for the GitHub REST API, served over HTTP on loopback.

Implements exactly the endpoints the App uses, with GitHub's JSON shapes (the fields
that matter, plus the usual neighbours), checks App JWTs against the App's public key
and installation tokens it minted itself, and records every write.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

BOT_ID = 4242
APP_SLUG = "mlx-verify-test"
# GitHub's limits: longer bodies and Check Run outputs are refused with 422.
COMMENT_BODY_MAX = 65_536
CHECK_OUTPUT_MAX = 65_535
# GitHub's answer to a burst of content-creating requests (REST docs, "Exceeding the
# rate limit"): 403 with this message, and usually a Retry-After header.
SECONDARY_RATE_LIMIT_MESSAGE = ("You have exceeded a secondary rate limit. Please wait a few "
                                "minutes before you try again.")
SECONDARY_RATE_LIMIT_DOCS = ("https://docs.github.com/rest/using-the-rest-api/"
                             "rate-limits-for-the-rest-api#about-secondary-rate-limits")


@dataclass
class Pull:
    number: int
    head_sha: str
    base_sha: str
    files: list[str]
    author: str
    draft: bool = False
    state: str = "open"
    # filename -> (status, patch): GitHub's `patch` is the unified diff of the file from
    # its first "@@" hunk header on; None for binary files and diffs too large to show
    diffs: dict[str, tuple[str, str | None]] = field(default_factory=dict)


@dataclass
class FakeGitHub:
    app_id: int
    public_key: str
    installation_id: int = 77
    permissions: dict[str, str] = field(default_factory=dict)  # login -> admin/write/read
    pulls: dict[tuple[str, int], Pull] = field(default_factory=dict)
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)
    check_runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    reactions: list[dict[str, Any]] = field(default_factory=list)
    writes: list[tuple[str, str, Any]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    # (method, path fragment, status, times left, body, headers): the next matching
    # requests fail, in the order the faults were added
    faults: list[list[Any]] = field(default_factory=list)
    # (method, path fragment, seconds, times left): the next matching requests are
    # answered only after that many seconds (a slow GitHub, or a worker to kill mid-call)
    delays: list[list[Any]] = field(default_factory=list)

    def fail_next(self, method: str, path_part: str, status: int = 502, times: int = 1) -> None:
        """The next `times` requests of method to a path containing path_part answer
        status (GitHub having a bad moment)."""
        with self.lock:
            self.faults.append([method, path_part, status, times,
                                {"message": "injected fault"}, {}])

    def rate_limit_next(self, method: str, path_part: str, times: int = 1,
                        retry_after_s: int = 1) -> None:
        """The next `times` matching requests get GitHub's secondary rate limit answer:
        403, its message and a Retry-After header (what content-creating bursts get)."""
        with self.lock:
            self.faults.append([method, path_part, 403, times, {
                "message": SECONDARY_RATE_LIMIT_MESSAGE,
                "documentation_url": SECONDARY_RATE_LIMIT_DOCS},
                {"retry-after": str(retry_after_s)}])

    def delay_next(self, method: str, path_part: str, seconds: float, times: int = 1) -> None:
        """The next `times` requests of method to a path containing path_part are answered
        `seconds` later."""
        with self.lock:
            self.delays.append([method, path_part, seconds, times])

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.delays.clear()
            self.permissions.clear()
            self.pulls.clear()
            self.comments.clear()
            self.check_runs.clear()
            self.reactions.clear()
            self.writes.clear()


def _user(login: str, user_id: int, kind: str = "User") -> dict[str, Any]:
    return {"login": login, "id": user_id, "node_id": f"U_{user_id}", "type": kind,
            "site_admin": False, "avatar_url": "", "url": f"https://api.example/users/{login}",
            "html_url": f"https://example/{login}"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _page(request: Request, items: list[Any]) -> JSONResponse:
    per_page = min(int(request.query_params.get("per_page", 30)), 100)
    page = int(request.query_params.get("page", 1))
    chunk = items[(page - 1) * per_page: page * per_page]
    headers = {}
    if page * per_page < len(items):
        url = request.url.include_query_params(page=page + 1, per_page=per_page)
        headers["Link"] = f'<{url}>; rel="next"'
    return JSONResponse(chunk, headers=headers)


def create_app(state: FakeGitHub) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def injected_faults(request: Request, call_next):
        wait_s = 0.0
        with state.lock:
            for delay in state.delays:
                method, part, seconds, times = delay
                if request.method == method and part in request.url.path and times > 0:
                    delay[3] -= 1
                    wait_s = seconds
                    break
        if wait_s:
            await asyncio.sleep(wait_s)
        with state.lock:
            for fault in state.faults:
                method, part, status, times, body, headers = fault
                if request.method == method and part in request.url.path and times > 0:
                    fault[3] -= 1
                    state.writes.append((request.method, request.url.path, f"fault {status}"))
                    return JSONResponse(body, status_code=status, headers=headers)
        return await call_next(request)

    def too_long(body: dict[str, Any]) -> None:
        if len(body.get("body") or "") > COMMENT_BODY_MAX:
            raise HTTPException(422, "body is too long (maximum is 65536 characters)")
        output = body.get("output") or {}
        for key in ("summary", "text"):
            if len(output.get(key) or "") > CHECK_OUTPUT_MAX:
                raise HTTPException(422, f"output.{key} is too long (maximum is 65535)")

    def require_jwt(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise HTTPException(401, "Bearer JWT required")
        try:
            claims = jwt.decode(auth[7:], state.public_key, algorithms=["RS256"])
        except jwt.PyJWTError as e:
            raise HTTPException(401, f"bad JWT: {e}") from None
        if str(claims.get("iss")) != str(state.app_id):
            raise HTTPException(401, "JWT for another App")

    def require_token(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("token ") or auth[6:] not in state.tokens:
            raise HTTPException(401, "Bad credentials")

    def pull_json(repo: str, pull: Pull) -> dict[str, Any]:
        return {
            "url": f"https://api.example/repos/{repo}/pulls/{pull.number}",
            "id": pull.number * 7, "number": pull.number, "state": pull.state,
            "draft": pull.draft, "title": "a change", "user": _user(pull.author, 9000),
            "head": {"ref": f"pr-{pull.number}", "sha": pull.head_sha,
                     "repo": {"full_name": repo}, "label": f"x:pr-{pull.number}"},
            "base": {"ref": "main", "sha": pull.base_sha, "repo": {"full_name": repo},
                     "label": "x:main"},
        }

    def record(request: Request, body: Any) -> None:
        with state.lock:
            state.writes.append((request.method, request.url.path, body))

    @app.post("/app/installations/{installation_id}/access_tokens", status_code=201)
    async def access_token(installation_id: int, request: Request):
        require_jwt(request)
        if installation_id != state.installation_id:
            raise HTTPException(404, "Not Found")
        token = "ghs_" + secrets.token_hex(16)
        state.tokens.add(token)
        record(request, None)
        expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "expires_at": expires, "permissions": {
            "checks": "write", "pull_requests": "write", "issues": "write",
            "contents": "read", "metadata": "read"}, "repository_selection": "all"}

    @app.get("/app")
    async def get_app(request: Request):
        require_jwt(request)
        return {"id": state.app_id, "slug": APP_SLUG, "name": "mlx-verify test",
                "owner": _user("ml-explore", 1, "Organization"), "description": "",
                "external_url": "https://example", "html_url": "https://example/apps/x",
                "created_at": _now(), "updated_at": _now(), "permissions": {}, "events": []}

    @app.get("/repos/{owner}/{repo}/installation")
    async def repo_installation(owner: str, repo: str, request: Request):
        require_jwt(request)
        return {"id": state.installation_id, "account": _user(owner, 1, "Organization"),
                "app_id": state.app_id, "target_type": "Organization"}

    @app.get("/users/{login}")
    async def get_user(login: str):
        if login == f"{APP_SLUG}[bot]":
            return _user(login, BOT_ID, "Bot")
        return _user(login, abs(hash(login)) % 100000)

    @app.get("/repos/{owner}/{repo}/pulls")
    async def list_pulls(owner: str, repo: str, request: Request):
        require_token(request)
        full = f"{owner}/{repo}"
        items = [pull_json(full, p) for (r, _), p in sorted(state.pulls.items())
                 if r == full and p.state == "open"]
        return _page(request, items)

    @app.get("/repos/{owner}/{repo}/pulls/{number}")
    async def get_pull(owner: str, repo: str, number: int, request: Request):
        require_token(request)
        pull = state.pulls.get((f"{owner}/{repo}", number))
        if pull is None:
            raise HTTPException(404, "Not Found")
        return pull_json(f"{owner}/{repo}", pull)

    @app.get("/repos/{owner}/{repo}/pulls/{number}/files")
    async def pull_files(owner: str, repo: str, number: int, request: Request):
        require_token(request)
        pull = state.pulls.get((f"{owner}/{repo}", number))
        if pull is None:
            raise HTTPException(404, "Not Found")
        items = []
        for f in pull.files:
            status, patch = pull.diffs.get(f, ("modified", None))
            lines = (patch or "").splitlines()
            additions = sum(line.startswith("+") for line in lines)
            deletions = sum(line.startswith("-") for line in lines)
            item = {"sha": "0" * 40, "filename": f, "status": status,
                    "additions": additions, "deletions": deletions,
                    "changes": additions + deletions, "blob_url": "", "raw_url": "",
                    "contents_url": ""}
            if patch is not None:
                item["patch"] = patch
            items.append(item)
        return _page(request, items)

    @app.get("/repos/{owner}/{repo}/collaborators/{login}/permission")
    async def permission(owner: str, repo: str, login: str, request: Request):
        require_token(request)
        level = state.permissions.get(login, "read")
        return {"permission": level, "role_name": level, "user": _user(login, 1)}

    @app.get("/repos/{owner}/{repo}/issues/{number}/comments")
    async def list_comments(owner: str, repo: str, number: int, request: Request):
        require_token(request)
        items = [c for c in state.comments.values()
                 if c["_repo"] == f"{owner}/{repo}" and c["_number"] == number]
        return _page(request, [{k: v for k, v in c.items() if not k.startswith("_")}
                               for c in items])

    @app.post("/repos/{owner}/{repo}/issues/{number}/comments", status_code=201)
    async def create_comment(owner: str, repo: str, number: int, request: Request):
        require_token(request)
        body = await request.json()
        too_long(body)
        record(request, body)
        comment_id = next(state.ids)
        comment = {"id": comment_id, "node_id": f"IC_{comment_id}", "body": body["body"],
                   "user": _user(f"{APP_SLUG}[bot]", BOT_ID, "Bot"),
                   "created_at": _now(), "updated_at": _now(),
                   "html_url": f"https://example/{owner}/{repo}/pull/{number}#c{comment_id}",
                   "author_association": "NONE", "_repo": f"{owner}/{repo}",
                   "_number": number}
        with state.lock:
            state.comments[comment_id] = comment
        return {k: v for k, v in comment.items() if not k.startswith("_")}

    @app.patch("/repos/{owner}/{repo}/issues/comments/{comment_id}")
    async def update_comment(owner: str, repo: str, comment_id: int, request: Request):
        require_token(request)
        body = await request.json()
        too_long(body)
        record(request, body)
        comment = state.comments.get(comment_id)
        if comment is None:
            raise HTTPException(404, "Not Found")
        comment.update(body=body["body"], updated_at=_now())
        return {k: v for k, v in comment.items() if not k.startswith("_")}

    @app.post("/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions", status_code=201)
    async def react(owner: str, repo: str, comment_id: int, request: Request):
        require_token(request)
        body = await request.json()
        too_long(body)
        record(request, body)
        reaction = {"id": next(state.ids), "content": body["content"],
                    "user": _user(f"{APP_SLUG}[bot]", BOT_ID, "Bot"), "created_at": _now(),
                    "_comment_id": comment_id}
        state.reactions.append(reaction)
        return {k: v for k, v in reaction.items() if not k.startswith("_")}

    @app.post("/repos/{owner}/{repo}/check-runs", status_code=201)
    async def create_check_run(owner: str, repo: str, request: Request):
        require_token(request)
        body = await request.json()
        too_long(body)
        record(request, body)
        run_id = next(state.ids)
        run = {"id": run_id, "head_sha": body["head_sha"], "name": body["name"],
               "status": body.get("status", "queued"), "conclusion": body.get("conclusion"),
               "external_id": body.get("external_id", ""), "output": body.get("output", {}),
               "started_at": body.get("started_at"), "completed_at": body.get("completed_at"),
               "details_url": body.get("details_url"), "pull_requests": [],
               "app": {"id": state.app_id, "slug": APP_SLUG}, "_repo": f"{owner}/{repo}",
               "_history": [body.get("status", "queued")]}
        with state.lock:
            state.check_runs[run_id] = run
        return {k: v for k, v in run.items() if not k.startswith("_")}

    @app.patch("/repos/{owner}/{repo}/check-runs/{run_id}")
    async def update_check_run(owner: str, repo: str, run_id: int, request: Request):
        require_token(request)
        body = await request.json()
        too_long(body)
        record(request, body)
        run = state.check_runs.get(run_id)
        if run is None:
            raise HTTPException(404, "Not Found")
        with state.lock:
            for key in ("status", "conclusion", "started_at", "completed_at", "output"):
                if key in body:
                    run[key] = body[key]
            if body.get("conclusion") and "status" not in body:
                run["status"] = "completed"
            run["_history"].append(run["status"])
        return {k: v for k, v in run.items() if not k.startswith("_")}

    return app
