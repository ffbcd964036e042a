"""Real parts for the App's end-to-end tests: a redis-server started here, rq workers,
the webhook server and a fake GitHub REST API over HTTP on loopback, and a local git
host (file://) holding an "upstream" mlx-lm repository built from the installed
mlx_lm package, with PR refs that change a model file correctly and incorrectly."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.app import fake_github

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "webhooks"  # real payloads (their README)
REPO = "ml-explore/mlx-lm"
SECRET = "test-webhook-secret"
APP_ID = 31337
MAINTAINER, OUTSIDER = "maintainer-1", "outsider-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, step: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class ServerThread(uvicorn.Server):
    """uvicorn in a thread of the test process, on a loopback port."""

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.started, 20, what="uvicorn start")

    def stop(self) -> None:
        self.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(data), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(lambda: _pings(client), 10, what="redis-server")
    yield url
    process.terminate()
    process.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def app_key() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.fixture(scope="session")
def github_fake(app_key):
    state = fake_github.FakeGitHub(app_id=APP_ID, public_key=app_key[1])
    port = free_port()
    server = ServerThread(uvicorn.Config(fake_github.create_app(state), host="127.0.0.1",
                                         port=port, log_level="warning"))
    server.start()
    state.url = f"http://127.0.0.1:{port}"
    yield state
    server.stop()


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@dataclass
class GitHost:
    root: Path  # GITHUB_GIT_URL is file://{root}
    work: Path  # a working clone to build PR commits in
    base_sha: str

    def commit(self, edits: dict[str, tuple[str, str] | str | None], parent: str,
               ref: str) -> str:
        """Commit `edits` on top of parent and publish it as ref. An edit is (old, new)
        (a replacement), a str (the whole new file) or None (remove the file)."""
        git(self.work, "checkout", "-q", "--detach", parent)
        for path, edit in edits.items():
            file = self.work / path
            if edit is None:
                file.unlink()
            elif isinstance(edit, str):
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_text(edit)
            else:
                old, new = edit
                text = file.read_text()
                assert old in text, f"{old!r} not in {path}"
                file.write_text(text.replace(old, new, 1))
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", ref)
        sha = git(self.work, "rev-parse", "HEAD")
        git(self.work, "push", "-q", "-f", "origin", f"HEAD:{ref}")
        return sha

    def make_pr(self, number: int, edits: dict[str, tuple[str, str] | str | None],
                parent: str | None = None, base: str | None = None) -> tuple[str, list[str]]:
        """Commit `edits` on top of parent (default: base, default main) and publish it
        as refs/pull/{number}/head. Returns (sha, files changed against base)."""
        base = base or self.base_sha
        sha = self.commit(edits, parent or base, f"refs/pull/{number}/head")
        files = git(self.work, "diff", "--name-only", base, sha).splitlines()
        return sha, files

    def diffs(self, base: str, sha: str) -> dict[str, tuple[str, str | None]]:
        """What GitHub's list-files API says of each file: (status, patch), the patch
        being git's unified diff from the first hunk header on (None: binary)."""
        statuses = {"A": "added", "D": "removed", "M": "modified"}
        found: dict[str, tuple[str, str | None]] = {}
        for line in git(self.work, "diff", "--name-status", base, sha).splitlines():
            letter, path = line.split("\t", 1)
            text = git(self.work, "diff", base, sha, "--", path)
            patch = text[text.index("\n@@") + 1:] if "\n@@" in text else None
            found[path] = (statuses.get(letter[0], "modified"), patch)
        return found


def released_llama() -> str:
    """llama.py of the installed (released) mlx-lm, with its known finding."""
    import mlx_lm

    return (Path(mlx_lm.__file__).parent / "models" / "llama.py").read_text()


