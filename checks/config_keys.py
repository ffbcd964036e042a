"""The `config` check: config keys transformers reads that MLX drops or reads differently.

Decided by measurement, key by key: the key is perturbed in config.json next to the
same weights; both libraries load it; if transformers' logits move and MLX's do not
follow to the same place, MLX ignores or misreads the key. A perturbation that
changes weight shapes is a size, not a setting, and is skipped. Keys that are not
part of the forward pass (dropout, token ids, init, bookkeeping) are not tried, nor is
tie_word_embeddings (the weights check and the tying variants cover it with realistic
checkpoints).

Verdict: fail for a key MLX's ModelArgs declares but does not honour, and for a
dropped key of the kinds that differ between real checkpoints of one architecture
(RoPE, windows, eps, softcaps, multipliers). Any other dropped key (e.g. hidden_act in
a port that hard-codes SiLU) is listed as hard-coded by MLX: the parity check on the
checked config already fails when its value differs from the hard-coded one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import compare, compat, hf_side, locations, mlx_side
from .schema import CheckResult
from .subject import Subject
from .variants import mlx_args_fields

SKIPPED_KEYS = {
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_router_logits", "router_aux_loss_coef", "use_mamba_kernels", "num_logits_to_keep",
    "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "classifier_dropout", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "is_decoder", "add_cross_attention",
    "pretraining_tp", "rope_traditional", "tie_word_embeddings",
}
# Keys whose values differ between real checkpoints of one architecture.
VARYING_WORDS = ("rope", "theta", "factor", "window", "eps", "softcap", "rotary", "head_dim",
                 "multiplier", "scale", "sliding", "chunk", "max_position")
SIZE_WORDS = ("size", "num_", "n_", "dim", "vocab", "layers", "heads", "experts", "rank",
              "_idxs", "groups")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


# Integer keys that lay out the decoder layers: a period (every N-th layer is of one
# kind) or a count/offset of leading layers. Perturbed within the layer count, as any
# checkpoint has them: a pattern of 16 over 6 layers is no model (mlx-lm indexes past
# its layer list).
LAYER_PERIOD_KEYS = ("sliding_window_pattern", "attn_layer_period", "full_attention_interval",
                     "decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step")
LAYER_OFFSET_KEYS = ("attn_layer_offset", "expert_layer_offset", "first_k_dense_replace",
                     "num_dense_layers", "max_window_layers")
# Per-layer lists that fix the layer pattern on their own: with one of them in the config,
# a different period next to the same list is no checkpoint's config.
LAYER_LISTS = ("layer_types", "block_types", "layers_block_type")
# A count chosen out of another count: group-limited routing picks topk_group of the
# n_group expert groups (DeepSeek-V3, GLM-5), so a value above n_group is no checkpoint's
# config (transformers' torch.topk raises on it: "selected index k out of range").
BOUNDED_BY = {"topk_group": "n_group"}


def _is_size(key: str) -> bool:
    return any(word in key for word in SIZE_WORDS) and "window" not in key


def _layer_count(config: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def layer_layout_value(key: str, value: int, config: dict[str, Any]) -> int | None:
    """A different period or offset of the layer layout that stays within the layer
    count (periods 1..n, offsets 0..n-1), or None when there is none or the config's
    per-layer list fixes the layout."""
    n_layers = _layer_count(config)
    if n_layers is None or any(isinstance(config.get(k), list) for k in LAYER_LISTS):
        return None
    low, high = (1, n_layers) if key in LAYER_PERIOD_KEYS else (0, n_layers - 1)
    for candidate in (value + 1, value - 1):
        if low <= candidate <= high and candidate != value:
            return candidate
    return None


def bounded_value(key: str, value: int, config: dict[str, Any]) -> int | None:
    """A different count within 1..its bound (topk_group within n_group), or None."""
    bound = config.get(BOUNDED_BY[key])
    if not isinstance(bound, int) or isinstance(bound, bool):
        return None
    for candidate in (value + 1, value - 1):
        if 1 <= candidate <= bound and candidate != value:
            return candidate
    return None


def perturb(key: str, value: Any) -> Any | None:
    """A different value that should matter, or None when the key is not tried."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        if "eps" in key:
            return 0.05
        if "partial" in key and 0 < value <= 1:
            # a share of the head's dims: more than all of them is no checkpoint's config
            return 0.5 if value != 0.5 else 0.25
        return value * 2.0 if value != 0 else 0.5
    if isinstance(value, int):
        if "window" in key or "chunk" in key:
            return 16 if value != 16 else 8
        if "max_position" in key:
            return max(value // 2, 64)
        return None if _is_size(key) else value + 1
    if isinstance(value, str) and ("act" in key or "activation" in key):
        return next(a for a in ACTIVATIONS if a != value)
    return None


def candidates(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key path, perturbed config) for every key worth trying."""
    out = []
    for key, value in config.items():
        if key in SKIPPED_KEYS or "dropout" in key or "pdrop" in key or "token" in key:
            continue
        if isinstance(value, dict) and key in ("rope_scaling", "rope_parameters"):
            for inner, inner_value in value.items():
                new_value = perturb(inner, inner_value)
                if new_value is not None and inner not in ("type", "rope_type"):
                    new = copy.deepcopy(config)
                    new[key][inner] = new_value
                    out.append((f"{key}.{inner}", new))
            continue
        if key in LAYER_PERIOD_KEYS or key in LAYER_OFFSET_KEYS:
            new_value = (layer_layout_value(key, value, config)
                         if isinstance(value, int) and not isinstance(value, bool) else None)
        elif key in BOUNDED_BY:
            new_value = (bounded_value(key, value, config)
                         if isinstance(value, int) and not isinstance(value, bool) else None)
        else:
            new_value = perturb(key, value)
        if new_value is not None:
            out.append((key, {**copy.deepcopy(config), key: new_value}))
    return out


def _checkpoint_with(config: dict[str, Any], weights_dir: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config))
    for weights in weights_dir.glob("*.safetensors"):
        link = target / weights.name
        if not link.exists():
            os.symlink(weights, link)
    return target


def run(subject: Subject) -> list[CheckResult]:
    tolerance = compare.LAYER_TOLERANCE[subject.dtype]
    ids = subject.ids
    hf_base = hf_side.plain_forward(subject.hf_model, ids)
    mlx_base = mlx_side.plain_forward(subject.mlx_model, ids)
    declared = mlx_args_fields(subject.config)
    args_class = compat.mlx_model_classes(subject.config)[1]
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="mlx-verify-config-"))
    try:
        for index, (key, config) in enumerate(candidates(subject.config)):
            checkpoint = _checkpoint_with(config, subject.checkpoint, work / str(index))
            refusal = transformers_refuses(checkpoint)
            if refusal is not None:
                # transformers' own config validation refuses the value: no checkpoint
                # can carry it, so there is nothing to hold MLX to (the refusal is kept)
                rows.append({"key": key, "status": "not applicable",
                             "reason": f"transformers' config class refuses the value: "
                                       f"{refusal}"})
                continue
            try:
                hf_model = hf_side.load(checkpoint, dtype=subject.dtype)
                hf_out = hf_side.plain_forward(hf_model, ids)
            except hf_side.WeightsMismatch as e:
                # a size, not a setting: the value asks for weights the checkpoint lacks
                rows.append({"key": key, "status": "not applicable",
                             "reason": f"changes the weights transformers expects ({e})"[:300]})
                continue
            except Exception as e:
                # transformers accepts the config and then fails: not measured
                rows.append({"key": key, "status": "error",
                             "reason": f"transformers accepts the value but cannot run it: "
                                       f"{mlx_side.describe_import_error(e)}"})
                continue
            try:
                mlx_model, _, _ = mlx_side.load(checkpoint)
                if mlx_model is not None:
                    if subject.dtype != "float32":
                        import mlx.core as mx

                        mlx_model.set_dtype(getattr(mx, subject.dtype))
                    mlx_out = mlx_side.plain_forward(mlx_model, ids)
            except mlx_side.MlxLmError:
                raise
            except Exception as e:
                # transformers runs this config (it passed its validation and ran) and
                # the port raises on it: a disagreement, measured
                fact = (f"{key}: transformers runs {key}={_value_at(config, key)!r}, MLX "
                        f"raises {mlx_side.describe_import_error(e)}")
                rows.append({"key": key, "new_value": _value_at(config, key),
                             "status": "fails in MLX", "fact": fact})
                problems.append(fact)
                continue
            if mlx_model is None:
                rows.append({"key": key, "status": "not applicable",
                             "reason": "changes MLX weight shapes"})
                continue
            row = judge_key(key, config, declared, hf_base, mlx_base, hf_out, mlx_out,
                            tolerance, args_class)
            if row["status"] in ("ignored by MLX", "read differently", "used only by MLX"):
                if row["declared_by_mlx_model_args"] or any(w in key for w in VARYING_WORDS):
                    reading = [r for r in reference_reading(checkpoint, config)
                               if r["key"] == key.split(".")[0]]
                    if reading:
                        label_reading(row, reading, checkpoint, config, ids, mlx_out,
                                      subject.dtype, tolerance)
                    problems.append(row["fact"])
                else:
                    row["status"] = "hard-coded by MLX"
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tried = [r for r in rows if r["status"] not in ("not applicable", "error")]
    return split_by_reach(subject, rows, problems, tried, hf_base, mlx_base, tolerance)


def split_by_reach(subject: Subject, rows: list[dict[str, Any]], problems: list[str],
                   tried: list[dict[str, Any]], hf_base: Any, mlx_base: Any,
                   tolerance: float) -> list[CheckResult]:
    """The perturbed keys' result, with reach "latent": each row holds a value this config
    does not carry, so a key MLX does not follow matters for other checkpoints, not this
    one (a port that hard-codes an epsilon equal to the config's value computes this
    config right). The config under test is judged by the parity checks; whether it
    agrees here too is recorded (baseline_rel_l2)."""
    baseline = compare.rel_l2(mlx_base, hf_base)
    for row in rows:
        row["reach"] = "latent"
    result = summarize(subject, rows, problems, tried)
    result.details["reach"] = "latent"
    result.metrics["reach"] = "latent"
    result.metrics["baseline_rel_l2"] = baseline
    result.details["config_under_test_agrees"] = baseline is not None and baseline <= tolerance
    reading = reference_reading(subject.checkpoint, subject.config)
    if reading:
        result.details["reference_reading"] = [r["fact"] for r in reading]
    return [result]


def summarize(subject: Subject, rows: list[dict[str, Any]], problems: list[str],
              tried: list[dict[str, Any]]) -> CheckResult:
    errors = [r for r in rows if r["status"] == "error"]
    verdict = "fail" if problems else "error" if errors else "pass" if tried else "skip"
    result = subject.result("config", verdict=verdict, summary="")
    counts = {s: sum(r["status"] == s for r in rows) for s in
              ("honoured", "no effect", "ignored by MLX", "read differently", "used only by MLX",
               "hard-coded by MLX", "fails in MLX", "not applicable")}
    result.metrics = {"keys_tried": len(tried), **{k.replace(" ", "_"): v
                                                    for k, v in counts.items()}}
    result.details = {"keys": rows, "problems": problems}
    result.metrics["errors"] = len(errors)
    if problems:
        result.summary = f"{len(problems)} key(s) not honoured by MLX; first: {problems[0]}"
        side = next((r.get("side") for r in rows if r.get("fact") == problems[0]), None)
        if side is not None:
            result.details["side"] = side
    elif errors:
        result.summary = (f"{len(errors)} perturbed key(s) not measured; first: "
                          f"{errors[0]['key']}: {errors[0]['reason']}")
    elif not tried:
        result.summary = (f"measured nothing: 0 of {len(rows)} candidate keys could be tried"
                          + (f" (first: {rows[0]['key']}: {rows[0]['reason']})" if rows else
                             ": the config has no key of the kinds perturbed"))
    else:
        hard_coded = [r["key"] for r in rows if r["status"] == "hard-coded by MLX"]
        result.summary = (f"{counts['honoured']} of {len(tried)} perturbed keys change the "
                          f"output, MLX follows each; {counts['no effect']} have no effect"
                          + (f"; hard-coded by MLX: {', '.join(hard_coded)}"
                             if hard_coded else ""))
    return result


def transformers_refuses(checkpoint: Path) -> str | None:
    """transformers' config class rejecting the config.json (its own validation), or
    None when it accepts it."""
    from transformers import AutoConfig

    def refusal() -> str | None:
        try:
            AutoConfig.from_pretrained(checkpoint)
        except Exception as e:
            # the memo is by content: the directory's path (fresh per run) said generically
            return mlx_side.describe_import_error(e).replace(str(checkpoint), CHECKPOINT_PATH)
        return None

    found = hf_side.config_memo("refusal", checkpoint, refusal)
    return None if found is None else found.replace(CHECKPOINT_PATH, str(checkpoint))


CHECKPOINT_PATH = "\0checkpoint\0"  # stands for the checkpoint's path in a memoized text


def judge_key(key: str, config: dict[str, Any], declared: set[str], hf_base: Any, mlx_base: Any,
              hf_out: Any, mlx_out: Any, tolerance: float,
              args_class: Any = None) -> dict[str, Any]:
    """How MLX follows transformers when one key changes.

    When the unperturbed models already disagree (e.g. a config format MLX misreads),
    only the direction is judged: does each side move at all."""
    hf_moved = compare.rel_l2(hf_out, hf_base) or 0.0
    mlx_moved = compare.rel_l2(mlx_out, mlx_base) or 0.0
    parity = compare.rel_l2(mlx_out, hf_out)
    baseline_agrees = (compare.rel_l2(mlx_base, hf_base) or 0.0) <= tolerance
    row: dict[str, Any] = {
        "key": key, "new_value": _value_at(config, key), "transformers_moved": hf_moved,
        "mlx_moved": mlx_moved, "rel_l2_after": parity,
        "declared_by_mlx_model_args": key.split(".")[0] in declared,
    }
    field = key.split(".")[0]
    where = locations.field_location(args_class, field)
    row["mlx_field"] = where.model_dump() if where is not None else None
    at = f" at {where.path}:{where.line}" if where is not None else ""
    why = (f"declared by ModelArgs{at} but unused" if row["declared_by_mlx_model_args"]
           else f"ModelArgs{at} has no field {field}: from_dict drops it")
    if hf_moved > tolerance and mlx_moved <= tolerance:
        row["status"] = "ignored by MLX"
        row["fact"] = f"{key}: transformers' logits move {hf_moved:.2e}, MLX's do not ({why})"
    elif mlx_moved > tolerance and hf_moved <= tolerance:
        row["status"] = "used only by MLX"
        row["fact"] = f"{key}: MLX's logits move {mlx_moved:.2e}, transformers' do not"
    elif not baseline_agrees or parity is None or parity <= tolerance:
        row["status"] = "honoured" if hf_moved > tolerance else "no effect"
    else:
        row["status"] = "read differently"
        row["fact"] = f"{key}: both move, but MLX ends {parity:.2e} from transformers"
    return row


def _value_at(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


# --- transformers' reading of the file's RoPE keys ----------------------------------------

READING_SIDE = "transformers' reading"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _rope_sources(checkpoint: Path, config: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(the file's dict holding legacy RoPE keys, transformers' RoPE settings per layer
    type) for a config in the legacy format; None otherwise."""
    from transformers import AutoConfig

    source = config
    if "rope_theta" not in config and "rope_scaling" not in config \
            and isinstance(config.get("text_config"), dict):
        source = config["text_config"]
    if "rope_theta" not in source and not isinstance(source.get("rope_scaling"), dict):
        return None

    def read() -> Any:
        try:
            loaded = AutoConfig.from_pretrained(checkpoint).get_text_config()
        except Exception:
            return None  # transformers' refusal is said where the checkpoint is loaded
        return getattr(loaded, "rope_parameters", None)

    # the same config bytes read again in the base run of a differential run
    params = hf_side.config_memo("rope_parameters", checkpoint, read)
    if not isinstance(params, dict) or not params:
        return None
    if all(isinstance(v, dict) for v in params.values()):
        return source, {str(k): dict(v) for k, v in params.items()}
    return source, {"every": dict(params)}


def reference_reading(checkpoint: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where transformers reads the file's legacy RoPE keys (top-level rope_theta,
    rope_scaling) other than literally: per finding, the fact and the layer types that
    get another value. A value another key of the file names (gemma3's
    rope_local_base_freq) is that key's literal value, not a different reading."""
    found = _rope_sources(checkpoint, config)
    if found is None:
        return []
    source, per_type = found
    out: list[dict[str, Any]] = []
    theta = _number(source.get("rope_theta"))
    other_bases = {_number(v) for k, v in source.items()
                   if k != "rope_theta" and ("rope" in k or "base" in k) and _number(v)}
    if theta is not None:
        read = {t: _number(p.get("rope_theta")) for t, p in per_type.items()}
        literal = [t for t, v in read.items() if v == theta]
        other = {t: v for t, v in read.items()
                 if v is not None and v != theta and v not in other_bases}
        if other:
            where = f"for {', '.join(literal)} layers only" if literal else "for no layer"
            out.append({"key": "rope_theta", "layer_types": sorted(other),
                        "fact": f"transformers reads rope_theta {theta:g} {where}; "
                                + ", ".join(f"{t} layers: {v:g}" for t, v in other.items())})
    scaling = source.get("rope_scaling")
    kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) \
        else None
    if kind and kind != "default":
        applied = [t for t, p in per_type.items() if p.get("rope_type") == kind]
        other_kind = {t: p.get("rope_type") for t, p in per_type.items()
                      if p.get("rope_type") != kind}
        if other_kind:
            where = f"to {', '.join(applied)} layers only" if applied else "to no layer"
            out.append({"key": "rope_scaling", "layer_types": sorted(other_kind),
                        "fact": f"transformers applies rope_scaling ({kind}) {where}; "
                                + ", ".join(f"{t} layers: {v}" for t, v in other_kind.items())})
    return out


