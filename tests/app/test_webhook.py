"""Webhook intake: signatures, redelivery, authorisation of /verify. No checks run here."""

from __future__ import annotations

import httpx
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from tests.app.conftest import OUTSIDER, REPO

LLAMA = "mlx_lm/models/llama.py"


def queued(env, name: str) -> int:
    return Queue(name, connection=env.redis, serializer=JSONSerializer).count


def test_bad_signature_gets_401_and_enqueues_nothing(env):
    payload = env.payload("pull_request.opened.payload.json", number=1, sha="a" * 40)
    response = env.send("pull_request", payload, secret="not-the-secret")
    assert response.status_code == 401
    assert queued(env, "report") == 0 and queued(env, "verify") == 0
    assert env.redis.keys("mlxv:delivery:*") == []
    assert env.github.writes == []


def test_ping_and_ignored_events(env):
    ping = env.send("ping", env.payload("ping.payload.json"))
    assert ping.status_code == 200 and ping.json() == {"status": "pong"}
    labeled = env.payload("pull_request.labeled.payload.json", number=1, sha="a" * 40)
    assert env.send("pull_request", labeled).json() == {"status": "ignored"}
    installed = env.send("installation", env.payload("installation.created.payload.json"))
    assert installed.status_code == 200
    assert queued(env, "report") == 0


def test_redelivered_delivery_runs_once(env):
    sha, files = env.git_host.make_pr(11, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # ok")})
    env.open_pr(11, sha, files)
    payload = env.payload("pull_request.opened.payload.json", number=11, sha=sha)
    first = env.send("pull_request", payload, delivery="delivery-1")
    again = env.send("pull_request", payload, delivery="delivery-1")
    assert first.status_code == 202
    assert again.json() == {"status": "duplicate delivery"}
    # A different delivery of the same PR head (reopened) maps to the same job id.
    reopened = env.payload("pull_request.reopened.payload.json", number=11, sha=sha)
    assert env.send("pull_request", reopened, delivery="delivery-2").status_code == 202
    env.run_queue("report")
    assert queued(env, "verify") == 1
    assert len(env.check_runs(sha)) == 1
    assert env.check_runs(sha)[0]["status"] == "queued"


def test_verify_from_user_without_write_permission_enqueues_nothing(env):
    sha, files = env.git_host.make_pr(12, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # ok")})
    env.open_pr(12, sha, files)
    payload = env.payload("issue_comment.created.payload.json", sender=OUTSIDER)
    payload["issue"].update(number=12, pull_request={"url": f"https://x/{REPO}/pulls/12"})
    payload["comment"]["body"] = "Please check this.\n/verify llama\n"
    assert env.send("issue_comment", payload).status_code == 202
    env.run_queue("report")
    assert queued(env, "verify") == 0
    assert env.check_runs(sha) == []
    replies = env.comments(12)
    assert len(replies) == 1 and "needs write access" in replies[0]["body"]
    assert env.github.reactions == []


def test_malformed_verify_gets_usage_reply(env):
    sha, files = env.git_host.make_pr(13, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # ok")})
    env.open_pr(13, sha, files)
    payload = env.payload("issue_comment.created.with-installation.payload.json")
    payload["issue"]["number"] = 13
    payload["comment"]["body"] = "/verify llama --dtype int3 @someone"
    env.send("issue_comment", payload)
    env.run_queue("report")
    assert queued(env, "verify") == 0
    (reply,) = env.comments(13)
    assert "could not read the command" in reply["body"] and "@someone" not in reply["body"]


@pytest.mark.parametrize("edits", [
    {"README.md": ("upstream", "the upstream")},  # docs only
    {"mlx_lm/LORA.md": ("LoRA", "LoRA (low-rank adapters)"),  # docs inside the package
     "tests/test_models.py": "def test_nothing():\n    assert True\n"},  # and tests
], ids=["docs", "docs-and-tests"])
def test_no_model_code_changed_gives_neutral_check_and_no_comment(env, edits):
    sha, files = env.git_host.make_pr(14, edits)
    env.open_pr(14, sha, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=14,
                                         sha=sha))
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "neutral")
    assert "nothing to verify" in run["output"]["summary"]
    assert env.comments(14) == [] and queued(env, "verify") == 0


def test_untrusted_author_waits_for_a_maintainer(env):
    sha, files = env.git_host.make_pr(15, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # ok")})
    env.open_pr(15, sha, files, author=OUTSIDER)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=15,
                                         sha=sha, sender=OUTSIDER))
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "neutral" and "/verify" in run["output"]["summary"]
    assert queued(env, "verify") == 0


