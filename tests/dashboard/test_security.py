"""Dashboard sessions and actions against abuse: server-side logout, rate limits, and
non-ASCII OAuth state and CSRF tokens. The dashboard router on a real redis-server,
GitHub's OAuth web flow from the fake GitHub over HTTP on loopback."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlx_verify.app.dashboard import COOKIE, DashboardSettings, dashboard_router

from .conftest import CLIENT_ID, CLIENT_SECRET, MAINTAINER, SESSION_SECRET


@pytest.fixture
def db(dash_redis):
    """A database of its own on the dashboard tests' redis-server."""
    port = dash_redis.connection_pool.connection_kwargs["port"]
    connection = redis.Redis(port=port, db=2)
    connection.flushdb()
    yield connection
    connection.flushdb()


def client_for(db, fake, per_user: int = 10, anonymous: int = 20) -> TestClient:
    config = DashboardSettings(
        require_login=False, oauth_client_id=CLIENT_ID, oauth_client_secret=CLIENT_SECRET,
        session_secret=SESSION_SECRET, oauth_url=fake.url, api_url=fake.url,
        dashboard_url="http://testserver/dashboard", secure_cookie=False,
        actions_per_minute=per_user, anonymous_actions_per_minute=anonymous)
    app = FastAPI()
    app.include_router(dashboard_router(None, db, config))
    return TestClient(app)