def fix_known_llama_finding(path: Path) -> None:
    """Released llama.py ignores transformers 5's nested `rope_parameters` (a real
    finding of the engine). The test upstream reads it, so that a harmless PR passes
    and a failing verdict comes from the PR's own change."""
    text = path.read_text()
    old = "    sliding_window: Optional[int] = None\n\n    def __post_init__(self):\n"
    assert old in text
    path.write_text(text.replace(old, (
        "    sliding_window: Optional[int] = None\n"
        "    rope_parameters: Optional[Dict[str, Union[float, str]]] = None\n\n"
        "    def __post_init__(self):\n"
        "        if self.rope_parameters:\n"
        "            self.rope_theta = self.rope_parameters.get('rope_theta', self.rope_theta)\n"
        "            if self.rope_parameters.get('rope_type', 'default') != 'default':\n"
        "                self.rope_scaling = self.rope_scaling or self.rope_parameters\n"), 1))


def webhook_payload(name: str, installation_id: int, number: int | None = None,
                    sha: str | None = None, base: str | None = None,
                    sender: str = MAINTAINER, **changes: Any) -> dict[str, Any]:
    """A real payload with repository/PR/SHA/sender fields pointed at the test repo."""
    data = json.loads((FIXTURES / name).read_text())
    owner, repo = REPO.split("/")
    if "repository" in data:
        data["repository"].update(full_name=REPO, name=repo)
        data["repository"]["owner"]["login"] = owner
    data["sender"]["login"] = sender
    if "installation" in data:
        data["installation"]["id"] = installation_id
    if "pull_request" in data:
        pull = data["pull_request"]
        data["number"] = pull["number"] = number
        pull["head"]["sha"] = sha
        pull["base"]["sha"] = base
        pull["head"]["repo"]["full_name"] = pull["base"]["repo"]["full_name"] = REPO
        pull["user"]["login"] = sender
        pull["draft"] = False
        if "after" in data:
            data["after"] = sha
    if "comment" in data:  # written now, as GitHub stamps it
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data["comment"].update(created_at=now, updated_at=now)
    data.update(changes)
    return data