def test_a_new_push_supersedes_the_queued_job_of_the_old_sha(env):
    old, files = env.git_host.make_pr(16, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # v1")})
    env.open_pr(16, old, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=16,
                                         sha=old))
    env.run_queue("report")
    new, files = env.git_host.make_pr(16, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # v2")})
    env.open_pr(16, new, files)
    env.send("pull_request", env.payload("pull_request.synchronize.payload.json",
                                         number=16, sha=new))
    env.run_queue("report")
    (old_run,) = env.check_runs(old)
    assert (old_run["status"], old_run["conclusion"]) == ("completed", "neutral")
    assert "superseded" in old_run["output"]["title"]
    (new_run,) = env.check_runs(new)
    assert new_run["status"] == "queued"
    verify = Queue("verify", connection=env.redis, serializer=JSONSerializer)
    assert verify.job_ids == [new_run["external_id"]]
    # Closing the PR cancels what is left.
    env.send("pull_request", env.payload("pull_request.closed.payload.json", number=16,
                                         sha=new))
    env.run_queue("report")
    assert env.check_runs(new)[0]["conclusion"] == "neutral"
    assert verify.job_ids == []


def test_missing_or_invalid_settings_stop_start_up_with_one_line(app_env, monkeypatch,
                                                                  capsys):
    import argparse

    from mlx_verify.app.server import serve
    from mlx_verify.workers.worker import worker

    monkeypatch.delenv("GITHUB_APP_ID")
    assert serve(argparse.Namespace(host="127.0.0.1", port=0)) == 2
    assert capsys.readouterr().err == "mlx-verify: error: GITHUB_APP_ID is not set\n"
    monkeypatch.setenv("GITHUB_APP_ID", "12")
    monkeypatch.setenv("GITHUB_PRIVATE_KEY", "not a key")
    assert serve(argparse.Namespace(host="127.0.0.1", port=0)) == 2
    assert capsys.readouterr().err.startswith(
        "mlx-verify: error: GITHUB_PRIVATE_KEY is not a PEM private key")
    monkeypatch.setenv("REDIS_URL", "http://nowhere")
    assert worker(argparse.Namespace(queue=["verify"], burst=True)) == 2
    assert "REDIS_URL is not a redis" in capsys.readouterr().err


def test_runner_environment_carries_no_secrets(app_env, tmp_path, monkeypatch):
    from mlx_verify.workers.verify import scrubbed_env

    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = scrubbed_env(tmp_path)
    assert not [k for k in env if k.startswith(("GITHUB", "REDIS", "AWS"))]
    assert "ghp_secret" not in repr(env) and app_env["GITHUB_PRIVATE_KEY"] not in repr(env)
    assert env["HOME"].startswith(str(tmp_path))


def test_fork_check_suite_rerun_maps_the_head_sha_back_to_the_pr(env):
    sha, files = env.git_host.make_pr(17, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # fork")})
    env.open_pr(17, sha, files, author=OUTSIDER)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=17,
                                         sha=sha, sender=OUTSIDER))
    env.run_queue("report")
    assert queued(env, "verify") == 0  # untrusted author: not run automatically
    rerun = env.payload("check_suite.rerequested.payload.json")
    rerun["check_suite"].update(head_sha=sha, pull_requests=[])  # as for a fork PR
    env.send("check_suite", rerun)
    env.run_queue("report")
    runs = env.check_runs(sha)
    assert [r["status"] for r in runs] == ["completed", "queued"]
    job_id = runs[1]["external_id"]
    assert Queue("verify", connection=env.redis, serializer=JSONSerializer).job_ids == [job_id]
    # The re-run of an outsider is refused.
    rerun["sender"]["login"] = OUTSIDER
    env.send("check_suite", rerun)
    env.run_queue("report")
    assert len(env.check_runs(sha)) == 2


