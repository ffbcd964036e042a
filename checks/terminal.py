"""The terminal report of `mlx-verify check`: a verdict matrix (model_type x check), then
one line per finding with its reach (the config under test or a named variant) and its
first divergence, with the source location under it. `-v` adds every check and, for each
finding, its facts, metrics and per-stage table.

rich draws it: colour and the terminal's width on a TTY; piped, plain text with no
escape codes and ASCII table rules. Numbers and tables come from checks/render.py like
every other report.
"""

from __future__ import annotations

import os
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import render as shared
from .schema import CheckResult, Localization, Results

STYLE = {"pass": "green", "fail": "bold red", "error": "bold yellow", "skip": "dim"}
SIGN = {"pass": "ok", "fail": "FAIL", "error": "ERROR", "skip": "skip"}
MAX_GROUPS = 24  # finding lines before "… and N more" without -v


def console(file: IO[str], tty: bool) -> Console:
    if tty:
        return Console(file=file, force_terminal=True, highlight=False)
    # piped: no escape codes, and lines as long as the facts need
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() else 160
    return Console(file=file, force_terminal=False, no_color=True, highlight=False,
                   width=max(width, 80), emoji=False, soft_wrap=True)


def _verdict(verdict: str | None, bad: int = 0, total: int = 0) -> Text:
    if verdict is None:
        return Text("–", style="dim")
    text = SIGN[verdict] + (f" {bad}/{total}" if bad else "")
    return Text(text, style=STYLE[verdict])


def matrix_table(results: Results, tty: bool) -> Table:
    names = shared.check_names(results)
    table = Table(box=box.SIMPLE_HEAD if tty else box.ASCII2, show_edge=False, pad_edge=False,
                  header_style="bold")
    table.add_column("model_type")
    for name in names:
        table.add_column(name)
    for report in results.reports:
        if report.error or not names:
            table.add_row(Text(report.model_type), _verdict(report.verdict),
                          *[Text("–", style="dim")] * max(len(names) - 1, 0))
            continue
        table.add_row(Text(report.model_type),
                      *[_verdict(c.verdict, c.bad, c.total) for c in shared.matrix(report, names)])
    return table


def _groups(results: Results) -> list[tuple[shared.Finding, list[str], int]]:
    """Findings grouped: the failing rows of one (model_type, check, variant) are one line
    (the rope check runs several position ranges), and variants whose first row diverges
    at the same stage and module are one line too. (first finding, variants, rows)."""
    by_variant: dict[tuple[str, str, str], list[shared.Finding]] = {}
    for finding in shared.findings(results):
        key = (finding.model_type, finding.check.check, finding.check.variant)
        by_variant.setdefault(key, []).append(finding)
    groups: dict[tuple[str, ...], tuple[shared.Finding, list[str], int]] = {}
    for (model_type, check, variant), found in by_variant.items():
        loc = found[0].check.localization
        key = (model_type, check, "loc", found[0].check.first_divergent_layer or "",
               loc.part, loc.module) if loc else (model_type, check, "variant", variant)
        first, variants, rows = groups.get(key, (found[0], [], 0))
        groups[key] = (first, variants + [variant], rows + len(found))
    return list(groups.values())


def where_text(loc: Localization | None) -> str | None:
    """The source lines on one line, file:line first (the function after it, cut first on
    a narrow terminal): the MLX call, the MLX method when it is another function, then
    transformers. -v shows all three in full."""
    if loc is None:
        return None
    shown = [loc.mlx_call] if loc.mlx_call is not None else []
    if loc.mlx_source is not None and (loc.mlx_call is None or
                                       loc.mlx_source.function != loc.mlx_call.function):
        shown.append(loc.mlx_source)
    if loc.hf_source is not None:
        shown.append(loc.hf_source)
    return " · ".join(f"{w.path}:{w.line} {w.function}" for w in shown) or None


def divergence(finding: shared.Finding) -> str:
    """The first divergence, most telling first: where, then by how much."""
    check, row, loc = finding.check, finding.row, finding.check.localization
    text = f"diverges at {check.first_divergent_layer or loc.stage}, {loc.part} {loc.module}"
    if row is not None:
        text += f", rel L2 {shared.num(row.rel_l2)} > {shared.num(row.tolerance)}"
    return text


