"""The comment and Check Run output from results: escaping, size limit, chart, command
parsing. Pure functions: no services needed."""

from __future__ import annotations

import pytest

from mlx_verify.app.commands import CommandError, find_command_line, parse
from mlx_verify.app.comment import COMMENT_LIMIT, render
from mlx_verify.checks.schema import (
    CheckResult,
    Environment,
    LayerRow,
    Localization,
    ModelReport,
    Results,
    SourceLocation,
)

ENV = Environment(python="3.11", platform="Linux", machine="x86_64", mlx="0.32",
                  mlx_device="cpu", torch="2.13", transformers="5.23",
                  mlx_lm_version="0.32.2", mlx_lm_path="/x", mlx_verify="0.1.0")


def rows(n: int, bad_from: int) -> list[LayerRow]:
    return [LayerRow(name=f"layers.{i}", index=i, rel_l2=1e-7 if i < bad_from else 0.5,
                     cosine=1.0, max_abs=1e-6, max_abs_rel=1e-6, nmse=1e-12,
                     tolerance=1e-5, ok=i < bad_from) for i in range(n)]


def results(model_types: list[str], summary: str = "ok", layers: int = 4) -> dict:
    reports = []
    for t in model_types:
        check = CheckResult(check="layers", variant="default", verdict="fail", summary=summary,
                            layers=rows(layers, 1), first_divergent_layer="layers.1",
                            localization=Localization(stage="layers.1", module="m.attn",
                                                      part="attention", inputs_agree=True,
                                                      facts=["<b>@evil</b> fact"]))
        reports.append(ModelReport(model_type=t, source="default", seed=0, dtype="float32",
                                   verdict="fail", checks=[check]))
    return Results(command="mlx-verify check x", environment=ENV,
                   reports=reports).model_dump(mode="json")


def rendered(outcome: dict):
    return render(outcome, repo="o/r", number=7, sha="a" * 40, request={}, history=[],
                  dashboard_url="https://dash.example/runs/j", changed_files=[])


def test_untrusted_text_is_escaped():
    hostile = "@maintainers <img src=x> | ``` </details> [link](http://x)"
    out = rendered({"status": "done", "results": results(["llama"], summary=hostile),
                    "errors": {"qwen2": "boom @someone <script>"}, "model_types": ["llama"]})
    body = out.comment
    assert "@maintainers" not in body and "@someone" not in body
    assert "<img" not in body and "<script>" not in body and "<b>" not in body
    assert "\\| \\`\\`\\`" in body  # no table or code-fence breakout
    odd = rendered({"status": "done", "results": results(["a|b`c"]), "model_types": []})
    assert "`a¦b'c`" in odd.comment
    assert out.conclusion == "failure" and out.verdict == "error"  # qwen2 could not run
    assert "xychart-beta" in body and '"layers.1"' in body


def test_huge_results_stay_under_the_limit_and_keep_every_verdict_row():
    many = [f"model_{i}" for i in range(120)]
    out = rendered({"status": "done", "results": results(many, summary="x" * 300, layers=60),
                    "model_types": many})
    assert len(out.comment) < COMMENT_LIMIT
    assert all(f"`model_{i}`" in out.comment for i in range(120))
    assert "left out to stay under" in out.comment
    assert "… and 100 more" in out.comment
    assert len(out.summary) <= 65535 and len(out.text) <= 65535


def test_nothing_planned_is_neutral_without_comment():
    out = rendered({"status": "nothing"})
    assert out.conclusion == "neutral" and out.comment is None


def test_timeout_is_reported_as_timed_out():
    out = rendered({"status": "timeout", "timeout_s": 600, "stderr_tail": "@x hang",
                    "model_types": ["llama"]})
    assert out.conclusion == "timed_out" and "timed out after 600 s" in out.comment
    assert "@x" not in out.comment


def test_command_parsing():
    assert find_command_line("hello\n  /verify llama qwen2 --dtype bfloat16\n") == \
        "/verify llama qwen2 --dtype bfloat16"
    assert find_command_line("> /verify llama") is None
    assert find_command_line("please /verify") is None
    command = parse("/verify llama --checks layers,rope --hub org/model-1")
    assert command.request.model_types == ("llama",)
    assert command.request.checks == ("layers", "rope")
    assert command.request.hub == ("org/model-1",)
    assert parse("/verify help").help
    assert parse("/verify").request.model_types == ()
    for bad in ("/verify --dtype int4", "/verify Llama!", "/verify --hub x", "/verify --rm",
                "/verify --checks"):
        with pytest.raises(CommandError):
            parse(bad)


