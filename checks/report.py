"""Markdown rendering of Results, shaped like the PR review comment (the same tables, from
checks/render.py): verdict matrix, findings, first divergences with their source
locations, details collapsed per model_type, the command that reproduces the run.
"""

from __future__ import annotations

import json

from . import render as shared
from .render import VERDICT_MARK, code, escape
from .schema import ModelReport, Results


def model_section(report: ModelReport) -> list[str]:
    lines = [f"<details><summary><b>{escape(report.model_type)}</b>: "
             f"{VERDICT_MARK[report.verdict]}</summary>", ""]
    lines.append(f"- source: {escape(report.source)}; seed {report.seed}; "
                 f"dtype {escape(report.dtype, 16)}")
    if report.error:
        lines.append(f"- could not run: {escape(report.error)}")
    for variant in report.variants:
        lines.append(f"- variant {code(variant.name)}: {escape(variant.description)} "
                     f"(config format: {escape(variant.config_format, 32)})")
    if report.config_diff:
        lines.append(f"- config keys that differ between the sources ({len(report.config_diff)}):")
        for key, values in list(report.config_diff.items())[:40]:
            shown = "; ".join(f"{escape(name, 80)}: {code(json.dumps(value), 80)}"
                              for name, value in values.items())
            lines.append(f"  - {code(key)}: {shown}")
    lines.append("")
    for check in sorted(report.checks, key=lambda c: c.verdict not in shared.BAD):
        lines.extend(shared.md_check_details(report.model_type, check))
    lines.extend(["</details>", ""])
    return lines


def environment_lines(results: Results) -> list[str]:
    env = results.environment
    sha = f" @ {env.mlx_lm_git_sha[:12]}" if env.mlx_lm_git_sha else ""
    blas = f", BLAS {escape(env.blas)}" if env.blas else ""
    return [
        f"- mlx-lm {escape(env.mlx_lm_version)}{sha} from {code(env.mlx_lm_path)}",
        f"- mlx {escape(env.mlx)} ({escape(env.mlx_device)}{blas}), torch {escape(env.torch)}, "
        f"transformers {escape(env.transformers)}, python {escape(env.python)}, "
        f"{escape(env.platform)}",
        f"- mlx-verify {escape(env.mlx_verify)}, results schema v{results.schema_version}"
        + (f"; lock {escape(env.lock)}" if env.lock else ""),
    ]


def render(results: Results) -> str:
    lines = [f"### mlx-verify: {VERDICT_MARK[results.verdict]}", "",
             escape(shared.reach_line(results)), ""]
    differential = shared.md_differential(results)
    if differential:
        base = results.base_environment
        where = f" ({code(base.mlx_lm_path)})" if base else ""
        lines.extend([f"**Against the base tree**{where}", ""] + differential + [""])
    lines.extend(shared.md_matrix(results) + [""])
    for check, variant, types in shared.systemic_causes(results):
        lines.append(f"- systemic: {escape(check)} on variant {code(variant)} fails in "
                     f"{len(types)} model_types: {', '.join(code(t, 64) for t in types)}")
    marker = None
    if results.differential:
        change = shared.row_change(results.differential)

        def marker(model_type: str, verdict: str, check: str, variant: str) -> str:
            found = change(model_type, check, variant)
            return shared.CHANGE_MARK[found] if found else "–"
    findings = shared.md_verdict_rows(results, only_findings=True, marker=marker)
    if len(findings) > 2:
        lines.extend(["**Findings**", ""] + findings + [""])
    divergences = shared.md_first_divergences(results)
    if divergences:
        lines.extend(["**First divergence**", ""] + divergences + [""])
    lines.extend(["<details><summary>every check</summary>", ""]
                 + shared.md_verdict_rows(results) + ["", "</details>", ""])
    for report in results.reports:
        lines.extend(model_section(report))
    lines.extend(["<details><summary>environment and reproduction</summary>", ""]
                 + environment_lines(results)
                 + ["", "```", results.command.replace("`", "'"), "```", "", "</details>", ""])
    return "\n".join(lines)
