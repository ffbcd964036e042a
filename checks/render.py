"""The one renderer's shared parts: number formats, escaping, the tables every report
shows (verdict matrix, findings, first divergences, per-stage rows) and the per-layer
chart's coordinates. The CLI's Markdown (checks/report.py), terminal (checks/terminal.py)
and HTML (checks/html.py) reports and the PR comment (app/comment.py) all draw from here.

Only numbers and facts from the results. Every string in results may come from a
process that imported untrusted code: Markdown goes through escape() or code() (no
@-mention pings, no HTML, no table or fence breakout); HTML is autoescaped by jinja2.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .schema import (
    CheckResult,
    DiffRow,
    LayerRow,
    Localization,
    ModelReport,
    Results,
    SourceLocation,
    check_verdicts,
)

VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "⚠️ error", "skip": "➖ skip"}
BAD = ("fail", "error")


# ---- numbers -----------------------------------------------------------------------------

def num(value: Any) -> str:
    """Every number a report shows: 3 significant digits in [1e-3, 1e4), else 2-digit
    scientific; exact zero as 0; None as –; other values as text."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return "0" if value == 0 else f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 \
            else f"{value:.2e}"
    return str(value)


def cosine(value: float) -> str:
    """Cosine similarity: six decimals, since everything that matters sits near 1."""
    return f"{value:.6f}" if math.isfinite(value) else str(value)


# ---- control characters ------------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text for a terminal: control characters (an ESC would start an escape sequence)
    shown as U+FFFD."""
    return CONTROL.sub("\ufffd", text)


def scrubbed(value: Any) -> Any:
    """A dumped results tree with every string made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value


# ---- Markdown escaping -------------------------------------------------------------------

def escape(text: str, limit: int = 300) -> str:
    """Neutralise untrusted text for a Markdown table cell."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)
    # @mentions and #refs: a zero-width joiner stops GitHub from linking them
    return text.replace("@", "@\u200d")


def code(text: str, limit: int = 200) -> str:
    """Untrusted text as an inline code span: no backticks inside, and no pipe (it would
    still split a table cell)."""
    text = str(text).replace("`", "'").replace("\n", " ").replace("\r", " ").replace("|", "¦")
    return f"`{text[:limit]}`"


def md_value(value: Any, limit: int = 120) -> str:
    """A metric value in Markdown: numbers formatted, text escaped."""
    if isinstance(value, str):
        return escape(value, limit)
    return escape(num(value))


# ---- facts derived from results (all renderers) ------------------------------------------

def check_names(results: Results | None) -> list[str]:
    reports = results.reports if results else []
    return list(dict.fromkeys(c.check for r in reports for c in r.checks))


@dataclass(frozen=True)
class Cell:
    """One model_type x check cell: the verdict over all variants, with counts."""
    verdict: str | None  # None: the check did not run
    bad: int
    total: int


def matrix(report: ModelReport, names: list[str]) -> list[Cell]:
    verdicts = check_verdicts([report])
    runs = Counter(c.check for c in report.checks)
    bad = Counter(c.check for c in report.checks if c.verdict in BAD)
    return [Cell(verdicts.get(name), bad[name], runs[name]) for name in names]


def reach(report: ModelReport, variant: str) -> str:
    """Which configuration a result is about: the config under test, or a named variant."""
    if variant == "default":
        return f"default ({report.source})"
    found = next((v for v in report.variants if v.name == variant), None)
    return f"{variant} ({found.description})" if found else variant


@dataclass(frozen=True)
class Finding:
    model_type: str
    check: CheckResult
    reach: str

    @property
    def row(self) -> LayerRow | None:
        return next((r for r in self.check.layers
                     if r.name == self.check.first_divergent_layer), None)


def findings(results: Results | None) -> list[Finding]:
    """Every failing or erroring check, in report order."""
    return [Finding(r.model_type, c, reach(r, c.variant))
            for r in (results.reports if results else []) for c in r.checks
            if c.verdict in BAD]


def sources(loc: Localization | None) -> list[tuple[str, SourceLocation]]:
    """The localization's source locations, labelled, in reading order."""
    if loc is None:
        return []
    labelled = [("MLX", loc.mlx_source), ("MLX call", loc.mlx_call),
                ("transformers", loc.hf_source)]
    return [(label, where) for label, where in labelled if where is not None]


