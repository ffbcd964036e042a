"""Webhook intake: signatures, redelivery, authorisation of /verify. No checks run here."""

from __future__ import annotations

import httpx
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


def test_no_model_code_changed_gives_neutral_check_and_no_comment(env):
    sha, files = env.git_host.make_pr(14, {"README.md": ("upstream", "the upstream")})
    env.open_pr(14, sha, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=14,
                                         sha=sha))
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "neutral")
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

    from app.server import serve
    from workers.worker import worker

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
    from workers.verify import scrubbed_env

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
