"""The `weights` check.

- strict: every tensor of the checkpoint, after `sanitize`, has a parameter of the
  same name and shape in the MLX model, and every parameter has a tensor.
- idempotent: `sanitize(sanitize(w)) == sanitize(w)`. mlx-lm's convert saves sanitized
  weights and loading them calls `sanitize` again, so a non-idempotent sanitize breaks
  every converted model.
- tying: with tie_word_embeddings true, checkpoints come both without lm_head.weight
  (transformers' save_pretrained) and with a copy of it (other exporters); MLX must load
  both strictly and give the logits transformers gives on the same file. Runs on the
  default variant and on the tied-embeddings variant (engine.applies): where
  transformers' default is untied (granite, falcon_h1), only the latter is tied.
"""

from __future__ import annotations

import glob
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import compare, hf_side, mlx_side
from .render import num
from .schema import CheckResult
from .subject import Subject


def _checkpoint_tensors(checkpoint: Path) -> dict[str, Any]:
    import mlx.core as mx

    tensors: dict[str, Any] = {}
    for path in sorted(glob.glob(str(checkpoint / "model*.safetensors"))):
        tensors.update(mx.load(path))
    return tensors


def _fresh_model(config: dict[str, Any]) -> Any:
    model_class, args_class = mlx_side.model_classes(config)
    return model_class(args_class.from_dict(config))


def idempotence(config: dict[str, Any], tensors: dict[str, Any]) -> list[str]:
    """Differences between sanitize(w) and sanitize(sanitize(w)), as facts."""
    model = _fresh_model(config)
    if not hasattr(model, "sanitize"):
        return []
    once = model.sanitize(dict(tensors))
    twice = _fresh_model(config).sanitize(dict(once))
    problems = []
    for name in sorted(set(once) - set(twice))[:5]:
        problems.append(f"{name} disappears on the second sanitize")
    for name in sorted(set(twice) - set(once))[:5]:
        problems.append(f"{name} appears on the second sanitize")
    for name in sorted(set(once) & set(twice)):
        a, b = once[name], twice[name]
        if tuple(a.shape) != tuple(b.shape):
            problems.append(f"{name}: shape {tuple(a.shape)} becomes {tuple(b.shape)}")
        elif not np.array_equal(np.array(a), np.array(b)):
            problems.append(f"{name}: values change on the second sanitize")
        if len(problems) >= 10:
            break
    return problems


def _embedding_name(tensors: dict[str, Any], vocab: int) -> str | None:
    for name, tensor in tensors.items():
        if "embed" in name and len(tensor.shape) == 2 and tensor.shape[0] == vocab:
            return name
    return None


def tying(subject: Subject, tensors: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    """(verdict, problems, facts) for loading a tied checkpoint with lm_head.weight present.

    transformers loads the same directory first: only a checkpoint transformers takes
    (and runs) holds MLX to anything; one it refuses is an `error` naming transformers."""
    import mlx.core as mx

    config = subject.config
    if config.get("tie_word_embeddings") is not True:
        return "skip", [], {"tying": "tie_word_embeddings is not true: lm_head is its own tensor"}
    vocab = int(config.get("vocab_size") or 0)
    embed = _embedding_name(tensors, vocab)
    if embed is None or "lm_head.weight" in tensors:
        return "skip", [], {"tying": "no embedding tensor found to copy into lm_head.weight"}
    work = Path(tempfile.mkdtemp(prefix="mlx-verify-tying-"))
    try:
        shutil.copy(subject.checkpoint / "config.json", work / "config.json")
        mx.save_safetensors(str(work / "model.safetensors"),
                            {**tensors, "lm_head.weight": tensors[embed]},
                            metadata={"format": "pt"})
        try:
            reference = hf_side.plain_forward(hf_side.load(work, dtype=subject.dtype),
                                              subject.ids)
        except Exception as e:
            return "error", [f"transformers does not load or run the tied checkpoint with "
                             f"lm_head.weight present: {mlx_side.describe_import_error(e)}"], \
                {"tying_side": "transformers"}
        try:
            model, _, report = mlx_side.load(work)
        except mlx_side.PortCrash as e:
            # sanitize raises on the extra tensor: mlx-lm's side, measured
            return "fail", [f"with lm_head.weight present (transformers loads it) MLX does "
                            f"not load: {e}"], {}
        if model is None:
            names = report.unexpected + report.missing + report.mismatched
            return "fail", [f"with lm_head.weight present (transformers loads it) MLX does "
                            f"not load strictly: {', '.join(names[:5])}"], {}
        if subject.dtype != "float32":
            model.set_dtype(getattr(mx, subject.dtype))
        logits = mlx_side.plain_forward(model, subject.ids)
        rel = compare.rel_l2(logits, reference)
        tolerance = compare.LAYER_TOLERANCE[subject.dtype]
        facts = {"tied_with_lm_head_present_rel_l2": rel}
        if rel is None or rel > tolerance:
            return "fail", [f"with lm_head.weight present the logits differ from "
                            f"transformers' on the same checkpoint (rel_l2 {num(rel)} > "
                            f"{tolerance:g})"], facts
        return "pass", [], facts
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(subject: Subject) -> list[CheckResult]:
    tensors = _checkpoint_tensors(subject.checkpoint)
    problems: list[str] = []
    # The subject loaded strictly, or it would not exist: record what that covered.
    sanitized = _fresh_model(subject.config).sanitize(dict(tensors)) \
        if hasattr(subject.mlx_model, "sanitize") else tensors
    metrics: dict[str, Any] = {"checkpoint_tensors": len(tensors),
                               "after_sanitize": len(sanitized)}
    idem = idempotence(subject.config, tensors)
    problems.extend(f"sanitize is not idempotent: {p}" for p in idem)
    metrics["sanitize_idempotent"] = not idem
    tie_verdict, tie_problems, facts = tying(subject, tensors)
    # transformers refusing the tied checkpoint measures nothing: kept apart from findings
    not_measured = tie_problems if tie_verdict == "error" else []
    problems.extend(p for p in tie_problems if p not in not_measured)
    metrics.update({k: v for k, v in facts.items() if not isinstance(v, str)})
    result = subject.result("weights", verdict="fail" if problems else "pass", summary="",
                            metrics=metrics, details={"problems": problems, **facts})
    if not_measured:
        result.details["not_measured"] = not_measured
    if not_measured and not problems:
        result.verdict = "error"
        result.details["side"] = "transformers"
        result.summary = not_measured[0]
    elif problems:
        # every problem here is mlx-lm's: its sanitize, its strict load, its logits
        result.details["side"] = "mlx-lm"
        result.summary = f"{len(problems)} problem(s); first: {problems[0]}"
        if not idem:
            # only the tied checkpoint that also carries lm_head.weight fails: a form of
            # the checkpoint this config's own files need not have
            result.details["reach"] = "latent"
    else:
        tied = {"pass": "; tied checkpoint with lm_head.weight present loads and matches",
                "skip": ""}[tie_verdict]
        result.summary = (f"{len(tensors)} tensors load strictly after sanitize; sanitize is "
                          f"idempotent{tied}")
    return [result]