def location_text(where: SourceLocation) -> str:
    return f"{where.path}:{where.line} ({where.function})"


def blob_url(repo: str, sha: str, where: SourceLocation) -> str | None:
    """The PR's blob at the head SHA for a location in the checked mlx_lm tree (the root
    of an mlx-lm repository holds the mlx_lm package); None for other libraries."""
    if not where.path.startswith("mlx_lm/") or ".." in where.path:
        return None
    safe_repo = re.sub(r"[^A-Za-z0-9_./-]", "", repo)
    safe_sha = re.sub(r"[^0-9a-f]", "", sha)[:40]
    safe_path = re.sub(r"[^A-Za-z0-9_./-]", "", where.path)
    return f"https://github.com/{safe_repo}/blob/{safe_sha}/{safe_path}#L{int(where.line)}"


def divergence_text(finding: Finding) -> str | None:
    """The first divergence of a finding as one plain line: stage, numbers, part, module."""
    check = finding.check
    if not check.first_divergent_layer:
        return None
    text = f"first divergent stage {check.first_divergent_layer}"
    row = finding.row
    if row is not None:
        text += f", rel L2 {num(row.rel_l2)} (tolerance {num(row.tolerance)})"
    if check.localization is not None:
        text += f"; {check.localization.part} {check.localization.module}"
    return text


REACH_LABEL = {"config": "your config", "latent": "latent", "systemic": "systemic",
               None: "–"}
REACH_ORDER = {"config": 0, "systemic": 1, "latent": 2, None: 3}


def reach_counts(results: Results | None) -> dict[str, int]:
    """Findings by reach: the config under test, latent variants and keys, and systemic
    causes (each counted once, however many architectures share it)."""
    found = {"config": 0, "latent": 0, "systemic": 0}
    causes: set[tuple[str, str]] = set()
    for report in results.reports if results else []:
        if report.error:
            found["config"] += 1
        for check in report.checks:
            if check.verdict not in BAD:
                continue
            if check.reach == "systemic":
                causes.add((check.check, check.variant))
            else:
                found[check.reach or "config"] += 1
    found["systemic"] = len(causes)
    return found


def reach_line(results: Results | None) -> str:
    """The summary line: findings on the config under test kept apart from latent ones."""
    counts = reach_counts(results)
    text = (f"your config: {counts['config']} finding(s); latent (variants and keys this "
            f"config does not use): {counts['latent']}")
    if counts["systemic"]:
        text += f"; systemic: {counts['systemic']} cause(s) across architectures"
    return text


def systemic_causes(results: Results | None) -> list[tuple[str, str, list[str]]]:
    """(check, variant, model_types) of each systemic cause, reported once."""
    seen: dict[tuple[str, str], list[str]] = {}
    for report in results.reports if results else []:
        for check in report.checks:
            if check.reach == "systemic" and check.verdict in BAD:
                types = seen.setdefault((check.check, check.variant), [])
                if report.model_type not in types:
                    types.append(report.model_type)
    return [(check, variant, types) for (check, variant), types in seen.items()]


# ---- a PR tree against its base (--base) -------------------------------------------------

CHANGE_MARK = {"new": "**new**", "worse": "**worse**", "fixed": "fixed", "better": "better",
               "unchanged": "unchanged", "added": "added", "gone": "gone"}
CHANGE_ORDER = {"new": 0, "worse": 1, "gone": 2, "fixed": 3, "better": 4, "added": 5,
                "unchanged": 6}


def change_counts(rows: list[DiffRow]) -> str:
    found: dict[str, int] = {}
    for row in rows:
        found[row.change] = found.get(row.change, 0) + 1
    return ", ".join(f"{found[c]} {c}" for c in sorted(found, key=CHANGE_ORDER.get))


