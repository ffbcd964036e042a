"""The run store on a real redis-server: indexes, bounds, filters, sweep import, and
durability across a Redis restart (AOF)."""

from __future__ import annotations

import json
import time

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlx_verify.app import store
from mlx_verify.app.dashboard import DashboardSettings, dashboard_router, read_session, sign_session
from mlx_verify.app.settings import SettingsError
from mlx_verify.checks.schema import Results
from tests.app.conftest import free_port
from tests.conftest import run_cli
from tests.dashboard.conftest import REPO, start_redis


@pytest.fixture
def fresh(dash_redis):
    """The dashboard tests' Redis is shared: these tests use database 1."""
    port = dash_redis.connection_pool.connection_kwargs["port"]
    connection = redis.Redis(port=port, db=1)
    connection.flushdb()
    yield connection
    connection.flushdb()


T0 = time.time() - 86400  # within STORE_TTL_DAYS


def make_run(results, number: int, i: int, **changes) -> store.Run:
    fields = {"id": f"verify-{number}-{i}", "repository": REPO, "pr": number,
              "title": f"PR {number}", "head_sha": f"{i:040x}",
              "request": {"model_types": ["llama"]}, "state": "done",
              "queued_at": T0 + i, "results": results}
    return store.Run(**{**fields, **changes})


def test_bounded_per_pr_with_consistent_indexes(fresh, real_results):
    for i in range(store.MAX_RUNS_PER_PR + 5):
        store.record_run(fresh, make_run(real_results["clean"], 7, i))
    runs = store.runs_for_pr(fresh, REPO, 7, limit=1000)
    assert len(runs) == store.MAX_RUNS_PER_PR
    assert runs[0]["id"] == f"verify-7-{store.MAX_RUNS_PER_PR + 4}"  # newest first
    assert store.get_run(fresh, "verify-7-0") is None  # the oldest went, with its indexes
    assert store.count_runs(fresh) == store.MAX_RUNS_PER_PR
    assert len(store.runs_for_model_type(fresh, "llama", limit=1000)) == store.MAX_RUNS_PER_PR
    # Runs expire (STORE_TTL_DAYS, 90 by default) as a backstop to the store's own
    # trimming; the indexes do not (trimming keeps them consistent).
    for key in fresh.scan_iter(f"{store.PREFIX}run:*"):
        assert 0 < fresh.ttl(key) <= 90 * 86400


def test_pr_list_filters_and_latest_run(fresh, real_results):
    store.record_run(fresh, make_run(real_results["clean"], 1, 1))
    store.record_run(fresh, make_run(real_results["bugged"], 2, 2))
    store.record_run(fresh, make_run(None, 3, 3, state="queued"))
    store.record_run(fresh, store.Run(id="other-1", repository="someone/fork", pr=1,
                                      state="failed", queued_at=T0 + 10, reason="crashed"))
    rows, total = store.pr_list(fresh)
    assert total == 4 and [r["number"] for r in rows] == [1, 3, 2, 1]
    assert [r["number"] for r in store.pr_list(fresh, verdict="fail")[0]] == [2]
    assert [r["number"] for r in store.pr_list(fresh, state="queued")[0]] == [3]
    assert store.pr_list(fresh, repository="someone/fork")[0][0]["state"] == "failed"
    assert store.pr_list(fresh, repository=REPO, verdict="pass")[1] == 1
    # A newer push takes over the PR's row; an older run finishing late does not.
    store.record_run(fresh, make_run(real_results["bugged"], 1, 9))
    store.record_run(fresh, make_run(real_results["clean"], 1, 1, title="renamed"))
    pr = store.get_pr(fresh, REPO, 1)
    assert pr["latest"] == "verify-1-9" and pr["verdict"] == "fail" and pr["title"] == "renamed"


def test_record_job_follows_the_report_job_state(fresh, real_results):
    fresh.hset("mlxv:job:verify-5-x", mapping={
        "repo": REPO, "number": 5, "sha": "a" * 40, "state": "queued",
        "request": json.dumps({"model_types": [], "checks": ["layers"], "dtype": "float32",
                               "hub": [], "source": "auto"})})
    store.note_pr(fresh, REPO, 5, "t")  # from the webhook payload, before any run
    store.record_job(fresh, "verify-5-x", "queued", requested_by="maintainer-1")
    assert store.get_run(fresh, "verify-5-x").state == "queued"
    assert store.get_pr(fresh, REPO, 5)["title"] == "t"
    store.record_job(fresh, "verify-5-x", "running")
    outcome = {"status": "done", "results": real_results["bugged"].model_dump(mode="json"),
               "errors": {"gemma": "cannot load"}, "stderr_tail": "tail"}
    run = store.record_job(fresh, "verify-5-x", "completed", outcome=outcome)
    assert run.state == "done" and run.verdict == "error"  # an unrunnable model_type
    assert run.started_at and run.finished_at
    assert run.matrix() == {"llama": {"layers": "fail"}, "gemma": {"(run)": "error"}}
    assert "tail" in run.logs and run.request["requested_by"] == "maintainer-1"
    assert store.runs_for_model_type(fresh, "gemma")[0]["id"] == "verify-5-x"
    store.record_job(fresh, "verify-5-x", "queued", requested_by="maintainer-2")  # a re-run
    rerun = store.get_run(fresh, "verify-5-x")
    assert rerun.state == "queued" and rerun.results is None and rerun.attempt == 2
    assert rerun.request["requested_by"] == "maintainer-2"
    # the first attempt is kept whole under its own id, and is what the indexes list
    first = store.get_run(fresh, "verify-5-x.1")
    assert first.state == "done" and first.results == run.results and first.attempt == 1
    assert first.request["requested_by"] == "maintainer-1" and "tail" in first.logs
    assert [r["id"] for r in store.runs_for_model_type(fresh, "gemma")] == ["verify-5-x.1"]
    assert [r["id"] for r in store.runs_for_pr(fresh, REPO, 5)] == ["verify-5-x", "verify-5-x.1"]
    assert store.get_pr(fresh, REPO, 5)["latest"] == "verify-5-x"
    store.record_job(fresh, "verify-5-x", "queued")  # asked again while queued: no new attempt
    assert store.get_run(fresh, "verify-5-x").attempt == 2
    assert store.get_run(fresh, "verify-5-x.2") is None
    assert store.record_job(fresh, "missing-job", "queued") is None  # never raises


