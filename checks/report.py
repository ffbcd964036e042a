"""Markdown rendering of Results, shaped like the PR review comment: verdict table first,
details collapsed, the per-layer table, the command that reproduces the run.

Only numbers and facts from the results; text that came from the checked code
(error messages, model names) is escaped so it cannot ping, inject HTML or break
out of the table.
"""

from __future__ import annotations

import json
import re

from .schema import CheckResult, ModelReport, Results

VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "⚠️ error", "skip": "➖ skip"}


def escape(text: str, limit: int = 300) -> str:
    """Neutralise untrusted text for a Markdown table cell."""
    text = text.replace("\r", " ").replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)
    # @mentions and #refs: a zero-width joiner stops GitHub from linking them
    return text.replace("@", "@\u200d")


def code(text: str, limit: int = 200) -> str:
    """Untrusted text as an inline code span: no escapes needed inside, but no backticks."""
    text = text.replace("`", "'").replace("\n", " ").replace("\r", " ")
    return f"`{text[:limit]}`"


def _num(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}"


def verdict_table(results: Results) -> list[str]:
    lines = ["| model_type | variant | check | verdict | summary |", "|---|---|---|---|---|"]
    for report in results.reports:
        if report.error:
            lines.append(f"| {code(report.model_type)} | – | – | {VERDICT_MARK['error']} | "
                         f"{escape(report.error)} |")
        for check in report.checks:
            lines.append(f"| {code(report.model_type)} | {escape(check.variant)} | "
                         f"{check.check} | {VERDICT_MARK[check.verdict]} | "
                         f"{escape(check.summary)} |")
    return lines


def layer_table(check: CheckResult) -> list[str]:
    lines = ["| stage | type | rel L2 | cosine | max abs | max abs / max ref | ok |",
             "|---|---|---|---|---|---|---|"]
    for row in check.layers:
        mark = "✅" if row.ok else "❌"
        if check.first_divergent_layer == row.name:
            mark += " first"
        lines.append(f"| {row.name} | {escape(row.layer_type or '')} | {_num(row.rel_l2)} | "
                     f"{row.cosine:.6f} | {_num(row.max_abs)} | {_num(row.max_abs_rel)} | {mark} |")
    return lines


def check_details(check: CheckResult) -> list[str]:
    lines = []
    if check.localization is not None:
        loc = check.localization
        lines.append(f"- first divergence: **{check.first_divergent_layer}**, part "
                     f"**{loc.part}**, module {code(loc.module)}")
        for fact in loc.facts:
            lines.append(f"  - {escape(fact)}")
    if check.weights is not None:
        for label, names in (("missing", check.weights.missing),
                             ("unexpected", check.weights.unexpected),
                             ("mis-shaped", check.weights.mismatched)):
            if names:
                shown = ", ".join(code(n, 160) for n in names[:20])
                more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
                lines.append(f"- {label} weights ({len(names)}): {shown}{more}")
    metrics = {k: v for k, v in check.metrics.items() if v is not None}
    if metrics:
        lines.append("- metrics: " + ", ".join(
            f"{k} {_num(v) if isinstance(v, float) else escape(str(v))}"
            for k, v in metrics.items()))
    if check.layers:
        lines.append("")
        lines.extend(layer_table(check))
    return lines


def model_section(report: ModelReport) -> list[str]:
    lines = [f"<details><summary><b>{escape(report.model_type)}</b>: "
             f"{VERDICT_MARK[report.verdict]}</summary>", ""]
    lines.append(f"- source: {escape(report.source)}; seed {report.seed}; dtype {report.dtype}")
    for variant in report.variants:
        lines.append(f"- variant {code(variant.name)}: {escape(variant.description)} "
                     f"(config format: {variant.config_format})")
    if report.config_diff:
        lines.append(f"- config keys that differ between the sources ({len(report.config_diff)}):")
        for key, values in list(report.config_diff.items())[:40]:
            shown = "; ".join(f"{escape(name, 80)}: {code(json.dumps(value), 80)}"
                              for name, value in values.items())
            lines.append(f"  - {code(key)}: {shown}")
    for check in report.checks:
        lines.append("")
        lines.append(f"#### {check.check} / {escape(check.variant)}: "
                     f"{VERDICT_MARK[check.verdict]}")
        lines.append("")
        lines.extend(check_details(check))
    lines.extend(["", "</details>", ""])
    return lines


def render(results: Results) -> str:
    env = results.environment
    lines = [f"### mlx-verify: {VERDICT_MARK[results.verdict]}", ""]
    lines.extend(verdict_table(results))
    lines.append("")
    for report in results.reports:
        lines.extend(model_section(report))
    sha = f" @ {env.mlx_lm_git_sha[:12]}" if env.mlx_lm_git_sha else ""
    lines.extend([
        "<details><summary>environment and reproduction</summary>", "",
        f"- mlx-lm {escape(env.mlx_lm_version)}{sha} from {code(env.mlx_lm_path)}",
        f"- mlx {env.mlx} ({env.mlx_device}{', BLAS ' + escape(env.blas) if env.blas else ''}), "
        f"torch {env.torch}, transformers "
        f"{env.transformers}, python {env.python}, {escape(env.platform)}",
        f"- mlx-verify {env.mlx_verify}, results schema v{results.schema_version}",
        "", "```", results.command.replace("`", "'"), "```", "", "</details>", "",
    ])
    return "\n".join(lines)
