"""Runners' Redis user (deploy/redis-acl.sh): a real redis-server started with the ACL
file the script writes; the server and report worker connect as `app`, a runner as
`runner`. The runner does its whole job (a real rq worker taking a real verify job of a
PR; its outcome is the job's result, which the server's collector reports), and cannot
read the App's cached tokens, job state, other jobs or key names, nor enqueue any job."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import uvicorn
from rq import Queue
from rq.serializers import JSONSerializer

from tests.app.conftest import (
    REPO_ROOT,
    Env,
    ServerThread,
    free_port,
    wait_until,
)

ACL_SCRIPT = REPO_ROOT / "deploy" / "redis-acl.sh"
LLAMA = "mlx_lm/models/llama.py"
HARMLESS = ("import mlx.core as mx", "import mlx.core as mx  # ok")


def write_acl(path: Path, app_password: str, runner_password: str,
              queues: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "APP_REDIS_PASSWORD": app_password,
           "RUNNER_REDIS_PASSWORD": runner_password}
    if queues is not None:
        env["RUNNER_QUEUES"] = queues
    done = subprocess.run(["sh", str(ACL_SCRIPT)], env=env, capture_output=True, text=True)
    if done.returncode == 0:
        path.write_text(done.stdout)
    return done


@pytest.fixture
def acl_redis(tmp_path):
    """(app URL, runner URL, port) of a redis-server that loads the ACL file."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    app_password, runner_password = secrets.token_hex(16), secrets.token_hex(16)
    acl = tmp_path / "users.acl"
    assert write_acl(acl, app_password, runner_password).returncode == 0
    assert app_password not in acl.read_text() and runner_password not in acl.read_text()
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--aclfile", str(acl),
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app_url = f"redis://app:{app_password}@127.0.0.1:{port}/0"
    runner_url = f"redis://runner:{runner_password}@127.0.0.1:{port}/0"

    def pings() -> bool:
        try:
            return bool(redis.Redis.from_url(app_url).ping())
        except redis.ConnectionError:
            return False

    wait_until(pings, 10, what="redis-server with the ACL file")
    yield app_url, runner_url, port
    process.terminate()
    process.wait(10)


