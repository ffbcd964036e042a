"""A PR tree against its base tree: the same checks on the same tiny checkpoints and
inputs, each row of the PR marked unchanged, fixed, new, worse or better.

Both trees run in one process (mlx_side.switch_mlx_lm), so the transformers side is
computed once and shared (hf_side.shared_reference): the base costs only its MLX
forwards. While a differential run is on, every compared stage keeps its MLX and
transformers arrays (`record`), so the PR's MLX output is compared with the base's
directly, not only through their distances from transformers: a second bug where a
stage already disagreed on base moves the output away from base's own error, which a
distance alone hides (0.7 -> 0.7000001).

Rows are matched by (model_type, check, variant, part). Runs on fixed seeds repeat
bit for bit (docs/tolerances.md, "Differential verdicts"), so the margins below only
absorb the rounding a refactor that reorders float operations can cause.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .schema import CheckResult, DiffRow, LayerRow, ModelReport, StageChange

# A distance moves "beyond noise" when it changes by more than this share of itself:
# a float reorder moves a failing row's rel_l2 by ~1e-7 of itself; an added bug, by more
# than 1e-3 unless it hides under the existing error (then the stage rule finds it).
DISTANCE_MARGIN = 1e-3
FINDING = ("fail", "error")
# A passing row is worse (better) when its distance grows (shrinks) by more than this
# share of its tolerance: material, where a float reorder moves it by about 1%.
MATERIAL_SHARE = 0.1

# Metric keys that mean the row measured an MLX forward against transformers (layers,
# dtype, rope far positions, generation, long, quantize). A row failing on both trees that
# has one on base and none on the PR lost its measurement: the PR's code raises (or no
# longer loads) where base's ran, which hides whatever base measured there.
FORWARD_METRICS = frozenset({
    "max_rel_l2", "logits_rel_l2", "top1_agreement", "max_stage_rel_l2",
    "max_step_vs_transformers_rel_l2", "max_step_vs_full_rel_l2",
    "prefill_vs_transformers_rel_l2", "max_logprobs_rel_l2", "tokens_agreeing",
    "max_position_logits_rel_l2", "kl_mean", "fidelity_max_rel_l2",
})
MEASUREMENT = "measurement"

# id(LayerRow) -> (row, mlx array, transformers array) while a differential run records
RECORDED: dict[int, tuple[LayerRow, np.ndarray, np.ndarray]] | None = None


@contextmanager
def recording() -> Iterator[dict[int, tuple[LayerRow, np.ndarray, np.ndarray]]]:
    global RECORDED
    RECORDED = {}
    try:
        yield RECORDED
    finally:
        RECORDED = None


def record(row: LayerRow, mlx: np.ndarray, reference: np.ndarray) -> None:
    """Called for every compared stage (layers._row); a no-op outside a differential run."""
    if RECORDED is not None:
        RECORDED[id(row)] = (row, np.array(mlx, dtype=np.float64, copy=True),
                             np.asarray(reference, dtype=np.float64))


# (model_type, check, variant, part, stage, occurrence) -> (mlx array, transformers array)
StageArrays = dict[tuple[str, str, str, str | None, str, int], tuple[np.ndarray, np.ndarray]]


def stage_arrays(reports: list[ModelReport],
                 recorded: dict[int, tuple[LayerRow, np.ndarray, np.ndarray]]) -> StageArrays:
    """The recorded arrays of one tree's reports, keyed so the other tree's rows find them."""
    out: StageArrays = {}
    for report in reports:
        for result, part in parts(report.checks):
            seen: Counter[str] = Counter()
            for row in result.layers:
                kept = recorded.get(id(row))
                if kept is not None and kept[0] is row:
                    out[(report.model_type, result.check, result.variant, part, row.name,
                         seen[row.name])] = kept[1:]
                seen[row.name] += 1
    return out


def part_of(result: CheckResult) -> str | None:
    """Which row of its check a result is, when a check gives several per variant."""
    labels = [result.metrics.get("check_part"), result.details.get("part")]
    if result.check == "dtype":
        labels.append(result.metrics.get("dtype"))
    if result.metrics.get("bits") is not None:
        labels.append(f"{result.metrics['bits']}-bit")
    if result.metrics.get("position") is not None and result.check == "rope":
        labels.append(f"position {result.metrics['position']}")
    found = [str(label) for label in labels if label not in (None, "")]
    return " ".join(found) or None


def parts(results: list[CheckResult]) -> list[tuple[CheckResult, str | None]]:
    """Each result with its part; a second row with the same label gets "#2"."""
    seen: Counter[tuple[str, str, str | None]] = Counter()
    out = []
    for result in results:
        part = part_of(result)
        key = (result.check, result.variant, part)
        seen[key] += 1
        out.append((result, part if seen[key] == 1 else f"{part or ''}#{seen[key]}"))
    return out


def distance(result: CheckResult) -> tuple[str, float] | None:
    """The row's distance from transformers: what "worse" and "better" compare. None where
    the row's own run did not repeat itself (`details["nondeterministic"]`): its distance
    moves without a change."""
    if result.details.get("nondeterministic"):
        return None
    m = result.metrics
    if result.weights is not None:
        w = result.weights
        return "weights not loading", float(len(w.missing) + len(w.unexpected)
                                            + len(w.mismatched))
    if result.check == "config" and isinstance(result.details.get("problems"), list):
        return "config keys not followed", float(len(result.details["problems"]))
    if result.check == "generation" and m.get("tokens_agreeing") is not None \
            and m.get("steps") is not None and m.get("prompts") is None:
        return "tokens differing", float(m["steps"]) - float(m["tokens_agreeing"])
    for name in ("max_rel_l2", "max_step_vs_transformers_rel_l2", "max_logprobs_rel_l2",
                 "kl_mean"):
        value = m.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, float(value)
    return None


def measured_forward(result: CheckResult) -> bool:
    """The row holds a measured MLX forward: compared stages, or a FORWARD_METRICS number."""
    if result.layers:
        return True
    return any(isinstance(result.metrics.get(key), (int, float))
               and not isinstance(result.metrics.get(key), bool) for key in FORWARD_METRICS)


def _measurement_lost(pr: CheckResult, base: CheckResult) -> bool:
    """Base measured a forward on this row and the PR measured none (both fail): the PR's
    model raises inside the forward (NameError, a shape error) or does not load, and its
    row fails as a crash where base's failed as a distance."""
    return measured_forward(base) and not measured_forward(pr)


