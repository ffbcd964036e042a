"""The `dtype` check: checkpoint dtype inference, half-precision dtype trace, bf16 parity.

(a) The checkpoint's dtype, inferred as transformers would (`dtype`/`torch_dtype` in
    the config, a nested text config, the index metadata, else the safetensors
    headers), and where the answer came from.
(b) For bfloat16 and float16: a checkpoint written in that dtype, loaded through
    mlx-lm's loader. Every parameter must keep the dtype after `sanitize`, and the
    hidden states and logits must keep it through every layer. On contamination the
    first stage, the module where float32 enters and the float32 parameter (or the
    float32 lines of the module's code) are named, from a trace of the dtypes going
    into and out of every module in call order (checks/tracing.py).
(c) Parity in half precision: the MLX half model against transformers in float32 on
    the same (half-rounded) weights, so the measured error is the compute rounding
    of the port only. Transformers' own half-precision run on the same weights is
    measured against the same reference and reported next to it: a correct port's
    error is of the same size as transformers' own.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import compare, layers, mlx_side, tracing
from .render import num
from .schema import CheckResult
from .subject import Subject
from .tracing import FLOAT_NAMES, Stage

CHECK = "dtype"
HALF_DTYPES = ("bfloat16", "float16")
# The half parity bound is max(LAYER_TOLERANCE[dtype], HF_RATIO x transformers' own half
# error on the same weights); correct ports measured 0.8-1.44x (docs/tolerances.md).
HF_RATIO = 2.0

# safetensors header dtype names -> torch/mlx dtype names
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U32": "uint32", "BOOL": "bool",
}


# ---------------------------------------------------------------- (a) inference


@dataclass
class DtypeInference:
    dtype: str | None  # "bfloat16", "float16", "float32", ... or None when unknown
    source: str  # where the answer came from, e.g. "config.json torch_dtype"
    facts: list[str] = field(default_factory=list)
    header_counts: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count


def _config_dtype(config: dict[str, Any]) -> tuple[str | None, str | None]:
    # transformers 5 writes `dtype`, older versions `torch_dtype`; both are read.
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value != "auto":
            return value.removeprefix("torch."), key
    return None, None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def header_dtypes(checkpoint: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(tensor name, dtype name, shape) for every tensor of every model*.safetensors."""
    tensors = []
    for file in sorted(checkpoint.glob("model*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
            tensors.append((name, dtype, tuple(info["shape"])))
    return tensors


def infer_checkpoint_dtype(checkpoint: Path) -> DtypeInference:
    """The checkpoint's dtype the way transformers decides it for `dtype="auto"`, with
    the safetensors fallback of the porting skill: the majority floating dtype of the
    tensors, ignoring 1-D float32 tensors (norms often kept in float32)."""
    config: dict[str, Any] = {}
    config_file = checkpoint / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
    facts: list[str] = []
    dtype, key = _config_dtype(config)
    if dtype is not None:
        return DtypeInference(dtype, f"config.json {key}")
    for nested in ("text_config", "language_config", "llm_config"):
        sub = config.get(nested)
        if isinstance(sub, dict):
            dtype, key = _config_dtype(sub)
            if dtype is not None:
                return DtypeInference(dtype, f"config.json {nested}.{key}")
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata") or {}
        if isinstance(meta.get("dtype"), str):
            return DtypeInference(meta["dtype"].removeprefix("torch."),
                                  "model.safetensors.index.json metadata dtype")
    tensors = header_dtypes(checkpoint)
    if not tensors:
        return DtypeInference(None, "no dtype in config.json and no safetensors files")
    floats = [(n, d, s) for n, d, s in tensors if d in FLOAT_NAMES]
    counts = Counter(d for _, d, _ in floats)
    # 1-D float32 tensors in a half checkpoint are norms/biases kept in float32 on purpose
    half = [(n, d, s) for n, d, s in floats if not (d == "float32" and len(s) <= 1)]
    votes = Counter(d for _, d, _ in half) or counts
    if not votes:
        return DtypeInference(None, "safetensors headers hold no floating tensor",
                              header_counts=dict(Counter(d for _, d, _ in tensors)))
    dtype = votes.most_common(1)[0][0]
    stray = [n for n, d, s in floats if d == "float32" and len(s) <= 1 and dtype != "float32"]
    if stray:
        facts.append(f"{len(stray)} 1-D float32 tensors ignored (first: {stray[0]})")
    if len(votes) > 1:
        facts.append("mixed floating dtypes: " + ", ".join(f"{d} x{c}" for d, c in
                                                            votes.most_common()))
    # transformers itself takes the first floating tensor of the first file
    first = next((d for _, d, _ in floats), None)
    if first is not None and first != dtype:
        facts.append(f"transformers' own rule (first floating tensor) gives {first}")
    return DtypeInference(dtype, "safetensors header majority (config.json has no dtype)",
                          facts=facts, header_counts=dict(counts))


# ---------------------------------------------------------------- (c) parity and the check


def half_checkpoint(checkpoint: Path, dtype: str) -> Path:
    """The float32 tiny checkpoint with its floating tensors cast to `dtype`, next to it.

    Bit-identical to synth.write_checkpoint(config, seed, dtype) (same weights, same
    round-to-nearest cast) without building the transformers model again.
    """
    import os
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    target = checkpoint.with_name(f"{checkpoint.name}-{dtype}")
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.name.endswith(".safetensors"):
            tensors = load_file(file)
            cast = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                    for k, v in tensors.items()}
            save_file(cast, tmp / file.name, metadata={"format": "pt"})
        elif file.is_file():
            shutil.copy(file, tmp / file.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _load_mlx(checkpoint: Path) -> tuple[Any, Any]:
    model, _, weights = mlx_side.load(checkpoint)
    return model, weights


def check_half(subject: Subject, dtype: str, inference: DtypeInference) -> CheckResult:
    """One half dtype: weights after loading, the dtype trace, parity against transformers."""
    from . import hf_side, mlx_side

    start = time.perf_counter()
    checkpoint = half_checkpoint(subject.checkpoint, dtype)
    written = infer_checkpoint_dtype(checkpoint)
    model, weights = _load_mlx(checkpoint)
    result = subject.result(CHECK, verdict="pass", summary="")
    result.metrics = {"dtype": dtype, "checkpoint_dtype": inference.dtype,
                      "checkpoint_dtype_source": inference.source}
    result.details = {"checkpoint_dtype": {"dtype": inference.dtype, "source": inference.source,
                                           "facts": inference.facts,
                                           "header_counts": inference.header_counts},
                      "half_checkpoint": {"dtype": written.dtype, "source": written.source}}
    if model is None:
        result.verdict = "fail"
        result.weights = weights
        result.summary = f"{dtype}: the {dtype} checkpoint does not load strictly"
        return result

    params = tracing.parameter_dtypes(model)
    wrong_params = sorted(k for k, d in params.items() if d in FLOAT_NAMES and d != dtype)
    cast = getattr(model, "cast_predicate", None)
    declared = [k for k in wrong_params if callable(cast) and not cast(k)]
    wrong_params = [k for k in wrong_params if k not in declared]
    result.metrics["parameters"] = len(params)
    result.metrics["parameters_not_in_dtype"] = len(wrong_params)
    result.details["parameters_not_in_dtype"] = {k: params[k] for k in wrong_params}
    if declared:
        result.details["kept_by_cast_predicate"] = {k: params[k] for k in declared}

    try:
        with tracing.cpu_gather_mm() as emulated:
            calls, logits_dtype, mlx_capture = tracing.traced_forward(model, subject.ids)
    except RuntimeError as e:
        limitation = mlx_side.backend_limitation(e)
        if limitation is None:
            raise
        # another op the CPU backend runs only in float32: nothing to measure
        result.details["backend_limitation"] = str(e)
        result.verdict = "fail" if wrong_params else "skip"
        result.summary = (f"{dtype}: " + (f"{len(wrong_params)} parameters not {dtype} after "
                                          f"loading (first: {wrong_params[0]}); " if wrong_params
                                          else "")
                          + f"forward not run: {limitation}")
        result.duration_s = time.perf_counter() - start
        return result
    if emulated["calls"]:
        result.details["cpu_gather_mm_emulated"] = (
            f"{emulated['calls']} gather_mm calls (MoE experts) computed in float32 and cast "
            "to the input dtype: MLX's CPU backend has no half-precision gather_mm")
    stages, layer_list = tracing.stages(calls, layers.layer_count(subject.config))
    stages.append(("logits", "", logits_dtype))
    result.details["stage_dtypes"] = {name: d for name, _, d in stages}
    result.metrics["logits_dtype"] = logits_dtype
    bad_stage = next(((n, p) for n, p, d in stages if d != dtype), None)
    upcast = None
    if bad_stage is not None:
        name, prefix = bad_stage
        if name == "logits":
            prefix = "lm_head" if "lm_head" in calls else ""
        upcast = tracing.locate_upcast(model, calls, name, prefix, layer_list, dtype)
        result.details["upcast"] = upcast
        result.first_divergent_layer = name
    result.metrics["first_non_half_stage"] = None if bad_stage is None else bad_stage[0]

    # parity: MLX half vs transformers float32 on the same half-rounded weights
    try:
        ref = hf_side.forward(hf_side.load(checkpoint, dtype="float32"), subject.ids)
        hf_half = hf_side.forward(hf_side.load(checkpoint, dtype=dtype), subject.ids)
    except Exception as e:
        # transformers cannot run this model in half precision: the dtype facts stand
        ref = hf_half = None
        result.details["parity_not_run"] = f"transformers fails: {type(e).__name__}: {e}"[:300]
    parity = None
    if ref is not None and hf_half is not None:
        parity = _parity(subject, dtype, ref, hf_half, mlx_capture, result)

    problems = []
    if wrong_params:
        problems.append(f"{len(wrong_params)} parameters not {dtype} after loading "
                        f"(first: {wrong_params[0]} {params[wrong_params[0]]})")
    if bad_stage is not None and upcast is not None:
        where = upcast["module"]
        if upcast.get("parameters"):
            where += f", parameter {upcast['parameters'][0]}"
        elif upcast.get("before"):
            where += f" between {upcast.get('after')} and {upcast['before']}"
        problems.append(f"hidden states leave {dtype} at {bad_stage[0]} "
                        f"({_stage_dtype(stages, bad_stage[0])}): float32 enters at {where}")
    if parity is None:
        problems.append(f"parity not run ({result.details['parity_not_run']})")
    elif parity.verdict == "fail":
        result.localization = parity.localization
        if result.first_divergent_layer is None:
            result.first_divergent_layer = parity.first_divergent_layer
        problems.append(f"parity vs transformers float32: {parity.summary}")
    elif parity.verdict == "error":
        problems.append(f"parity could not run: {parity.summary}")

    if problems:
        parity_only = len(problems) == 1 and (parity is None or parity.verdict == "error")
        result.verdict = "error" if parity_only else "fail"
        result.summary = f"{dtype}: " + "; ".join(problems)
    else:
        result.summary = (f"{dtype}: {len(params)} parameters and {len(stages)} stages stay "
                          f"{dtype}; max rel_l2 vs transformers float32 "
                          f"{parity.metrics['max_rel_l2']:.2e} <= "
                          f"{result.metrics['tolerance_rel_l2']:.1e} (transformers {dtype}: "
                          f"{num(result.metrics['hf_half_max_rel_l2'])}); checkpoint "
                          f"dtype {inference.dtype} from {inference.source}")
    result.duration_s = time.perf_counter() - start
    return result


def _parity(subject: Subject, dtype: str, ref: Any, hf_half: Any, mlx_capture: Any,
            result: CheckResult) -> CheckResult:
    """MLX half vs transformers float32 on the same half-rounded weights, per stage."""
    # transformers' own half-precision error on the same weights: the noise floor. Where
    # it is large (an MoE router flipping between near-tied experts), the bound follows it.
    fixed = compare.LAYER_TOLERANCE[dtype]
    hf_rows, _, _ = layers.compare_stages(ref, hf_half, subject.config, fixed)
    hf_max = max((r.rel_l2 for r in hf_rows), default=0.0)
    tolerance = max(fixed, HF_RATIO * hf_max)
    parity = layers.judge(ref, mlx_capture, subject.config, dtype, subject.variant.name, CHECK,
                          tolerance=tolerance)
    result.layers = parity.layers
    result.metrics.update({
        "tolerance_rel_l2": tolerance,
        "fixed_tolerance_rel_l2": fixed,
        "max_rel_l2": parity.metrics.get("max_rel_l2"),
        "logits_rel_l2": parity.metrics.get("logits_rel_l2"),
        "hf_half_logits_rel_l2": compare.rel_l2(hf_half.logits, ref.logits),
        "hf_half_max_rel_l2": hf_max,
        "top1_agreement": parity.metrics.get("top1_agreement"),
    })
    return parity


def _stage_dtype(stages: list[Stage], name: str) -> str | None:
    return next((d for n, _, d in stages if n == name), None)


def run(subject: Subject) -> list[CheckResult]:
    inference = infer_checkpoint_dtype(subject.checkpoint)
    return [check_half(subject, dtype, inference) for dtype in HALF_DTYPES]
