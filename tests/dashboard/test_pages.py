"""The dashboard in a real browser (headless Debian Chromium via Playwright) against the
live app with real runs in Redis. Each page's screenshot goes to artifacts/screenshots/."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from mlx_verify.app import report, store

from .conftest import (
    HOSTILE_TITLE,
    MAINTAINER,
    OUTSIDER,
    REPO,
    REQUEST,
    SHA_BAD,
    SHA_GOOD,
    screenshot,
    sign_in,
)


def layers_check(results):
    return next(c for c in results.reports[0].checks if c.check == "layers")


def test_pages_load(page, live):
    pages = {
        "pr-list": (f"{live.url}/", "Pull requests"),
        "pr-list-filtered": (f"{live.url}/?verdict=fail&repository={quote(REPO)}",
                             "Pull requests"),
        "pr-page": (f"{live.url}/prs/{REPO}/7", f"{REPO}#7"),
        "run-failing": (f"{live.url}/runs/{live.ids['bad']}", "Run"),
        "run-passing": (f"{live.url}/runs/{live.ids['good']}", "Run"),
        "runs": (f"{live.url}/runs", "Runs"),
        "runs-llama": (f"{live.url}/runs?model_type=llama", "Runs of llama"),
        "queue": (f"{live.url}/queue", "Queue"),
        "matrix": (f"{live.url}/matrix", "Architecture matrix"),
    }
    for name, (url, heading) in pages.items():
        answer = page.goto(url)
        assert answer is not None and answer.status == 200, (name, answer and answer.status)
        headings = page.locator("h1")
        assert headings.count() == 1, name
        assert headings.inner_text().startswith(heading), (name, headings.inner_text())
        screenshot(page, name)
    assert page.goto(f"{live.url}/runs/no-such-run").status == 404


def test_run_page_renders_every_check(page, live):
    """dtype trace, RoPE facts, generation comparison, quantization table: real results."""
    results = live.results["others"]
    checks = results.reports[0].checks
    assert {c.check for c in checks} == {"dtype", "rope", "generation", "quantize"}
    assert page.goto(f"{live.url}/runs/{live.ids['others']}").status == 200
    assert page.locator("#verdicts tbody tr").count() == len(checks)
    sections = page.locator("section[aria-labelledby^='c-0-']")
    assert sections.count() == len(checks)
    charts = page.locator("svg.layer-chart")
    assert charts.count() == sum(1 for c in checks if c.layers)
    for index, check in enumerate(checks):
        section = sections.nth(index)
        assert section.locator("h3").inner_text().startswith(f"{check.check} / {check.variant}")
        if check.layers:
            assert section.locator("circle.point").count() == len(check.layers)
        for key, value in check.metrics.items():  # every metric is on the page
            row = section.locator("table.metrics tr", has=page.locator(f"th:text-is('{key}')"))
            assert row.count() == 1, (check.check, key)
            if isinstance(value, str):
                assert value in row.inner_text()
    rope = next(i for i, c in enumerate(checks) if c.metrics.get("check_part") == "rotation")
    assert "MLX applies base" in sections.nth(rope).inner_text()
    greedy = next(i for i, c in enumerate(checks) if c.details.get("part") == "greedy")
    tokens = checks[greedy].details["mlx_tokens"]
    paired = sections.nth(greedy).locator("table.paired tbody tr")
    assert paired.count() == len(tokens)
    assert paired.first.locator("td").nth(1).inner_text() == str(tokens[0])
    quant = next(i for i, c in enumerate(checks) if c.check == "quantize")
    assert "per_layer_quantization" in sections.nth(quant).inner_text()
    screenshot(page, "run-every-check")


def test_pr_page_shows_the_regression_between_pushes(page, live):
    page.goto(f"{live.url}/prs/{REPO}/7")
    rows = page.locator("#pushes tbody tr")
    assert rows.count() == 2
    newest, older = rows.nth(0), rows.nth(1)
    assert SHA_BAD[:12] in newest.inner_text() and SHA_GOOD[:12] in older.inner_text()
    assert "regressed: llama/layers" in newest.inner_text()
    assert "regressed" in (newest.get_attribute("class") or "")
    assert "fail" in newest.inner_text() and "pass" in older.inner_text()


def test_chart_has_one_point_per_stage(page, live):
    for name, results in (("bad", live.results["bugged"]), ("good", live.results["clean"])):
        check = layers_check(results)
        page.goto(f"{live.url}/runs/{live.ids[name]}")
        chart = page.locator("svg.layer-chart")
        assert chart.count() == 1
        assert chart.locator("circle.point").count() == len(check.layers) >= 3
        assert chart.get_attribute("role") == "img"
        assert "log scale" in chart.locator("title").first.text_content()
        assert chart.locator("polyline.tolerance").count() == 1
        stages = [t.text_content().split(":")[0]
                  for t in chart.locator("circle.point > title").all()]
        assert stages == [row.name for row in check.layers]
        first = chart.locator("circle.first")
        if check.first_divergent_layer is None:
            assert first.count() == 0 and chart.locator("line.first-divergent").count() == 0
        else:
            assert first.count() == 1
            assert first.locator("title").text_content().startswith(
                check.first_divergent_layer)
            assert chart.locator("line.first-divergent").count() == 1
            # the failing stages are drawn above the tolerance line (smaller y)
            bad = [float(c.get_attribute("cy")) for c in chart.locator("circle.bad").all()]
            tol_y = float(chart.locator("polyline.tolerance").get_attribute(
                "points").split()[0].split(",")[1])
            assert bad and all(y < tol_y for y in bad)
    screenshot(page, "run-chart-passing")


def test_run_page_shows_the_source_lines_of_a_localized_divergence(page, live):
    loc = layers_check(live.results["bugged"]).localization
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    shown = [li.inner_text() for li in page.locator("li.source").all()]
    assert shown == [f"{label}: {w.path}:{w.line} ({w.function})" for label, w in (
        ("MLX", loc.mlx_source), ("MLX call", loc.mlx_call), ("transformers", loc.hf_source))]
    assert loc.mlx_call.path == "mlx_lm/models/llama.py"


def test_links_lead_where_they_say(page, live):
    page.goto(f"{live.url}/")
    page.get_by_role("link", name="#7", exact=True).click()
    assert page.url == f"{live.url}/prs/{REPO}/7"
    page.locator("#pushes tbody tr").first.get_by_role("link", name="run").click()
    assert page.url == f"{live.url}/runs/{live.ids['bad']}"
    assert live.ids["bad"] in page.locator("h1").inner_text()
    page.locator("#pr-link").click()
    assert page.url == f"{live.url}/prs/{REPO}/7"
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    page.locator("#verdicts").get_by_role("link", name="layers").click()
    assert page.url.endswith("#c-0-0")
    assert page.locator("#c-0-0").is_visible()
    page.locator("#verdicts").get_by_role("link", name="llama").click()
    assert page.url == f"{live.url}/runs?model_type=llama"
    # every llama run the store indexes (the 4 PR runs and 2 sweep runs seeded, and any
    # that earlier tests added), newest first
    listed = [row.locator("td").first.inner_text()
              for row in page.locator("#runs tbody tr").all()]
    assert listed == [r["id"] for r in store.runs_for_model_type(live.connection, "llama")]
    assert set(live.ids[k] for k in ("good", "bad", "other", "others")) <= set(listed)
    assert sum(run_id.startswith("sweep-") for run_id in listed) == 2
    # downloads: the stored results JSON and the Markdown report
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    with page.expect_download() as download:
        page.locator("#download-json").click()
    data = json.loads(open(download.value.path()).read())
    assert data["reports"][0]["checks"][0]["first_divergent_layer"] == \
        layers_check(live.results["bugged"]).first_divergent_layer
    with page.expect_download() as download:
        page.locator("#download-md").click()
    text = open(download.value.path()).read()
    assert text.startswith("### mlx-verify: ❌ fail") and "| stage |" in text
    # the matrix: a verdict cell leads to that sweep's run
    page.goto(f"{live.url}/matrix")
    page.locator("#matrix tbody tr").first.locator("td").nth(1).get_by_role("link").click()
    assert re.search(r"/runs/sweep-[0-9a-f]{16}-llama$", page.url)
    assert "main-today" in page.locator("#facts").inner_text()


def test_matrix_lists_what_changed_since_the_previous_sweep(page, live):
    page.goto(f"{live.url}/matrix")
    changes = page.locator("#changes tbody tr")
    assert changes.count() == 1
    assert re.sub(r"\s+", " ", changes.first.inner_text()).strip() == "llama layers pass fail"
    page.get_by_label("mlx-lm tree and transformers version").select_option(
        live.ids["sweep-clean"])
    page.get_by_role("button", name="Show").click()
    assert "main-yesterday" in page.locator("main p").nth(0).inner_text()
    assert "No earlier sweep" in page.locator("main").inner_text()
    screenshot(page, "matrix-previous")


def test_filters_work_without_javascript(browser, live):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{live.url}/")
    page.get_by_label("Verdict").select_option("fail")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#prs tbody tr")
    assert rows.count() == 1 and "#7" in rows.first.inner_text()
    page.get_by_label("State").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    assert "No pull request matches" in page.locator("#prs").inner_text()
    context.close()


def test_untrusted_text_is_escaped(page, live):
    page.goto(f"{live.url}/")
    assert page.locator("#prs img").count() == 0
    assert page.get_by_text(HOSTILE_TITLE).count() == 1
    assert page.title() != "1"
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    assert "<script>alert(1)</script>" in page.locator("#logs").inner_text()
    assert page.locator("main script").count() == 0


def test_actions_refuse_an_anonymous_user(page, live):
    verify = Queue(report.VERIFY_QUEUE, connection=live.connection, serializer=JSONSerializer)
    before = verify.count
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    page.get_by_role("button", name="Re-run this request").click()
    assert page.locator("h1").inner_text() == "Login required"
    screenshot(page, "action-refused-anonymous")
    assert verify.count == before and not live.fake.github.check_runs
    # a forged POST without the session's CSRF token, even with a session: refused
    sign_in(page, live, MAINTAINER)
    answer = page.request.post(f"{live.url}/runs/{live.ids['bad']}/rerun",
                               form={"csrf": "forged"})
    assert answer.status == 403
    assert verify.count == before and not live.fake.github.check_runs


def test_actions_refuse_a_user_without_write_permission(page, live):
    verify = Queue(report.VERIFY_QUEUE, connection=live.connection, serializer=JSONSerializer)
    before = verify.count
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    sign_in(page, live, OUTSIDER)
    page.get_by_role("button", name="Re-run this request").click()
    assert page.locator("h1").inner_text() == "Refused"
    assert "no write permission" in page.locator("main").inner_text()
    assert verify.count == before and not live.fake.github.check_runs


def test_rerun_and_cancel_for_an_authorised_user(page, live):
    connection = live.connection
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    sign_in(page, live, MAINTAINER)
    # back on the run page after the OAuth round trip
    assert page.url == f"{live.url}/runs/{live.ids['bad']}"
    cookie = next(c for c in page.context.cookies() if c["name"] == "mlxv_session")
    assert cookie["httpOnly"] and cookie["path"] == "/dashboard"
    assert "gho_" not in cookie["value"]  # the OAuth token never reaches the browser
    page.get_by_role("button", name="Re-run this request").click()
    assert page.locator("h1").inner_text() == "Re-run requested", page.locator("main").inner_text()
    screenshot(page, "action-rerun")
    job_id = report.verify_job_id(REPO, 7, SHA_BAD, REQUEST)
    assert job_id == live.ids["bad"]  # the same request: the same deterministic job
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status().value == "queued"
    assert job.args[0]["request"]["model_types"] == ["llama"]
    runs = list(live.fake.github.check_runs.values())
    assert len(runs) == 1 and runs[0]["head_sha"] == SHA_BAD and runs[0]["status"] == "queued"
    run = store.get_run(connection, job_id)
    assert run.state == "queued" and run.request["requested_by"] == MAINTAINER
    # the finished attempt is kept whole, and linked from the new attempt's page
    first = store.get_run(connection, f"{job_id}.1")
    assert first.state == "done" and first.results == live.results["bugged"]
    page.goto(f"{live.url}/runs/{job_id}")
    assert page.locator("#attempts").inner_text() == "attempt 1 · attempt 2"
    page.locator("#attempts").get_by_role("link", name="attempt 1").click()
    assert page.url == f"{live.url}/runs/{job_id}.1"
    assert "fail" in page.locator("#verdict").inner_text()
    screenshot(page, "run-earlier-attempt")
    # asking again while it waits changes nothing: the same job id is already queued
    page.goto(f"{live.url}/runs/{job_id}")
    page.get_by_role("button", name="Re-run this request").click()
    assert "already queued" in page.locator("main").inner_text()
    assert len(live.fake.github.check_runs) == 1
    assert store.get_run(connection, job_id).queued_at == run.queued_at
    # the queue page lists it with a cancel button, reachable from the keyboard
    page.goto(f"{live.url}/queue")
    queued = page.locator('table[data-queue="verify"][data-section="queued"]')
    assert job_id in queued.inner_text()
    screenshot(page, "queue-with-job")
    cancel = page.get_by_role("button", name=f"Cancel job {job_id}")
    cancel.focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.locator("h1").inner_text() == "Cancel", page.locator("main").inner_text()
    assert job.get_status(refresh=True).value == "canceled"
    assert runs[0]["status"] == "completed" and runs[0]["conclusion"] == "cancelled"
    assert store.get_run(connection, job_id).state == "cancelled"
    assert connection.hget(f"mlxv:job:{job_id}", "state") == b"cancelled"
    # a push moved the PR on: re-running the old head is refused, nothing enqueued
    live.fake.github.pulls[(REPO, 7)].head_sha = "9" * 40
    page.goto(f"{live.url}/runs/{live.ids['bad']}")
    page.get_by_role("button", name="Re-run this request").click()
    assert page.locator("h1").inner_text() == "Not re-run"
    assert len(live.fake.github.check_runs) == 1
    # sign out needs the CSRF token too, and ends the session
    page.get_by_role("button", name="Sign out").click()
    assert page.get_by_role("link", name="Sign in with GitHub").is_visible()


def test_accessibility_basics(page, live):
    for url in (f"{live.url}/", f"{live.url}/prs/{REPO}/7", f"{live.url}/runs/{live.ids['bad']}",
                f"{live.url}/runs", f"{live.url}/queue", f"{live.url}/matrix"):
        page.goto(url)
        assert page.locator("html").get_attribute("lang") == "en"
        assert page.locator("h1").count() == 1 and page.locator("h2, caption").count() >= 0
        # every visible form control has an accessible name
        unlabeled = page.evaluate("""() => [...document.querySelectorAll(
            'input:not([type=hidden]), select, textarea, button')].filter(e => {
              const label = e.labels && e.labels.length ? e.labels[0].innerText.trim() : '';
              return !(label || e.getAttribute('aria-label') || e.innerText.trim());
            }).map(e => e.outerHTML)""")
        assert unlabeled == [], (url, unlabeled)
        # every chart has a title and a description
        for svg in page.locator("svg").all():
            assert svg.get_attribute("role") == "img" and svg.get_attribute("aria-labelledby")
            assert svg.locator("title").first.text_content()
    # keyboard: Tab from the top reaches the skip link, the nav and the filter controls
    page.goto(f"{live.url}/")
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate(
            "() => document.activeElement.tagName + ':' + "
            "(document.activeElement.innerText || document.activeElement.name || '')"))
    assert seen[0].startswith("A:Skip to content")
    assert any(s.startswith("SELECT:") for s in seen) and any(s == "BUTTON:Filter" for s in seen)


def test_queue_page_shows_a_live_runner(page, live):
    import os
    import signal

    from rq import Worker

    from tests.app.conftest import start_worker_process, wait_until

    port = live.connection.connection_pool.connection_kwargs["port"]
    process = start_worker_process(report.LARGE_VERIFY_QUEUE, {
        "REDIS_URL": f"redis://127.0.0.1:{port}/0", "GITHUB_GIT_URL": live.fake.url})
    try:
        wait_until(lambda: Worker.all(connection=live.connection, serializer=JSONSerializer),
                   30, what="the runner to register")
        page.goto(f"{live.url}/queue")
        row = page.locator("#workers tbody tr").filter(has_text=report.LARGE_VERIFY_QUEUE)
        text = row.inner_text()
        assert report.LARGE_VERIFY_QUEUE in text and "large" in text
        assert re.search(r"\d+ s ago", text), text  # its last heartbeat
        screenshot(page, "queue-with-runner")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)


def test_matrix_compares_one_tree_under_two_environments(page, live, real_results, tmp_path):
    """The nightly sweep of one mlx-lm tree under a second environment (the newest
    transformers): the matrix links the two and lists every verdict that differs."""
    out = tmp_path / "sweep-newest"
    out.mkdir()
    (out / "llama.json").write_text(real_results["clean"].model_dump_json())
    fingerprint = {"mlx_lm": "0.32.2 /main-today", "transformers": "5.24.0",
                   "options": ["--checks", "layers", "--variants", "default"]}
    (out / "sweep.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": {
        "llama": {"model_type": "llama", "exit": 0, "seconds": 20.0,
                  "verdict": real_results["clean"].verdict}}}))
    newest = store.import_sweep_dir(live.connection, out)
    page.goto(f"{live.url}/matrix?sweep={quote(live.ids['sweep-bugged'])}")
    link = page.locator("#other-environments").get_by_role("link")
    assert link.count() == 1 and "transformers 5.24.0" in link.inner_text()
    link.click()
    assert f"compare={newest}" in page.url
    changes = page.locator("#changes tbody tr")
    assert changes.count() == 1
    assert re.sub(r"\s+", " ", changes.first.inner_text()).strip() == "llama layers pass fail"
    assert "transformers 5.24.0" in page.locator("main").inner_text()
    screenshot(page, "matrix-two-environments")