def _beyond(new: float, old: float) -> int:
    """+1 when new is beyond noise above old, -1 below, 0 within it."""
    if new > old * (1 + DISTANCE_MARGIN) + 1e-12:
        return 1
    if new < old * (1 - DISTANCE_MARGIN) - 1e-12:
        return -1
    return 0


def stage_change(row: LayerRow, base_row: LayerRow, occurrence: int,
                 pr: tuple[np.ndarray, np.ndarray],
                 base: tuple[np.ndarray, np.ndarray]) -> StageChange | None:
    """MLX(PR) against MLX(base) at one stage; None when the arrays cannot be compared."""
    pr_mlx, reference = pr
    base_mlx, base_reference = base
    if pr_mlx.shape != base_mlx.shape or reference.shape != base_reference.shape \
            or pr_mlx.shape != reference.shape:
        return None
    if not np.array_equal(reference, base_reference, equal_nan=True):
        return None  # not a shared transformers reference (quantize compares MLX with MLX)
    scale = float(np.linalg.norm(reference)) or 1.0
    if not (np.all(np.isfinite(pr_mlx)) and np.all(np.isfinite(base_mlx))):
        same = np.array_equal(pr_mlx, base_mlx, equal_nan=True)
        changed = 0.0 if same else float("inf")
        return StageChange(stage=row.name, occurrence=occurrence, changed_rel_l2=changed,
                           new_error_rel_l2=changed, toward_reference_rel_l2=0.0,
                           pr_rel_l2=row.rel_l2,
                           base_rel_l2=base_row.rel_l2, tolerance=row.tolerance)
    change = (pr_mlx - base_mlx).ravel()
    base_error = (base_mlx - reference).ravel()
    # the part of the change that is not along base's own error: a new disagreement
    along = float(base_error @ base_error)
    projected = float(change @ base_error)
    perpendicular = change - (projected / along) * base_error if along else change
    toward = -projected / float(np.sqrt(along)) if along else 0.0
    return StageChange(
        stage=row.name, occurrence=occurrence,
        changed_rel_l2=float(np.linalg.norm(change)) / scale,
        new_error_rel_l2=float(np.linalg.norm(perpendicular)) / scale,
        toward_reference_rel_l2=toward / scale,
        pr_rel_l2=row.rel_l2, base_rel_l2=base_row.rel_l2, tolerance=row.tolerance)


NEW_DIRECTION = "new error direction"


