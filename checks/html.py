"""The standalone HTML report: one file with inline CSS and inline SVG charts, no script and
no request to anywhere, so it opens offline and can be attached or mailed as it is.

Shaped like the dashboard's run page (the same chart, numbers and generic tables from
checks/render.py), plus what a reader looks for first: the verdict matrix, the findings
with their reach, first divergence and source locations, the RoPE and dtype facts, the
generation and quantization tables, and the command that reproduces the run. jinja2
autoescapes every string (results may carry text from untrusted code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from . import render as shared
from .schema import Results

TEMPLATES = Path(__file__).with_name("templates")


def _checks(results: Results, name: str):
    for report in results.reports:
        for check in report.checks:
            if check.check == name:
                yield report, check


def rope_rows(results: Results) -> list[dict[str, Any]]:
    """The rotation each side applies, per layer, as the rope check measured it."""
    rows = []
    for report, check in _checks(results, "rope"):
        per_layer = check.details.get("per_layer")
        if not isinstance(per_layer, dict):
            continue
        for layer, sides in per_layer.items():
            if not isinstance(sides, dict):
                continue
            for side in ("mlx", "transformers"):
                measured = sides.get(side)
                if not isinstance(measured, dict):
                    continue
                freqs = measured.get("freqs") or []
                rows.append({
                    "model_type": report.model_type, "variant": check.variant,
                    "layer": layer, "side": "MLX" if side == "mlx" else side,
                    "module": measured.get("module"), "dims": measured.get("rotated_dims"),
                    "layout": measured.get("layout"), "scale": measured.get("scale"),
                    "freqs": ", ".join(shared.num(f) for f in freqs[:4])
                    + (" …" if len(freqs) > 4 else ""),
                    "freq_diff": sides.get("max_freq_rel_diff"), "verdict": check.verdict,
                })
    return rows


def dtype_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for report, check in _checks(results, "dtype"):
        m = check.metrics
        rows.append({
            "model_type": report.model_type, "variant": check.variant,
            "dtype": m.get("dtype"), "checkpoint": m.get("checkpoint_dtype"),
            "source": m.get("checkpoint_dtype_source"), "parameters": m.get("parameters"),
            "off_dtype": m.get("parameters_not_in_dtype"), "logits": m.get("logits_dtype"),
            "first_non_half": m.get("first_non_half_stage"), "max_rel_l2": m.get("max_rel_l2"),
            "tolerance": m.get("tolerance_rel_l2"), "hf_half": m.get("hf_half_max_rel_l2"),
            "verdict": check.verdict, "summary": check.summary,
        })
    return rows


def generation_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for report, check in _checks(results, "generation"):
        tokens = []
        mlx, ref = check.details.get("mlx_tokens"), check.details.get("transformers_tokens")
        if isinstance(mlx, list) and isinstance(ref, list):
            tokens = [{"i": i, "mlx": mlx[i] if i < len(mlx) else None,
                       "transformers": ref[i] if i < len(ref) else None}
                      for i in range(min(max(len(mlx), len(ref)), 64))]
        rows.append({"model_type": report.model_type, "variant": check.variant,
                     "part": check.details.get("part") or check.metrics.get("check_part"),
                     "steps": check.metrics.get("steps"), "verdict": check.verdict,
                     "summary": check.summary, "tokens": tokens})
    return rows


def quantize_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for report, check in _checks(results, "quantize"):
        m = check.metrics
        rows.append({
            "model_type": report.model_type, "variant": check.variant, "bits": m.get("bits"),
            "group_size": m.get("group_size"), "modules": m.get("quantized_modules"),
            "kl_mean": m.get("kl_mean"), "kl_bound": m.get("kl_bound"),
            "top1": m.get("top1_agreement"), "top1_bound": m.get("top1_bound"),
            "stage": m.get("max_stage_rel_l2"), "stage_bound": m.get("stage_bound"),
            "fidelity": m.get("fidelity_max_rel_l2"), "fidelity_bound": m.get("fidelity_bound"),
            "verdict": check.verdict,
        })
    return rows


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=shared.num, cosine=shared.cosine,
                       location=shared.location_text)
    env.globals.update(shape=shared.shape, paired=shared.paired_lists,
                       sources=shared.sources, divergence=shared.divergence_text)
    return env


def render(results: Results) -> str:
    charts = {}
    for r_index, report in enumerate(results.reports):
        for c_index, check in enumerate(report.checks):
            if check.layers:
                charts[(r_index, c_index)] = shared.layer_chart(check)
    names = shared.check_names(results)
    return environment().get_template("report.html").render(
        results=results, verdict=results.verdict, names=names,
        matrix=[(report, shared.matrix(report, names)) for report in results.reports],
        findings=shared.findings(results), charts=charts, rope=rope_rows(results),
        dtypes=dtype_rows(results), generation=generation_rows(results),
        quantize=quantize_rows(results), env=results.environment,
        reach_line=shared.reach_line(results), reach_label=shared.REACH_LABEL,
        change_counts=shared.change_counts(results.differential),
        changed=sorted((r for r in results.differential if r.change != "unchanged"),
                       key=lambda r: shared.CHANGE_ORDER[r.change]),
    )
