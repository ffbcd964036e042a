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
- mtp: real checkpoints of some architectures carry multi-token-prediction tensors that
  transformers' model has no module for, so the tiny checkpoint lacks them and the branch
  of `sanitize` that handles them never runs. They are added (`mtp_tensors`), in the
  checkpoint as released and in a converted checkpoint that kept them; `sanitize` must
  give what it gives without them (the released ports drop them).
"""

from __future__ import annotations

import glob
import re
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


# Multi-token-prediction tensors real checkpoints carry and transformers' model has no
# module for: model_type -> naming. "qwen_mtp": top-level `mtp.fc.weight` (hidden x
# 2 hidden), `mtp.norm.weight`, `mtp.pre_fc_norm_hidden.weight`,
# `mtp.pre_fc_norm_embedding.weight` and `mtp.layers.{i}.*`, one full-attention decoder
# layer each (vLLM's qwen3_5_mtp.py, Qwen3_5MultiTokenPredictor, which loads the released
# Qwen3.5 checkpoints' `mtp.` tensors; mlx-lm's own test of commit 4eeaf209 uses
# `mtp.fc.weights`). "nextn": decoder layers `model.layers.{N + i}.*` after the N
# layers, each with `enorm`, `hnorm` (hidden), `eh_proj` (hidden x 2 hidden),
# `embed_tokens`, `shared_head.head` (vocab x hidden) and `shared_head.norm` (DeepSeek-V3's
# model.safetensors.index.json: model-00163-of-000163 holds `model.layers.61.*`; vLLM's
# deepseek_mtp.py and glm4_moe_mtp.py read the same names for DeepSeek-V3.2 and GLM).
# deepseek_v3 is left out: its sanitize drops `model.layers.61` by number, right for every
# released checkpoint with an MTP layer (61 decoder layers each), and the tiny checkpoint's
# layer count is not 61.
MTP_NAMING: dict[str, str] = {
    "qwen3_5": "qwen_mtp", "qwen3_5_moe": "qwen_mtp",
    "deepseek_v32": "nextn", "glm_moe_dsa": "nextn", "glm4_moe": "nextn",
}

# MTP layer count where the config does not say: what the released checkpoints' configs
# say (tests/fixtures/configs: qwen3.5-27b.json mtp_num_hidden_layers 1, deepseek-v3.2.json
# and glm-5.json num_nextn_predict_layers 1; transformers' default configs lack the key).
MTP_LAYERS_UNSAID = {"qwen_mtp": 1, "nextn": 1}
MTP_LAYER_KEYS = {"qwen_mtp": "mtp_num_hidden_layers", "nextn": "num_nextn_predict_layers"}

LAYER_NAME = re.compile(r"^(?P<prefix>(?:model\.)?(?:language_model\.)?layers)\.(?P<index>\d+)\."
                        r"(?P<rest>.+)$")


def mtp_tensors(config: dict[str, Any], tensors: dict[str, Any], seed: int
                ) -> tuple[dict[str, Any], str | None]:
    """(name -> tensor, where the names come from) of the MTP tensors a real checkpoint of
    this config carries next to `tensors`; empty when the architecture has none or the
    config says 0 layers. The decoder layer of each is a copy of one of the checkpoint's own
    layers, renamed (the layer kind the MTP block uses: full attention, or the last layer,
    a MoE one where there are any); the other tensors are seeded noise of the config's
    sizes."""
    import mlx.core as mx

    naming = MTP_NAMING.get(config.get("model_type", ""))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if naming is None:
        return {}, None
    count = text.get(MTP_LAYER_KEYS[naming])
    count = MTP_LAYERS_UNSAID[naming] if count is None else int(count)
    hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    layers: dict[int, dict[str, Any]] = {}
    prefix = None
    for name, tensor in tensors.items():
        match = LAYER_NAME.match(name)
        if match:
            prefix = match["prefix"]
            layers.setdefault(int(match["index"]), {})[match["rest"]] = tensor
    if count <= 0 or not layers:
        return {}, None
    kinds = text.get("layer_types") or []
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention" and i in layers]
    source = full[0] if naming == "qwen_mtp" and full else max(layers)
    key = mx.random.key(seed)
    out: dict[str, Any] = {}

    def noise(shape: tuple[int, ...]) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal(shape, key=sub) * 0.1

    for i in range(count):
        if naming == "qwen_mtp":
            base = f"mtp.layers.{i}."
        else:
            base = f"{prefix}.{int(text['num_hidden_layers']) + i}."
        out.update({base + rest: tensor for rest, tensor in layers[source].items()})
        if naming == "nextn":
            out.update({base + "enorm.weight": noise((hidden,)),
                        base + "hnorm.weight": noise((hidden,)),
                        base + "eh_proj.weight": noise((hidden, 2 * hidden)),
                        base + "embed_tokens.weight": noise((vocab, hidden)),
                        base + "shared_head.norm.weight": noise((hidden,)),
                        base + "shared_head.head.weight": noise((vocab, hidden))})
    if naming == "qwen_mtp":
        out.update({"mtp.fc.weight": noise((hidden, 2 * hidden)),
                    "mtp.norm.weight": noise((hidden,)),
                    "mtp.pre_fc_norm_hidden.weight": noise((hidden,)),
                    "mtp.pre_fc_norm_embedding.weight": noise((hidden,))})
    said = (f"{len(out)} MTP tensors of {count} layer(s) ({naming} naming: "
            f"{', '.join(sorted(out)[:3])}, ...), layer copied from layers.{source}")
    return out, said


def _sanitize_differences(expected: dict[str, Any], got: dict[str, Any],
                          parameters: set[str]) -> list[str]:
    """What `got` (a sanitize with MTP tensors present) does differently from `expected`
    (the same without them), as facts."""
    problems = []
    for name in sorted(set(got) - set(expected))[:3]:
        kept = "kept, a parameter of the model" if name in parameters else \
            "kept, and the model has no such parameter: the strict load fails"
        problems.append(f"{name} {kept}")
    for name in sorted(set(expected) - set(got))[:3]:
        problems.append(f"{name} disappears")
    for name in sorted(set(expected) & set(got)):
        a, b = expected[name], got[name]
        if tuple(a.shape) != tuple(b.shape):
            problems.append(f"{name}: shape {tuple(a.shape)} becomes {tuple(b.shape)}")
        elif not np.array_equal(np.array(a), np.array(b)):
            problems.append(f"{name}: values change")
        if len(problems) >= 6:
            break
    return problems


def mtp_problems(config: dict[str, Any], tensors: dict[str, Any], seed: int
                 ) -> tuple[list[str], dict[str, Any]]:
    """(problems, facts) of sanitize on the checkpoint with the MTP tensors real
    checkpoints carry: as released (next to transformers' tensors), and converted (next to
    sanitized tensors: a converter that kept them, mlx-lm's own test of 4eeaf209)."""
    import mlx.nn  # noqa: F401  (tree_flatten below needs mlx imported)
    from mlx.utils import tree_flatten

    extra, said = mtp_tensors(config, tensors, seed)
    if not extra:
        return [], {}
    from .engine import raised_in
    from .mlx_side import describe_import_error

    def sanitize(weights: dict[str, Any]) -> dict[str, Any]:
        # a model without sanitize hands the checkpoint's tensors to the strict load as-is
        model = _fresh_model(config)
        return model.sanitize(weights) if hasattr(model, "sanitize") else dict(weights)

    parameters = {name for name, _ in tree_flatten(_fresh_model(config).parameters())}
    plain = sanitize(dict(tensors))
    problems = []
    for form, weights in (("of a released checkpoint", {**tensors, **extra}),
                          ("kept in a converted checkpoint", {**plain, **extra})):
        try:
            got = sanitize(weights)
        except Exception as e:
            if raised_in(e) != "mlx-lm":
                raise  # ours or transformers': the engine's error row, naming the side
            problems.append(f"with the MTP tensors {form}: sanitize raises "
                            f"{describe_import_error(e)}")
            continue
        problems += [f"with the MTP tensors {form}: {p}"
                     for p in _sanitize_differences(plain, got, parameters)]
    return problems, {"mtp": said}


def _embedding_name(tensors: dict[str, Any], head_shape: tuple[int, ...]) -> str | None:
    """The input embedding a tied head shares: an `embed` tensor of the head's shape
    (gemma4's per-layer embeddings have as many rows and another width)."""
    for name, tensor in tensors.items():
        if "embed" in name and tuple(tensor.shape) == head_shape:
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
    head = subject.hf_model.get_output_embeddings()
    head_shape = tuple(head.weight.shape) if head is not None else ()
    embed = _embedding_name(tensors, head_shape)
    if embed is None or "lm_head.weight" in tensors:
        return "skip", [], {"tying": "no embedding tensor found to copy into lm_head.weight"}
    work = Path(tempfile.mkdtemp(prefix="mlx-verify-tying-"))
    try:
        shutil.copy(subject.checkpoint / "config.json", work / "config.json")
        mx.save_safetensors(str(work / "model.safetensors"),
                            {**tensors, "lm_head.weight": tensors[embed]},
                            metadata={"format": "pt"})
        # what the file measured holds, read back: the head a copy of the embedding
        written = mx.load(str(work / "model.safetensors"))
        copied = "lm_head.weight" in written and \
            np.array_equal(np.array(written["lm_head.weight"]), np.array(written[embed]))
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
        # which tensor the checkpoint's lm_head.weight copies: the row says what it loaded
        facts = {"tied_with_lm_head_present_rel_l2": rel,
                 "tying_lm_head_from": embed if copied else None}
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
    mtp, mtp_facts = mtp_problems(subject.config, tensors, subject.seed)
    problems.extend(mtp)
    if mtp_facts:
        metrics["mtp_sanitize_ok"] = not mtp
    tie_verdict, tie_problems, facts = tying(subject, tensors)
    # transformers refusing the tied checkpoint measures nothing: kept apart from findings
    not_measured = tie_problems if tie_verdict == "error" else []
    problems.extend(p for p in tie_problems if p not in not_measured)
    facts.update(mtp_facts)
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
        if not idem and not mtp:
            # only the tied checkpoint that also carries lm_head.weight fails: a form of
            # the checkpoint this config's own files need not have
            result.details["reach"] = "latent"
    else:
        tied = {"pass": "; tied checkpoint with lm_head.weight present loads and matches",
                "skip": ""}[tie_verdict]
        with_mtp = ("; with the MTP tensors real checkpoints carry (as released and "
                    "converted) sanitize gives the same weights" if mtp_facts.get("mtp") else "")
        result.summary = (f"{len(tensors)} tensors load strictly after sanitize; sanitize is "
                          f"idempotent{tied}{with_mtp}")
    return [result]