def _check(variant: str, verdict: str) -> CheckResult:
    return CheckResult(check="layers", variant=variant, verdict=verdict, summary=variant)


def _results(checks: dict[str, list[CheckResult]]) -> dict:
    reports = [ModelReport(model_type=t, source="default", seed=0, dtype="float32",
                           verdict="fail" if any(c.verdict == "fail" for c in cs) else "pass",
                           checks=cs) for t, cs in checks.items()]
    return Results(command="mlx-verify check x", environment=ENV,
                   reports=reports).model_dump(mode="json")


def test_baseline_marks_each_failing_row_and_only_new_findings_fail():
    head = _results({"llama": [_check("default", "fail"), _check("rope-params", "fail"),
                               _check("sliding", "pass")]})
    base_sha = "b" * 40
    # Only rope-params also fails on base: default is new, so the run fails.
    base = _results({"llama": [_check("default", "pass"), _check("rope-params", "fail")]})
    outcome = {"status": "done", "results": head, "model_types": ["llama"],
               "base_sha": base_sha, "base_status": "done", "base_results": base}
    out = rendered(outcome)
    assert out.conclusion == "failure"
    assert "| default | layers | ❌ fail | **new** | default |" in out.comment
    assert "| rope-params | layers | ❌ fail | also fails on base `bbbbbbb` |" in out.comment
    assert "| sliding | layers | ✅ pass | – |" in out.comment
    assert "**1 new finding(s)**; 1 finding(s) also fail on base `bbbbbbb`" in out.summary
    assert out.title.endswith("1 new, 1 also on base bbbbbbb")

    # Both fail on base: nothing new, neutral, the summary counts the pre-existing ones.
    base = _results({"llama": [_check("default", "fail"), _check("rope-params", "fail")]})
    out = rendered({**outcome, "base_results": base})
    assert out.conclusion == "neutral" and out.verdict == "fail"
    assert "**No new findings**: all 2 finding(s) also fail on base `bbbbbbb`" in out.summary
    assert "**new**" not in out.comment
    assert "### mlx-verify: ➖ no new findings at" in out.comment
    assert out.title.startswith("➖ no new findings")

    # No baseline for the model_type (the PR adds it): its failures are new.
    out = rendered({**outcome, "base_results": None,
                    "base_errors": {"llama": "mlx-lm has no model llama"}})
    assert out.conclusion == "failure" and "No baseline for `llama`" in out.comment
    assert "also fails on base" not in out.comment.replace("also fail on base", "")

    # Baseline off: the tables are as before, any failure fails.
    plain = rendered({"status": "done", "results": head, "model_types": ["llama"]})
    assert plain.conclusion == "failure" and "vs base" not in plain.comment
    assert "| default | layers | ❌ fail | default |" in plain.comment
    # A clean head gets no baseline column even when the baseline is on.
    clean = _results({"llama": [_check("default", "pass")]})
    out = rendered({**outcome, "results": clean, "base_status": "skipped", "base_results": None})
    assert out.conclusion == "success" and "vs base" not in out.comment


def located(model_types: list[str], lines: list[int]) -> dict:
    """Results whose layers findings carry source locations, one MLX call line each."""
    data = Results.model_validate(results(model_types))
    for report, line in zip(data.reports, lines, strict=True):
        loc = report.checks[0].localization
        loc.mlx_source = SourceLocation(path="mlx_lm/models/llama.py", line=74,
                                        function="Attention.__call__")
        loc.mlx_call = SourceLocation(path="mlx_lm/models/llama.py", line=line,
                                      function="Attention.__call__")
        loc.hf_source = SourceLocation(path="transformers/models/llama/modeling_llama.py",
                                       line=233, function="LlamaAttention.forward")
    return data.model_dump(mode="json")