def test_sweep_import_is_idempotent(fresh, real_results, tmp_path):
    fingerprint = {"mlx_lm": "0.32.2 abc /x", "transformers": "5.23.0", "options": []}
    (tmp_path / "llama.json").write_text(real_results["clean"].model_dump_json())
    (tmp_path / "sweep.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": {
        "llama": {"model_type": "llama", "exit": 0, "seconds": 9.0, "verdict": "pass"},
        "gemma": {"model_type": "gemma", "exit": 2, "seconds": 1.0, "verdict": "error",
                  "error": "cannot load"}}}))
    sid = store.import_sweep_dir(fresh, tmp_path)
    assert store.import_sweep_dir(fresh, tmp_path) == sid
    sweeps = store.list_sweeps(fresh)
    assert len(sweeps) == 1 and sweeps[0]["transformers"] == "5.23.0"
    matrix = store.sweep_matrix(fresh, sweeps[0])
    assert matrix["llama"]["checks"] == {"layers": "pass"}
    assert matrix["gemma"]["verdict"] == "error"
    assert store.count_runs(fresh) == 2


def test_a_real_sweep_directory_imports(fresh, cache_dir, tmp_path):
    """`mlx-verify sweep` output as written by the sweep itself (what --redis stores)."""
    import transformers

    out = tmp_path / "sweep"
    done = run_cli(["sweep", "--types", "llama", "--checks", "layers", "--variants", "default",
                    "--jobs", "1", "--out", str(out)], cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    sid = store.import_sweep_dir(fresh, out)
    (sweep,) = store.list_sweeps(fresh)
    assert sweep["id"] == sid and sweep["transformers"] == transformers.__version__
    state = json.loads((out / "sweep.json").read_text())
    assert sweep["mlx_lm"] == state["fingerprint"]["mlx_lm"]
    matrix = store.sweep_matrix(fresh, sweep)
    assert matrix == {"llama": {"run": f"sweep-{sid}-llama", "verdict": "pass",
                                "checks": {"layers": "pass"}}}
    assert "| llama | pass | pass |" in (out / "summary.md").read_text()
    run = store.get_run(fresh, f"sweep-{sid}-llama")
    assert run.results == Results.model_validate_json((out / "llama.json").read_text())
    assert run.request["checks"] == ["layers"]


def test_runs_survive_a_redis_restart(tmp_path, real_results):
    port = free_port()
    process = start_redis(tmp_path, port)
    try:
        store.record_run(redis.Redis(port=port), make_run(real_results["bugged"], 4, 1))
    finally:
        process.terminate()
        process.wait(10)
    process = start_redis(tmp_path, port)  # same AOF directory
    try:
        run = store.get_run(redis.Redis(port=port), "verify-4-1")
        assert run is not None and run.results == real_results["bugged"]
        assert store.pr_list(redis.Redis(port=port))[1] == 1
    finally:
        process.terminate()
        process.wait(10)


def test_session_cookie_is_signed_and_expires():
    secret = "k" * 40
    cookie = sign_session(secret, {"login": "a", "csrf": "c"})
    assert read_session(secret, cookie)["login"] == "a"
    mac = cookie.rsplit(".", 1)[1]
    forged = sign_session("x" * 40, {"login": "admin", "csrf": "c"}).rsplit(".", 1)[0]
    assert read_session(secret, f"{forged}.{mac}") == {}
    assert read_session("y" * 40, cookie) == {}
    old = sign_session(secret, {"login": "a"})
    assert read_session(secret, old) != {}
    import mlx_verify.app.dashboard as dashboard

    saved = dashboard.SESSION_MAX_AGE_S
    dashboard.SESSION_MAX_AGE_S = -1
    try:
        assert read_session(secret, old) == {}
    finally:
        dashboard.SESSION_MAX_AGE_S = saved


def test_require_login_setting(fresh, monkeypatch):
    config = DashboardSettings(True, "id", "secret", "z" * 40, "http://127.0.0.1:9",
                               "http://127.0.0.1:9", None, False)
    app = FastAPI()
    app.include_router(dashboard_router(None, fresh, config))
    client = TestClient(app)
    for path in ("/dashboard/", "/dashboard/runs/x", "/dashboard/queue", "/dashboard/matrix"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/dashboard/login?next=")
    monkeypatch.setenv("DASHBOARD_REQUIRE_LOGIN", "1")
    monkeypatch.delenv("GITHUB_OAUTH_CLIENT_ID", raising=False)
    with pytest.raises(SettingsError, match="DASHBOARD_REQUIRE_LOGIN"):
        dashboard_router(None, fresh)