@pytest.fixture(scope="session")
def git_host(tmp_path_factory) -> GitHost:
    import mlx_lm

    root = tmp_path_factory.mktemp("githost")
    bare = root / REPO.split("/")[0] / (REPO.split("/")[1] + ".git")
    bare.parent.mkdir(parents=True)
    git(root, "init", "-q", "--bare", str(bare))
    work = tmp_path_factory.mktemp("upstream")
    shutil.copytree(Path(mlx_lm.__file__).parent, work / "mlx_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "README.md").write_text("upstream mlx-lm, built by the test suite\n")
    fix_known_llama_finding(work / "mlx_lm" / "models" / "llama.py")
    git(work, "init", "-q", "-b", "main")
    git(work, "add", ".")
    git(work, "commit", "-q", "-m", "upstream")
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    return GitHost(root=root, work=work, base_sha=git(work, "rev-parse", "HEAD"))


@pytest.fixture(scope="session")
def app_env(redis_url, app_key, github_fake, git_host, tmp_path_factory):
    """The settings of the server, report worker and runner, as environment variables."""
    work_dir = tmp_path_factory.mktemp("jobs")
    values = {
        "GITHUB_APP_ID": str(APP_ID),
        "GITHUB_PRIVATE_KEY": app_key[0],
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "GITHUB_API_URL": github_fake.url,
        "GITHUB_GIT_URL": f"file://{git_host.root}",
        "REDIS_URL": redis_url,
        "DASHBOARD_URL": "https://dashboard.example",
        "VERIFY_MODEL_TYPES": "llama",  # keep the suite cheap: one model_type,
        "VERIFY_CHECKS": "layers",  # one check
        "VERIFY_WORK_DIR": str(work_dir),
        "VERIFY_TIMEOUT": "600",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def server(app_env):
    from mlx_verify.app.server import create_app
    from mlx_verify.app.settings import connect_redis, load_app_settings

    settings = load_app_settings()
    port = free_port()
    thread = ServerThread(uvicorn.Config(
        create_app(settings, connect_redis(settings.redis_url), sweep_interval_s=2),
        host="127.0.0.1", port=port, log_level="warning"))
    thread.start()
    yield f"http://127.0.0.1:{port}"
    thread.stop()


@pytest.fixture
def env(server, app_env, github_fake, git_host, redis_url):
    """A clean slate for one test: empty Redis, empty fake GitHub."""
    from mlx_verify.app import report

    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    github_fake.reset()
    github_fake.permissions[MAINTAINER] = "write"
    report.context.cache_clear()
    return Env(server, github_fake, git_host, connection)


@dataclass
class Env:
    server: str
    github: fake_github.FakeGitHub
    git_host: GitHost
    redis: redis.Redis

    def open_pr(self, number: int, sha: str, files: list[str], author: str = MAINTAINER,
                base: str | None = None):
        base = base or self.git_host.base_sha
        self.github.pulls[(REPO, number)] = fake_github.Pull(
            number, sha, base, files, author, diffs=self.git_host.diffs(base, sha))

    def payload(self, name: str, number: int | None = None, sha: str | None = None,
                sender: str = MAINTAINER, base: str | None = None,
                **changes: Any) -> dict[str, Any]:
        return webhook_payload(name, self.github.installation_id, number, sha,
                               base or self.git_host.base_sha, sender, **changes)

    def send(self, event: str, payload: dict[str, Any], delivery: str | None = None,
             secret: str = SECRET) -> httpx.Response:
        body = json.dumps(payload).encode()
        signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return httpx.post(f"{self.server}/webhook", content=body, timeout=10, headers={
            "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": signature, "Content-Type": "application/json"})

    def run_queue(self, name: str) -> None:
        """An in-process burst worker (forks a work horse per job, like production). The
        report queue's takes first what the server's collector would have enqueued by now
        (the server's own collector thread runs too, every second)."""
        from mlx_verify.app import collector
        from mlx_verify.workers.worker import make_worker

        if name == "report":
            collector.collect_outcomes(self.redis)
        make_worker([name], self.redis).work(burst=True, with_scheduler=True)

    def drain(self, rounds: int = 6) -> None:
        """Run report and verify jobs until both queues are empty."""
        for _ in range(rounds):
            self.run_queue("report")
            if not Queue("verify", connection=self.redis, serializer=JSONSerializer).count:
                self.run_queue("report")
                if not Queue("report", connection=self.redis,
                             serializer=JSONSerializer).count:
                    return
            self.run_queue("verify")

    def check_runs(self, sha: str) -> list[dict[str, Any]]:
        return [r for r in self.github.check_runs.values() if r["head_sha"] == sha]

    def comments(self, number: int) -> list[dict[str, Any]]:
        return [c for c in self.github.comments.values() if c["_number"] == number]


def runner_finishes(connection, job_id: str, outcome: dict[str, Any]) -> None:
    """What a runner's rq worker writes when run_verify returns `outcome` (rq's
    handle_job_success, through rq's own calls): the job off its queue, finished, the
    outcome its result. For tests of the report side that need no real check run."""
    from rq.results import Result

    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    Queue(job.origin, connection=connection, serializer=JSONSerializer).remove(job)
    with connection.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        Result.create(job, Result.Type.SUCCESSFUL, ttl=3600, return_value=outcome,
                      pipeline=pipe)
        pipe.execute()


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_worker_process(queue: str, env: dict[str, str],
                         module: str = "workers.worker") -> subprocess.Popen:
    """`worker(args)` of `module` (app.worker for the report queue) in a subprocess of its
    own session (so it can be killed whole)."""
    code = (f"import argparse, sys; from {module} import worker; "
            f"sys.exit(worker(argparse.Namespace(queue=[{queue!r}], burst=False)))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT,
                            env={**os.environ, **env}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
