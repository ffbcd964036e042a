"""GitHub REST calls of the App, through githubkit.

App-level calls authenticate with the App JWT; repository calls with an installation
token. Both are cached in Redis by githubkit's RedisCacheStrategy, so the server and
every report worker share one token per installation instead of minting their own.

Responses are read as plain JSON (`.json()`), only the fields used: the bot must not
break when GitHub adds or drops an optional field.
"""

from __future__ import annotations

import re
from typing import Any

import redis
from githubkit import AppAuthStrategy, GitHub
from githubkit.cache import RedisCacheStrategy
from githubkit.exception import RequestFailed

from .settings import AppSettings

PER_PAGE = 100
MAX_PAGES = 30  # GitHub lists at most 3000 changed files; comments beyond are not ours
WRITE_PERMISSIONS = ("admin", "maintain", "write")
USER_AGENT = "mlx-verify"
# GitHub's limits on what the App writes: a body or output over them is refused (422).
COMMENT_BODY_MAX = 65_536
CHECK_OUTPUT_MAX = 65_535  # output.summary and output.text, each
CHECK_TITLE_MAX = 255
CUT_NOTE = "\n\n_… cut here to stay under GitHub's limit of {limit} characters._\n"


def fit(text: str, limit: int) -> str:
    """text, or its longest prefix of whole lines that fits in limit with a note saying
    it was cut (an open code fence or <details> is closed first)."""
    if len(text) <= limit:
        return text
    note = CUT_NOTE.format(limit=f"{limit:,}")
    room = limit - len(note) - len("\n```\n</details>\n")
    cut = text[:room]
    if "\n" in cut:
        cut = cut[:cut.rindex("\n")]
    if cut.count("```") % 2:
        cut += "\n```"
    if cut.count("<details>") > cut.count("</details>"):
        cut += "\n</details>"
    return cut + note


def fit_output(output: dict[str, Any] | None) -> dict[str, Any] | None:
    if not output:
        return output
    fitted = dict(output)
    if isinstance(fitted.get("title"), str):
        fitted["title"] = fitted["title"][:CHECK_TITLE_MAX]
    for key in ("summary", "text"):
        if isinstance(fitted.get(key), str):
            fitted[key] = fit(fitted[key], CHECK_OUTPUT_MAX)
    return fitted


def app_client(settings: AppSettings, connection: redis.Redis) -> GitHub:
    return GitHub(
        AppAuthStrategy(settings.app_id, settings.private_key),
        base_url=settings.api_url,
        cache_strategy=RedisCacheStrategy(connection, prefix="mlxv:githubkit"),
        http_cache=False,  # comment lists and PR heads must be read fresh
        user_agent=USER_AGENT,
        timeout=30.0,
    )


def installation_client(settings: AppSettings, connection: redis.Redis,
                        installation_id: int) -> GitHub:
    return GitHub(
        AppAuthStrategy(settings.app_id, settings.private_key).as_installation(installation_id),
        base_url=settings.api_url,
        cache_strategy=RedisCacheStrategy(connection, prefix="mlxv:githubkit"),
        http_cache=False,
        user_agent=USER_AGENT,
        timeout=30.0,
    )


def repo_installation(app_gh: GitHub, owner: str, repo: str) -> int:
    return int(app_gh.rest.apps.get_repo_installation(owner, repo).json()["id"])


def bot_user(app_gh: GitHub, gh: GitHub, connection: redis.Redis) -> tuple[int, str]:
    """(id, login) of the App's bot user, which authors its comments. Cached in Redis."""
    cached = connection.hmget("mlxv:bot", ["id", "login"])
    if cached[0] and cached[1]:
        return int(cached[0]), cached[1].decode()
    slug = app_gh.rest.apps.get_authenticated().json()["slug"]
    login = f"{slug}[bot]"
    # /users is not an App route: ask with the installation token.
    user_id = int(gh.rest.users.get_by_username(login).json()["id"])
    connection.hset("mlxv:bot", mapping={"id": user_id, "login": login})
    return user_id, login


def get_pull(gh: GitHub, owner: str, repo: str, number: int) -> dict[str, Any] | None:
    """The pull request, or None when `number` is an issue (or gone)."""
    try:
        return gh.rest.pulls.get(owner, repo, number).json()
    except RequestFailed as e:
        if e.response.status_code == 404:
            return None
        raise


def open_pulls(gh: GitHub, owner: str, repo: str) -> list[dict[str, Any]]:
    pulls: list[dict[str, Any]] = []
    for page in range(1, MAX_PAGES + 1):
        batch = gh.rest.pulls.list(owner, repo, state="open", per_page=PER_PAGE,
                                   page=page).json()
        pulls.extend(batch)
        if len(batch) < PER_PAGE:
            break
    return pulls


