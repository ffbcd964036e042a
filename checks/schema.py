"""The results schema: the one contract between checks, worker, comment and dashboard.

Bump SCHEMA_VERSION on any change a reader of old results would trip over.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# v2: Localization carries source locations (optional: v1 results still read).
# v3: CheckResult.reach; Results.base_* and differential (a PR tree against its base).
SCHEMA_VERSION = 3

Verdict = Literal["pass", "fail", "error", "skip"]
# Whom a finding concerns: the config under test (transformers' default or the user's
# real config), a latent variant or perturbed key that config does not use, or one cause
# seen across many architectures (reported once, with the list).
Reach = Literal["config", "latent", "systemic"]
# How a row of the PR tree compares with the same row on its base tree.
Change = Literal["unchanged", "fixed", "new", "worse", "better", "gone", "added"]
# What kind of code a divergence was localized to.
Part = Literal[
    "load", "embedding", "attention", "mlp", "moe", "norm", "ssm", "residual",
    "final_norm", "lm_head", "unknown",
]


class Strict(BaseModel):
    # A diverged metric can be infinite: JSON has no Infinity, so it travels as the
    # string "Infinity" and reads back as float("inf").
    model_config = ConfigDict(ser_json_inf_nan="strings")


class LayerRow(Strict):
    """One stage of the forward pass compared between transformers and MLX."""

    name: str  # "embeddings", "layers.3", "final_norm", "logits"
    index: int | None = None  # decoder layer index, None for the other stages
    layer_type: str | None = None  # e.g. "sliding_attention", "mamba", "moe"
    rel_l2: float  # ||mlx - ref|| / ||ref||: the verdict metric
    cosine: float
    max_abs: float  # max |mlx - ref|
    max_abs_rel: float  # max |mlx - ref| / max |ref| (the reference harness' metric)
    nmse: float  # mean((mlx - ref)^2) / var(ref)
    tolerance: float
    ok: bool


class SourceLocation(Strict):
    """A line of Python source: where the code of a module sits."""

    path: str  # relative to the directory holding its top package: "mlx_lm/models/llama.py"
    line: int
    function: str  # qualified name, e.g. "Attention.__call__"


class Localization(Strict):
    """Where inside the first divergent stage the outputs part ways."""

    stage: str  # the LayerRow name
    module: str  # transformers module path, e.g. "model.layers.2.self_attn.o_proj"
    part: Part
    inputs_agree: bool | None  # True: this module's own computation differs
    input_rel_l2: float | None = None
    output_rel_l2: float | None = None
    # Modules of the same stage that agree before the divergence, in call order.
    agreeing_before: list[str] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)
    # Source locations (v2). mlx_source: the diverging MLX module's __call__. mlx_call: the
    # line that calls the diverging sub-module: inside mlx_source when the sub-module's
    # input differs (the code before the call is at fault), else in the parent's __call__.
    # hf_source: the forward of the matching transformers module.
    mlx_source: SourceLocation | None = None
    mlx_call: SourceLocation | None = None
    hf_source: SourceLocation | None = None


class WeightsReport(Strict):
    missing: list[str] = Field(default_factory=list)  # in the MLX model, not in the checkpoint
    unexpected: list[str] = Field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = Field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"


class CheckResult(Strict):
    check: str  # "layers", "rope", "dtype", ...
    variant: str  # which synthesized configuration ran, e.g. "default"
    verdict: Verdict
    summary: str  # one line of facts
    metrics: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    layers: list[LayerRow] = Field(default_factory=list)
    first_divergent_layer: str | None = None
    localization: Localization | None = None
    weights: WeightsReport | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    duration_s: float = 0.0
    reach: Reach | None = None  # v3; set for every result of a v3 run


class StageChange(Strict):
    """What the PR changes at one compared stage: MLX(PR) against MLX(base) directly."""

    stage: str  # the LayerRow name
    occurrence: int = 0  # the n-th row of that name in the check (far positions, dtypes)
    changed_rel_l2: float  # ||mlx_pr - mlx_base|| / ||transformers||
    # the part of that change not along base's own error, relative to ||transformers||:
    # a new disagreement even where the stage already disagreed on base
    new_error_rel_l2: float
    # the part of that change along base's error, towards transformers (negative: away)
    toward_reference_rel_l2: float = 0.0
    pr_rel_l2: float
    base_rel_l2: float
    tolerance: float


class DiffRow(Strict):
    """One result row of a differential run: the PR tree's row against the base tree's."""

    model_type: str
    check: str
    variant: str
    part: str | None = None  # which row of the check: "greedy", "bfloat16", "position 1024"
    change: Change
    verdict: Verdict  # the PR's (the base's for "gone")
    base_verdict: Verdict | None = None
    reach: Reach | None = None
    distance: float | None = None  # the row's distance from transformers, on the PR
    base_distance: float | None = None
    distance_metric: str | None = None
    # the first stage whose MLX output differs between the trees, and the largest new error
    first_changed_stage: str | None = None
    # why "worse" or "better": "verdict", "distance", "tolerance" (a stage within it on
    # base is not), "new error direction" (MLX(PR) leaves base's error direction), "keys",
    # "measurement" (base measured a forward here, the PR none: its model raises)
    basis: str | None = None
    stages: list[StageChange] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)


class Variant(Strict):
    """One synthesized tiny checkpoint: a configuration the checks ran on."""

    name: str
    description: str
    config_format: Literal["legacy", "rope_parameters", "unknown"]
    config: dict[str, Any]  # the config.json both libraries loaded
    overrides: dict[str, Any] = Field(default_factory=dict)  # what differs from the source config
    checkpoint_dir: str | None = None


class Environment(Strict):
    python: str
    platform: str
    machine: str
    mlx: str
    mlx_device: str
    torch: str
    transformers: str
    mlx_lm_version: str
    mlx_lm_path: str
    mlx_lm_git_sha: str | None = None
    mlx_verify: str
    blas: str | None = None  # the BLAS MLX's CPU matmuls ran on (Linux), when known
    # the validated lock (constraints/*.txt) the installed versions match, or what differs
    lock: str | None = None


class ModelReport(Strict):
    model_type: str
    source: str  # "transformers default config", "config file X", "hub repo@rev", ...
    seed: int
    dtype: str
    verdict: Verdict
    variants: list[Variant] = Field(default_factory=list)
    # keys whose values differ between several sources: key -> {source: value}
    config_diff: dict[str, dict[str, Any]] = Field(default_factory=dict)
    checks: list[CheckResult] = Field(default_factory=list)
    error: str | None = None  # set when the model could not run at all


class Results(Strict):
    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    command: str  # reproduces the run locally
    environment: Environment
    reports: list[ModelReport] = Field(default_factory=list)
    # v3, a differential run (--base): the base tree's environment and reports, and each
    # PR row against the base's
    base_environment: Environment | None = None
    base_reports: list[ModelReport] = Field(default_factory=list)
    differential: list[DiffRow] = Field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return combine_verdicts([r.verdict for r in self.reports])


def combine_verdicts(verdicts: list[Verdict]) -> Verdict:
    """error beats fail beats pass; all-skip (or nothing) is skip."""
    if "error" in verdicts:
        return "error"
    if "fail" in verdicts:
        return "fail"
    if "pass" in verdicts:
        return "pass"
    return "skip"


def check_verdicts(reports: list[ModelReport]) -> dict[str, Verdict]:
    """check -> its verdict combined over variants (and over these reports), in the order
    the checks ran: one row of the model_type x check matrix."""
    per_check: dict[str, list[Verdict]] = {}
    for report in reports:
        for check in report.checks:
            per_check.setdefault(check.check, []).append(check.verdict)
    return {name: combine_verdicts(verdicts) for name, verdicts in per_check.items()}