def sign_in(client: TestClient, fake, login: str) -> str:
    """GitHub's OAuth round trip; returns the session's CSRF token."""
    fake.oauth.login_as = login
    start = client.get("/dashboard/login", follow_redirects=False)
    assert start.status_code == 303
    authorize = httpx.get(start.headers["location"], follow_redirects=False, timeout=10)
    assert authorize.status_code == 302
    back = urlparse(authorize.headers["location"])
    done = client.get(f"{back.path}?{back.query}", follow_redirects=False)
    assert done.status_code == 303, done.text
    page = client.get("/dashboard/runs")
    assert f"Signed in as <strong>{login}</strong>" in page.text
    return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_a_session_no_longer_works_after_logout(db, fake):
    client = client_for(db, fake)
    csrf = sign_in(client, fake, MAINTAINER)
    cookie = client.cookies.get(COOKIE)
    assert len(db.keys("mlxv:session:*")) == 1
    out = client.post("/dashboard/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert db.keys("mlxv:session:*") == []
    # The old cookie, replayed (copied before logout): no longer signed in.
    replay = TestClient(client.app)
    replay.cookies.set(COOKIE, cookie, path="/dashboard")
    assert "Signed in as" not in replay.get("/dashboard/runs").text
    action = replay.post("/dashboard/runs/x/rerun", data={"csrf": csrf})
    assert action.status_code == 401 and "Login required" in action.text


def test_actions_are_rate_limited_per_user_and_per_address(db, fake):
    client = client_for(db, fake, per_user=3, anonymous=2)
    csrf = sign_in(client, fake, MAINTAINER)
    codes = [client.post("/dashboard/runs/nope/rerun", data={"csrf": csrf}).status_code
             for _ in range(4)]
    assert codes == [404, 404, 404, 429]
    limited = client.post("/dashboard/jobs/nope/cancel", data={"csrf": csrf})
    assert limited.status_code == 429 and "At most 3 actions a minute" in limited.text
    assert 0 < int(limited.headers["retry-after"]) <= 60
    # another user has a budget of their own
    other = TestClient(client.app)
    other_csrf = sign_in(other, fake, "maintainer-2")
    assert other.post("/dashboard/runs/nope/rerun", data={"csrf": other_csrf}).status_code \
        == 404
    # anonymous requests are counted per client address
    anonymous = TestClient(client.app)
    codes = [anonymous.post("/dashboard/runs/nope/rerun", data={"csrf": "x"}).status_code
             for _ in range(3)]
    assert codes == [401, 401, 429]


def test_non_ascii_oauth_state_and_csrf_token_get_4xx(db, fake):
    client = client_for(db, fake)
    client.get("/dashboard/login", follow_redirects=False)  # a session with an oauth_state
    answer = client.get("/dashboard/oauth/callback", params={"code": "c", "state": "é" * 8})
    assert answer.status_code == 400 and "Login failed" in answer.text
    csrf = sign_in(client, fake, MAINTAINER)
    for token in ("é", "\u00ff" * 43, "токен"):
        refused = client.post("/dashboard/runs/x/rerun", content=f"csrf={token}".encode(),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert refused.status_code == 403, refused.status_code
    raw = client.post("/dashboard/runs/x/rerun", content=b"csrf=%FF%FE",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert raw.status_code == 403
    assert parse_qs(f"csrf={csrf}")["csrf"] == [csrf]  # the real token still works:
    assert client.post("/dashboard/runs/x/rerun", data={"csrf": csrf}).status_code == 404
    # a cookie that is not ASCII at all is no session
    odd = TestClient(client.app).get("/dashboard/runs",
                                     headers={"Cookie": f"{COOKIE}=ü.ö".encode()})
    assert odd.status_code == 200 and "Signed in as" not in odd.text


def test_a_cancel_that_github_fails_can_be_completed_by_cancelling_again(db, fake, app_key):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from mlx_verify.app import github, report, store
    from mlx_verify.app.commands import VerifyRequest
    from mlx_verify.app.settings import AppSettings
    from tests.app import fake_github

    from .conftest import REPO

    port = db.connection_pool.connection_kwargs["port"]
    settings = AppSettings(
        redis_url=f"redis://127.0.0.1:{port}/2", app_id=31337, private_key=app_key[0],
        webhook_secret="test-webhook-secret", api_url=fake.url, git_url=fake.url,
        dashboard_url=None, auto_model_types=("llama",), max_model_types=4,
        auto_checks=("layers",))
    fake.github.reset()
    fake.github.permissions[MAINTAINER] = "write"
    sha = "6" * 40
    fake.github.pulls[(REPO, 41)] = fake_github.Pull(41, sha, "0" * 40, ["x.py"], MAINTAINER)
    gh = github.installation_client(settings, db, fake.github.installation_id)
    request = VerifyRequest(model_types=("llama",), source="command")
    report.start_verify(settings, db, gh, fake.github.installation_id, REPO, 41, sha,
                        request, ["mlx_lm/models/llama.py"], rerun=False,
                        untrusted=None)
    job_id = report.verify_job_id(REPO, 41, sha, request)
    (check_run,) = fake.github.check_runs.values()

    app = FastAPI()
    app.include_router(dashboard_router(settings, db, DashboardSettings(
        require_login=False, oauth_client_id=CLIENT_ID, oauth_client_secret=CLIENT_SECRET,
        session_secret=SESSION_SECRET, oauth_url=fake.url, api_url=fake.url,
        dashboard_url="http://testserver/dashboard", secure_cookie=False)))
    client = TestClient(app)
    csrf = sign_in(client, fake, MAINTAINER)
    fake.github.fail_next("PATCH", f"/check-runs/{check_run['id']}", status=403)
    first = client.post(f"/dashboard/jobs/{job_id}/cancel", data={"csrf": csrf})
    assert first.status_code == 200 and "cancel it again to retry" in first.text
    job = Job.fetch(job_id, connection=db, serializer=JSONSerializer)
    assert job.get_status().value == "canceled"
    assert check_run["status"] == "queued"  # GitHub did not take it
    assert db.hget(f"mlxv:job:{job_id}", "state") == b"cancelling"
    again = client.post(f"/dashboard/jobs/{job_id}/cancel", data={"csrf": csrf})
    assert again.status_code == 200 and "its Check Run is completed" in again.text
    assert (check_run["status"], check_run["conclusion"]) == ("completed", "cancelled")
    assert db.hget(f"mlxv:job:{job_id}", "state") == b"cancelled"
    assert store.get_run(db, job_id).state == "cancelled"