def literal_config(checkpoint: Path, config: dict[str, Any],
                   reading: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The same config with the file's rope_theta / rope_scaling written into transformers'
    per-layer-type rope_parameters for every layer type: the file read literally."""
    found = _rope_sources(checkpoint, config)
    if found is None or found[0] is not config:
        return None
    source, per_type = found
    keys = {r["key"] for r in reading}
    theta = _number(source.get("rope_theta"))
    scaling = source.get("rope_scaling") if isinstance(source.get("rope_scaling"), dict) else {}
    params = {}
    for layer_type, settings in per_type.items():
        settings = dict(settings)
        if "rope_theta" in keys and theta is not None and \
                layer_type in next(r for r in reading if r["key"] == "rope_theta")["layer_types"]:
            settings["rope_theta"] = theta
        if "rope_scaling" in keys:
            settings.update({k: v for k, v in scaling.items() if k != "type"})
            settings["rope_type"] = scaling.get("rope_type") or scaling.get("type")
        params[layer_type] = settings
    out = copy.deepcopy(config)
    out.pop("rope_theta", None)
    out.pop("rope_scaling", None)
    out["rope_parameters"] = params if set(params) != {"every"} else params["every"]
    return out


def literal_agreement(checkpoint: Path, config: dict[str, Any], reading: list[dict[str, Any]],
                      ids: Any, mlx_out: Any, dtype: str, tolerance: float
                      ) -> tuple[float | None, list[dict[str, Any]], str | None]:
    """transformers run on the file read literally, one reading key at a time, then all of
    them (a port may apply rope_theta to every layer and the scaling to some): the
    closest rel L2 to MLX's logits, the reading entries read literally for it, and why
    the literal form could not run (or None)."""
    subsets = [[r] for r in reading] + ([reading] if len(reading) > 1 else [])
    best: tuple[float | None, list[dict[str, Any]], str | None] = (None, [], None)
    work = Path(tempfile.mkdtemp(prefix="mlx-verify-literal-"))
    try:
        for index, subset in enumerate(subsets):
            literal = literal_config(checkpoint, config, subset)
            if literal is None:
                continue
            target = _checkpoint_with(literal, checkpoint, work / str(index))
            try:
                rel = compare.rel_l2(mlx_out, hf_side.plain_forward(
                    hf_side.load(target, dtype=dtype), ids))
            except Exception as e:  # the literal form does not load: the facts stand alone
                best = (best[0], best[1], mlx_side.describe_import_error(e))
                continue
            if rel is not None and (best[0] is None or rel < best[0]):
                best = (rel, subset, None)
            if rel is not None and rel <= tolerance:
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return best


def _literal_text(subset: list[dict[str, Any]]) -> str:
    return " and ".join(r["key"] for r in subset) + " applied to every layer type"


def label_reading(row: dict[str, Any], reading: list[dict[str, Any]], checkpoint: Path,
                  config: dict[str, Any], ids: Any, mlx_out: Any, dtype: str,
                  tolerance: float) -> None:
    """A row where transformers reads the perturbed file other than literally: the facts,
    and transformers run on the literal reading. When MLX agrees with that, the row fails
    only through transformers' reading, and says so (row["side"])."""
    row["reference_reading"] = [r["fact"] for r in reading]
    facts = "; ".join(r["fact"] for r in reading)
    rel, subset, error = literal_agreement(checkpoint, config, reading, ids, mlx_out, dtype,
                                           tolerance)
    row["mlx_vs_literal_reading_rel_l2"] = rel
    if error is not None:
        row["literal_reading_error"] = error
    if rel is not None and rel <= tolerance:
        row["side"] = READING_SIDE
        row["fact"] += (f"; {facts}: read literally ({_literal_text(subset)}), transformers "
                        f"agrees with MLX (rel_l2 {rel:.1e}): the difference is transformers' "
                        "reading of the file, not MLX")
    else:
        row["fact"] += f"; {facts}" + (f" (MLX also differs from the literal reading: "
                                       f"rel_l2 {rel:.2e})" if rel is not None else "")


# Per loaded subject (checkpoint, dtype): transformers' reading of its config, and how MLX
# compares with transformers run on the literal reading.
_SUBJECT_READINGS: dict[tuple[str, str, int], tuple[Any, dict[str, Any]]] = {}
_LITERAL_CONFIGS: set[str] = set()  # checkpoints transformers reads literally
# checks whose rows compare the same function on the same prompt as the literal run
READING_JUDGED_CHECKS = ("layers", "rope")


def subject_reading(subject: Subject) -> dict[str, Any] | None:
    """None when transformers reads the subject's config literally; else the facts and
    MLX's logits against transformers on the literal reading (parity prompt)."""
    if str(subject.checkpoint) in _LITERAL_CONFIGS:
        return None
    # the MLX model is part of the key (two trees may share a checkpoint) and is kept
    # alive with the entry, so its id is not reused
    key = (str(subject.checkpoint), subject.dtype, id(subject.mlx_model))
    if key in _SUBJECT_READINGS:
        return _SUBJECT_READINGS[key][1]
    reading = reference_reading(subject.checkpoint, subject.config)
    if not reading:
        _LITERAL_CONFIGS.add(str(subject.checkpoint))
        return None
    mlx_out = mlx_side.plain_forward(subject.mlx_model, subject.ids)
    rel, subset, error = literal_agreement(
        subject.checkpoint, subject.config, reading, subject.ids, mlx_out, subject.dtype,
        compare.LAYER_TOLERANCE[subject.dtype])
    label = {"facts": [r["fact"] for r in reading], "rel_l2": rel, "error": error,
             "literal": _literal_text(subset) if subset else None}
    _SUBJECT_READINGS[key] = (subject.mlx_model, label)
    return label


def label_by_reading(subject: Subject, results: list[CheckResult]) -> None:
    """Failing rows of a subject whose config transformers reads other than literally get
    the facts (details["reference_reading"]); where MLX agrees with transformers run on
    the literal reading, rows of READING_JUDGED_CHECKS say that the side that differs is
    transformers' reading (details["side"]). MLX stays judged against transformers."""
    failing = [r for r in results if r.verdict == "fail"]
    if not failing:
        return
    label = subject_reading(subject)
    if label is None:
        return
    tolerance = compare.LAYER_TOLERANCE[subject.dtype]
    literal_agrees = label["rel_l2"] is not None and label["rel_l2"] <= tolerance
    for result in failing:
        result.details["reference_reading"] = label["facts"]
        result.details["mlx_vs_literal_reading_rel_l2"] = label["rel_l2"]
        if literal_agrees and result.check in READING_JUDGED_CHECKS \
                and "side" not in result.details:
            result.details["side"] = READING_SIDE
            result.summary += (f"; {'; '.join(label['facts'])}: read literally "
                               f"({label['literal']}), transformers agrees with MLX (logits rel_l2 "
                               f"{label['rel_l2']:.1e}): the side that differs is "
                               "transformers' reading of the file")
