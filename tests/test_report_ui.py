"""The reports people read: the terminal report, the standalone HTML report (in Chromium),
`mlx-verify report`, the source locations of a localized divergence, and the contributor
flow (run inside an mlx-lm checkout, no --mlx-lm).

One real run: a copy of the installed mlx_lm with the SiLU of llama's MLP replaced by
GELU, checked from inside that copy (cwd) with `--checks layers --variants default`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mlx_verify.checks import terminal
from mlx_verify.checks.schema import Results
from tests.conftest import MLX_VERIFY, Edit, copy_mlx_lm

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "artifacts" / "screenshots"
BUGGY_LINE = "return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))"
GELU_BUG = Edit("models/llama.py",
                "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))", BUGGY_LINE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Run:
    def __init__(self, tree: Path, proc: subprocess.CompletedProcess, out: Path, html: Path):
        self.tree, self.proc, self.json_path, self.html = tree, proc, out, html
        self.results = Results.model_validate_json(out.read_text())

    def layers(self) -> Any:
        return next(c for r in self.results.reports for c in r.checks if c.check == "layers")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Run:
    tree = copy_mlx_lm(tmp_path_factory.mktemp("checkout"), [GELU_BUG])
    out, html = tree / "results.json", tree / "report.html"
    # the contributor's flow: from inside the checkout, no --mlx-lm
    proc = subprocess.run(
        [str(MLX_VERIFY), "check", "llama", "--checks", "layers", "--variants", "default",
         "--json", str(out), "--html", str(html)],
        cwd=tree, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLX_VERIFY_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"})
    assert out.is_file(), proc.stderr[-2000:]
    return Run(tree, proc, out, html)


def test_inside_a_checkout_it_checks_that_checkout_and_says_so(run: Run) -> None:
    assert run.proc.returncode == 1, run.proc.stderr[-2000:]
    assert "mlx-verify: checking ./mlx_lm" in run.proc.stderr
    assert Path(run.results.environment.mlx_lm_path) == (run.tree / "mlx_lm").resolve()
    assert run.layers().verdict == "fail"  # the edit is seen: it is this tree that ran


def test_localized_divergence_carries_its_source_lines(run: Run) -> None:
    import transformers

    loc = run.layers().localization
    assert loc is not None and loc.module == "model.layers.0.mlp" and loc.part == "mlp"
    model_file = (run.tree / loc.mlx_source.path).read_text().splitlines()
    assert loc.mlx_source.path == "mlx_lm/models/llama.py"
    assert loc.mlx_source.function == "MLP.__call__"
    assert model_file[loc.mlx_source.line - 1].strip().startswith("def __call__")
    # the call of the diverging sub-module (down_proj, whose input differs) is the edit
    assert loc.mlx_call is not None and loc.mlx_call.path == loc.mlx_source.path
    assert model_file[loc.mlx_call.line - 1].strip() == BUGGY_LINE
    hf_root = Path(transformers.__file__).resolve().parent.parent
    assert loc.hf_source is not None and loc.hf_source.function == "LlamaMLP.forward"
    assert loc.hf_source.path == "transformers/models/llama/modeling_llama.py"
    hf_line = (hf_root / loc.hf_source.path).read_text().splitlines()[loc.hf_source.line - 1]
    assert hf_line.strip().startswith("def forward")


def test_terminal_report_piped_is_plain_and_short(run: Run) -> None:
    shown = subprocess.run([str(MLX_VERIFY), "report", str(run.json_path)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 1, shown.stderr
    text = shown.stdout
    assert not ANSI.search(text)
    lines = text.splitlines()
    assert len(lines) <= 50
    assert lines[0].startswith("mlx-verify: FAIL")
    finding = next(i for i, line in enumerate(lines) if line.startswith("✗ llama layers"))
    assert "llama layers  default config: " in lines[finding]
    assert "config: transformers default config" in text  # what "default" is
    assert "diverges at layers.0, mlp model.layers.0.mlp, rel L2 " in lines[finding]
    loc = run.layers().localization
    assert lines[finding + 1].split() == [
        f"mlx_lm/models/llama.py:{loc.mlx_call.line}", "MLP.__call__", "·",
        f"transformers/models/llama/modeling_llama.py:{loc.hf_source.line}", "LlamaMLP.forward"]
    verbose = subprocess.run([str(MLX_VERIFY), "report", str(run.json_path), "-v"],
                             capture_output=True, text=True, timeout=120).stdout
    assert "Every check" in verbose and "layers.0" in verbose and "NO first" in verbose


def test_terminal_report_on_a_tty_has_colour_and_fits_the_width(run: Run,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    results = run.results.model_copy(deep=True)
    check = results.reports[0].checks[0]
    check.summary = "[bold red]not markup[/] \x1b[2J"  # untrusted text stays text
    check.localization = None
    out = io.StringIO()
    terminal.render(results, out, tty=True)
    text = out.getvalue()
    assert "\x1b[" in text  # colour
    plain = ANSI.sub("", text)
    assert "[bold red]not markup[/]" in plain and "\x1b[2J" not in text
    assert max(len(line) for line in plain.splitlines()) <= 100


def test_report_subcommand_renders_saved_results(run: Run, tmp_path: Path) -> None:
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    done = subprocess.run([str(MLX_VERIFY), "report", str(run.json_path), "--markdown", str(md),
                           "--html", str(page)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "| `llama` | ❌ fail 1/1 |" in md.read_text()
    assert "mlx\\_lm/models/llama.py" not in md.read_text()  # in code spans, not escaped
    assert f"`mlx_lm/models/llama.py:{run.layers().localization.mlx_call.line}`" in md.read_text()
    assert page.read_text().startswith("<!doctype html>")
    # results of schema v1 (no source locations) still render
    old = json.loads(run.json_path.read_text())
    old["schema_version"] = 1
    for report in old["reports"]:
        for check in report["checks"]:
            for key in ("mlx_source", "mlx_call", "hf_source"):
                (check.get("localization") or {}).pop(key, None)
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(old))
    shown = subprocess.run([str(MLX_VERIFY), "report", str(v1)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 1 and "diverges at layers.0, mlp" in shown.stdout


@pytest.mark.parametrize("content,expected", [
    (None, "cannot read"), ("{not json", "not mlx-verify results"),
    ('{"reports": []}', "not mlx-verify results"),
])
def test_report_subcommand_bad_input_is_one_line(tmp_path: Path, content: str | None,
                                                 expected: str) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([str(MLX_VERIFY), "report", str(path), "--html", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr
    assert not (tmp_path / "x").exists()


def test_html_report_in_chromium(run: Run, browser) -> None:
    layers = run.layers()
    loc = layers.localization
    requests: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(run.html.as_uri())
        assert page.title().startswith("mlx-verify: fail")
        matrix = page.locator("#matrix tbody tr")
        assert matrix.count() == 1
        assert matrix.first.inner_text().split() == ["llama", "fail", "1/1"]
        finding = page.locator("#findings tbody tr")
        assert finding.count() == 1
        text = finding.first.inner_text()
        assert "default (transformers default config)" in text
        assert "first divergent stage layers.0" in text and "model.layers.0.mlp" in text
        assert f"mlx_lm/models/llama.py:{loc.mlx_call.line}" in text
        assert f"transformers/models/llama/modeling_llama.py:{loc.hf_source.line}" in text
        chart = page.locator("svg.layer-chart").first
        assert chart.is_visible()
        assert chart.locator("circle").count() == len(layers.layers)
        assert chart.locator("circle.bad").count() == sum(not r.ok for r in layers.layers)
        assert page.locator("table.layers tr.regressed td").first.inner_text() == "layers.0"
        assert "mlx-verify check llama" in page.locator("#reproduce").inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "html-report.png"), full_page=True)
    finally:
        context.close()
    assert requests == [run.html.as_uri()]  # self-contained: nothing else is fetched


def test_html_report_keeps_untrusted_text_inert(run: Run, browser, tmp_path: Path) -> None:
    from mlx_verify.checks import html

    hostile = '<script>document.title="owned"</script><img src=x onerror="document.title=1">'
    results = run.results.model_copy(deep=True)
    check = results.reports[0].checks[0]
    check.summary = hostile
    check.localization.facts = [hostile]
    page_file = tmp_path / "hostile.html"
    page_file.write_text(html.render(results))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(page_file.as_uri())
        assert page.title().startswith("mlx-verify: fail")
        assert page.locator("script").count() == 0 and page.locator("main img").count() == 0
        assert hostile in page.locator("details.check").first.inner_text()
    finally:
        context.close()