def stage_verdict(change: StageChange, pr_ok: bool, base_ok: bool) -> tuple[int, str]:
    """(+1 the PR's stage is worse, -1 better, 0 neither; the basis)."""
    if base_ok and not pr_ok:
        return 1, "tolerance"
    if pr_ok and not base_ok:
        return -1, "tolerance"
    if _beyond(change.pr_rel_l2, change.base_rel_l2) > 0:
        return 1, "distance"
    # MLX(PR) leaves base's error direction by more than the stage's tolerance, and by more
    # than it moves towards transformers along that error: a second disagreement, hidden
    # under the first (its distance barely moves: 0.7 -> 0.7000001, or even shrinks)
    if change.new_error_rel_l2 > change.tolerance and \
            change.new_error_rel_l2 > change.toward_reference_rel_l2:
        return 1, NEW_DIRECTION
    return _beyond(change.pr_rel_l2, change.base_rel_l2), "distance"


def whole_check_counterpart(pr: CheckResult, part: str | None,
                            base_rows: dict[tuple[str, str, str | None], CheckResult],
                            matched: set[tuple[str, str, str | None]]
                            ) -> tuple[CheckResult | None, str | None]:
    """The base row an unmatched PR row is compared with when one tree gave a check as a
    single row (it raised, or did not run: no part) and the other as its parts: a crash
    on the PR is held against what base's parts measured (the first finding among them,
    else the first part), and each part of the PR against base's single row. Those base
    rows are matched: they are not also "gone". (None, None) when there is none."""
    same = [(key, row) for key, row in base_rows.items()
            if key[:2] == (pr.check, pr.variant)]
    if part is None:
        split = [(key, row) for key, row in same if key[2] is not None]
        if not split:
            return None, None
        matched.update(key for key, _ in split)
        key, base = next(((k, r) for k, r in split if r.verdict in FINDING), split[0])
        listed = ", ".join(f"{k[2]} {r.verdict}" for k, r in split[:8])
        return base, (f"base gave this check as {len(split)} rows ({listed}), the PR as one; "
                      f"compared with base's {key[2]}")
    whole = base_rows.get((pr.check, pr.variant, None))
    if whole is None:
        return None, None
    matched.add((pr.check, pr.variant, None))
    return whole, f"base gave this check as one row ({whole.verdict}: {whole.summary[:160]})"


def compare_row(model_type: str, part: str | None, pr: CheckResult | None,
                base: CheckResult | None, pr_arrays: StageArrays,
                base_arrays: StageArrays) -> DiffRow:
    row = pr or base
    assert row is not None
    out = DiffRow(model_type=model_type, check=row.check, variant=row.variant, part=part,
                  change="unchanged", verdict=row.verdict, reach=row.reach,
                  base_verdict=base.verdict if base is not None else None)
    if pr is None:
        out.change = "gone"
        out.facts.append(f"on base only: {row.summary[:200]}")
        return out
    if base is None:
        out.change = "new" if pr.verdict in FINDING else "added"
        out.facts.append("not on base (a model_type, variant or check the PR adds)")
        return out
    measured, base_measured = distance(pr), distance(base)
    if measured is not None and base_measured is not None and measured[0] == base_measured[0]:
        out.distance_metric, out.distance, out.base_distance = (measured[0], measured[1],
                                                                base_measured[1])
    direction = 0
    seen: Counter[str] = Counter()
    base_rows: dict[tuple[str, int], LayerRow] = {}
    base_seen: Counter[str] = Counter()
    for base_row in base.layers:
        base_rows[(base_row.name, base_seen[base_row.name])] = base_row
        base_seen[base_row.name] += 1
    for layer_row in pr.layers:
        occurrence = seen[layer_row.name]
        seen[layer_row.name] += 1
        base_row = base_rows.get((layer_row.name, occurrence))
        key = (model_type, pr.check, pr.variant, part, layer_row.name, occurrence)
        if base_row is None or key not in pr_arrays or key not in base_arrays:
            continue
        change = stage_change(layer_row, base_row, occurrence, pr_arrays[key],
                              base_arrays[key])
        if change is None:
            continue
        out.stages.append(change)
        if out.first_changed_stage is None and change.changed_rel_l2 > 0:
            out.first_changed_stage = layer_row.name
        verdict, basis = stage_verdict(change, layer_row.ok, base_row.ok)
        if verdict > 0 and direction <= 0:
            direction, out.basis = 1, basis
        elif verdict > 0 and out.basis == NEW_DIRECTION:
            out.basis = basis  # a firmer reason than the direction alone
        elif verdict < 0 and direction == 0:
            direction, out.basis = -1, basis
    if out.distance is not None and out.base_distance is not None and not out.stages:
        direction, out.basis = _beyond(out.distance, out.base_distance), "distance"
    if pr.check == "config":
        keys = _config_direction(pr, base, out.facts)
        if keys:
            direction, out.basis = keys, "keys"
    pr_finding, base_finding = pr.verdict in FINDING, base.verdict in FINDING
    if pr_finding and not base_finding:
        out.change = "new"
    elif base.verdict == "fail" and pr.verdict == "skip":
        # not a fix: the PR no longer measures what base found (its model does not load,
        # or no longer takes this path)
        out.change, out.basis = "worse", MEASUREMENT
        out.facts.append(f"base found a disagreement here ({base.summary[:160]}); the PR "
                         f"measured nothing: {pr.summary[:160]}")
    elif base.verdict == "error" and pr.verdict == "skip":
        out.change = "unchanged"  # neither tree measured anything here
        out.facts.append(f"base: {base.summary[:200]}")
    elif base_finding and not pr_finding:
        out.change = "fixed"
    elif not pr_finding:
        out.change = _within_tolerance(pr, out)
    elif _measurement_lost(pr, base):
        out.change, out.basis = "worse", MEASUREMENT
        out.facts.append(f"base measured a forward here ({_measured_summary(base)}); "
                         f"the PR measured none: {pr.summary[:200]}")
    elif pr.verdict == "error" and base.verdict == "fail":
        out.change = "worse"  # a crash now hides what base measured
    elif pr.verdict == "fail" and base.verdict == "error":
        out.change = "new"  # base measured nothing here; the PR's fail is measured
    elif pr.verdict == "error":
        out.change = "unchanged" if pr.summary == base.summary else "worse"
        if pr.summary != base.summary:
            out.facts.append(f"base: {base.summary[:200]}")
    else:
        out.change = {1: "worse", -1: "better", 0: "unchanged"}[direction]
    if out.change in ("new", "fixed"):
        out.basis = "verdict"
    elif out.change == "unchanged":
        out.basis = None
    elif pr.verdict == "pass" and base.verdict == "pass":
        out.basis = "distance within tolerance"
    if out.first_changed_stage is not None:
        worst = max(out.stages, key=lambda s: s.new_error_rel_l2)
        out.facts.append(f"MLX(PR) differs from MLX(base) from {out.first_changed_stage} on "
                         f"(largest change {max(s.changed_rel_l2 for s in out.stages):.2e}, "
                         f"new error {worst.new_error_rel_l2:.2e} at {worst.stage})")
    elif out.stages:
        out.facts.append("MLX(PR) equals MLX(base) at every compared stage")
    return out


