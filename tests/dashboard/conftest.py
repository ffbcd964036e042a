"""A live dashboard for the browser tests: the App's server (app.server.create_app) with
the dashboard router mounted as in production, a redis-server of its own (AOF on), the
fake GitHub of tests/app with GitHub's OAuth web flow added, REAL results from
`mlx-verify check` (a clean llama and one with a bug injected into a copy of mlx_lm)
stored as runs, and headless Debian Chromium driven by Playwright. Loopback only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mlx_verify.app import store
from mlx_verify.app.commands import VerifyRequest
from mlx_verify.app.dashboard import DashboardSettings
from mlx_verify.app.settings import AppSettings
from mlx_verify.checks.schema import Results
from tests.app import fake_github
from tests.app.conftest import (
    ServerThread,
    free_port,
    git_host,  # noqa: F401 - a fixture, for runners' git fetch
    wait_until,
)
from tests.conftest import Edit, copy_mlx_lm, run_cli
from tests.dashboard.fake_oauth import OAuthState, add_oauth_routes

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
REPO = "ml-explore/mlx-lm"
MAINTAINER, OUTSIDER = "maintainer-1", "outsider-1"
CLIENT_ID, CLIENT_SECRET = "Iv1.dashboardtest", "oauth-client-secret"
SESSION_SECRET = "s" * 40
BASE_SHA = "0" * 40
SHA_GOOD, SHA_BAD = "1" * 40, "2" * 40  # two pushes of PR 7: a regression between them
SHA_OTHER = "3" * 40  # PR 8, whose title is hostile HTML
HOSTILE_TITLE = '<img src=x onerror="document.title=1"> @everyone #1'
GELU_BUG = Edit("models/llama.py",
                "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))",
                "return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))")
REQUEST = VerifyRequest(model_types=("llama",), checks=("layers",), source="command")


def start_redis(data: Path, port: int) -> subprocess.Popen:
    """redis-server as deployed: AOF on, no eviction."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data),
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(pings, 10, what="redis-server")
    return process


@pytest.fixture(scope="session")
def dash_redis(tmp_path_factory) -> redis.Redis:
    port = free_port()
    process = start_redis(tmp_path_factory.mktemp("dash-redis"), port)
    yield redis.Redis(port=port)
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def real_results(tmp_path_factory, cache_dir) -> dict[str, Results]:
    """The two real runs: clean llama, and llama with SwiGLU replaced by GELU."""
    out = tmp_path_factory.mktemp("dash-results")
    args = ["check", "llama", "--checks", "layers", "--variants", "default"]
    clean = run_cli(args, cache_dir, out / "clean.json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    tree = copy_mlx_lm(out / "bugged", [GELU_BUG])
    bugged = run_cli([*args, "--mlx-lm", str(tree)], cache_dir, out / "bugged.json")
    assert bugged.returncode == 1, bugged.stderr[-2000:]
    # the other checks, for the run page's dtype trace, RoPE facts, generation
    # comparison and quantization table
    others = run_cli(["check", "llama", "--checks", "dtype,rope,generation,quantize",
                      "--variants", "default"], cache_dir, out / "others.json")
    assert others.returncode == 0, others.stderr[-2000:]
    return {name: Results.model_validate(run.results)
            for name, run in (("clean", clean), ("bugged", bugged), ("others", others))}


@pytest.fixture(scope="session")
def app_key() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@dataclass
class Fake:
    github: fake_github.FakeGitHub
    oauth: OAuthState
    url: str


@pytest.fixture(scope="session")
def fake(app_key) -> Fake:
    state = fake_github.FakeGitHub(app_id=31337, public_key=app_key[1])
    oauth = OAuthState(CLIENT_ID, CLIENT_SECRET)
    api = fake_github.create_app(state)
    add_oauth_routes(api, oauth)
    port = free_port()
    server = ServerThread(uvicorn.Config(api, host="127.0.0.1", port=port,
                                         log_level="warning"))
    server.start()
    url = f"http://127.0.0.1:{port}"
    state.url = url
    yield Fake(state, oauth, url)
    server.stop()


@dataclass
class Live:
    url: str  # the dashboard: http://127.0.0.1:PORT/dashboard
    settings: AppSettings
    connection: redis.Redis
    fake: Fake
    results: dict[str, Results]
    ids: dict[str, str]  # name -> stored run id


def run_id(number: int, sha: str) -> str:
    from mlx_verify.app import report

    return report.verify_job_id(REPO, number, sha, REQUEST)


def seed(connection: redis.Redis, results: dict[str, Results], tmp: Path) -> dict[str, str]:
    """Store the real results as runs: PR 7 pushed twice (pass, then fail), PR 8 with a
    hostile title, and two sweeps (clean tree, then bugged tree)."""
    now = time.time()
    ids = {"good": run_id(7, SHA_GOOD), "bad": run_id(7, SHA_BAD), "other": run_id(8, SHA_OTHER)}
    common = {"kind": "pr", "repository": REPO, "state": "done",
              "request": {**REQUEST.to_dict(), "requested_by": MAINTAINER}}
    store.record_run(connection, store.Run(
        id=ids["good"], pr=7, title="llama: tidy attention", head_sha=SHA_GOOD,
        queued_at=now - 600, started_at=now - 590, finished_at=now - 560,
        results=results["clean"], logs="check llama: pass", **common))
    store.record_run(connection, store.Run(
        id=ids["bad"], pr=7, title="llama: tidy attention", head_sha=SHA_BAD,
        queued_at=now - 300, started_at=now - 290, finished_at=now - 260,
        results=results["bugged"], logs="check llama: fail\n<script>alert(1)</script>",
        **common))
    store.record_run(connection, store.Run(
        id=ids["other"], pr=8, title=HOSTILE_TITLE, head_sha=SHA_OTHER,
        queued_at=now - 100, started_at=now - 95, finished_at=now - 60,
        results=results["clean"], **common))
    ids["others"] = "verify-9-others"
    store.record_run(connection, store.Run(
        id=ids["others"], pr=9, title="llama: every check", head_sha="4" * 40,
        queued_at=now - 50, started_at=now - 45, finished_at=now - 5,
        results=results["others"], **{**common, "request": {"checks": [
            "dtype", "rope", "generation", "quantize"], "model_types": ["llama"]}}))
    for name, tree in (("clean", "0.32.2 /main-yesterday"), ("bugged", "0.32.2 /main-today")):
        out = tmp / f"sweep-{name}"
        out.mkdir()
        (out / "llama.json").write_text(results[name].model_dump_json())
        fingerprint = {"mlx_lm": tree, "transformers": "5.23.0",
                       "options": ["--checks", "layers", "--variants", "default"]}
        (out / "sweep.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": {
            "llama": {"model_type": "llama", "exit": 0 if name == "clean" else 1,
                      "seconds": 20.0, "verdict": results[name].verdict}}}))
        ids[f"sweep-{name}"] = store.import_sweep_dir(connection, out)
        time.sleep(0.01)  # distinct sweep times: "previous" is well defined
    return ids


