"""Load and faults of the App (issue 11, item 8), measured on the real parts.

Started here, each on loopback: a redis-server (AOF on, noeviction, the ACL users of
deploy/redis-acl.sh, as deploy/docker-compose.yml runs it), the fake GitHub REST API of
the tests (tests/app/fake_github.py, in this process), `mlx-verify serve` (uvicorn),
`mlx-verify worker --queue report`, and runners (`mlx-verify worker --queue verify`, as
the `runner` Redis user, bubblewrap sandbox on) that take real verify jobs from a
file:// git host holding the installed mlx_lm, each PR changing llama.py harmlessly
(VERIFY_MODEL_TYPES=llama, VERIFY_CHECKS=layers, as in tests/app). Every process is
supervised like systemd/compose would (restarted 2 s after an exit the bench did not
ask for); restarts are counted.

Scenarios, each on its own PR numbers:
  ack     webhooks at --rate requests/s (open loop, from a separate process): one
          `pull_request.opened` per PR for --prs PRs, redeliveries (same
          X-GitHub-Delivery), other deliveries of the same heads (`reopened`), bad
          signatures, bodies that are not JSON, bodies over the 5 MiB limit. Ack time
          from the request's scheduled send time to its response. The report worker
          drains meanwhile; no runner runs: the verify jobs are counted, not run.
  redis   real verify jobs and a stream of docs-only PRs while Redis is restarted
          (SIGTERM, --redis-down-s seconds down, started again on its AOF); a delivery
          answered 503 or not answered is redelivered (same id) every second, as an
          operator would from the App's settings page.
  runner  a real verify job whose runner (the rq worker and its work horse) is
          SIGKILLed inside `mlx-verify check`; the supervisor restarts it.
  github  a secondary rate limit (403 + Retry-After) twice, then a 502, on each write
          path in turn: Check Run create (queued, and neutral for a docs-only PR),
          Check Run update (in progress, completed), comment create, comment update
          (a push), reply (`/verify help`).

At the end each scenario is checked: every accepted PR event has exactly one Check Run
per head, none left in progress (nor queued, where its job ran), one sticky comment per
PR whose job ran, one reply per command, no failed job; ack: the expected status for
every request, one verify job per PR, p99 within --p99-goal-ms. Exit 1 when one fails.

    .venv/bin/python bench/bench_load.py [--prs 2000] [--rate 200]
        [--scenarios redis,runner,github,ack] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.app import fake_github  # noqa: E402
from tests.app.conftest import (  # noqa: E402
    MAINTAINER,
    REPO,
    GitHost,
    ServerThread,
    descendants,
    fix_known_llama_finding,
    free_port,
    git,
    webhook_payload,
)

CLI = str(Path(sys.executable).with_name("mlx-verify"))
APP_ID = 31337
INSTALLATION_ID = 77
LLAMA = "mlx_lm/models/llama.py"
MAX_BODY_BYTES = 5 * 1024 * 1024  # app/server.py's limit
OPENED = "pull_request.opened.payload.json"
SYNCHRONIZE = "pull_request.synchronize.payload.json"
REOPENED = "pull_request.reopened.payload.json"
COMMENT = "issue_comment.created.with-installation.payload.json"
# First PR number of each scenario, so that each is checked on its own PRs.
FIRST_PR = {"ack": 1, "redis": 30001, "runner": 40001, "github": 50001}


def harmless_edit(tag: str) -> dict[str, tuple[str, str]]:
    """A llama.py edit that changes nothing computed (its own SHA per tag)."""
    return {LLAMA: ("import mlx.core as mx", f"import mlx.core as mx  # {tag}")}


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_request(secret: str, event: str, payload: dict[str, Any] | bytes,
                    delivery: str, bad_signature: bool = False) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = sign("not-the-webhook-secret" if bad_signature else secret, body)
    return body, {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
                  "X-Hub-Signature-256": signature, "Content-Type": "application/json",
                  "User-Agent": "GitHub-Hookshot/bench"}


def pr_payload(fixture: str, number: int, sha: str, base: str,
               sender: str = MAINTAINER) -> dict[str, Any]:
    return webhook_payload(fixture, INSTALLATION_ID, number, sha, base, sender)


def comment_payload(number: int, body: str) -> dict[str, Any]:
    payload = webhook_payload(COMMENT, INSTALLATION_ID)
    payload["issue"]["number"] = number
    payload["comment"]["body"] = body
    payload["comment"]["id"] = 900000 + number
    return payload


# ---- the parts ------------------------------------------------------------------------

@dataclass
class Managed:
    """One supervised process (server, report worker, runner)."""
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    stopping: bool = False

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)


class Supervisor:
    """Restarts a process that exited without being asked to (systemd Restart=always,
    compose restart: unless-stopped), 2 s later."""

    def __init__(self) -> None:
        self.processes: list[Managed] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def add(self, managed: Managed) -> Managed:
        managed.start()
        with self.lock:
            self.processes.append(managed)
        return managed

    def watch(self) -> None:
        while not self.stop.wait(0.5):
            with self.lock:
                dead = [m for m in self.processes if not m.stopping and m.process is not None
                        and m.process.poll() is not None]
            for managed in dead:
                time.sleep(2)
                if not managed.stopping:
                    managed.restarts += 1
                    managed.start()

    def terminate(self, managed: Managed) -> None:
        managed.stopping = True
        if managed.process is not None and managed.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(managed.process.pid, signal.SIGTERM)
            try:
                managed.process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(managed.process.pid, signal.SIGKILL)
                managed.process.wait(10)
        with self.lock:
            self.processes.remove(managed)

    def shutdown(self) -> None:
        self.stop.set()
        for managed in list(self.processes):
            self.terminate(managed)


class RedisServer:
    """redis-server as deploy/docker-compose.yml runs it, on a free loopback port."""

    def __init__(self, work: Path, aclfile: Path | None) -> None:
        self.port = free_port()
        self.dir = work / "redis"
        self.dir.mkdir()
        self.aclfile = aclfile
        self.log = work / "redis.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--appendonly", "yes", "--maxmemory-policy",
                 "noeviction", "--maxmemory", "1gb",
                 *(["--aclfile", str(self.aclfile)] if self.aclfile else [])],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM: Redis writes its AOF out and exits (docker/systemd restart)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    secret: str
    redis: RedisServer
    app_url: str
    runner_url: str
    connection: redis.Redis
    github: fake_github.FakeGitHub
    git_host: GitHost
    supervisor: Supervisor
    app_env: dict[str, str]
    runner_env: dict[str, str]
    server_url: str
    report_workers: list[Managed] = field(default_factory=list)
    runners: list[Managed] = field(default_factory=list)

    def send(self, event: str, payload: dict[str, Any], delivery: str | None = None,
             timeout: float = 10) -> httpx.Response:
        body, headers = webhook_request(self.secret, event, payload,
                                        delivery or str(uuid.uuid4()))
        return httpx.post(f"{self.server_url}/webhook", content=body, headers=headers,
                          timeout=timeout)

    def start_runner(self) -> Managed:
        index = len(self.runners) + 1
        runner = self.supervisor.add(Managed(
            f"runner-{index}", [CLI, "worker", "--queue", "verify"], self.runner_env,
            self.work / f"runner-{index}.log"))
        self.runners.append(runner)
        return runner

    def start_report_workers(self, count: int) -> None:
        for _ in range(count):
            index = len(self.report_workers) + 1
            self.report_workers.append(self.supervisor.add(Managed(
                f"report-worker-{index}", [CLI, "worker", "--queue", "report"],
                self.app_env, self.work / f"report-worker-{index}.log")))

    def fresh_workers(self) -> None:
        """Stop every worker (SIGTERM: rq finishes the job and releases its locks) and
        start --report-workers report workers: each scenario starts clean."""
        self.stop_runners()
        for worker in self.report_workers:
            self.supervisor.terminate(worker)
        self.report_workers = []
        self.start_report_workers(self.args.report_workers)

    def stop_runners(self) -> None:
        for runner in self.runners:
            self.supervisor.terminate(runner)
        self.runners = []

    def open_pr(self, number: int, tag: str, parent: str | None = None) -> str:
        """A real PR on the git host and the fake GitHub: llama.py edited harmlessly."""
        base = self.git_host.base_sha
        sha, files = self.git_host.make_pr(number, harmless_edit(tag), parent)
        self.github.pulls[(REPO, number)] = fake_github.Pull(
            number, sha, base, files, MAINTAINER, diffs=self.git_host.diffs(base, sha))
        return sha

    def docs_pr(self, number: int) -> str:
        """A docs-only PR in the fake GitHub only (no job runs: the report worker reads
        only its file list)."""
        sha = hashlib.sha1(f"docs-{number}".encode()).hexdigest()
        self.github.pulls[(REPO, number)] = fake_github.Pull(
            number, sha, self.git_host.base_sha, ["README.md"], MAINTAINER)
        return sha

    def runs_of(self, sha: str) -> list[dict[str, Any]]:
        with self.github.lock:
            return [r for r in self.github.check_runs.values() if r["head_sha"] == sha]

    def comments_of(self, number: int) -> list[dict[str, Any]]:
        with self.github.lock:
            return [c for c in self.github.comments.values() if c["_number"] == number]


def make_git_host(work: Path) -> GitHost:
    """tests/app/conftest.py's git host: upstream = the installed mlx_lm."""
    import mlx_lm

    root = work / "githost"
    bare = root / REPO.split("/")[0] / (REPO.split("/")[1] + ".git")
    bare.parent.mkdir(parents=True)
    git(root, "init", "-q", "--bare", str(bare))
    upstream = work / "upstream"
    shutil.copytree(Path(mlx_lm.__file__).parent, upstream / "mlx_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (upstream / "README.md").write_text("upstream mlx-lm, built by bench_load.py\n")
    fix_known_llama_finding(upstream / "mlx_lm" / "models" / "llama.py")
    git(upstream, "init", "-q", "-b", "main")
    git(upstream, "add", ".")
    git(upstream, "commit", "-q", "-m", "upstream")
    git(upstream, "remote", "add", "origin", str(bare))
    git(upstream, "push", "-q", "origin", "main")
    return GitHost(root=root, work=upstream, base_sha=git(upstream, "rev-parse", "HEAD"))


def wait_for(condition, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def setup(args: argparse.Namespace, work: Path) -> Bench:
    app_password, runner_password = secrets.token_hex(16), secrets.token_hex(16)
    acl = subprocess.run(["sh", str(ROOT / "deploy" / "redis-acl.sh")], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "APP_REDIS_PASSWORD": app_password,
                              "RUNNER_REDIS_PASSWORD": runner_password}).stdout
    aclfile = work / "users.acl"
    aclfile.write_text(acl)
    server = RedisServer(work, None if args.no_acl else aclfile)
    app_url = f"redis://app:{app_password}@127.0.0.1:{server.port}/0"
    runner_url = f"redis://runner:{runner_password}@127.0.0.1:{server.port}/0"
    if args.no_acl:  # the default user, no password, for everyone
        app_url = runner_url = f"redis://127.0.0.1:{server.port}/0"
    connection = redis.Redis.from_url(app_url)
    if not wait_for(lambda: pings(connection), 20, 0.2):
        raise SystemExit(f"bench_load: redis-server did not start (see {server.log})")

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    github = fake_github.FakeGitHub(app_id=APP_ID, public_key=public,
                                    installation_id=INSTALLATION_ID)
    github.permissions[MAINTAINER] = "write"
    github_port = free_port()
    ServerThread(uvicorn.Config(fake_github.create_app(github), host="127.0.0.1",
                                port=github_port, log_level="warning")).start()
    github.url = f"http://127.0.0.1:{github_port}"
    git_host = make_git_host(work)

    secret = secrets.token_hex(32)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("GITHUB_", "REDIS_", "VERIFY_", "DASHBOARD_"))}
    app_env = {**base_env, "GITHUB_APP_ID": str(APP_ID), "GITHUB_PRIVATE_KEY": private,
               "GITHUB_WEBHOOK_SECRET": secret, "GITHUB_API_URL": github.url,
               "GITHUB_GIT_URL": f"file://{git_host.root}", "REDIS_URL": app_url,
               "DASHBOARD_URL": "https://dashboard.example",
               "VERIFY_MODEL_TYPES": "llama", "VERIFY_CHECKS": "layers"}
    (work / "jobs").mkdir()
    # A runner gets only its own settings: no App key, no webhook secret.
    runner_env = {**base_env, "REDIS_URL": runner_url,
                  "GITHUB_GIT_URL": f"file://{git_host.root}",
                  "VERIFY_WORK_DIR": str(work / "jobs"), "VERIFY_TIMEOUT": "600"}
    supervisor = Supervisor()
    port = free_port()
    supervisor.add(Managed("server", [CLI, "serve", "--host", "127.0.0.1", "--port",
                                      str(port)], app_env, work / "server.log"))
    server_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{server_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(healthy, 60):
        raise SystemExit(f"bench_load: mlx-verify serve did not start (see {work}/server.log)")
    bench = Bench(args, work, secret, server, app_url, runner_url, connection, github,
                  git_host, supervisor, app_env, runner_env, server_url)
    bench.start_report_workers(args.report_workers)
    return bench


# ---- measurements ---------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def queue_count(bench: Bench, name: str) -> int:
    return Queue(name, connection=bench.connection, serializer=JSONSerializer).count


def failed_jobs(bench: Bench) -> dict[str, list[str]]:
    """Job ids in the failed registries of the report and verify queues."""
    found = {}
    for name in ("report", "verify"):
        queue = Queue(name, connection=bench.connection, serializer=JSONSerializer)
        ids = queue.failed_job_registry.get_job_ids()
        if ids:
            found[name] = ids
    return found


def report_idle(bench: Bench) -> bool:
    """The report queue is empty and nothing runs or waits for a retry on it."""
    queue = Queue("report", connection=bench.connection, serializer=JSONSerializer)
    return queue.count == 0 and queue.started_job_registry.count == 0 and \
        queue.scheduled_job_registry.count == 0


class Quiet:
    """True once the report and verify queues have had nothing queued, running or
    waiting for a retry for `seconds` in a row: what has not happened by then will
    not (a lost job), so a scenario stops waiting."""

    def __init__(self, bench: Bench, seconds: float = 30) -> None:
        self.bench, self.seconds, self.since = bench, seconds, None

    def __call__(self) -> bool:
        verify = Queue("verify", connection=self.bench.connection, serializer=JSONSerializer)
        try:
            idle = report_idle(self.bench) and verify.count == 0 and \
                verify.started_job_registry.count == 0 and \
                verify.scheduled_job_registry.count == 0
        except redis.RedisError:
            idle = False
        if not idle:
            self.since = None
            return False
        self.since = self.since or time.monotonic()
        return time.monotonic() - self.since >= self.seconds


def restarts(bench: Bench) -> dict[str, int]:
    with bench.supervisor.lock:
        return {m.name: m.restarts for m in bench.supervisor.processes if m.restarts}


def check_prs(bench: Bench, outcome: Outcome, heads: dict[int, list[str]],
              ran: set[int], completed: bool = True) -> None:
    """Exactly one Check Run per head; none in progress; completed when `completed`;
    one sticky comment on each PR in `ran` (whose jobs ran), none on the others."""
    lost = duplicated = in_progress = not_completed = 0
    comments_missing = comments_duplicated = 0
    for number, shas in heads.items():
        for sha in shas:
            runs = bench.runs_of(sha)
            lost += not runs
            duplicated += max(0, len(runs) - 1)
            in_progress += sum(r["status"] == "in_progress" for r in runs)
            not_completed += sum(r["status"] != "completed" for r in runs)
        comments = [c for c in bench.comments_of(number)
                    if "mlx-verify:sticky" in c["body"]]
        if number in ran:
            comments_missing += not comments
            comments_duplicated += max(0, len(comments) - 1)
        else:
            comments_duplicated += len(comments)
    outcome.figures.update({
        "PRs": len(heads), "Check Runs lost": lost, "Check Runs duplicated": duplicated,
        "in progress at the end": in_progress, "comments lost": comments_missing,
        "comments duplicated": comments_duplicated})
    outcome.check(lost == 0, f"{lost} head(s) without a Check Run")
    outcome.check(duplicated == 0, f"{duplicated} duplicate Check Run(s)")
    outcome.check(in_progress == 0, f"{in_progress} Check Run(s) left in progress")
    if completed:
        outcome.figures["not completed"] = not_completed
        outcome.check(not_completed == 0, f"{not_completed} Check Run(s) not completed")
    outcome.check(comments_missing == 0, f"{comments_missing} PR(s) without their comment")
    outcome.check(comments_duplicated == 0, f"{comments_duplicated} extra sticky comment(s)")


# ---- ack: webhook intake under load ---------------------------------------------------

def load_plan(args: argparse.Namespace, base_sha: str) -> list[dict[str, Any]]:
    """What to send, in order: the kind of each request and what it is about."""
    rng = random.Random(args.seed)
    opened = [{"kind": "opened", "number": FIRST_PR["ack"] + i,
               "sha": hashlib.sha1(f"ack-{i}".encode()).hexdigest(),
               "delivery": str(uuid.UUID(int=rng.getrandbits(128))), "key": float(i)}
              for i in range(args.prs)]
    extra = []
    for _ in range(int(args.prs * args.redeliveries)):
        original = rng.choice(opened)
        extra.append({**original, "kind": "redelivery",
                      "key": original["key"] + rng.uniform(1, 400)})
    for _ in range(int(args.prs * args.same_head)):
        original = rng.choice(opened)
        extra.append({**original, "kind": "reopened",
                      "delivery": str(uuid.UUID(int=rng.getrandbits(128))),
                      "key": original["key"] + rng.uniform(1, 400)})
    for kind, count in (("bad-signature", args.bad_signatures), ("bad-json", args.bad_json),
                        ("oversize", args.oversize)):
        for _ in range(count):
            original = rng.choice(opened)
            extra.append({**original, "kind": kind,
                          "delivery": str(uuid.UUID(int=rng.getrandbits(128))),
                          "key": rng.uniform(0, args.prs)})
    plan = sorted(opened + extra, key=lambda item: item["key"])
    for item in plan:
        item["base"] = base_sha
    return plan


EXPECTED_STATUS = {"opened": 202, "redelivery": 200, "reopened": 202, "bad-signature": 401,
                   "bad-json": 400, "oversize": 413}


def build_request(item: dict[str, Any], secret: str,
                  oversize: bytes) -> tuple[bytes, dict[str, str]]:
    kind = item["kind"]
    if kind == "bad-json":
        return webhook_request(secret, "pull_request", b'{"action": "opened", "number": ',
                               item["delivery"])
    if kind == "oversize":
        return webhook_request(secret, "pull_request", oversize, item["delivery"])
    fixture = REOPENED if kind == "reopened" else OPENED
    payload = pr_payload(fixture, item["number"], item["sha"], item["base"])
    return webhook_request(secret, "pull_request", payload, item["delivery"],
                           bad_signature=kind == "bad-signature")


def generate_load(url: str, secret: str, plan: list[dict[str, Any]], rate: float,
                  threads: int) -> list[tuple[str, int, float, float]]:
    """Open loop: request i is due at i/rate s; (kind, status, ack ms from the due time,
    ms late to start). Runs in a process of its own (its GIL is not the fake GitHub's)."""
    oversize = b'{"padding": "' + b"x" * (MAX_BODY_BYTES + 1024) + b'"}'
    requests = [build_request(item, secret, oversize) for item in plan]
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        return local.client

    def one(index: int, due: float) -> tuple[str, int, float, float]:
        body, headers = requests[index]
        started = time.perf_counter()
        try:
            status = client().post(url, content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = 0
            local.__dict__.pop("client", None)
        done = time.perf_counter()
        return plan[index]["kind"], status, (done - due) * 1000, (started - due) * 1000

    with ThreadPoolExecutor(threads) as pool:
        # warm the connections (and the server's first-request paths) off the clock
        list(pool.map(lambda _: client().get(url.replace("/webhook", "/healthz")),
                      range(threads)))
        start = time.perf_counter() + 0.2
        futures = []
        for index in range(len(plan)):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, index, due))
        return [f.result() for f in futures]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def scenario_ack(bench: Bench) -> Outcome:
    args = bench.args
    outcome = Outcome("ack")
    plan = load_plan(args, bench.git_host.base_sha)
    for item in plan:
        if item["kind"] == "opened":
            bench.github.pulls[(REPO, item["number"])] = fake_github.Pull(
                item["number"], item["sha"], item["base"], [LLAMA], MAINTAINER)
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(generate_load, (f"{bench.server_url}/webhook", bench.secret,
                                             plan, args.rate, args.threads))
    sent_s = time.monotonic() - started
    acks = [ms for _, _, ms, _ in results]
    late = [ms for _, _, _, ms in results]
    wrong: dict[str, int] = {}
    for kind, status, _, _ in results:
        if status != EXPECTED_STATUS[kind]:
            wrong[f"{kind}: {status}"] = wrong.get(f"{kind}: {status}", 0) + 1
    by_kind = {kind: sum(1 for item in plan if item["kind"] == kind) for kind in EXPECTED_STATUS}
    p50, p99 = statistics.median(acks), percentile(acks, 0.99)
    outcome.figures.update({
        "requests": len(plan), "sent in (s)": round(sent_s, 1),
        "rate (req/s)": args.rate, **{f"{k} requests": v for k, v in by_kind.items()},
        "ack p50 (ms)": round(p50, 1), "ack p99 (ms)": round(p99, 1),
        "ack max (ms)": round(max(acks), 1),
        "p99 of each kind (ms)": {k: round(percentile([ms for kk, _, ms, _ in results
                                                       if kk == k], 0.99), 1)
                                  for k in by_kind if by_kind[k]},
        "sender late p99 (ms)": round(percentile(late, 0.99), 1),
        "unexpected statuses": wrong or 0})
    outcome.check(not wrong, f"unexpected webhook statuses: {wrong}")
    outcome.check(p99 <= args.p99_goal_ms,
                  f"ack p99 {p99:.1f} ms over the {args.p99_goal_ms} ms goal")

    # The report worker turns each accepted delivery into GitHub reads, a Check Run and
    # a verify job; no runner takes them. More report workers drain the backlog.
    drain_started = time.monotonic()
    bench.start_report_workers(args.drain_workers)
    drained = wait_for(lambda: report_idle(bench), args.drain_timeout_s, 1.0)
    drain_s = time.monotonic() - drain_started
    outcome.check(drained, f"the report queue did not drain in {args.drain_timeout_s} s")
    verify = Queue("verify", connection=bench.connection, serializer=JSONSerializer)
    jobs_per_pr: dict[int, int] = {}
    job_ids = verify.job_ids
    for start in range(0, len(job_ids), 500):
        for job in Job.fetch_many(job_ids[start:start + 500], connection=bench.connection,
                                  serializer=JSONSerializer):
            if job is not None:
                number = int(job.args[0]["number"])
                jobs_per_pr[number] = jobs_per_pr.get(number, 0) + 1
    numbers = [item["number"] for item in plan if item["kind"] == "opened"]
    none = sum(1 for n in numbers if n not in jobs_per_pr)
    extra = sum(max(0, c - 1) for c in jobs_per_pr.values())
    report_jobs = by_kind["opened"] + by_kind["reopened"]
    outcome.figures.update({
        "report workers while sending / draining": f"{args.report_workers} / "
                                                    f"{args.report_workers + args.drain_workers}",
        "report jobs drained in (s)": round(drain_s + sent_s, 1),
        "report jobs per s": round(report_jobs / (drain_s + sent_s), 1),
        "verify jobs enqueued": len(job_ids), "PRs without a verify job": none,
        "PRs with more than one": extra})
    outcome.check(none == 0 and extra == 0 and len(job_ids) == len(numbers),
                  f"verify jobs: {len(job_ids)} for {len(numbers)} PRs ({none} PRs without, "
                  f"{extra} extra)")
    heads = {item["number"]: [item["sha"]] for item in plan if item["kind"] == "opened"}
    check_prs(bench, outcome, heads, ran=set(), completed=False)
    queued = sum(r["status"] == "queued" for shas in heads.values() for s in shas
                 for r in bench.runs_of(s))
    outcome.figures["Check Runs queued (jobs not run)"] = queued
    failed = failed_jobs(bench)
    outcome.figures["failed jobs"] = sum(len(v) for v in failed.values())
    outcome.check(not failed, f"failed jobs: {failed}")
    outcome.figures["process restarts"] = restarts(bench) or 0
    # The verify jobs are counted, not run: off the queue, so that no runner of a later
    # scenario takes them (their job hashes stay: each is still a queued job, not a
    # vanished one, for whatever watches them).
    bench.connection.delete(verify.key)
    return outcome


