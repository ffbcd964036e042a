"""End to end: webhook -> report job -> verify job on a runner (real git fetch of
pull/N/head, real `mlx-verify check` subprocess) -> Check Run and sticky comment."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import mlx_lm
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from mlx_verify.app import store
from mlx_verify.checks.render import escape, num
from mlx_verify.workers import planning
from tests.app.conftest import (
    REPO,
    descendants,
    git,
    released_llama,
    start_worker_process,
    wait_until,
)

LLAMA = "mlx_lm/models/llama.py"
HARMLESS = ("import mlx.core as mx", "import mlx.core as mx  # a harmless edit")
SWAPPED = ("swiglu(self.gate_proj(x), self.up_proj(x))",
           "swiglu(self.up_proj(x), self.gate_proj(x))")


def open_and_run(env, number: int, edits: dict, parent: str | None = None,
                 fixture: str = "pull_request.opened.payload.json",
                 base: str | None = None) -> str:
    sha, files = env.git_host.make_pr(number, edits, parent, base)
    env.open_pr(number, sha, files, base=base)
    response = env.send("pull_request", env.payload(fixture, number=number, sha=sha,
                                                    base=base))
    assert response.status_code == 202
    env.drain()
    return sha


def outcome_of(env, run: dict) -> dict:
    return Job.fetch(run["external_id"], connection=env.redis,
                     serializer=JSONSerializer).return_value()


def test_clean_pr_passes_bugged_pr_fails_and_a_push_updates_the_same_comment(env,
                                                                             monkeypatch):
    clean = open_and_run(env, 1, {LLAMA: HARMLESS})
    bugged = open_and_run(env, 2, {LLAMA: SWAPPED})  # main passes: every finding is new

    (clean_run,) = env.check_runs(clean)
    assert clean_run["_history"][:3] == ["queued", "in_progress", "completed"]
    assert clean_run["conclusion"] == "success"
    (bugged_run,) = env.check_runs(bugged)
    assert bugged_run["_history"][:3] == ["queued", "in_progress", "completed"]
    assert bugged_run["conclusion"] == "failure"
    assert "llama" in bugged_run["output"]["summary"]
    # the base commit runs in the same check process (--base), clean or not
    assert outcome_of(env, clean_run)["base_status"] == "in-run"
    assert outcome_of(env, bugged_run)["base_status"] == "in-run"
    base7 = env.git_host.base_sha[:7]
    summary = bugged_run["output"]["summary"]
    assert f"**Against the base commit** `{base7}`" in summary
    assert "| **new** | your config | `llama` | default | layers |" in summary
    assert "against base: " in bugged_run["output"]["title"]

    (clean_comment,) = env.comments(1)
    assert "mlx-verify: ✅ pass" in clean_comment["body"]
    # the runner measured the final logits itself, outside the sandbox, of every variant
    # the sandboxed results claim passes: confirmed
    results = store.get_run(env.redis, clean_run["external_id"]).results
    claimed = [c.variant for c in results.reports[0].checks
               if c.check == "layers" and c.verdict == "pass"]
    checks = outcome_of(env, clean_run)["cross_checks"]
    assert [c["variant"] for c in checks] == claimed and len(claimed) > 5, checks
    assert {(c["verdict"], c["claimed"], c["bound"]) for c in checks} == {("pass", "pass", 1e-5)}
    worst = max(checks, key=lambda c: c["rel_l2"])
    assert worst["rel_l2"] <= 1e-5
    names = ", ".join(escape(v, 32) for v in claimed)
    assert (f"final logits confirmed outside the sandbox: `llama` on {len(checks)} variants "
            f"({names}): largest rel L2 {num(worst['rel_l2'])} ({escape(worst['variant'], 32)})"
            f" ≤ 1.00e-05 (float32, 48 random tokens each, top-1 at least 1)"
            ) in clean_comment["body"]
    # one sandboxed capture measured them all: one wall time, recorded (its cost is
    # bench/bench_crosscheck.py's, docs/benchmarks.md)
    assert len({c["duration_s"] for c in checks}) == 1 and checks[0]["duration_s"] > 0
    (bugged_comment,) = env.comments(2)
    body = bugged_comment["body"]
    assert "mlx-verify: ❌ fail" in body and bugged[:12] in body
    assert "First divergence" in body and "xychart-beta" in body
    assert "<!-- mlx-verify:sticky -->" in body and len(body) < 65536
    assert "pull/2/head" in body  # the reproduction command
    assert "| vs base |" in body and "| ❌ fail | **new** |" in body
    assert "also fails on base" not in body
    # The Check Run annotates the swapped line itself, a line of the PR's diff.
    annotations = bugged_run["output"]["annotations"]
    assert annotations and {a["path"] for a in annotations} == {LLAMA}
    head_llama = git(env.git_host.work, "show", f"{bugged}:{LLAMA}").splitlines()
    assert all(SWAPPED[1] in head_llama[a["start_line"] - 1] for a in annotations), annotations

    # A push that breaks PR 1: the same comment is updated, with the clean SHA in history.
    # With the baseline off (VERIFY_BASELINE=0) the tables are as they were without it.
    monkeypatch.setenv("VERIFY_BASELINE", "0")
    pushed = open_and_run(env, 1, {LLAMA: SWAPPED}, parent=clean,
                          fixture="pull_request.synchronize.payload.json")
    (updated,) = env.comments(1)
    assert updated["id"] == clean_comment["id"]
    assert pushed[:12] in updated["body"] and "❌ fail" in updated["body"]
    assert "earlier commits" in updated["body"] and clean[:12] in updated["body"]
    patches = [w for w in env.github.writes
               if w[0] == "PATCH" and w[1].endswith(f"/issues/comments/{clean_comment['id']}")]
    assert len(patches) == 1
    assert [r["conclusion"] for r in env.check_runs(pushed)] == ["failure"]
    assert "vs base" not in updated["body"]
    assert outcome_of(env, env.check_runs(pushed)[0])["base_status"] is None


def test_findings_of_the_base_commit_are_not_new_and_a_new_model_file_has_none(env):
    # A base with released llama.py, whose rope_parameters variant fails (a known
    # finding): a harmless PR on it fails only there, as its base does.
    host = env.git_host
    released = host.commit({LLAMA: released_llama()}, host.base_sha, "refs/heads/released")
    sha = open_and_run(env, 10, {LLAMA: HARMLESS}, base=released)
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "neutral", run["output"]
    summary = run["output"]["summary"]
    assert f"**Against the base commit** `{released[:7]}`" in summary
    assert "rope\\_parameters" in summary and "**new**" not in summary
    assert run["output"]["title"].startswith("➖ no new findings")
    (comment,) = env.comments(10)
    assert "| latent | `llama` | config-format-rope\\_parameters | layers | ❌ fail | " \
        "unchanged |" in comment["body"]
    assert outcome_of(env, run)["base_sha"] == released

    # A base without llama.py, and a PR that adds it: no baseline, so its finding is new.
    gone = host.commit({LLAMA: None}, host.base_sha, "refs/heads/no-llama")
    sha = open_and_run(env, 11, {LLAMA: released_llama()}, base=gone)
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "failure", run["output"]
    assert "not on base" in run["output"]["summary"]
    (comment,) = env.comments(11)
    assert "| ❌ fail | **new** |" in comment["body"]
    assert "also fails on base `" not in comment["body"]
    assert outcome_of(env, run)["base_status"] == "in-run"


def test_annotations_go_only_on_lines_inside_the_diff(env):
    """A base that already carries the swapped MLP, and a PR that edits only the top of
    llama.py: the finding's line is in a changed file but not in the diff, so the Check
    Run carries no annotation there (the comment still links it)."""
    host = env.git_host
    bugged_base = host.commit({LLAMA: SWAPPED}, host.base_sha, "refs/heads/bugged")
    sha = open_and_run(env, 13, {LLAMA: HARMLESS}, base=bugged_base)
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "neutral", run["output"]  # the finding is the base's
    results = store.get_run(env.redis, run["external_id"]).results
    head_llama = git(host.work, "show", f"{sha}:{LLAMA}").splitlines()
    located = [c.localization.mlx_call for r in results.reports for c in r.checks
               if c.localization is not None and c.localization.mlx_call is not None]
    assert located and all(SWAPPED[1] in head_llama[w.line - 1] for w in located)
    patches = [body for method, path, body in env.github.writes
               if method == "PATCH" and path.endswith(f"/check-runs/{run['id']}")]
    assert patches and all("annotations" not in (body.get("output") or {})
                           for body in patches)
    (comment,) = env.comments(13)
    assert f"blob/{sha}/{LLAMA}#L{located[0].line}" in comment["body"]


def test_patch_ranges_read_githubs_hunk_headers(env):
    """The new-side ranges of each hunk, from the `patch` (fake) GitHub serves for a real
    two-hunk change, a removed file and an added one."""
    from githubkit import GitHub

    from mlx_verify.app import github

    host = env.git_host
    lines = git(host.work, "show", f"{host.base_sha}:{LLAMA}").splitlines()
    sha, files = host.make_pr(14, {LLAMA: "\n".join(
        ["# top"] + lines[:100] + ["# middle"] + lines[100:]) + "\n",
        "mlx_lm/models/mamba.py": None, "mlx_lm/models/new_model.py": "a = 1\nb = 2\n"})
    env.open_pr(14, sha, files)
    token = "ghs_patch_ranges_test"
    env.github.tokens.add(token)
    with GitHub(token, base_url=env.github.url) as gh:
        names, ranges = github.changed_files_and_lines(gh, *REPO.split("/"), 14)
    assert sorted(names) == sorted(files)
    assert ranges[LLAMA] == [(1, 4), (99, 105)]  # 3 lines of context either side
    assert ranges["mlx_lm/models/mamba.py"] == []  # removed: no line on the new side
    assert ranges["mlx_lm/models/new_model.py"] == [(1, 2)]
    assert github.patch_ranges("@@ -5 +5 @@\n-a\n+b\n@@ -9,0 +10,3 @@ def f():\n") == \
        [(5, 5), (10, 12)]


def test_shared_module_change_plans_the_dependent_models(env):
    tree = Path(mlx_lm.__file__).parent
    planned = planning.plan(tree, ["mlx_lm/models/rope_utils.py"])
    assert {"llama", "qwen2", "gemma3_text", "deepseek_v3"} <= set(planned)
    assert "mamba" not in planned and "rope_utils" not in planned
    assert "mistral" in planning.plan(tree, [LLAMA])  # remapped onto llama.py

    sha = open_and_run(env, 4, {"mlx_lm/models/rope_utils.py": (
        "import math", "import math  # a harmless edit")})
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "success"
    job_id = run["external_id"]
    outcome = Job.fetch(job_id, connection=env.redis,
                        serializer=JSONSerializer).return_value()
    assert outcome["model_types"] == ["llama"]  # VERIFY_MODEL_TYPES keeps the suite cheap
    assert set(planned) == set(outcome["planned"])


def test_a_loading_change_runs_one_model_type_per_family_and_says_why(env):
    """A PR that changes mlx_lm/utils.py (loading, sanitize plumbing) touches no model
    file: it plans the representative set, and the comment says which file put it there."""
    sha = open_and_run(env, 12, {"mlx_lm/utils.py": (
        "import copy", "import copy  # a harmless edit")})
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "success", run["output"]
    outcome = outcome_of(env, run)
    families = list(planning.REPRESENTATIVE.values())
    assert outcome["planned"] == families  # family order, the runner's cut keeps the first
    assert len(set(families)) == 7
    assert outcome["model_types"] == ["llama"]  # VERIFY_MODEL_TYPES keeps the suite cheap
    job = Job.fetch(run["external_id"], connection=env.redis, serializer=JSONSerializer)
    assert job.args[0]["changed_files"] == ["mlx_lm/utils.py"]
    (comment,) = env.comments(12)
    line = ("`mlx_lm/utils.py` changed: representative set: `llama` (dense), `qwen3_moe` "
            "(MoE), `deepseek_v3` (MLA), `gemma3_text` (sliding-window), `mamba` (SSM), "
            "`falcon_h1` (hybrid), `gemma3` (multimodal text).")
    assert line in comment["body"]
    assert line in run["output"]["summary"]
    assert "Planned 7 model_types from the changed files; ran `llama`" in comment["body"]


def test_plans_name_why_each_model_type_is_there():
    tree = Path(mlx_lm.__file__).parent
    for shared in ("mlx_lm/convert.py", "mlx_lm/generate.py", "mlx_lm/quant/awq.py",
                   "mlx_lm/models/cache.py", "mlx_lm/models/base.py"):
        plan = planning.make_plan(tree, [shared, "README.md", "tests/test_models.py"])
        assert plan.model_types == list(planning.REPRESENTATIVE.values()), shared
        assert plan.plumbing == [shared]
        assert plan.reasons["mamba"] == f"representative set (SSM): {shared} changed"
    # A model file and a shared file: both reasons, the representative set first.
    plan = planning.make_plan(tree, ["mlx_lm/quant/gptq.py", LLAMA])
    assert plan.model_types[:7] == list(planning.REPRESENTATIVE.values())
    assert plan.reasons["llama"] == (f"{LLAMA} changed; representative set (dense): "
                                     "mlx_lm/quant/gptq.py changed")
    assert plan.reasons["mistral"] == f"MODEL_REMAPPING maps it onto {LLAMA} ({LLAMA} changed)"
    assert "mistral" in plan.model_types and plan.model_types[7:] == sorted(plan.model_types[7:])
    # rope_utils is shared too, but only by the files that import it: the import walk.
    plan = planning.make_plan(tree, ["mlx_lm/models/rope_utils.py"])
    assert plan.plumbing == [] and plan.model_types == sorted(plan.model_types)
    assert plan.reasons["llama"] == "imports mlx_lm/models/rope_utils.py (changed)"
    # A quantize function outside the listed files counts; a dequantize one does not.
    assert planning.plumbing_files(tree, ["mlx_lm/tuner/dora.py", "mlx_lm/server.py"]) == []
    assert planning.make_plan(tree, ["mlx_lm/server.py", "docs/x.md"]).model_types == []


def test_a_quantize_function_elsewhere_in_the_package_plans_the_representative_set(tmp_path):
    package = tmp_path / "mlx_lm"
    shutil.copytree(Path(mlx_lm.__file__).parent / "models", package / "models")
    (package / "utils.py").write_text("MODEL_REMAPPING = {}\n")
    (package / "kernels").mkdir()
    (package / "kernels" / "qmm.py").write_text("def fused_quantize_matmul(x):\n    return x\n")
    (package / "kernels" / "dq.py").write_text("def dequantize_rows(x):\n    return x\n")
    assert planning.plumbing_files(package, ["mlx_lm/kernels/qmm.py",
                                             "mlx_lm/kernels/dq.py"]) == \
        ["mlx_lm/kernels/qmm.py"]


def opened_by_outsider(env, number: int, edits: dict) -> str:
    """A PR of an author without write access: its opened event gives a neutral Check
    Run (not run automatically), and the server has seen its head arrive. Returns the
    head SHA, one second later (comment times have whole seconds)."""
    sha, files = env.git_host.make_pr(number, edits)
    env.open_pr(number, sha, files, author="outsider-1")
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=number,
                                         sha=sha, sender="outsider-1"))
    env.run_queue("report")
    time.sleep(1.1)
    return sha


def test_verify_command_is_acknowledged_and_pinned_to_the_head(env):
    sha = opened_by_outsider(env, 5, {LLAMA: SWAPPED})
    payload = env.payload("issue_comment.created.payload.json")  # no installation field
    payload["issue"]["number"] = 5
    payload["comment"]["body"] = "Looks odd.\n/verify llama --checks layers\n"
    assert env.send("issue_comment", payload).status_code == 202
    env.run_queue("report")
    assert [r["content"] for r in env.github.reactions] == ["eyes"]
    waiting, run = env.check_runs(sha)
    assert waiting["output"]["title"] == "waiting for a maintainer"
    assert run["status"] == "queued"
    # The PR moves on before a runner takes the job: the job stays pinned to `sha`.
    env.github.pulls[(REPO, 5)].head_sha = "f" * 40
    job = Job.fetch(run["external_id"], connection=env.redis, serializer=JSONSerializer)
    spec = job.args[0]
    assert spec["sha"] == sha
    assert spec["request"]["model_types"] == ["llama"]
    assert spec["request"]["checks"] == ["layers"]
    assert job.origin == "verify"


def test_killed_runner_leaves_no_check_run_in_progress(env, app_env):
    sha, files = env.git_host.make_pr(6, {LLAMA: HARMLESS})
    env.open_pr(6, sha, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=6,
                                         sha=sha))
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    job = Job.fetch(run["external_id"], connection=env.redis, serializer=JSONSerializer)
    runner = start_worker_process("verify", app_env)
    try:
        wait_until(lambda: job.get_status() == "started", 60, what="job start")
        time.sleep(3)  # well inside `mlx-verify check`
    finally:
        # The whole runner: the worker, its work horse (rq puts it in a session of its
        # own) and the `mlx-verify check` process, as when a machine goes away.
        for pid in [runner.pid, *descendants(runner.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runner.wait()
    env.run_queue("report")
    assert env.github.check_runs[run["id"]]["status"] == "in_progress"

    # The server's sweeper finds the job once the dead runner's heartbeat expires; its
    # failure callback notes why, the job is retried, and the server's collector
    # reports it requeued.
    def not_in_progress():
        env.run_queue("report")
        return env.github.check_runs[run["id"]]["status"] != "in_progress"

    wait_until(not_in_progress, 150, step=2, what="the abandoned job to be reported")
    assert env.github.check_runs[run["id"]]["status"] == "queued", [
        (r["_history"], r["conclusion"], r["output"]) for r in env.github.check_runs.values()]
    assert "did not finish" in env.github.check_runs[run["id"]]["output"]["summary"]
    verify = Queue("verify", connection=env.redis, serializer=JSONSerializer)
    assert verify.scheduled_job_registry.get_job_ids() == [job.id]  # retried in 10 s
    time.sleep(11)
    env.run_queue("verify")  # a burst worker moves due retries to the queue first
    env.drain()
    final = env.github.check_runs[run["id"]]
    assert (final["status"], final["conclusion"]) == ("completed", "success")
    assert REPO


def test_killed_report_worker_loses_no_event(env, app_env):
    """A report worker that dies inside a job (SIGKILL while GitHub answers slowly, as
    when Redis goes away under it and rq quits): the server's sweeper finds the event job
    once the heartbeat expires and retries it; the PR gets its one Check Run."""
    sha, files = env.git_host.make_pr(16, {LLAMA: HARMLESS})
    env.open_pr(16, sha, files)
    delivery = "killed-report-worker"
    assert env.send("pull_request", env.payload("pull_request.opened.payload.json",
                                                number=16, sha=sha),
                    delivery=delivery).status_code == 202
    env.github.delay_next("GET", "/pulls/16", 600)
    job = Job.fetch(f"event-{delivery}", connection=env.redis, serializer=JSONSerializer)
    worker = start_worker_process("report", app_env, module="mlx_verify.app.worker")
    try:
        wait_until(lambda: job.get_status() == "started", 60, what="the event job to start")
        time.sleep(1)
    finally:
        for pid in [worker.pid, *descendants(worker.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait()
    assert env.check_runs(sha) == []
    assert job.get_status() == "started"  # what a dead worker leaves behind
    wait_until(lambda: job.get_status() != "started", 150, step=2,
               what="the sweeper to find the abandoned event job")
    assert job.get_status() == "scheduled"  # retried, 5 s later
    # The dead worker's scheduler held rq's scheduler lock of the queue: the server's
    # scheduler moves the due retry to the queue, with no worker running.
    wait_until(lambda: job.get_status() == "queued", 30, step=0.5,
               what="the server to enqueue the due retry")
    env.run_queue("report")
    (run,) = env.check_runs(sha)
    assert run["status"] == "queued"
    assert Queue("verify", connection=env.redis, serializer=JSONSerializer).job_ids == \
        [run["external_id"]]


def test_verify_of_an_unknown_model_type_is_reported_as_skipped(env):
    sha = opened_by_outsider(env, 7, {LLAMA: HARMLESS})
    payload = env.payload("issue_comment.created.with-installation.payload.json")
    payload["issue"]["number"] = 7
    payload["comment"]["body"] = "/verify not_a_model_type"
    env.send("issue_comment", payload)
    env.drain()
    _, run = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "neutral")
    (comment,) = env.comments(7)
    assert "not a transformers model_type" in comment["body"]


def test_pr_code_sees_no_secrets_and_a_hang_times_out(env, monkeypatch):
    # PR 8's llama.py prints the environment it is imported in to stderr (the sandbox
    # has no other way out: no host path is writable), then hangs.
    hostile = ("import json as _j, os as _o, sys as _s, time as _t\n"
               "_s.stderr.write('SEEN-ENV ' + _j.dumps(dict(_o.environ)) + '\\n')\n"
               "_s.stderr.flush()\n"
               "_t.sleep(3600)\nimport mlx.core as mx")
    sha, files = env.git_host.make_pr(8, {LLAMA: ("import mlx.core as mx", hostile)})
    env.open_pr(8, sha, files)
    monkeypatch.setenv("VERIFY_TIMEOUT", "20")  # read by the runner at job time
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=8,
                                         sha=sha))
    started = time.monotonic()
    env.drain()
    assert time.monotonic() - started < 120
    (run,) = env.check_runs(sha)
    assert (run["status"], run["conclusion"]) == ("completed", "timed_out")
    (comment,) = env.comments(8)
    assert "timed out after 20 s" in comment["body"]

    logs = store.get_run(env.redis, run["external_id"]).logs  # the runner's stderr tail
    (line,) = [line for line in logs.splitlines() if line.startswith("SEEN-ENV ")]
    seen = json.loads(line.removeprefix("SEEN-ENV "))
    leaked = [k for k in seen if k.startswith(("GITHUB", "REDIS", "VERIFY", "DASHBOARD"))]
    assert leaked == []
    assert not any(os.environ["GITHUB_PRIVATE_KEY"][30:90] in v for v in seen.values())
    assert seen["HOME"] != os.environ.get("HOME")


# A PR whose llama.py, once imported, writes an all-pass results JSON to the descriptor
# the runner passed as --json, and exits 0 before any check runs: the whole of a forged
# pass, since the process that imports the PR's code writes the results.
FORGED_PASS = '''import json as _j, os as _o, sys as _s
from mlx_verify.checks import schema as _schema
_out = _s.argv[_s.argv.index("--json") + 1]
_env = {k: "forged" for k in _schema.Environment.model_fields if k not in ("blas", "lock")}
_r = _schema.Results(command="forged", environment=_env, reports=[_schema.ModelReport(
    model_type="llama", source="forged", seed=0, dtype="float32", verdict="pass",
    checks=[_schema.CheckResult(check="layers", variant="default", verdict="pass",
                                summary="forged")])])
_fd = _o.open(_out, _o.O_WRONLY)
_o.write(_fd, _r.model_dump_json().encode())
_o._exit(0)
import mlx.core as mx'''


def test_a_pass_from_an_untrusted_authors_code_is_never_a_green_gate(env):
    """An outsider's PR that forges an all-pass report before any check runs. A
    maintainer's /verify runs it: the forged pass reaches the report, but the runner's own
    measurement of the final logits (workers/crosscheck.py) does not confirm it: the
    forger's llama.py breaks the sandboxed capture too, so the logits are not measured,
    and the Check Run fails instead of passing."""
    sha = opened_by_outsider(env, 9, {LLAMA: ("import mlx.core as mx", FORGED_PASS)})
    payload = env.payload("issue_comment.created.payload.json")
    payload["issue"]["number"] = 9
    payload["comment"]["body"] = "/verify llama --checks layers\n"
    assert env.send("issue_comment", payload).status_code == 202
    env.drain()
    waiting, run = env.check_runs(sha)
    assert waiting["output"]["title"] == "waiting for a maintainer"
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert run["output"]["title"].startswith("⚠️ error: claimed passes outside the sandbox: "
                                             "1 not confirmed; ")
    (comment,) = env.comments(9)
    assert ("final logits not measured outside the sandbox: `llama` `default`: the sandboxed "
            "capture gave no logits: exit status 1: ValueError") in comment["body"]
    assert "the sandboxed results claimed pass: not confirmed" in comment["body"]
    checks = {c["variant"]: c for c in outcome_of(env, run)["cross_checks"]}
    checked = checks.pop("default")
    assert (checked["verdict"], checked["claimed"]) == ("error", "pass")
    # the variants the forged report leaves out are measured too: no logits either, which
    # hides nothing (not counted as contradicted)
    assert checks and {(c["claimed"], c["verdict"]) for c in checks.values()} == {
        ("omitted", "error")}, checks


# A smarter forger: the forged results only in the check run (the process given --json);
# anywhere else llama.py is the released file with gate and up projections swapped.
FORGED_IF_CHECKED = ("import os as _o, sys as _s\nif '--json' in _s.argv:\n"
                     + "\n".join("    " + line for line in FORGED_PASS.splitlines()[1:-1])
                     + "\nimport mlx.core as mx")
# Forged results, and in the capture a wrong-shaped array written to the first case's
# descriptor (--case CHECKPOINT IDS OUT)
WRONG_SHAPE = (FORGED_IF_CHECKED.removesuffix("import mlx.core as mx")
               + "if '--case' in _s.argv:\n    import numpy as _np\n"
               "    with open(_s.argv[_s.argv.index('--case') + 3], 'wb') as _f:\n"
               "        _np.save(_f, _np.zeros((1, 3), dtype=_np.float32))\n"
               "    _o._exit(0)\nimport mlx.core as mx")


def test_a_forged_pass_from_a_maintainer_is_contradicted_by_the_runners_measurement(env):
    """A maintainer's PR whose llama.py forges an all-pass report in the check run and
    computes a wrong function everywhere else (gate and up swapped): the final logits the
    runner measures outside the sandbox contradict the claim, with the numbers, and the
    Check Run fails. A capture that writes a wrong-shaped array is refused: not a pass."""
    main_llama = git(env.git_host.work, "show", f"{env.git_host.base_sha}:{LLAMA}")
    forger = main_llama.replace("import mlx.core as mx", FORGED_IF_CHECKED, 1)
    sha, files = env.git_host.make_pr(10, {LLAMA: forger.replace(*SWAPPED)})
    env.open_pr(10, sha, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=10,
                                         sha=sha))
    env.drain()
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "failure"
    checks = {c["variant"]: c for c in outcome_of(env, run)["cross_checks"]}
    checked = checks.pop("default")
    assert (checked["verdict"], checked["claimed"], checked["bound"]) == ("fail", "pass", 1e-5)
    # every variant the forged report leaves out is measured too, and the swap fails each
    assert checks and {(c["claimed"], c["verdict"]) for c in checks.values()} == {
        ("omitted", "fail")}, checks
    assert run["output"]["title"].startswith("❌ fail: claimed passes outside the sandbox: "
                                             f"{1 + len(checks)} contradicted; ")
    assert checked["rel_l2"] > 0.01  # the swap moves the logits far beyond the bound
    fact = (f"final logits measured outside the sandbox: `llama` `default` rel L2 "
            f"{num(checked['rel_l2'])} > bound 1.00e-05; the sandboxed results claimed pass")
    assert fact in run["output"]["summary"]
    (comment,) = env.comments(10)
    assert fact in comment["body"] and "blamed on the PR" in comment["body"]
    assert "Not a gate" not in comment["body"]
    left_out = checks["head-dim"]
    assert (f"final logits measured outside the sandbox: `llama` `head-dim` rel L2 "
            f"{num(left_out['rel_l2'])} > bound 1.00e-05; the sandboxed results left this "
            "variant out") in comment["body"]
    # The dashboard shows the same measurement, and the run's verdict is the PR's failure
    # although its sandboxed results say pass.
    page = httpx.get(f"{env.server}/dashboard/runs/{run['external_id']}", timeout=10).text
    table = page.split('<table id="cross-checks">', 1)[1].split("</table>", 1)[0]
    contradicted = [[re.sub(r"<[^>]+>", "", cell).strip()
                     for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
                    for row in re.findall(r'<tr class="contradicted">(.*?)</tr>', table, re.S)]
    assert len(contradicted) == 1 + len(checks)
    (cells,) = [cells for cells in contradicted if cells[1] == "default"]
    assert cells == ["llama", "default", "fail", "pass (contradicted: blamed on the PR)",
                     num(checked["rel_l2"]), num(1e-5), num(checked["top1_agreement"]),
                     "float32", "48", "–"], cells
    assert '<td id="verdict"><span class="v-fail">fail</span></td>' in page
    assert store.get_run(env.redis, run["external_id"]).results.verdict == "pass"

    sha, files = env.git_host.make_pr(11, {LLAMA: ("import mlx.core as mx", WRONG_SHAPE)})
    env.open_pr(11, sha, files)
    env.send("pull_request", env.payload("pull_request.opened.payload.json", number=11,
                                         sha=sha))
    env.drain()
    (run,) = env.check_runs(sha)
    assert run["conclusion"] == "failure"
    checks = {c["variant"]: c for c in outcome_of(env, run)["cross_checks"]}
    checked = checks.pop("default")  # the first case: its descriptor got the array
    assert checked["verdict"] == "error"
    assert checked["reason"] == "capture file refused: shape (1, 3), expected (1, 48, 512)"
    assert {c["verdict"] for c in checks.values()} == {"error"}, checks
    assert escape(checked["reason"]) in env.comments(11)[0]["body"]