def _measured_summary(result: CheckResult) -> str:
    found = distance(result)
    if found is not None:
        return f"{found[0]} {found[1]:.3g}"
    return f"{len(result.layers)} stage(s) compared"


def _within_tolerance(pr: CheckResult, out: DiffRow) -> str:
    """A row passing on both trees that moved away from transformers by a material share
    of its tolerance: worse (or better), though still within it. A precision loss (a
    float32 cast dropped from a recurrent gate) can cost half the half-precision budget
    and pass; a reordering of float operations moves a float32 row by ~1e-7 of 1e-5."""
    tolerance = pr.metrics.get("tolerance_rel_l2")
    if out.distance is None or out.base_distance is None or \
            not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool):
        return "unchanged"
    moved = out.distance - out.base_distance
    if abs(moved) <= MATERIAL_SHARE * float(tolerance):
        return "unchanged"
    out.facts.append(f"{out.distance_metric} moved {moved:+.2e} within the tolerance "
                     f"{float(tolerance):.1e} ({abs(moved) / float(tolerance):.0%} of it)")
    return "worse" if moved > 0 else "better"


def _config_direction(pr: CheckResult, base: CheckResult, facts: list[str]) -> int:
    """+1 when a key base followed is no longer followed on the PR, -1 the reverse."""
    def problem_keys(result: CheckResult) -> set[str]:
        return {str(p).split(":")[0] for p in result.details.get("problems") or []}

    added = sorted(problem_keys(pr) - problem_keys(base))
    removed = sorted(problem_keys(base) - problem_keys(pr))
    if added:
        facts.append(f"not followed on the PR only: {', '.join(added)}")
    if removed:
        facts.append(f"followed on the PR only: {', '.join(removed)}")
    return 1 if added else (-1 if removed else 0)