def finding_lines(finding: shared.Finding, variants: list[str], rows: int,
                  verbose: bool = False) -> list[Text]:
    check = finding.check
    line = Text()
    line.append("✗ " if check.verdict == "fail" else "! ", style=STYLE[check.verdict])
    line.append(f"{finding.model_type} {check.check}", style="bold")
    # the reach: "default" is the config the header names; a variant by its name (-v:
    # with its description)
    reach = finding.reach if verbose else (
        "default config" if check.variant == "default" else check.variant)
    if check.reach in ("latent", "systemic"):
        reach += f" [{check.reach}]"
    if len(variants) > 1:
        reach = f"{len(variants)} configs: {', '.join(variants)}"
    line.append(f"  {reach}", style="cyan")
    line.append(": ")
    loc = check.localization
    line.append(divergence(finding) if loc is not None else check.summary)
    if rows > len(variants):
        line.append(f" ({rows} rows)", style="dim")
    lines = [line]
    where = where_text(loc)
    if where:
        lines.append(Text("    " + where, style="dim"))
    return lines


def stage_table(check: CheckResult, tty: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD if tty else box.ASCII2, show_edge=False,
                  pad_edge=False, header_style="bold")
    for name in ("stage", "type", "rel L2", "cosine", "max abs", "tolerance", "ok"):
        table.add_column(name, justify="right" if name not in ("stage", "type") else "left")
    for row in check.layers:
        first = row.name == check.first_divergent_layer
        # Text, never str: rich would read a str cell as markup (the names are untrusted)
        table.add_row(Text(row.name), Text(row.layer_type or ""), shared.num(row.rel_l2),
                      shared.cosine(row.cosine), shared.num(row.max_abs),
                      shared.num(row.tolerance),
                      Text(("ok" if row.ok else "NO") + (" first" if first else ""),
                           style="green" if row.ok else "bold red"))
    return table


def details(out: Console, model_type: str, check: CheckResult, tty: bool) -> None:
    out.print(Text(f"{model_type} / {check.check} / {check.variant}: ", style="bold")
              + _verdict(check.verdict))
    out.print(Text("  " + check.summary))
    loc = check.localization
    if loc is not None:
        out.print(Text(f"  localized: stage {loc.stage}, part {loc.part}, module {loc.module}"))
        for label, where in shared.sources(loc):
            out.print(Text(f"  {label}: {shared.location_text(where)}"))
        for fact in loc.facts:
            out.print(Text(f"  - {fact}"))
    if check.weights is not None:
        for label, names in (("missing", check.weights.missing),
                             ("unexpected", check.weights.unexpected),
                             ("mis-shaped", check.weights.mismatched)):
            if names:
                out.print(Text(f"  {label} weights ({len(names)}): " + ", ".join(names[:20])))
    metrics = [(k, v) for k, v in check.metrics.items() if v is not None]
    if metrics:
        out.print(Text("  metrics: " + ", ".join(f"{k} {shared.num(v)}" for k, v in metrics),
                       style="dim"))
    if check.layers:
        out.print(stage_table(check, tty))
    out.print()


CHANGE_STYLE = {"new": "bold red", "worse": "bold red", "gone": "yellow", "fixed": "green",
                "better": "green", "added": "dim", "unchanged": "dim"}


def differential(out: Console, results: Results, verbose: bool) -> None:
    """The PR tree against its base: counts, then each changed row (new and worse first)."""
    rows = results.differential
    base = results.base_environment
    out.print(Text("against base ", style="bold") + Text(base.mlx_lm_path if base else "")
              + Text(f": {shared.change_counts(rows)}"))
    changed = sorted((r for r in rows if r.change != "unchanged"),
                     key=lambda r: (shared.CHANGE_ORDER[r.change], shared.REACH_ORDER[r.reach]))
    for row in changed if verbose else changed[:MAX_GROUPS]:
        line = Text(f"  {row.change:<6} ", style=CHANGE_STYLE[row.change])
        line.append(f"{row.model_type} {row.check}", style="bold")
        line.append(f" {row.variant}{' ' + row.part if row.part else ''}", style="cyan")
        line.append(f" [{shared.REACH_LABEL[row.reach]}]: {row.base_verdict or '–'} → "
                    f"{row.verdict}")
        if row.distance is not None and row.base_distance is not None:
            line.append(f", {row.distance_metric} {shared.num(row.base_distance)} → "
                        f"{shared.num(row.distance)}")
        if row.facts:
            line.append("; " + "; ".join(row.facts), style="dim")
        out.print(line)
    if not verbose and len(changed) > MAX_GROUPS:
        out.print(Text(f"  … and {len(changed) - MAX_GROUPS} more (-v for all)", style="dim"))


