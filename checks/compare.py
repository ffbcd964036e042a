"""Metrics between a reference tensor (transformers) and a candidate (MLX), and tolerances.

The verdict metric is the relative L2 error ||mlx - ref|| / ||ref||: a single outlier
cannot hide a drift spread over the tensor, and a drift cannot hide behind a large
outlier the way max|diff| / max|ref| lets it. Cosine, max abs and NMSE are reported.

Tolerances are calibrated on the correct ports of the installed mlx-lm (see
docs/tolerances.md for the measurements and the command that reproduces them).
"""

from __future__ import annotations

import math

import numpy as np

# Relative L2 error allowed per compared stage, by compute dtype. See docs/tolerances.md.
LAYER_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}


def metrics(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    a = candidate.astype(np.float64).ravel()
    b = reference.astype(np.float64).ravel()
    diff = a - b
    ref_norm = float(np.linalg.norm(b))
    diff_norm = float(np.linalg.norm(diff))
    cand_norm = float(np.linalg.norm(a))
    ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    var = float(np.var(b)) if b.size else 0.0
    if not np.all(np.isfinite(a)):
        return {"rel_l2": math.inf, "cosine": -1.0, "max_abs": math.inf,
                "max_abs_rel": math.inf, "nmse": math.inf}
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    return {
        "rel_l2": _ratio(diff_norm, ref_norm),
        "cosine": float(a @ b) / (cand_norm * ref_norm) if cand_norm and ref_norm else
        (1.0 if cand_norm == ref_norm else 0.0),
        "max_abs": max_abs,
        "max_abs_rel": max_abs / ref_max if ref_max > 0 else 0.0,
        "nmse": float(np.mean(diff**2)) / var if var > 0 else 0.0,
    }


def _ratio(diff_norm: float, ref_norm: float) -> float:
    return diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)


def rel_l2(candidate: np.ndarray | None, reference: np.ndarray | None) -> float | None:
    """None when the two cannot be compared (missing or of different shapes). The value
    of metrics()["rel_l2"]: on finite arrays computed alone (the other metrics cost as
    much again), on others by metrics itself."""
    if candidate is None or reference is None or candidate.shape != reference.shape:
        return None
    a = candidate.astype(np.float64).ravel()
    b = reference.astype(np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return metrics(candidate, reference)["rel_l2"]
    return _ratio(float(np.linalg.norm(a - b)), float(np.linalg.norm(b)))