def test_oversized_body_is_refused_and_healthz_reports_queues(env):
    response = env.send("pull_request", {"pad": "x" * (6 * 1024 * 1024)})
    assert response.status_code == 413
    health = httpx.get(f"{env.server}/healthz", timeout=10).json()
    assert health["redis"] == "ok" and health["queues"]["report"] == 0


def test_installation_tokens_are_minted_once_and_shared_through_redis(env):
    # Three report jobs, each in its own work horse process with its own client.
    for number in (18, 19, 20):
        sha, files = env.git_host.make_pr(number, {"README.md": ("upstream", f"v{number}")})
        env.open_pr(number, sha, files)
        env.send("pull_request", env.payload("pull_request.opened.payload.json",
                                             number=number, sha=sha))
    env.run_queue("report")
    minted = [w for w in env.github.writes if w[1].endswith("/access_tokens")]
    assert len(minted) == 1
    assert env.redis.keys("mlxv:githubkit:*installation*")


# ---- issue 11: pinning, stale events, pushers, intake faults, GitHub limits -------------

HARMLESS = ("import mlx.core as mx", "import mlx.core as mx  # ok")


def verify_comment(env, number: int, body: str = "/verify llama") -> dict:
    payload = env.payload("issue_comment.created.with-installation.payload.json")
    payload["issue"]["number"] = number
    payload["comment"]["body"] = body
    return payload


def open_event(env, number: int, sha: str, sender: str = "maintainer-1",
               fixture: str = "pull_request.opened.payload.json"):
    return env.send("pull_request", env.payload(fixture, number=number, sha=sha,
                                                sender=sender))