def compare(pr_reports: list[ModelReport], base_reports: list[ModelReport],
            pr_arrays: StageArrays | None = None,
            base_arrays: StageArrays | None = None) -> list[DiffRow]:
    """Every row of either tree, PR rows in their order, then base-only rows.

    A change that leaves base's error direction on a row failing on both trees is read
    as the PR's direction elsewhere: removing a small bug under a larger finding moves
    MLX as much off base's error as adding one does; when the same model_type has rows
    the PR fixes or betters and none it makes new or worse on firmer grounds, those rows
    are that fix."""
    base_by_type = {r.model_type: r for r in base_reports}
    rows: list[DiffRow] = []
    for report in pr_reports:
        base_report = base_by_type.get(report.model_type)
        base_rows = {(r.check, r.variant, part): r
                     for r, part in parts(base_report.checks if base_report else [])}
        matched = set()
        for result, part in parts(report.checks):
            key = (result.check, result.variant, part)
            base_result = base_rows.get(key)
            matched.add(key)
            said = None
            if base_result is None:
                base_result, said = whole_check_counterpart(result, part, base_rows, matched)
            row = compare_row(report.model_type, part, result, base_result,
                              pr_arrays or {}, base_arrays or {})
            if said is not None:
                row.facts.insert(0, said)
            rows.append(row)
        for key, base_result in base_rows.items():
            if key not in matched:
                rows.append(compare_row(report.model_type, key[2], None, base_result,
                                        pr_arrays or {}, base_arrays or {}))
    for model_type in {row.model_type for row in rows}:
        own = [row for row in rows if row.model_type == model_type]
        improved = [row for row in own if row.change in ("fixed", "better")]
        firmly_worse = [row for row in own if row.change in ("new", "worse")
                        and row.basis != NEW_DIRECTION]
        if not improved or firmly_worse:
            continue
        for row in own:
            if row.change == "worse" and row.basis == NEW_DIRECTION:
                row.change = "better"
                row.facts.append(f"read as the fix of {improved[0].check} / "
                                 f"{improved[0].variant}: MLX(PR) leaves base's error "
                                 "direction here with no firmer sign of a new error")
    return rows


def blocking(rows: list[DiffRow]) -> list[DiffRow]:
    """The rows that fail a differential run (exit 1, the Check Run): new or worse."""
    return [row for row in rows if row.change in ("new", "worse")]


def verify_trees(model_types: list[str], pr_tree: str | None, base_tree: str,
                 progress: Any = None, **options: Any) -> tuple[Any, Any, list[Any],
                                                                list[Any], list[DiffRow]]:
    """Every model_type on the PR tree, then on the base tree, in this process: the
    tiny checkpoints (synth's cache) and the transformers side (hf_side.shared_reference)
    are made once. Returns (pr info, base info, pr reports, base reports, rows).

    Bad input on the PR tree raises as in a single run; a model_type that cannot run on
    base (the PR adds it, base's config reading differs) gets a base report with its error,
    and its PR rows read "new"."""
    from . import engine, hf_side, mlx_side

    say = progress or (lambda message: None)
    with hf_side.shared_reference(), recording() as recorded:
        pr_info = mlx_side.use_mlx_lm(pr_tree)
        pr_reports = []
        for model_type in model_types:
            pr_reports.append(engine.verify(model_type, progress=say, **options))
        pr_arrays = stage_arrays(pr_reports, recorded)
        recorded.clear()
        say(f"base: importing mlx_lm from {base_tree}")
        try:
            base_info = mlx_side.switch_mlx_lm(base_tree)
        except mlx_side.MlxLmError as e:
            raise mlx_side.MlxLmError(f"base tree: {e}") from e
        base_reports = []
        for model_type in model_types:
            try:
                report = engine.verify(model_type, progress=lambda m: say(f"base: {m}"),
                                       **options)
            except (engine.InputError, mlx_side.MlxLmError) as e:
                report = ModelReport(model_type=model_type, source="base tree", seed=0,
                                     dtype=str(options.get("dtype", "float32")),
                                     verdict="error", error=str(e))
            base_reports.append(report)
        base_arrays = stage_arrays(base_reports, recorded)
    engine.mark_systemic(pr_reports)
    engine.mark_systemic(base_reports)
    rows = compare(pr_reports, base_reports, pr_arrays, base_arrays)
    return pr_info, base_info, pr_reports, base_reports, rows


def base_tree_from_ref(repo: str, ref: str, into: str) -> str:
    """`git archive REF mlx_lm` of the checkout at `repo`, unpacked into `into`: the base
    tree for --base REF. Raises ValueError with git's one line when the ref is unknown."""
    import io
    import subprocess
    import tarfile

    done = subprocess.run(["git", "-C", repo, "archive", "--format=tar", ref, "mlx_lm"],
                          capture_output=True, timeout=120)
    if done.returncode != 0:
        line = (done.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[0]
        raise ValueError(f"--base {ref}: git archive in {repo}: {line}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into