def test_source_locations_link_to_the_head_blob_and_annotate_changed_files():
    outcome = {"status": "done", "results": located(["llama", "mistral"], [102, 102]),
               "model_types": ["llama", "mistral"]}
    sha = "ab" * 20
    out = render(outcome, repo="ml-explore/mlx-lm", number=7, sha=sha, request={}, history=[],
                 dashboard_url=None, changed_files=["mlx_lm/models/llama.py"])
    blob = f"https://github.com/ml-explore/mlx-lm/blob/{sha}/mlx_lm/models/llama.py"
    assert f"[`mlx_lm/models/llama.py:102`]({blob}#L102)" in out.comment
    assert f"({blob}#L74)" in out.comment
    # transformers is not the PR's repository: named, not linked
    assert "`transformers/models/llama/modeling_llama.py:233`" in out.comment
    assert "blob/" + sha + "/transformers" not in out.comment
    # one annotation per line, listing both findings there
    assert [(a["path"], a["start_line"]) for a in out.annotations] == \
        [("mlx_lm/models/llama.py", 102)]
    message = out.annotations[0]["message"]
    assert "llama layers / default" in message and "mistral layers / default" in message
    assert out.annotations[0]["annotation_level"] == "failure"
    untouched = render(outcome, repo="ml-explore/mlx-lm", number=7, sha=sha, request={},
                       history=[], dashboard_url=None, changed_files=["mlx_lm/models/qwen2.py"])
    assert untouched.annotations == []


def test_more_than_fifty_annotations_go_in_batches_of_fifty(github_fake):
    """120 located findings on 120 lines: 120 annotations, sent to (fake) GitHub's REST
    API 50 per request."""
    from githubkit import GitHub

    from mlx_verify.app import github

    types = [f"model_{i}" for i in range(120)]
    out = render({"status": "done", "results": located(types, list(range(1, 121))),
                  "model_types": types}, repo="o/r", number=7, sha="a" * 40, request={},
                 history=[], dashboard_url=None, changed_files=["mlx_lm/models/llama.py"])
    assert len(out.annotations) == 120
    token = "ghs_annotations_test"
    github_fake.tokens.add(token)
    with GitHub(token, base_url=github_fake.url) as gh:
        run_id = github.create_check_run(gh, "o", "r", name="mlx-verify", head_sha="a" * 40)
        github.update_check_run(gh, "o", "r", run_id, status="completed",
                                conclusion=out.conclusion,
                                output={"title": out.title, "summary": out.summary,
                                        "annotations": out.annotations})
    sent = [body["output"]["annotations"] for method, path, body in github_fake.writes
            if method == "PATCH" and path == f"/repos/o/r/check-runs/{run_id}"]
    assert [len(batch) for batch in sent] == [50, 50, 20]
    assert [a["start_line"] for batch in sent for a in batch] == list(range(1, 121))


def test_the_environment_line_names_the_lock_the_run_matched():
    locked = results(["llama"])
    locked["environment"]["lock"] = "constraints/lock.txt (sha256 6f5ed10a)"
    body = rendered({"status": "done", "results": locked, "model_types": ["llama"]}).comment
    assert "; lock constraints/lock.txt \\(sha256 6f5ed10a\\)" in body  # Markdown-escaped
    unlocked = rendered({"status": "done", "results": results(["llama"]),
                         "model_types": ["llama"]}).comment
    assert "; lock" not in unlocked


def test_a_config_finding_links_the_model_args_field():
    """The config check's finding names where ModelArgs declares the key (or the class
    that lacks it), linked to the PR's blob like the other source locations."""
    from mlx_verify.checks.schema import CheckResult, ModelReport, Results

    fact = ("sliding_window: transformers' logits move 8.43e-02, MLX's do not (ModelArgs at "
            "mlx_lm/models/gemma2.py:13 has no field sliding_window: from_dict drops it)")
    check = CheckResult(check="config", variant="default", verdict="fail",
                        summary=f"1 key(s) not honoured by MLX; first: {fact}",
                        details={"problems": [fact], "keys": [
                            {"key": "sliding_window", "status": "ignored by MLX", "fact": fact,
                             "mlx_field": {"path": "mlx_lm/models/gemma2.py", "line": 13,
                                           "function": "ModelArgs"}},
                            {"key": "rms_norm_eps", "status": "honoured",
                             "mlx_field": None}]})
    report = ModelReport(model_type="gemma2", source="default", seed=0, dtype="float32",
                         verdict="fail", checks=[check])
    outcome = {"status": "done", "model_types": ["gemma2"],
               "results": Results(command="mlx-verify check gemma2", environment=ENV,
                                  reports=[report]).model_dump(mode="json")}
    sha = "cd" * 20
    body = render(outcome, repo="ml-explore/mlx-lm", number=7, sha=sha, request={}, history=[],
                  dashboard_url=None, changed_files=[]).comment
    blob = f"https://github.com/ml-explore/mlx-lm/blob/{sha}/mlx_lm/models/gemma2.py#L13"
    assert f"config key `sliding_window`: ModelArgs [`mlx_lm/models/gemma2.py:13`]({blob})" \
        in body
    assert "config key `rms_norm_eps`" not in body  # honoured: not a finding