def test_verify_refuses_a_head_pushed_after_the_comment(env):
    import time

    old, files = env.git_host.make_pr(30, {LLAMA: HARMLESS})
    env.open_pr(30, old, files, author=OUTSIDER)
    open_event(env, 30, old, sender=OUTSIDER)
    env.run_queue("report")  # neutral: not run automatically
    time.sleep(1.1)  # comment times have whole seconds
    # The maintainer comments on `old`; before the report worker reads the command,
    # the author pushes `new` (its delivery arrives after the comment was written).
    comment = verify_comment(env, 30)
    assert env.send("issue_comment", comment).status_code == 202
    time.sleep(1.1)
    new, files = env.git_host.make_pr(30, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # later")})
    env.open_pr(30, new, files, author=OUTSIDER)
    open_event(env, 30, new, sender=OUTSIDER, fixture="pull_request.synchronize.payload.json")
    env.run_queue("report")
    assert queued(env, "verify") == 0
    assert [r["output"]["title"] for r in env.check_runs(new)] == ["waiting for a maintainer"]
    (reply,) = env.comments(30)
    assert f"`{new[:12]}` is not known to be the commit this command was written for" in \
        reply["body"]
    assert env.github.reactions == []
    # A /verify written after the push runs on the new head.
    time.sleep(1.1)
    env.send("issue_comment", verify_comment(env, 30))
    env.run_queue("report")
    (job_id,) = Queue("verify", connection=env.redis, serializer=JSONSerializer).job_ids
    assert job_id.startswith(f"verify-30-{new[:12]}")


def test_verify_on_a_head_the_server_never_saw_is_refused_once(env):
    import time

    # The PR was opened before the App was installed: no pull_request event was seen.
    sha, files = env.git_host.make_pr(31, {LLAMA: HARMLESS})
    env.open_pr(31, sha, files, author=OUTSIDER)
    env.send("issue_comment", verify_comment(env, 31))
    env.run_queue("report")
    assert queued(env, "verify") == 0
    (reply,) = env.comments(31)
    assert f"Comment `/verify` again to check `{sha[:12]}`" in reply["body"]
    time.sleep(1.1)
    env.send("issue_comment", verify_comment(env, 31))  # written after the refusal
    env.run_queue("report")
    assert queued(env, "verify") == 1 and len(env.comments(31)) == 1


def test_a_late_push_event_does_not_cancel_the_run_of_the_newer_head(env):
    old, files = env.git_host.make_pr(32, {LLAMA: HARMLESS})
    env.open_pr(32, old, files)
    open_event(env, 32, old)
    env.run_queue("report")
    new, files = env.git_host.make_pr(32, {LLAMA: ("import mlx.core as mx",
                                                   "import mlx.core as mx  # v2")})
    env.open_pr(32, new, files)
    open_event(env, 32, new, fixture="pull_request.synchronize.payload.json")
    env.run_queue("report")
    (new_run,) = env.check_runs(new)
    assert new_run["status"] == "queued"
    # The push event of `old` again (a retried report job, or a late copy): nothing moves.
    open_event(env, 32, old, fixture="pull_request.synchronize.payload.json")
    env.run_queue("report")
    assert env.check_runs(new)[0]["status"] == "queued"
    verify = Queue("verify", connection=env.redis, serializer=JSONSerializer)
    assert verify.job_ids == [new_run["external_id"]]
    assert env.redis.get(f"mlxv:head:{REPO}#32") == new.encode()
    assert len(env.check_runs(old)) == 1  # its own, superseded; no new one


def test_a_push_by_a_user_without_write_access_is_not_run(env):
    # The author is a maintainer, but someone else (with push access to the fork's
    # branch, say) pushed this commit.
    sha, files = env.git_host.make_pr(33, {LLAMA: HARMLESS})
    env.open_pr(33, sha, files, author="maintainer-1")
    payload = env.payload("pull_request.synchronize.payload.json", number=33, sha=sha,
                          sender=OUTSIDER)
    payload["pull_request"]["user"]["login"] = "maintainer-1"
    env.send("pull_request", payload)
    env.run_queue("report")
    assert queued(env, "verify") == 0
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "neutral"
    assert "user who pushed this commit has no write access" in run["output"]["summary"]


def test_a_failed_enqueue_does_not_swallow_the_delivery(env):
    sha, files = env.git_host.make_pr(34, {LLAMA: HARMLESS})
    env.open_pr(34, sha, files)
    payload = env.payload("pull_request.opened.payload.json", number=34, sha=sha)
    # A real Redis error inside rq's enqueue: its queue list is a string key.
    env.redis.set("rq:queue:report", "not a list")
    refused = env.send("pull_request", payload, delivery="delivery-34")
    assert refused.status_code == 503
    assert not env.redis.exists("mlxv:delivery:delivery-34")
    env.redis.delete("rq:queue:report")
    # GitHub's redelivery (same X-GitHub-Delivery) is taken this time.
    again = env.send("pull_request", payload, delivery="delivery-34")
    assert again.status_code == 202
    env.run_queue("report")
    assert queued(env, "verify") == 1


def test_non_ascii_signature_gets_401(env):
    import json as _json

    body = _json.dumps(env.payload("ping.payload.json")).encode()
    for signature in ("sha256=é" + "0" * 63, "sha256=\u00ff", "sha1=" + "0" * 40):
        answer = httpx.post(f"{env.server}/webhook", content=body, timeout=10, headers={
            "X-GitHub-Event": "ping", "X-GitHub-Delivery": "d-nonascii",
            "X-Hub-Signature-256": signature.encode("utf-8"),
            "Content-Type": "application/json"})
        assert answer.status_code == 401, (signature, answer.status_code)


def queue_verify_job(env, number: int) -> tuple[str, str]:
    """An opened PR whose verify job waits for a runner: (sha, job id)."""
    sha, files = env.git_host.make_pr(number, {LLAMA: HARMLESS})
    env.open_pr(number, sha, files)
    open_event(env, number, sha)
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    return sha, run["external_id"]


def runner_reports(env, job_id: str, outcome: dict) -> None:
    """What a runner leaves at the end of a job: its verify job finished, the outcome its
    result (the collector takes it from there)."""
    from tests.app.conftest import runner_finishes

    runner_finishes(env.redis, job_id, outcome)


def test_a_github_error_on_the_comment_is_retried_until_the_comment_is_written(env):
    import time

    from mlx_verify.app import store

    sha, job_id = queue_verify_job(env, 35)
    outcome = {"status": "done", "results": None, "errors": {"llama": "ImportError: boom"},
               "skipped": [], "planned": ["llama"], "model_types": ["llama"]}
    runner_reports(env, job_id, outcome)
    # 502 four times: githubkit's own three retries (1 + 4 + 9 s) do not get through
    env.github.fail_next("POST", "/issues/35/comments", status=502, times=4)
    env.run_queue("report")
    assert env.comments(35) == []  # GitHub failed the write
    # not complete yet: still active (the collector saw no start, only the finish)
    assert env.redis.hget(f"mlxv:job:{job_id}", "state") in (b"queued", b"running")
    time.sleep(5.5)  # the report job's first retry interval
    env.run_queue("report")
    # on a loaded machine the scheduler may move the retry a little later: poll for it
    deadline = time.monotonic() + 30
    while not env.comments(35) and time.monotonic() < deadline:
        time.sleep(0.5)
        env.run_queue("report")
    (comment,) = env.comments(35)
    assert "ImportError: boom" in comment["body"]
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    completions = [w for w in env.github.writes if w[0] == "PATCH" and
                   w[1].endswith(f"/check-runs/{run['id']}") and
                   isinstance(w[2], dict) and w[2].get("status") == "completed"]
    assert len(completions) == 1  # the retry wrote the comment, not the Check Run again
    assert env.redis.hget(f"mlxv:job:{job_id}", "state") == b"completed"
    assert store.get_run(env.redis, job_id).state == "done"


def test_a_huge_report_stays_under_githubs_limits_and_completes_its_check_run(env):
    from mlx_verify.app.github import COMMENT_BODY_MAX

    sha, job_id = queue_verify_job(env, 36)
    # 3000 model_types that could not run, each with a long reason: far over 64 KiB
    errors = {f"model_{i:04d}": f"RuntimeError: {'x' * 400} {i}" for i in range(3000)}
    outcome = {"status": "done", "results": None, "errors": errors, "skipped": [],
               "planned": list(errors), "model_types": list(errors)}
    runner_reports(env, job_id, outcome)
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert len(run["output"]["summary"]) <= 65535
    assert "cut here to stay under GitHub's limit" in run["output"]["summary"]
    (comment,) = env.comments(36)
    assert len(comment["body"]) <= COMMENT_BODY_MAX
    assert comment["body"].startswith("<!-- mlx-verify:sticky -->")
    assert "cut here to stay under GitHub's limit of 65,536 characters" in comment["body"]
    refused = [w for w in env.github.writes if isinstance(w[2], str)]
    assert refused == []


def test_placeholder_or_short_secrets_stop_start_up_with_one_line(app_env, monkeypatch,
                                                                   capsys):
    import argparse

    from mlx_verify.app.server import serve

    for value, error in (
            ("change-me", "GITHUB_WEBHOOK_SECRET is a placeholder; set a long random string"),
            ("CHANGEME-please-now-soon", "GITHUB_WEBHOOK_SECRET is a placeholder"),
            ("short-one", "GITHUB_WEBHOOK_SECRET must be at least 16 characters")):
        monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", value)
        assert serve(argparse.Namespace(host="127.0.0.1", port=0)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mlx-verify: error: {error}") and err.count("\n") == 1
        assert value not in err
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", app_env["GITHUB_WEBHOOK_SECRET"])
    monkeypatch.setenv("GITHUB_OAUTH_CLIENT_ID", "Iv1.x")
    monkeypatch.setenv("GITHUB_OAUTH_CLIENT_SECRET", "f" * 40)
    monkeypatch.setenv("DASHBOARD_SESSION_SECRET", "9f8e7d6c5b4a" * 4)
    assert serve(argparse.Namespace(host="127.0.0.1", port=0)) == 2
    assert capsys.readouterr().err.startswith(
        "mlx-verify: error: GITHUB_OAUTH_CLIENT_SECRET is a placeholder")
    monkeypatch.setenv("GITHUB_OAUTH_CLIENT_SECRET", "a1b2c3d4e5f6a7b8c9d0")
    monkeypatch.setenv("DASHBOARD_SESSION_SECRET", "change-me" * 4)
    assert serve(argparse.Namespace(host="127.0.0.1", port=0)) == 2
    assert capsys.readouterr().err.startswith(
        "mlx-verify: error: DASHBOARD_SESSION_SECRET is a placeholder")


def padded_results(kb: int) -> dict:
    """Results of one failing llama report, padded to about kb KiB."""
    from mlx_verify.checks.schema import CheckResult, Environment, ModelReport, Results

    env = Environment(python="3.11", platform="Linux", machine="x86_64", mlx="0.32",
                      mlx_device="cpu", torch="2.13", transformers="5.23",
                      mlx_lm_version="0.32.2", mlx_lm_path="/x", mlx_verify="0.1.0")
    check = CheckResult(check="layers", variant="default", verdict="fail", summary="diverges",
                        details={"pad": "x" * (kb * 1024)})
    report = ModelReport(model_type="llama", source="default", seed=0, dtype="float32",
                         verdict="fail", checks=[check])
    return Results(command="mlx-verify check llama", environment=env,
                   reports=[report]).model_dump(mode="json")


def test_stored_results_are_bounded_and_never_crowd_out_webhooks(env, monkeypatch):
    import time

    from mlx_verify.app import store

    monkeypatch.setenv("STORE_MAX_MB", "2")
    monkeypatch.setenv("STORE_RESULTS_MAX_KB", "256")
    monkeypatch.setenv("STORE_TTL_DAYS", "30")
    results = padded_results(200)
    now = time.time()

    def run(i: int, **changes) -> store.Run:
        return store.Run(**{"id": f"verify-{i}", "repository": REPO, "pr": 100 + i % 5,
                            "head_sha": f"{i:040x}", "state": "done", "queued_at": now + i,
                            "results": results, **changes})

    # A run queued 31 days ago goes at the next write.
    store.record_run(env.redis, run(0, queued_at=now - 31 * 86400))
    store.record_run(env.redis, run(1))
    assert store.get_run(env.redis, "verify-0") is None
    # Results over STORE_RESULTS_MAX_KB: the run is kept, its results are not.
    store.record_run(env.redis, run(2, results=padded_results(400)))
    kept = store.get_run(env.redis, "verify-2")
    assert kept.results is None and "over STORE_RESULTS_MAX_KB (256)" in kept.reason
    assert store.get_metas(env.redis, ["verify-2"])[0]["verdict"] == "fail"
    assert env.redis.ttl("mlxv:store:run:verify-2") > 29 * 86400

    # Redis has 4 MB left; 60 runs of 200 KB (12 MB) are stored: the store drops its
    # oldest runs to stay under 2 MB, and the webhook intake keeps working.
    used = int(env.redis.info("memory")["used_memory"])
    env.redis.config_set("maxmemory", used + 4 * 1024 * 1024)
    try:
        for i in range(3, 63):
            store.record_run(env.redis, run(i))
        assert store.stored_bytes(env.redis) <= 2 * 1024 * 1024
        assert store.get_run(env.redis, "verify-62").results is not None  # the newest
        assert store.get_run(env.redis, "verify-3") is None
        assert store.count_runs(env.redis) <= 10
        sizes = env.redis.hgetall("mlxv:store:sizes")
        assert sum(int(v) for v in sizes.values()) == store.stored_bytes(env.redis)
        assert set(sizes) == set(env.redis.zrange("mlxv:store:idx:time", 0, -1))
        sha, files = env.git_host.make_pr(37, {LLAMA: HARMLESS})
        env.open_pr(37, sha, files)
        answer = env.send("pull_request", env.payload("pull_request.opened.payload.json",
                                                      number=37, sha=sha))
        assert answer.status_code == 202
    finally:
        env.redis.config_set("maxmemory", 0)
    # PRs none of whose runs is left leave the PR list.
    rows, _ = store.pr_list(env.redis)
    assert {r["number"] for r in rows} <= {100 + i % 5 for i in range(53, 63)}
