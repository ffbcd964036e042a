"""The sticky PR comment and the Check Run output, rendered from a verify outcome.

Deterministic templates over the results: numbers, verdicts and facts, no prose that
depends on anything but the results. Every string in the results came out of a process
that imported the PR's code, so all of it is untrusted: it goes through escape() or
code() (no @-mention pings, no HTML, no Markdown breakout), and chart labels are cut
down to a safe alphabet. The comment stays under GitHub's 65,536 characters by dropping
details, never rows of the verdict table.

With the PR's base commit in the run (`--base`, see workers.verify), the results carry a
row-by-row comparison with it (checks/differential.py): every failing row is marked new,
worse, unchanged or better, and only new or worse rows make the Check Run fail; all
unchanged is `neutral`. Outcomes of older runners carry a separate base run instead
(`base_results`): there a failing row is "new" or "also fails on base <sha7>".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from mlx_verify.checks import render as shared
from mlx_verify.checks.render import VERDICT_MARK, code, escape
from mlx_verify.checks.schema import CheckResult, Results, SourceLocation, combine_verdicts
from mlx_verify.workers.jobs import CrossCheck

MARKER = "<!-- mlx-verify:sticky -->"
COMMENT_LIMIT = 65_536
CHECK_OUTPUT_LIMIT = 65_535
MARGIN = 1_000  # room for the trimming notes and the footer
CHART_MAX_POINTS = 64
MAX_DIVERGENCE_LINES = 20
CONCLUSION = {"pass": "success", "fail": "failure", "error": "failure", "skip": "neutral"}


@dataclass(frozen=True)
class Baseline:
    """What the PR's base commit says about the head's failing rows: a failing
    (model_type, check, variant) is pre-existing when it also fails on base, and new
    otherwise (also when base has no result for it: a model_type the PR adds)."""
    sha: str  # the base commit, hex only
    status: str  # done / unavailable / timeout / crashed (of the base run)
    failing: frozenset[tuple[str, str, str]]  # a report error is (model_type, "", "")
    missing: tuple[str, ...]  # model_types that could not run on base: no baseline

    def fails_on_base(self, model_type: str, check: str = "", variant: str = "") -> bool:
        return (model_type, check, variant) in self.failing

    def marker(self, model_type: str, check: str = "", variant: str = "") -> str:
        if self.fails_on_base(model_type, check, variant):
            return f"also fails on base `{self.sha[:7]}`"
        return "**new**"


def baseline_of(outcome: dict[str, Any]) -> Baseline | None:
    """The baseline of a verify outcome; None when it was off (VERIFY_BASELINE=0) or the
    job carried no base commit."""
    status = str(outcome.get("base_status") or "")
    sha = re.sub(r"[^0-9a-f]", "", str(outcome.get("base_sha") or ""))[:40]
    if not status or not sha:
        return None
    if status == "in-run" and outcome.get("results"):
        return None  # the results carry their own PR-vs-base rows (results.differential)
    failing: set[tuple[str, str, str]] = set()
    base = Results.model_validate(outcome["base_results"]) \
        if outcome.get("base_results") else None
    for report in base.reports if base else []:
        if report.error:
            failing.add((report.model_type, "", ""))
        failing.update((report.model_type, c.check, c.variant) for c in report.checks
                       if c.verdict in ("fail", "error"))
    missing = tuple(str(t) for t in outcome.get("base_errors") or {})
    return Baseline(sha, status, frozenset(failing), missing)


def count_findings(results: Results | None, errors: dict[str, str],
                   baseline: Baseline) -> tuple[int, int]:
    """(new, pre-existing) failing rows of the head: a report error and each failing
    check is one row; a model_type that could not run at all is always new."""
    new, old = len(errors), 0
    for report in results.reports if results else []:
        keys = [(c.check, c.variant) for c in report.checks if c.verdict in ("fail", "error")]
        if report.error:
            keys.append(("", ""))
        if not keys and report.verdict in ("fail", "error"):
            new += 1  # failing with no failing row to compare: count it, as new
        for check, variant in keys:
            if baseline.fails_on_base(report.model_type, check, variant):
                old += 1
            else:
                new += 1
    return new, old


def baseline_lines(baseline: Baseline, new: int, old: int) -> list[str]:
    """The baseline's facts for the head of the comment and the Check Run summary."""
    base = f"base `{baseline.sha[:7]}`"
    lines = [f"**{new} new finding(s)**; {old} finding(s) also fail on {base} "
             "(the PR's base commit)." if new else
             f"**No new findings**: all {old} finding(s) also fail on {base} "
             "(the PR's base commit)."]
    why = {"unavailable": "could not be fetched", "timeout": "timed out",
           "crashed": "crashed"}.get(baseline.status)
    if why:
        lines.append(f"No baseline: the run on {base} {why}; every finding counts as new.")
    if baseline.missing:
        types = ", ".join(code(t, 64) for t in baseline.missing[:20])
        lines.append(f"No baseline for {types}: could not run on {base}.")
    return [part for line in lines for part in (line, "")]  # one paragraph each