@pytest.fixture(scope="session")
def live(dash_redis, fake, app_key, real_results, tmp_path_factory) -> Live:
    from mlx_verify.app.server import create_app

    settings = AppSettings(
        redis_url=f"redis://127.0.0.1:{dash_redis.connection_pool.connection_kwargs['port']}",
        app_id=31337, private_key=app_key[0], webhook_secret="test-webhook-secret",
        api_url=fake.url, git_url=fake.url, dashboard_url=None, auto_model_types=("llama",),
        max_model_types=4, auto_checks=("layers",))
    port = free_port()
    dashboard = DashboardSettings(
        require_login=False, oauth_client_id=CLIENT_ID, oauth_client_secret=CLIENT_SECRET,
        session_secret=SESSION_SECRET, oauth_url=fake.url, api_url=fake.url,
        dashboard_url=f"http://127.0.0.1:{port}/dashboard", secure_cookie=False)
    dash_redis.flushdb()
    ids = seed(dash_redis, real_results, tmp_path_factory.mktemp("sweeps"))
    app = create_app(settings, dash_redis, sweep_interval_s=3600, dashboard=dashboard)
    server = ServerThread(uvicorn.Config(app, host="127.0.0.1", port=port,
                                         log_level="warning"))
    server.start()
    yield Live(f"http://127.0.0.1:{port}/dashboard", settings, dash_redis, fake, real_results,
               ids)
    server.stop()


@pytest.fixture
def page(browser, live):
    """A fresh browser context (no cookies) per test; GitHub's state reset."""
    live.fake.github.reset()
    live.fake.github.permissions.update({MAINTAINER: "write", OUTSIDER: "read"})
    live.fake.github.pulls[(REPO, 7)] = fake_github.Pull(
        7, SHA_BAD, BASE_SHA, ["mlx_lm/models/llama.py"], MAINTAINER)
    live.fake.oauth.login_as = None
    for key in live.connection.scan_iter("mlxv:ratelimit:*"):  # each test starts afresh
        live.connection.delete(key)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(15000)
    yield context.new_page()
    context.close()


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Any, live: Live, login: str) -> None:
    """Through the dashboard's link and the fake GitHub's OAuth pages, like a person."""
    live.fake.oauth.login_as = login
    page.get_by_role("link", name="Sign in with GitHub").click()
    page.get_by_text(f"Signed in as {login}").wait_for()