def run_runner(runner_url: str) -> subprocess.CompletedProcess:
    """`mlx-verify worker --queue verify --burst` as a runner host has it: REDIS_URL (the
    runner user) and GITHUB_GIT_URL, none of the App's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_APP", "GITHUB_PRIVATE", "GITHUB_WEBHOOK", "GITHUB_API",
                                "DASHBOARD"))}
    env["REDIS_URL"] = runner_url
    code = ("import argparse, sys; from workers.worker import worker; "
            "sys.exit(worker(argparse.Namespace(queue=['verify'], burst=True)))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_runner_does_its_job_and_cannot_read_the_apps_tokens(env, acl_redis, monkeypatch):
    from mlx_verify.app import report
    from mlx_verify.app.server import create_app
    from mlx_verify.app.settings import connect_redis, load_app_settings

    app_url, runner_url, port = acl_redis
    monkeypatch.setenv("REDIS_URL", app_url)  # the server and the report worker
    report.context.cache_clear()
    app_redis = redis.Redis.from_url(app_url)
    settings = load_app_settings()
    server = ServerThread(uvicorn.Config(
        create_app(settings, connect_redis(settings.redis_url), sweep_interval_s=2),
        host="127.0.0.1", port=free_port(), log_level="warning"))
    server.start()
    try:
        acl = Env(f"http://127.0.0.1:{server.config.port}", env.github, env.git_host,
                  app_redis)
        sha, files = acl.git_host.make_pr(50, {LLAMA: HARMLESS})
        acl.open_pr(50, sha, files)
        delivery = "acl-delivery-50"
        assert acl.send("pull_request", acl.payload("pull_request.opened.payload.json",
                                                    number=50, sha=sha),
                        delivery=delivery).status_code == 202
        acl.run_queue("report")
        (run,) = acl.check_runs(sha)
        job_id = run["external_id"]
        assert Queue("verify", connection=app_redis, serializer=JSONSerializer).job_ids == \
            [job_id]

        runner = run_runner(runner_url)
        assert runner.returncode == 0, runner.stderr[-3000:]
        assert "NOPERM" not in runner.stderr and "NoPermission" not in runner.stderr
        # Nothing it needed was denied (redis-py's CLIENT SETINFO, Redis 7.2+, is optional:
        # refused, it is skipped; Redis 7.0 has no such command, so the file cannot list it).
        denials = [e for e in app_redis.acl_log() if e.get("object") != "client|setinfo"]
        assert denials == [], denials
        # The server's collector thread, not the runner, enqueues the report job.
        report_queue = Queue("report", connection=app_redis, serializer=JSONSerializer)
        def collected() -> list[str]:
            return [job.func_name.rsplit(".", 1)[1] for job in report_queue.get_jobs()
                    if list(job.args) == [job_id]]

        wait_until(lambda: "verify_finished" in collected(), 10,
                   what="the collector's report job")
        assert collected() in (["verify_finished"], ["verify_started", "verify_finished"])
        assert report_queue.count == len(collected())
        acl.run_queue("report")
        done = acl.github.check_runs[run["id"]]
        assert (done["status"], done["conclusion"]) == ("completed", "success"), done["output"]
        assert "mlx-verify: ✅ pass" in acl.comments(50)[0]["body"]
    finally:
        server.stop()

    # What the runner user cannot do, with the keys really there.
    runner = redis.Redis.from_url(runner_url)
    tokens = app_redis.keys("mlxv:githubkit*")
    assert tokens  # githubkit cached the App JWT and the installation token here
    denied = [("GET", key) for key in tokens] + [
        ("HGETALL", f"mlxv:job:{job_id}"),  # job state (installation id, check run id)
        ("HGETALL", f"rq:job:event-{delivery}"),  # the server's report job (a webhook)
        ("LRANGE", "rq:queue:report", 0, -1),  # enqueue-only
        ("GET", "mlxv:anything"), ("SET", "mlxv:bot", "x"),
        ("KEYS", "*"), ("SCAN", 0), ("CONFIG", "GET", "*"), ("ACL", "LIST"),
        ("FLUSHALL",), ("CLIENT", "LIST"), ("MONITOR",), ("SCRIPT", "FLUSH"),
        ("HSET", "rq:job:not-a-runner-report", "func_name", "os.system"),
    ]
    for command in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            runner.execute_command(*command)
    assert app_redis.exists(f"rq:job:event-{delivery}")  # the denial is not for want of a key
    # No report job, under any name: the report worker holds the App key.
    for forged_id in ("forged-id", "runner-report-1", f"verify-{job_id}"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            Queue("report", connection=runner, serializer=JSONSerializer).enqueue(
                "mlx_verify.app.report.verify_started", job_id, job_id=forged_id)
    for command in (("RPUSH", "rq:queue:report", "x"), ("LPUSH", "rq:queue:report", "x"),
                    ("SADD", "mlxv:collect", "x"), ("HSET", f"mlxv:job:{job_id}", "state",
                                                    "queued")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            runner.execute_command(*command)
    assert runner.hget(f"rq:job:{job_id}", "status") == b"finished"  # its own job: readable
    # Without a password (the default user is off) nothing is served.
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).get(tokens[0])


@pytest.mark.parametrize(("app_password", "runner_password", "queues", "message"), [
    ("a" * 32, "short", None, "passwords must have at least 24 characters"),
    ("b" * 32, "b" * 32, None, "the runner password must differ from the app password"),
    ("c" * 32, "d" * 32, "verify report", "bad runner queue name: report"),
    ("c" * 32, "d" * 32, "verify rq:*", "bad runner queue name: rq:*"),
])
def test_the_acl_script_refuses_weak_settings_with_one_line(tmp_path, app_password,
                                                            runner_password, queues, message):
    done = write_acl(tmp_path / "users.acl", app_password, runner_password, queues)
    assert done.returncode == 2
    assert done.stderr.strip() == f"redis-acl.sh: {message}"
    assert not (tmp_path / "users.acl").exists()


def test_a_restart_keeps_every_transaction_and_default_stays_locked(tmp_path):
    """Redis replays its append-only file as the `default` user and re-checks the ACL at
    each EXEC (Redis 7.0), so the ACL file must leave `default` its permissions (but off),
    or a restart silently drops every rq enqueue made in a MULTI/EXEC."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    app_password, runner_password = secrets.token_hex(16), secrets.token_hex(16)
    acl = tmp_path / "users.acl"
    assert write_acl(acl, app_password, runner_password).returncode == 0
    port = free_port()
    url = f"redis://app:{app_password}@127.0.0.1:{port}/0"

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
             str(tmp_path), "--appendonly", "yes", "--aclfile", str(acl)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def pings() -> bool:
            try:
                return bool(redis.Redis.from_url(url).ping())
            except redis.ConnectionError:
                return False

        wait_until(pings, 10, what="redis-server with the ACL file and AOF")
        return process

    process = start()
    try:
        connection = redis.Redis.from_url(url)
        job = Queue("report", connection=connection, serializer=JSONSerializer).enqueue(
            "mlx_verify.app.report.handle_event", "x", job_id="event-restart")
        with connection.pipeline(transaction=True) as pipe:
            pipe.set("mlxv:delivery:restart", "1").lpush("mlxv:list", "a").execute()
        for credentials in ({}, {"username": "default", "password": "anything"}):
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=port, **credentials).get("mlxv:delivery:restart")
        process.terminate()  # as docker/systemd stop it: Redis writes the AOF out
        process.wait(30)
        process = start()
        connection = redis.Redis.from_url(url)
        assert connection.get("mlxv:delivery:restart") == b"1"
        assert connection.lrange("mlxv:list", 0, -1) == [b"a"]
        queue = Queue("report", connection=connection, serializer=JSONSerializer)
        assert queue.job_ids == [job.id]
    finally:
        process.terminate()
        process.wait(30)