@dataclass
class Rendered:
    conclusion: str  # Check Run conclusion
    title: str
    summary: str  # Check Run summary: the verdict table and first divergences
    text: str  # Check Run text: the details
    comment: str | None  # the sticky comment body; None: leave the comment alone
    verdict: str  # pass / fail / error / skip, for the history line
    annotations: list[dict[str, Any]]


def _label(text: str) -> str:
    """A chart label: letters, digits and . _ - only, short."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "", text)[:24] or "?"


def _log10(value: float) -> float:
    if not math.isfinite(value):
        return 2.0
    return round(max(math.log10(value), -12.0), 2) if value > 0 else -12.0


def layer_chart(model_type: str, check: CheckResult) -> list[str]:
    """A mermaid xychart of log10 rel L2 per stage, with the tolerance as a second line."""
    rows = check.layers[:CHART_MAX_POINTS]
    if not rows:
        return []
    names = ", ".join(f'"{_label(r.name)}"' for r in rows)
    values = ", ".join(str(_log10(r.rel_l2)) for r in rows)
    tolerances = ", ".join(str(_log10(r.tolerance)) for r in rows)
    low = min(min(_log10(r.rel_l2) for r in rows), min(_log10(r.tolerance) for r in rows))
    high = max(max(_log10(r.rel_l2) for r in rows), max(_log10(r.tolerance) for r in rows))
    return [
        "```mermaid",
        "xychart-beta",
        f'    title "{_label(model_type)} {_label(check.check)} {_label(check.variant)}: '
        f'log10 rel L2 per stage (2nd line: tolerance)"',
        f"    x-axis [{names}]",
        f'    y-axis "log10 rel L2" {math.floor(low)} --> {math.ceil(high) + 1}',
        f"    line [{values}]",
        f"    line [{tolerances}]",
        "```",
    ]


def verdict_matrix(results: Results | None, errors: dict[str, str],
                   skipped: list[str]) -> list[str]:
    return shared.md_matrix(results, errors, skipped)


def verdict_rows(results: Results | None, errors: dict[str, str], skipped: list[str],
                 summary_limit: int, only_findings: bool = False,
                 baseline: Baseline | None = None) -> list[str]:
    """The verdict table; with a baseline, a "vs base" column marks each failing row."""
    marker = None
    if baseline is not None:
        def marker(model_type: str, verdict: str, check: str, variant: str) -> str:
            if verdict not in ("fail", "error"):
                return "–"
            return baseline.marker(model_type, check, variant)
    elif results is not None and results.differential:
        change = shared.row_change(results.differential)

        def marker(model_type: str, verdict: str, check: str, variant: str) -> str:
            found = change(model_type, check, variant)
            return shared.CHANGE_MARK[found] if found else ("**new**" if verdict in
                                                           ("fail", "error") else "–")
    return shared.md_verdict_rows(results, summary_limit, only_findings, errors, skipped,
                                  marker)


def linker(repo: str, sha: str) -> shared.Linker:
    """Source locations link to the PR's blob at the head SHA."""
    def link(where: SourceLocation) -> str | None:
        return shared.blob_url(repo, sha, where)
    return link