def every_check(results: Results, tty: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD if tty else box.ASCII2, show_edge=False,
                  pad_edge=False, header_style="bold")
    for name in ("model_type", "variant", "check", "verdict", "summary"):
        table.add_column(name, overflow="fold")
    for report in results.reports:
        for check in report.checks:
            table.add_row(Text(report.model_type), Text(check.variant), Text(check.check),
                          _verdict(check.verdict), Text(check.summary))
    return table


def render(results: Results, file: IO[str], tty: bool, verbose: bool = False) -> None:
    # every string of the results may come from untrusted code: no control characters
    # reach the terminal (rich would pass an ESC through), and Text is never markup
    results = Results.model_validate(shared.scrubbed(results.model_dump()))
    out = console(file, tty)
    env = results.environment
    reports = results.reports
    failing = sum(r.verdict in shared.BAD for r in reports)
    head = Text("mlx-verify: ", style="bold") + _verdict(results.verdict)
    head.append(f"  {failing} of {len(reports)} model_types with findings" if failing
                else f"  {len(reports)} model_types pass")
    out.print(head)
    sha = f" @ {env.mlx_lm_git_sha[:12]}" if env.mlx_lm_git_sha else ""
    out.print(Text(f"mlx-lm {env.mlx_lm_version}{sha} from {env.mlx_lm_path}; transformers "
                   f"{env.transformers}, mlx {env.mlx} ({env.mlx_device}), torch {env.torch}"
                   + (f"; lock {env.lock}" if env.lock else ""),
                   style="dim"))
    sources = sorted({f"{r.source}, {r.dtype}, seed {r.seed}" for r in reports})
    if sources:
        out.print(Text("config: " + "; ".join(sources), style="dim"))
    out.print(Text(shared.reach_line(results)))
    if results.differential:
        differential(out, results, verbose)
    out.print()
    out.print(matrix_table(results, tty))
    for check, variant, types in shared.systemic_causes(results):
        out.print(Text(f"systemic: {check} on variant {variant} fails in {len(types)} "
                       f"model_types: {', '.join(types)}", style="cyan"))

    errors = [r for r in reports if r.error]
    groups = _groups(results)
    if not verbose:  # a systemic cause is the one "systemic:" line above, not a line a type
        groups = [g for g in groups if g[0].check.reach != "systemic"]
    if errors or groups:
        out.print(Text(f"Findings ({len(groups) + len(errors)})", style="bold"))
    for report in errors:
        out.print(Text("! ", style=STYLE["error"]) + Text(report.model_type, style="bold")
                  + Text(f": could not run: {report.error}"))
    shown = groups if verbose else groups[:MAX_GROUPS]
    for finding, variants, rows in shown:
        for line in finding_lines(finding, variants, rows, verbose):
            if tty and not verbose:  # one screen line each; piped lines are never cut
                out.print(line, no_wrap=True, overflow="ellipsis", crop=True)
            else:
                out.print(line)
    if len(shown) < len(groups):
        out.print(Text(f"… and {len(groups) - len(shown)} more (-v for all)", style="dim"))
    if verbose:
        out.print()
        out.print(Text("Every check", style="bold"))
        out.print(every_check(results, tty))
        for report in reports:
            for check in report.checks:
                if check.verdict in shared.BAD:
                    details(out, report.model_type, check, tty)
    out.print()
    out.print(Text("reproduce: ", style="dim") + Text(results.command))
    if not verbose and groups:
        out.print(Text("-v: every check and the per-stage tables; --html FILE: a page to "
                       "share; --markdown -: the PR comment's format", style="dim"))