# ---- redis: a restart mid-run ---------------------------------------------------------

class Redeliverer:
    """Sends deliveries in a thread; one answered 503 or not answered is sent again
    with the same X-GitHub-Delivery every second, until it is acknowledged."""

    def __init__(self, bench: Bench, deliveries: list[tuple[str, dict[str, Any]]],
                 rate: float, give_up_s: float) -> None:
        self.bench, self.deliveries, self.rate, self.give_up_s = bench, deliveries, rate, \
            give_up_s
        self.redelivered = 0
        self.unacknowledged: list[str] = []
        self.statuses: dict[int, int] = {}
        self.sent = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def deliver(self, event: str, payload: dict[str, Any]) -> None:
        delivery = str(uuid.uuid4())
        deadline = time.monotonic() + self.give_up_s
        first = True
        while True:
            try:
                status = self.bench.send(event, payload, delivery, timeout=5).status_code
            except httpx.HTTPError:
                status = 0
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status not in (0, 502, 503, 504):
                return
            if time.monotonic() > deadline:
                self.unacknowledged.append(delivery)
                return
            if first:
                self.redelivered += 1
                first = False
            time.sleep(1)

    def run(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            futures = []
            for event, payload in self.deliveries:
                futures.append(pool.submit(self.deliver, event, payload))
                self.sent += 1
                time.sleep(1 / self.rate)
            for future in futures:
                future.result()


def scenario_redis(bench: Bench) -> Outcome:
    args = bench.args
    outcome = Outcome("redis")
    first = FIRST_PR["redis"]
    bench.start_runner()
    model_prs = {first + i: bench.open_pr(first + i, f"redis-{i}")
                 for i in range(args.redis_model_prs)}
    docs_prs = {first + 100 + i: bench.docs_pr(first + 100 + i)
                for i in range(args.redis_docs_prs)}
    deliveries = [("pull_request", pr_payload(OPENED, n, sha, bench.git_host.base_sha))
                  for n, sha in model_prs.items()]
    # the docs-only stream spans the restart
    deliveries += [("pull_request", pr_payload(OPENED, n, sha, bench.git_host.base_sha))
                   for n, sha in docs_prs.items()]
    sender = Redeliverer(bench, deliveries, args.redis_rate, give_up_s=120)
    verify = Queue("verify", connection=bench.connection, serializer=JSONSerializer)
    # mid-run: a verify job inside `mlx-verify check`, webhooks still coming in
    wait_for(lambda: verify.started_job_registry.count > 0, 120)
    time.sleep(5)
    restart_at = time.monotonic()
    bench.redis.stop()
    time.sleep(args.redis_down_s)
    bench.redis.start()
    wait_for(lambda: pings(bench.connection), 30, 0.2)
    outcome.figures["Redis down (s)"] = round(time.monotonic() - restart_at, 1)
    outcome.figures["sent before the restart"] = sender.sent
    sender.thread.join(300)

    heads = {**{n: [s] for n, s in model_prs.items()}, **{n: [s] for n, s in docs_prs.items()}}

    def settled() -> bool:
        return all(bench.runs_of(s) and all(r["status"] == "completed" for r in bench.runs_of(s))
                   for shas in heads.values() for s in shas) and \
            all(bench.comments_of(n) for n in model_prs) and report_idle(bench)

    quiet = Quiet(bench)
    wait_for(lambda: settled() or quiet(), args.job_timeout_s, 1.0)
    finished = settled()
    outcome.check(finished, "not settled: nothing left to run and PRs still without their "
                            "Check Run or comment" if quiet() else
                  f"not settled within {args.job_timeout_s} s of the restart")
    outcome.figures.update({
        "deliveries": len(deliveries), "redelivered (503 or no answer)": sender.redelivered,
        "never acknowledged": len(sender.unacknowledged), "statuses": sender.statuses,
        "settled after the restart (s)": round(time.monotonic() - restart_at, 1)})
    outcome.check(not sender.unacknowledged,
                  f"{len(sender.unacknowledged)} deliveries never acknowledged")
    check_prs(bench, outcome, heads, ran=set(model_prs))
    conclusions = [r["conclusion"] for s in model_prs.values() for r in bench.runs_of(s)]
    outcome.figures["model PR conclusions"] = conclusions
    outcome.check(all(c == "success" for c in conclusions), f"conclusions {conclusions}")
    failed = failed_jobs(bench)
    outcome.figures["failed jobs"] = sum(len(v) for v in failed.values())
    outcome.check(not failed, f"failed jobs: {failed}")
    outcome.figures["process restarts"] = restarts(bench) or 0
    return outcome


# ---- runner: SIGKILL mid-job ----------------------------------------------------------

def work_horse(worker_pid: int) -> int | None:
    """rq's work horse: the worker's child that leads its own process group."""
    for pid in descendants(worker_pid):
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid and \
                    int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                    == worker_pid:
                return pid
    return None


def scenario_runner(bench: Bench) -> Outcome:
    args = bench.args
    outcome = Outcome("runner")
    number = FIRST_PR["runner"]
    if not bench.runners:
        bench.start_runner()
    (runner,) = bench.runners[-1:]
    sha = bench.open_pr(number, "runner")
    response = bench.send("pull_request", pr_payload(OPENED, number, sha,
                                                     bench.git_host.base_sha))
    outcome.check(response.status_code == 202, f"webhook answered {response.status_code}")
    verify = Queue("verify", connection=bench.connection, serializer=JSONSerializer)

    def in_check() -> bool:  # the job is running and the sandboxed check has started
        pid = runner.process.pid if runner.process else None
        return pid is not None and verify.started_job_registry.count > 0 and any(
            b"checks.cli" in Path(f"/proc/{p}/cmdline").read_bytes()
            for p in descendants(pid) if Path(f"/proc/{p}/cmdline").exists())

    outcome.check(wait_for(in_check, 180), "the verify job did not start")
    time.sleep(3)  # well inside `mlx-verify check`
    worker_pid = runner.process.pid
    horse = work_horse(worker_pid)
    tree = descendants(worker_pid)
    killed_at = time.monotonic()
    for pid in (worker_pid, horse):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    runner.process.wait()
    time.sleep(3)
    survivors = [p for p in tree if p != horse and Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    outcome.figures["work horse found"] = horse is not None
    outcome.figures["processes left 3 s after the kill"] = len(survivors)
    outcome.check(horse is not None, "no work horse found to kill")
    outcome.check(not survivors, f"{len(survivors)} process(es) of the killed runner left")
    # the supervisor starts the runner again (systemd Restart=always)
    requeued = wait_for(lambda: any(r["status"] == "queued" and r["_history"][-2:-1] ==
                                    ["in_progress"] for r in bench.runs_of(sha)),
                        args.job_timeout_s, 1.0)
    outcome.figures["Check Run back to queued after (s)"] = \
        round(time.monotonic() - killed_at, 1) if requeued else "never"

    def settled() -> bool:
        runs = bench.runs_of(sha)
        return bool(runs) and all(r["status"] == "completed" for r in runs) and \
            bool(bench.comments_of(number)) and report_idle(bench)

    finished = wait_for(settled, args.job_timeout_s, 1.0)
    outcome.figures["completed after (s)"] = round(time.monotonic() - killed_at, 1) \
        if finished else "never"
    outcome.check(finished, f"not completed within {args.job_timeout_s} s of the kill")
    check_prs(bench, outcome, {number: [sha]}, ran={number})
    runs = bench.runs_of(sha)
    outcome.figures["Check Run statuses"] = [r["_history"] for r in runs]
    outcome.figures["conclusion"] = [r["conclusion"] for r in runs]
    outcome.check([r["conclusion"] for r in runs] == ["success"],
                  f"conclusion {[r['conclusion'] for r in runs]}")
    failed = failed_jobs(bench)
    outcome.figures["failed jobs"] = sum(len(v) for v in failed.values())
    outcome.check(not failed, f"failed jobs: {failed}")
    outcome.figures["process restarts"] = restarts(bench) or 0
    return outcome


# ---- github: 5xx and secondary rate limits on every write path -----------------------

def inject(bench: Bench, method: str, path_part: str) -> None:
    """Twice the secondary rate limit (githubkit waits Retry-After and tries once more,
    then the job fails and rq retries it), then a 502 (githubkit retries it in 1 s)."""
    bench.github.rate_limit_next(method, path_part, times=2, retry_after_s=1)
    bench.github.fail_next(method, path_part, 502, times=1)


def faults_left(bench: Bench) -> int:
    with bench.github.lock:
        return sum(fault[3] for fault in bench.github.faults)


def faults_hit(bench: Bench, method: str, path_part: str) -> int:
    with bench.github.lock:
        return sum(1 for m, p, body in bench.github.writes if m == method and
                   path_part in p and isinstance(body, str) and body.startswith("fault"))


def scenario_github(bench: Bench) -> Outcome:
    args = bench.args
    outcome = Outcome("github")
    first = FIRST_PR["github"]
    base = bench.git_host.base_sha
    if not bench.runners:
        bench.start_runner()
    paths: dict[str, int] = {}
    timeout = args.job_timeout_s

    def step(name: str, method: str, path_part: str, action, done) -> None:
        before = faults_hit(bench, method, path_part)
        inject(bench, method, path_part)
        action()
        ok = wait_for(lambda: done() and faults_left(bench) == 0 and report_idle(bench),
                      timeout, 0.5)
        paths[name] = faults_hit(bench, method, path_part) - before
        outcome.check(ok, f"{name}: not done within {timeout} s")
        with bench.github.lock:
            bench.github.faults.clear()

    # Check Run create, neutral: a docs-only PR
    docs = first + 1
    docs_sha = bench.docs_pr(docs)
    step("Check Run create (neutral)", "POST", "/check-runs",
         lambda: bench.send("pull_request", pr_payload(OPENED, docs, docs_sha, base)),
         lambda: bool(bench.runs_of(docs_sha)))

    number = first
    sha = bench.open_pr(number, "github-1")
    verify = Queue("verify", connection=bench.connection, serializer=JSONSerializer)
    # Check Run create, queued: hold the runner back until the job is queued
    bench.stop_runners()
    step("Check Run create (queued)", "POST", "/check-runs",
         lambda: bench.send("pull_request", pr_payload(OPENED, number, sha, base)),
         lambda: bool(bench.runs_of(sha)) and verify.count == 1)
    (run,) = bench.runs_of(sha) or [{"id": 0}]
    check_path = f"/check-runs/{run['id']}"
    # Check Run update: in progress (the runner starts the job)
    step("Check Run update (in progress)", "PATCH", check_path, bench.start_runner,
         lambda: any(r["status"] == "in_progress" for r in bench.runs_of(sha)))
    # Check Run update (completed) and comment create: the job's end
    bench.github.rate_limit_next("PATCH", check_path, times=2, retry_after_s=1)
    bench.github.fail_next("PATCH", check_path, 502, times=1)
    comment_path = f"/issues/{number}/comments"
    step("comment create", "POST", comment_path, lambda: None,
         lambda: bool(bench.comments_of(number)))
    paths["Check Run update (completed)"] = faults_hit(bench, "PATCH", check_path) - \
        paths["Check Run update (in progress)"]
    # comment update: a push to the PR, checked again
    pushed = bench.open_pr(number, "github-2", parent=sha)
    (sticky,) = bench.comments_of(number) or [{"id": 0}]
    step("comment update", "PATCH", f"/issues/comments/{sticky['id']}",
         lambda: bench.send("pull_request", pr_payload(SYNCHRONIZE, number, pushed, base)),
         lambda: any(r["status"] == "completed" for r in bench.runs_of(pushed)) and
         pushed[:12] in (bench.comments_of(number) or [{"body": ""}])[0]["body"])
    # reply: `/verify help`
    step("reply", "POST", comment_path,
         lambda: bench.send("issue_comment", comment_payload(number, "/verify help")),
         lambda: any("mlx-verify commands" in c["body"] for c in bench.comments_of(number)))

    outcome.figures["faults answered per path"] = paths
    for name, hits in paths.items():
        outcome.check(hits >= 3, f"{name}: {hits} of its 3 faults reached GitHub")
    heads = {number: [sha, pushed], docs: [docs_sha]}
    check_prs(bench, outcome, heads, ran={number})
    replies = [c for c in bench.comments_of(number) if "mlx-verify commands" in c["body"]]
    outcome.figures["replies"] = len(replies)
    outcome.check(len(replies) == 1, f"{len(replies)} replies to one /verify help")
    conclusions = {s[:7]: [r["conclusion"] for r in bench.runs_of(s)]
                   for s in (sha, pushed, docs_sha)}
    outcome.figures["conclusions"] = conclusions
    outcome.check(conclusions == {sha[:7]: ["success"], pushed[:7]: ["success"],
                                  docs_sha[:7]: ["neutral"]}, f"conclusions {conclusions}")
    failed = failed_jobs(bench)
    outcome.figures["failed jobs"] = sum(len(v) for v in failed.values())
    outcome.check(not failed, f"failed jobs: {failed}")
    outcome.figures["process restarts"] = restarts(bench) or 0
    return outcome


# ---- main -----------------------------------------------------------------------------

# ack last: its 2,000 queued Check Runs and jobs stay behind it.
SCENARIOS = {"redis": scenario_redis, "runner": scenario_runner, "github": scenario_github,
             "ack": scenario_ack}


def print_table(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        verdict = "ok" if not outcome.failures else "FAILED"
        print(f"\n### {outcome.name}: {verdict} ({outcome.figures.get('wall time (s)')} s)\n")
        print("| figure | value |\n|---|---|")
        for name, value in outcome.figures.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            print(f"| {name} | {text.replace('|', '/')} |")
        for failure in outcome.failures:
            print(f"\nFAILED: {failure}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--prs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks per second")
    parser.add_argument("--threads", type=int, default=32, help="sender threads")
    parser.add_argument("--redeliveries", type=float, default=0.1,
                        help="redelivered deliveries, a fraction of --prs")
    parser.add_argument("--same-head", type=float, default=0.05,
                        help="other deliveries of a PR's head (reopened), a fraction of --prs")
    parser.add_argument("--bad-signatures", type=int, default=50)
    parser.add_argument("--bad-json", type=int, default=50)
    parser.add_argument("--oversize", type=int, default=10)
    parser.add_argument("--p99-goal-ms", type=float, default=50.0)
    parser.add_argument("--report-workers", type=int, default=1,
                        help="`mlx-verify worker --queue report` processes (compose runs one)")
    parser.add_argument("--drain-workers", type=int, default=3,
                        help="report workers added once the ack load is sent, to drain it")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--drain-timeout-s", type=float, default=1500)
    parser.add_argument("--redis-model-prs", type=int, default=2)
    parser.add_argument("--redis-docs-prs", type=int, default=100)
    parser.add_argument("--redis-rate", type=float, default=10.0)
    parser.add_argument("--redis-down-s", type=float, default=3.0)
    parser.add_argument("--job-timeout-s", type=float, default=300)
    parser.add_argument("--no-acl", action="store_true",
                        help="Redis without deploy/redis-acl.sh's users (to tell an ACL "
                             "effect from others)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and logs")
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"bench_load: error: unknown scenario {unknown[0]!r} (of {', '.join(SCENARIOS)})",
              file=sys.stderr)
        return 2
    for tool in ("redis-server", "bwrap", "git"):
        if shutil.which(tool) is None:
            print(f"bench_load: error: {tool} is not installed", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    os.chmod(work, 0o755)  # the sandboxed check runs as `nobody` and reads the PR tree
    outcomes: list[Outcome] = []
    bench = None
    started = time.monotonic()
    try:
        bench = setup(args, work)
        for index, name in enumerate(names):
            if index:
                bench.fresh_workers()
            at = time.monotonic()
            outcome = SCENARIOS[name](bench)
            outcome.figures["wall time (s)"] = round(time.monotonic() - at, 1)
            outcomes.append(outcome)
            print(f"bench_load: {name} done in {outcome.figures['wall time (s)']} s, "
                  f"{len(outcome.failures)} failure(s)", file=sys.stderr, flush=True)
    finally:
        if bench is not None:
            bench.supervisor.shutdown()
            bench.redis.stop()
        if args.keep:
            print(f"bench_load: work dir and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"bench_load: {len(outcomes)} scenario(s) in {time.monotonic() - started:.0f} s; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} cores")
    print_table(outcomes)
    failures = [f"{o.name}: {f}" for o in outcomes for f in o.failures]
    if failures:
        print(f"\nbench_load: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