def check_details(model_type: str, check: CheckResult, chart: bool,
                  link: shared.Linker | None = None) -> list[str]:
    """Everything about one check: facts, metrics, weights, chart and layer table."""
    return shared.md_check_details(model_type, check,
                                   layer_chart(model_type, check) if chart else None, link)


def detail_sections(results: Results | None,
                    link: shared.Linker | None = None) -> list[list[str]]:
    """One collapsed section per model_type; failing checks first within it."""
    sections = []
    for report in results.reports if results else []:
        lines = [f"<details><summary>{escape(report.model_type, 64)}: "
                 f"{VERDICT_MARK[report.verdict]}</summary>", "",
                 f"- source: {escape(report.source, 200)}; seed {report.seed}; "
                 f"dtype {escape(report.dtype, 16)}"]
        for variant in report.variants[:20]:
            lines.append(f"- variant {code(variant.name, 64)}: {escape(variant.description)} "
                         f"(config format: {escape(variant.config_format, 32)})")
        lines.append("")
        ordered = sorted(report.checks, key=lambda c: c.verdict != "fail")
        # One chart per model_type (its first failing check with layers) keeps the page
        # readable; every check keeps its layer table.
        charted = next((c for c in ordered if c.layers), None)
        for check in ordered:
            lines.extend(check_details(report.model_type, check, check is charted, link))
        lines.extend(["</details>", ""])
        sections.append(lines)
    return sections


def reproduce(repo: str, number: int, sha: str, model_types: list[str],
              request: dict[str, Any]) -> list[str]:
    """The local command, built from the request (not from the untrusted results)."""
    command = ["mlx-verify", "check", *model_types, "--mlx-lm", "."]
    if request.get("checks"):
        command += ["--checks", ",".join(request["checks"])]
    if request.get("dtype", "float32") != "float32":
        command += ["--dtype", request["dtype"]]
    safe = [re.sub(r"[^A-Za-z0-9_.,/\-]", "", part) for part in command]
    return ["```bash",
            f"git clone https://github.com/{re.sub(r'[^A-Za-z0-9_./-]', '', repo)}.git "
            f"&& cd {re.sub(r'[^A-Za-z0-9_.-]', '', repo.split('/')[-1])}",
            f"git fetch origin pull/{int(number)}/head && git checkout {sha[:40]}",
            " ".join(safe), "```"]


def environment_lines(results: Results | None) -> list[str]:
    if results is None:
        return []
    env = results.environment
    blas = f", BLAS {escape(env.blas, 60)}" if env.blas else ""
    return [f"- mlx-lm {escape(env.mlx_lm_version, 40)}, mlx {escape(env.mlx, 40)} "
            f"({escape(env.mlx_device, 40)}{blas}), torch {escape(env.torch, 40)}, transformers "
            f"{escape(env.transformers, 40)}, python {escape(env.python, 40)}, "
            f"{escape(env.platform, 80)}; mlx-verify {escape(env.mlx_verify, 40)}, results "
            f"schema v{results.schema_version}"
            + (f"; lock {escape(env.lock, 120)}" if env.lock else "")]


def _fit(head: list[str], optional: list[list[str]], tail: list[str], limit: int) -> str:
    """head and tail always; optional sections in order while they fit."""
    used = sum(len(line) + 1 for line in head + tail) + MARGIN
    body = list(head)
    dropped = 0
    for section in optional:
        size = sum(len(line) + 1 for line in section)
        if used + size <= limit:
            body.extend(section)
            used += size
        else:
            dropped += 1
    if dropped:
        body.extend([f"_{dropped} detail section(s) left out to stay under GitHub's size "
                     "limit: run the command below locally for all of them._", ""])
    return "\n".join(body + tail)


