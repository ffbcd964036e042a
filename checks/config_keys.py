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


def _is_size(key: str) -> bool:
    return any(word in key for word in SIZE_WORDS) and "window" not in key


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
            mlx_model, _, _ = mlx_side.load(checkpoint)
            if mlx_model is None:
                rows.append({"key": key, "status": "not applicable",
                             "reason": "changes MLX weight shapes"})
                continue
            if subject.dtype != "float32":
                import mlx.core as mx

                mlx_model.set_dtype(getattr(mx, subject.dtype))
            mlx_out = mlx_side.plain_forward(mlx_model, ids)
            row = judge_key(key, config, declared, hf_base, mlx_base, hf_out, mlx_out,
                            tolerance, args_class)
            if row["status"] in ("ignored by MLX", "read differently", "used only by MLX"):
                if row["declared_by_mlx_model_args"] or any(w in key for w in VARYING_WORDS):
                    problems.append(row["fact"])
                else:
                    row["status"] = "hard-coded by MLX"
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tried = [r for r in rows if r["status"] not in ("not applicable", "error")]
    errors = [r for r in rows if r["status"] == "error"]
    verdict = "fail" if problems else "error" if errors else "pass" if tried else "skip"
    result = subject.result("config", verdict=verdict, summary="")
    counts = {s: sum(r["status"] == s for r in rows) for s in
              ("honoured", "no effect", "ignored by MLX", "read differently", "used only by MLX",
               "hard-coded by MLX", "not applicable")}
    result.metrics = {"keys_tried": len(tried), **{k.replace(" ", "_"): v
                                                    for k, v in counts.items()}}
    result.details = {"keys": rows, "problems": problems}
    result.metrics["errors"] = len(errors)
    if problems:
        result.summary = f"{len(problems)} key(s) not honoured by MLX; first: {problems[0]}"
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
    return [result]


def transformers_refuses(checkpoint: Path) -> str | None:
    """transformers' config class rejecting the config.json (its own validation), or
    None when it accepts it."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(checkpoint)
    except Exception as e:
        return mlx_side.describe_import_error(e)
    return None


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