def row_change(rows: list[DiffRow]) -> Callable[[str, str, str], str | None]:
    """(model_type, check, variant) -> the most severe change among its rows."""
    worst: dict[tuple[str, str, str], str] = {}
    for row in rows:
        key = (row.model_type, row.check, row.variant)
        if key not in worst or CHANGE_ORDER[row.change] < CHANGE_ORDER[worst[key]]:
            worst[key] = row.change
    return lambda model_type, check, variant: worst.get((model_type, check, variant))


def distance_text(row: DiffRow) -> str:
    if row.distance is None or row.base_distance is None:
        return "–"
    metric = escape(row.distance_metric or "", 40)
    return f"{num(row.base_distance)} → {num(row.distance)} ({metric})"


def md_differential(results: Results | None, limit: int = 60) -> list[str]:
    """The rows the PR changes against base, most severe first; empty without --base."""
    rows = results.differential if results else []
    if not rows:
        return []
    shown = sorted((r for r in rows if r.change != "unchanged"),
                   key=lambda r: (CHANGE_ORDER[r.change], REACH_ORDER[r.reach]))
    lines = [f"Against base: {change_counts(rows)}.", ""]
    if not shown:
        return lines
    lines += ["| change | reach | model_type | variant | check | part | PR | base | "
              "distance base → PR | MLX(PR) vs MLX(base) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in shown[:limit]:
        facts = "; ".join(row.facts)
        lines.append(
            f"| {CHANGE_MARK[row.change]} | {REACH_LABEL[row.reach]} | "
            f"{code(row.model_type, 64)} | {escape(row.variant, 64)} | {escape(row.check, 32)} | "
            f"{escape(row.part or '', 40)} | {VERDICT_MARK[row.verdict]} | "
            f"{VERDICT_MARK[row.base_verdict] if row.base_verdict else '–'} | "
            f"{distance_text(row)} | {escape(facts, 300) or '–'} |")
    if len(shown) > limit:
        lines.append(f"| … | {len(shown) - limit} more rows | | | | | | | | |")
    return lines


# ---- Markdown tables (CLI report and PR comment) -----------------------------------------

def md_matrix(results: Results | None, errors: dict[str, str] | None = None,
              skipped: list[str] | None = None) -> list[str]:
    """One row per model_type, one column per check: the verdict over all variants and
    runs of that check, with the count of non-passing ones."""
    reports = results.reports if results else []
    names = check_names(results)
    lines = ["| model_type | " + " | ".join(escape(n, 32) for n in names) + " |",
             "|---|" + "---|" * len(names)]
    if not names:
        lines = ["| model_type | verdict |", "|---|---|"]
    for report in reports:
        cells = [("–" if c.verdict is None else
                  f"{VERDICT_MARK[c.verdict]} {c.bad}/{c.total}" if c.bad else
                  VERDICT_MARK[c.verdict]) for c in matrix(report, names)]
        if report.error or not names:
            cells = [VERDICT_MARK[report.verdict]] + ["–"] * (len(names) - 1)
        lines.append(f"| {code(report.model_type, 64)} | " + " | ".join(cells) + " |")
    for model_type in errors or {}:
        cells = [f"{VERDICT_MARK['error']} could not run"] + ["–"] * (len(names) - 1)
        lines.append(f"| {code(model_type, 64)} | " + " | ".join(cells) + " |")
    for model_type in skipped or []:
        cells = [f"{VERDICT_MARK['skip']} not in transformers"] + ["–"] * (len(names) - 1)
        lines.append(f"| {code(model_type, 64)} | " + " | ".join(cells) + " |")
    return lines


# marker(model_type, verdict, check, variant) -> the "vs base" cell, or None for no column
Marker = Callable[[str, str, str, str], str]


def md_verdict_rows(results: Results | None, summary_limit: int = 300,
                    only_findings: bool = False, errors: dict[str, str] | None = None,
                    skipped: list[str] | None = None, marker: Marker | None = None
                    ) -> list[str]:
    """The verdict table, one row per check run; with a marker, a "vs base" column."""
    def base(model_type: str, verdict: str, check: str = "", variant: str = "") -> str:
        return "" if marker is None else f" {marker(model_type, verdict, check, variant)} |"

    # led by reach: what concerns the config under test comes first
    lines = ["| reach | model_type | variant | check | verdict | summary |",
             "|---|---|---|---|---|---|"]
    if marker is not None:
        lines = ["| reach | model_type | variant | check | verdict | vs base | summary |",
                 "|---|---|---|---|---|---|---|"]
    rows: list[tuple[int, str]] = []
    for report in results.reports if results else []:
        if report.error:
            rows.append((0, f"| {REACH_LABEL['config']} | {code(report.model_type, 64)} | – | – | "
                            f"{VERDICT_MARK['error']} |{base(report.model_type, 'error')} "
                            f"{escape(report.error, summary_limit)} |"))
        for check in report.checks:
            if only_findings and check.verdict not in BAD:
                continue
            rows.append((REACH_ORDER[check.reach] if only_findings else 0,
                         f"| {REACH_LABEL[check.reach]} | {code(report.model_type, 64)} | "
                         f"{escape(check.variant, 64)} | "
                         f"{escape(check.check, 64)} | {VERDICT_MARK[check.verdict]} |"
                         f"{base(report.model_type, check.verdict, check.check, check.variant)} "
                         f"{escape(check.summary, summary_limit)} |"))
    lines += [line for _, line in sorted(rows, key=lambda r: r[0])]
    for model_type, line in (errors or {}).items():
        new = " **new** |" if marker is not None else ""  # nothing to compare
        lines.append(f"| {REACH_LABEL['config']} | {code(model_type, 64)} | – | – | "
                     f"{VERDICT_MARK['error']} |{new} "
                     f"could not run: {escape(line, summary_limit)} |")
    for model_type in [] if only_findings else skipped or []:
        lines.append(f"| – | {code(model_type, 64)} | – | – | {VERDICT_MARK['skip']} |"
                     f"{' – |' if marker is not None else ''} "
                     "not a transformers model_type |")
    return lines


# link(location) -> URL or None: where a source location can be opened
Linker = Callable[[SourceLocation], str | None]


def md_location(where: SourceLocation, link: Linker | None = None) -> str:
    text = code(f"{where.path}:{where.line}", 160)
    url = link(where) if link is not None else None
    shown = f"[{text}]({url})" if url else text
    return f"{shown} {code(where.function, 80)}"


def md_sources(loc: Localization | None, link: Linker | None = None) -> str:
    return "; ".join(f"{label} {md_location(where, link)}" for label, where in sources(loc))


def md_first_divergences(results: Results | None, link: Linker | None = None) -> list[str]:
    """One line per failing check with a first divergent stage: numbers, part, module and
    the source locations."""
    lines = []
    for finding in findings(results):
        check = finding.check
        if check.verdict != "fail" or not check.first_divergent_layer:
            continue
        row = finding.row
        text = (f"- {code(finding.model_type, 64)} {escape(check.check, 64)} / "
                f"{escape(check.variant, 64)}: first divergent stage "
                f"**{escape(check.first_divergent_layer, 64)}**")
        if row is not None:
            text += (f", rel L2 {md_value(row.rel_l2)} (tolerance {md_value(row.tolerance)}), "
                     f"cosine {md_value(row.cosine)}, max abs {md_value(row.max_abs)}")
        if check.localization is not None:
            loc = check.localization
            text += f"; part **{escape(loc.part, 32)}**, module {code(loc.module, 120)}"
            where = md_sources(loc, link)
            if where:
                text += f"; {where}"
        lines.append(text)
    return lines


def md_layer_table(check: CheckResult, limit: int = 200) -> list[str]:
    lines = ["| stage | type | rel L2 | cosine | max abs | tolerance | ok |",
             "|---|---|---|---|---|---|---|"]
    for row in check.layers[:limit]:
        mark = "✅" if row.ok else "❌"
        if row.name == check.first_divergent_layer:
            mark += " first"
        lines.append(f"| {escape(row.name, 48)} | {escape(row.layer_type or '', 32)} | "
                     f"{md_value(row.rel_l2)} | {cosine(row.cosine)} | {md_value(row.max_abs)} | "
                     f"{md_value(row.tolerance)} | {mark} |")
    return lines


def config_fields(check: CheckResult) -> list[tuple[str, SourceLocation]]:
    """(key, where its ModelArgs declares it, or the class that lacks it) for each config
    key the `config` check found MLX not to honour."""
    if check.check != "config":
        return []
    out = []
    for row in check.details.get("keys", []):
        if isinstance(row, dict) and row.get("fact") and row.get("key") in \
                {p.split(":", 1)[0] for p in check.details.get("problems", [])}:
            try:
                where = SourceLocation.model_validate(row.get("mlx_field"))
            except ValueError:
                continue
            out.append((str(row["key"]), where))
    return out[:20]


def md_check_details(model_type: str, check: CheckResult, chart: list[str] | None = None,
                     link: Linker | None = None) -> list[str]:
    """Everything about one check: localization and its sources, facts, weights, metrics,
    an optional chart and the per-stage table."""
    lines = [f"#### {escape(model_type, 64)} / {escape(check.check, 64)} / "
             f"{escape(check.variant, 64)}: {VERDICT_MARK[check.verdict]}", ""]
    if check.localization is not None:
        loc = check.localization
        stage = check.first_divergent_layer or loc.stage
        lines.append(f"- first divergence: **{escape(stage, 64)}**, part "
                     f"**{escape(loc.part, 32)}**, module {code(loc.module, 120)}")
        for label, where in sources(loc):
            lines.append(f"  - {label}: {md_location(where, link)}")
        for fact in loc.facts[:20]:
            lines.append(f"- {escape(fact)}")
    for key, where in config_fields(check):
        lines.append(f"- config key {code(key, 80)}: ModelArgs {md_location(where, link)}")
    if check.weights is not None:
        for label, names in (("missing", check.weights.missing),
                             ("unexpected", check.weights.unexpected),
                             ("mis-shaped", check.weights.mismatched)):
            if names:
                shown = ", ".join(code(n, 120) for n in names[:10])
                more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
                lines.append(f"- {label} weights ({len(names)}): {shown}{more}")
    metrics = [(k, v) for k, v in check.metrics.items() if v is not None][:40]
    if metrics:
        lines.append("- " + ", ".join(f"{escape(k, 48)} {md_value(v)}" for k, v in metrics))
    if check.layers:
        lines.append("")
        if chart:
            lines.extend(chart)
            lines.append("")
        lines.extend(md_layer_table(check))
    lines.append("")
    return lines


# ---- the per-layer chart (SVG coordinates, for the dashboard and the HTML report) --------

CHART_W, CHART_H = 720, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 16, 64
FLOOR = 1e-12  # rel_l2 of exactly 0 is drawn at the floor (log scale)


def layer_chart(check: CheckResult) -> dict[str, Any]:
    """Coordinates for the inline SVG: one point per stage, log10 y axis."""
    rows = check.layers
    values = [max(r.rel_l2, FLOOR) if math.isfinite(r.rel_l2) else 1e6 for r in rows]
    tols = [max(r.tolerance, FLOOR) for r in rows]
    logs = [math.log10(v) for v in values + tols]
    low, high = math.floor(min(logs)) - 1, math.ceil(max(logs)) + 1
    plot_w, plot_h = CHART_W - MARGIN_L - MARGIN_R, CHART_H - MARGIN_T - MARGIN_B

    def x(i: int) -> float:
        return MARGIN_L + (plot_w * (i + 0.5) / max(len(rows), 1))

    def y(v: float) -> float:
        return MARGIN_T + plot_h * (high - math.log10(v)) / (high - low)

    step = max(1, (high - low) // 6)
    ticks = [{"y": round(y(10.0 ** e), 1), "label": f"1e{e}"}
             for e in range(low, high + 1, step)]
    every = max(1, math.ceil(len(rows) / 24))  # at most ~24 x labels
    points = [{"x": round(x(i), 1), "y": round(y(v), 1), "name": r.name, "ok": r.ok,
               "rel_l2": r.rel_l2, "tolerance": r.tolerance, "label": i % every == 0,
               "first": r.name == check.first_divergent_layer}
              for i, (r, v) in enumerate(zip(rows, values, strict=True))]
    tolerance = " ".join(f"{round(x(i), 1)},{round(y(t), 1)}" for i, t in enumerate(tols))
    if len(rows) == 1:  # a single point: draw the tolerance across the plot
        tolerance = f"{MARGIN_L},{round(y(tols[0]), 1)} {CHART_W - MARGIN_R},{round(y(tols[0]), 1)}"
    first = next((p for p in points if p["first"]), None)
    return {"w": CHART_W, "h": CHART_H, "left": MARGIN_L, "right": CHART_W - MARGIN_R,
            "top": MARGIN_T, "bottom": CHART_H - MARGIN_B, "points": points,
            "line": " ".join(f"{p['x']},{p['y']}" for p in points), "tolerance": tolerance,
            "ticks": ticks, "first": first}


# ---- generic rendering of metrics/details whose shape is not known (HTML) ------------

def shape(value: Any, depth: int = 0) -> dict[str, Any]:
    """A tree the template renders without knowing the check: scalars, lists of scalars,
    tables (lists of flat dicts), mappings. Depth- and size-capped."""
    if depth > 4:
        return {"kind": "scalar", "value": json.dumps(value, default=str)[:300]}
    if isinstance(value, dict | list) and not value:
        return {"kind": "scalar", "value": "(none)"}
    if isinstance(value, dict):
        items = list(value.items())[:200]
        if items and all(isinstance(v, dict) and all(not isinstance(x, dict | list)
                                                     for x in v.values())
                         for _, v in items):
            columns = list(dict.fromkeys(k for _, v in items for k in v))
            return {"kind": "table", "columns": ["", *columns],
                    "rows": [[str(k), *[num(v.get(c)) for c in columns]]
                             for k, v in items]}
        return {"kind": "map", "entries": [(str(k), shape(v, depth + 1)) for k, v in items],
                "more": max(0, len(value) - 200)}
    if isinstance(value, list):
        items = value[:200]
        if items and all(isinstance(v, dict) and all(not isinstance(x, dict | list)
                                                     for x in v.values()) for v in items):
            columns = list(dict.fromkeys(k for v in items for k in v))
            return {"kind": "table", "columns": columns,
                    "rows": [[num(v.get(c)) for c in columns] for v in items],
                    "more": max(0, len(value) - 200)}
        if all(not isinstance(v, dict | list) for v in items):
            return {"kind": "list", "entries": [num(v) for v in items],
                    "more": max(0, len(value) - 200)}
        return {"kind": "seq", "entries": [shape(v, depth + 1) for v in items],
                "more": max(0, len(value) - 200)}
    text = num(value)
    return {"kind": "scalar", "value": text[:2000]}


def paired_lists(details: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Lists that come in pairs, mlx_X next to transformers_X (generated tokens, say),
    as side-by-side rows; the rest of details unchanged."""
    pairs, rest = [], dict(details)
    for key, value in details.items():
        other = "transformers_" + key.removeprefix("mlx_")
        if key.startswith("mlx_") and isinstance(value, list) and \
                isinstance(details.get(other), list):
            theirs = details[other]
            rows = [{"i": i, "mlx": num(value[i]) if i < len(value) else "–",
                     "transformers": num(theirs[i]) if i < len(theirs) else "–",
                     "same": i < len(value) and i < len(theirs) and value[i] == theirs[i]}
                    for i in range(min(max(len(value), len(theirs)), 500))]
            pairs.append({"name": key.removeprefix("mlx_"), "rows": rows})
            rest.pop(key)
            rest.pop(other)
    return pairs, rest