def _verdict_table(results: Results | None, errors: dict[str, str], skipped: list[str],
                   budget: int, only_findings: bool = False,
                   baseline: Baseline | None = None) -> list[str]:
    """A verdict table with every row; cell summaries shortened until it fits."""
    for summary_limit in (300, 120, 40, 0):
        rows = verdict_rows(results, errors, skipped, summary_limit, only_findings, baseline)
        if sum(len(r) + 1 for r in rows) <= budget:
            return rows
    return rows


def render(outcome: dict[str, Any], *, repo: str, number: int, sha: str,
           request: dict[str, Any], history: list[dict[str, str]],
           dashboard_url: str | None, changed_files: list[str],
           untrusted: str | None = None) -> Rendered:
    """Check Run output and comment for a finished verify job.

    outcome: the runner's answer, see workers.verify.run_verify.
    history: earlier SHAs of this PR, newest first: {"sha", "verdict", "counts"}.
    untrusted: who wrote the head without write access (app.report.untrusted_code): the
    results come from the process that ran that code, so their pass is no gate.
    """
    status = outcome.get("status")
    short = sha[:12]
    if status == "nothing":
        summary = "No model code changed: no `mlx_lm/models/*.py` file that a model uses."
        return Rendered("neutral", "no model code changed", summary, "", None, "skip", [])
    if status == "stale":
        summary = f"Commit {short} is no longer the head of the PR: not run."
        return Rendered("neutral", "superseded by a newer push", summary, "", None, "skip", [])

    results = Results.model_validate(outcome["results"]) if outcome.get("results") else None
    errors = {str(k): str(v) for k, v in (outcome.get("errors") or {}).items()}
    skipped = [str(t) for t in outcome.get("skipped") or []]
    verdicts = ([r.verdict for r in results.reports] if results else []) + \
        ["error"] * len(errors)
    failure = None
    if status == "timeout":
        failure = f"timed out after {int(outcome.get('timeout_s', 0))} s"
    elif status == "crashed":
        failure = f"the check process died: {outcome.get('reason', 'unknown reason')}"
    if failure:
        verdicts.append("error")
    verdict = combine_verdicts(verdicts)  # type: ignore[arg-type]
    conclusion = "timed_out" if status == "timeout" else CONCLUSION[verdict]

    counts = _counts(results, errors)
    differential = results.differential if results is not None and not failure else []
    # With a baseline, only findings the PR introduces fail the Check Run: when every
    # failing row also fails on the base commit, the conclusion is neutral. A differential
    # run (--base in the same sandboxed run) marks every row itself and takes precedence.
    baseline = baseline_of(outcome) if verdict in ("fail", "error") and not failure \
        and not differential else None
    new = old = 0
    if baseline is not None:
        new, old = count_findings(results, errors, baseline)
        counts += f"; {new} new, {old} also on base {baseline.sha[:7]}"
        if not new:
            conclusion = "neutral"
    if differential:
        blocking = sum(row.change in ("new", "worse") for row in differential)
        counts += f"; against base: {shared.change_counts(differential)}"
        if errors:
            blocking += len(errors)  # could not run at all: nothing to compare, new
        if not blocking and verdict in ("fail", "error"):
            conclusion = "neutral"
        elif blocking:
            conclusion = "failure"
    # Final logits the runner measured outside the sandbox (workers/crosscheck.py): a
    # claimed pass they do not confirm fails the run, whatever the baseline says.
    cross_checks = [CrossCheck.model_validate(c) for c in outcome.get("cross_checks") or []]
    contradicted = [c for c in cross_checks if c.contradicts]
    if contradicted and not failure:
        verdict = combine_verdicts([verdict, *(c.verdict for c in contradicted)])
        conclusion = "failure"
        failed = sum(c.verdict == "fail" for c in contradicted)
        unmeasured = len(contradicted) - failed
        said = [f"{failed} contradicted" if failed else "",
                f"{unmeasured} not confirmed" if unmeasured else ""]
        counts = (f"claimed passes outside the sandbox: {', '.join(w for w in said if w)}; "
                  f"{counts}")
    # A pass computed by code of someone without write access could be that code's own
    # writing (a results file and exit 0): reported, but never a green gate.
    not_a_gate = untrusted is not None and conclusion == "success"
    if not_a_gate:
        conclusion = "neutral"
    # the heading says what the conclusion says: findings the base has too are not this PR's
    mark = "➖ no new findings" if conclusion == "neutral" and (
        baseline is not None or differential) else VERDICT_MARK[verdict]
    if not_a_gate:
        mark += " (not a gate)"
    title = f"{mark}: {counts}" if not failure else f"⚠️ {failure}"
    model_types = [str(t) for t in outcome.get("model_types") or []]
    head = [MARKER, f"### mlx-verify: {mark} at `{short}`", ""]
    if failure:
        head.extend([f"**Could not finish: {escape(failure, 200)}.**", ""])
        tail_lines = [escape(line, 200) for line in (outcome.get("stderr_tail") or "")
                      .splitlines()[-10:]]
        if tail_lines:
            head.extend(["Last lines of its error output:", ""] +
                         [f"    {line}" for line in tail_lines] + [""])
    head.extend(cross_check_lines(cross_checks))
    if not_a_gate:
        head.extend([f"**Not a gate: {escape(str(untrusted), 80)} has no write access.** "
                     "These results were written by the sandboxed process that imported this "
                     "PR's code, which could have written them itself: only the final "
                     "logits above were measured outside it. The Check Run is neutral; "
                     "review the diff.", ""])
    head.extend(plan_lines(outcome))
    planned = outcome.get("planned") or []
    if len(planned) > len(model_types):
        ran = ", ".join(code(t, 64) for t in model_types) or "none"
        head.extend([f"Planned {len(planned)} model_types from the changed files; ran {ran} "
                     "(the runner's limits). Run others with `/verify MODEL_TYPE`.", ""])
    if baseline is not None:
        head.extend(baseline_lines(baseline, new, old))
    if results is not None:
        head.extend([escape(shared.reach_line(results)), ""])
    base_sha = re.sub(r"[^0-9a-f]", "", str(outcome.get("base_sha") or ""))[:7]
    if differential:
        head.extend([f"**Against the base commit** `{base_sha or 'base'}` (same checkpoints "
                     "and inputs; rows the PR does not change are left out):", ""]
                     + shared.md_differential(results) + [""])
    head.extend(verdict_matrix(results, errors, skipped) + [""])
    for check, variant, types in shared.systemic_causes(results):
        head.extend([f"- systemic: {escape(check, 32)} on variant {code(variant, 64)} fails in "
                     f"{len(types)} model_types: {', '.join(code(t, 64) for t in types[:30])}",
                     ""])
    findings = _verdict_table(results, errors, skipped, COMMENT_LIMIT // 3, only_findings=True,
                              baseline=baseline)
    if len(findings) > 2:
        head.extend(["**Findings**", ""] + findings + [""])
    link = linker(repo, sha)
    divergences = shared.md_first_divergences(results, link)
    if len(divergences) > MAX_DIVERGENCE_LINES:
        more = len(divergences) - MAX_DIVERGENCE_LINES
        divergences = divergences[:MAX_DIVERGENCE_LINES] + [f"- … and {more} more"]
    if divergences:
        head.extend(["**First divergence**", ""] + divergences + [""])

    tail = ["<details><summary>environment and reproduction</summary>", ""]
    tail.extend(environment_lines(results))
    tail.extend([""] + reproduce(repo, number, sha, model_types, request) + [""])
    if dashboard_url:
        tail.append(f"[Full results on the dashboard]({dashboard_url})")
    tail.extend(["", "</details>", ""])
    if history:
        tail.extend(["<details><summary>earlier commits</summary>", ""])
        for entry in history[:10]:
            tail.append(f"- `{entry['sha'][:12]}`: {VERDICT_MARK.get(entry['verdict'], '?')} "
                        f"({escape(entry.get('counts', ''), 80)})")
        tail.extend(["", "</details>", ""])

    every_row = ["<details><summary>every check</summary>", ""] + \
        _verdict_table(results, errors, skipped, COMMENT_LIMIT // 4, baseline=baseline) + \
        ["", "</details>", ""]
    sections = [every_row] + detail_sections(results, link)
    comment = _fit(head, sections, tail, COMMENT_LIMIT)
    summary_lines = head[1:]  # the marker means nothing in a Check Run
    summary = _fit(summary_lines, [], [], CHECK_OUTPUT_LIMIT)
    text = _fit([], sections, tail, CHECK_OUTPUT_LIMIT)
    annotations = _annotations(results, changed_files)
    return Rendered(conclusion, title[:250], summary, text, comment, verdict, annotations)


def cross_check_lines(cross_checks: list[CrossCheck]) -> list[str]:
    """Facts as numbers: the final logits of each claimed-pass variant, measured by the
    runner outside the sandbox (transformers there, MLX logits as data). A model_type's
    confirmed variants share one line (the largest distance); every failure or
    unmeasured variant has its own."""
    lines = []
    confirmed: dict[str, list[CrossCheck]] = {}
    for c in cross_checks:
        if c.verdict == "pass":
            confirmed.setdefault(c.model_type, []).append(c)
    for model_type, passed in confirmed.items():
        worst = max(passed, key=lambda c: c.rel_l2 or 0.0)
        setting = f"{escape(worst.dtype, 16)}, {worst.tokens} random tokens"
        top1 = min(c.top1_agreement or 0.0 for c in passed)
        if len(passed) == 1:
            lines.append(f"- final logits confirmed outside the sandbox: "
                         f"{code(model_type, 64)} {code(worst.variant, 32)} rel L2 "
                         f"{shared.num(worst.rel_l2)} ≤ {shared.num(worst.bound)} ({setting}, "
                         f"top-1 {shared.num(top1)})")
            continue
        names = ", ".join(escape(c.variant, 32) for c in passed[:16])
        more = f", and {len(passed) - 16} more" if len(passed) > 16 else ""
        lines.append(f"- final logits confirmed outside the sandbox: {code(model_type, 64)} "
                     f"on {len(passed)} variants ({names}{more}): largest rel L2 "
                     f"{shared.num(worst.rel_l2)} ({escape(worst.variant, 32)}) ≤ "
                     f"{shared.num(worst.bound)} ({setting} each, top-1 at least "
                     f"{shared.num(top1)})")
    for c in cross_checks:
        where = f"{code(c.model_type, 64)} {code(c.variant, 32)}"
        setting = f"{escape(c.dtype, 16)}, {c.tokens} random tokens"
        claim = ("; the sandboxed results left this variant out" if c.claimed == "omitted"
                 else f"; the sandboxed results claimed {escape(c.claimed or 'nothing', 16)}")
        if c.verdict == "fail":
            measured = (f"rel L2 {shared.num(c.rel_l2)} > bound {shared.num(c.bound)}"
                        if c.rel_l2 is not None else escape(c.reason or "not finite", 200))
            lines.append(f"- **final logits measured outside the sandbox: {where} {measured}"
                         f"{claim}** ({setting}, top-1 {shared.num(c.top1_agreement)})")
        elif c.verdict == "error":
            lines.append(f"- **final logits not measured outside the sandbox: {where}: "
                         f"{escape(c.reason or 'no reason given', 300)}{claim}: "
                         "not confirmed**")
    if any(c.contradicts for c in cross_checks):
        lines.append("- **blamed on the PR: its sandboxed results are contradicted by a "
                     "measurement its code could not write; the Check Run fails**")
    return lines + [""] if lines else []


def plan_lines(outcome: dict[str, Any]) -> list[str]:
    """Why the representative set ran (workers.planning.make_plan): the shared files the
    PR changes, then one model_type per family."""
    plan = outcome.get("plan") or {}
    plumbing = [str(f) for f in plan.get("plumbing") or []]
    representative = plan.get("representative") or {}
    if not plumbing or not isinstance(representative, dict):
        return []
    files = ", ".join(code(f, 120) for f in plumbing[:10])
    more = f" and {len(plumbing) - 10} more" if len(plumbing) > 10 else ""
    families = ", ".join(f"{code(str(t), 64)} ({escape(str(family), 32)})"
                         for family, t in representative.items())
    return [f"{files}{more} changed: representative set: {families}.", ""]


def _counts(results: Results | None, errors: dict[str, str]) -> str:
    reports = results.reports if results else []
    total = len(reports) + len(errors)
    failing = sum(r.verdict in ("fail", "error") for r in reports) + len(errors)
    return f"{failing} of {total} model_types with findings" if failing else \
        f"{total} model_types pass"


def _annotations(results: Results | None, changed_files: list[str]) -> list[dict[str, Any]]:
    """Annotations on files the PR changes: the source location of each localized
    divergence (the MLX line calling the diverging sub-module, else the diverging module's
    __call__), one per line with every finding there; then those the engine points at
    code itself ({"path", "line", "message"} items in a check's details["annotations"]).
    GitHub takes 50 per request: app.github.update_check_run sends them in batches."""
    changed = set(changed_files)
    at_line: dict[tuple[str, int], list[str]] = {}
    for finding in shared.findings(results):
        loc = finding.check.localization
        where = (loc.mlx_call or loc.mlx_source) if loc is not None else None
        if where is None or where.path not in changed:
            continue
        row = finding.row
        at_line.setdefault((where.path, where.line), []).append(
            f"{finding.model_type} {finding.check.check} / {finding.check.variant}: first "
            f"divergent stage {finding.check.first_divergent_layer}"
            + (f", rel L2 {shared.num(row.rel_l2)} (tolerance {shared.num(row.tolerance)})"
               if row is not None else "")
            + f"; {loc.part} {loc.module}")
    found: list[dict[str, Any]] = []
    for (path, line), messages in at_line.items():
        shown = messages[:20] + ([f"… and {len(messages) - 20} more"] if len(messages) > 20
                                 else [])
        found.append({
            "path": path, "start_line": line, "end_line": line,
            "annotation_level": "failure",
            "title": f"mlx-verify: outputs part from transformers here ({len(messages)} "
                     "finding(s))"[:250],
            "message": "\n".join(shown)[:2000],
        })
    for report in results.reports if results else []:
        for check in report.checks:
            for item in check.details.get("annotations") or []:
                if not isinstance(item, dict):
                    continue
                path, line = item.get("path"), item.get("line")
                if path not in changed or not isinstance(line, int) or line < 1:
                    continue
                found.append({
                    "path": path, "start_line": line, "end_line": line,
                    "annotation_level": "failure" if check.verdict == "fail" else "notice",
                    "title": f"{report.model_type} {check.check}"[:250],
                    "message": str(item.get("message", check.summary))[:2000],
                })
    return found[:500]


def history_entry(sha: str, rendered: Rendered) -> dict[str, str]:
    return {"sha": sha, "verdict": rendered.verdict,
            "counts": rendered.title.split(": ", 1)[-1]}