HUNK_HEADER = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def patch_ranges(patch: str) -> list[tuple[int, int]]:
    """Line ranges (first, last; 1-based, inclusive) on the new side of each hunk of a
    unified diff as GitHub's `patch` field gives it ("@@ -10,7 +10,8 @@ ..." headers,
    no file header). A hunk that only removes lines has none."""
    ranges = []
    for line in patch.splitlines():
        match = HUNK_HEADER.match(line)
        if match:
            start, count = int(match[1]), int(match[2] if match[2] is not None else 1)
            if count > 0:
                ranges.append((start, start + count - 1))
    return ranges


def changed_files_and_lines(gh: GitHub, owner: str, repo: str, number: int
                            ) -> tuple[list[str], dict[str, list[tuple[int, int]]]]:
    """Paths the PR adds, changes or removes (renames give both names), and for each
    file with a `patch` the new-side line ranges of its hunks. GitHub leaves `patch` out
    for binary files and diffs too large to show: those files have no entry."""
    files: list[str] = []
    lines: dict[str, list[tuple[int, int]]] = {}
    for page in range(1, MAX_PAGES + 1):
        batch = gh.rest.pulls.list_files(owner, repo, number, per_page=PER_PAGE,
                                         page=page).json()
        for item in batch:
            files.append(item["filename"])
            if item.get("previous_filename"):
                files.append(item["previous_filename"])
            if isinstance(item.get("patch"), str):
                lines[item["filename"]] = patch_ranges(item["patch"])
        if len(batch) < PER_PAGE:
            break
    return files, lines


def changed_files(gh: GitHub, owner: str, repo: str, number: int) -> list[str]:
    """Paths the PR adds, changes or removes (renames give both names)."""
    return changed_files_and_lines(gh, owner, repo, number)[0]


def has_write_permission(gh: GitHub, owner: str, repo: str, username: str) -> bool:
    """Write, maintain or admin on the repository. Any doubt (404, error) is a no."""
    try:
        data = gh.rest.repos.get_collaborator_permission_level(owner, repo, username).json()
    except RequestFailed:
        return False
    return (data.get("permission") in WRITE_PERMISSIONS
            or data.get("role_name") in WRITE_PERMISSIONS)


def find_comment(gh: GitHub, owner: str, repo: str, number: int, marker: str,
                 bot_id: int) -> int | None:
    """Id of the bot's own comment holding the marker, walking every page."""
    for page in range(1, MAX_PAGES * 10 + 1):
        batch = gh.rest.issues.list_comments(owner, repo, number, per_page=PER_PAGE,
                                             page=page).json()
        for comment in batch:
            if (comment.get("user") or {}).get("id") == bot_id and \
                    marker in (comment.get("body") or ""):
                return int(comment["id"])
        if len(batch) < PER_PAGE:
            return None
    return None


def create_comment(gh: GitHub, owner: str, repo: str, number: int, body: str) -> int:
    body = fit(body, COMMENT_BODY_MAX)
    return int(gh.rest.issues.create_comment(owner, repo, number, body=body).json()["id"])


def update_comment(gh: GitHub, owner: str, repo: str, comment_id: int, body: str) -> bool:
    """False when the comment is gone (deleted by a maintainer)."""
    body = fit(body, COMMENT_BODY_MAX)
    try:
        gh.rest.issues.update_comment(owner, repo, comment_id, body=body)
    except RequestFailed as e:
        if e.response.status_code == 404:
            return False
        raise
    return True


def react(gh: GitHub, owner: str, repo: str, comment_id: int, content: str) -> None:
    gh.rest.reactions.create_for_issue_comment(owner, repo, comment_id, content=content)


def create_check_run(gh: GitHub, owner: str, repo: str, **fields: Any) -> int:
    if "output" in fields:
        fields["output"] = fit_output(fields["output"])
    return int(gh.rest.checks.create(owner, repo, data=fields).json()["id"])


def update_check_run(gh: GitHub, owner: str, repo: str, check_run_id: int,
                     **fields: Any) -> None:
    if "output" in fields:
        fields["output"] = fit_output(fields["output"])
    annotations = (fields.get("output") or {}).get("annotations") or []
    if len(annotations) <= 50:
        gh.rest.checks.update(owner, repo, check_run_id, data=fields)
        return
    # GitHub takes 50 annotations per request and appends each batch.
    output = dict(fields["output"])
    for start in range(0, len(annotations), 50):
        output["annotations"] = annotations[start:start + 50]
        gh.rest.checks.update(owner, repo, check_run_id, data={**fields, "output": output})
