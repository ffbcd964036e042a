"""The `quantize` check: mlx-lm's own convert path at 4 and 8 bits, then reload, as a user would.

The bfloat16 tiny checkpoint (what real checkpoints are) goes through
`mlx_lm.convert.convert(quantize=True, q_bits=B, q_group_size=64)`: load, the model's
own quant predicate, `quantize_model`, `save`. The output is loaded back with
`load_model`, so `sanitize` runs on mlx-lm's own output (a non-idempotent sanitize
breaks here). The reloaded model is then measured against the unquantized MLX model
loaded from the same bfloat16 checkpoint:

- the dtype check again: every floating parameter (scales and biases included) and
  every stage stays bfloat16;
- next-token distributions: mean KL(unquantized || quantized) and top-1 agreement
  over the prompt's positions, within bounds calibrated on correct ports;
- per-stage rel L2 of quantized vs unquantized hidden states; the first stage beyond
  the bound is named;
- the modules mlx-lm leaves unquantized (predicate, group-size rule, or a class
  nn.quantize does not handle), listed as facts.

The tiny models have hidden size 64, so group size 64 quantizes whole rows; the
bounds are calibrated on that (docs/tolerances.md).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import compat, dtypes, layers, tracing
from .generation import raised_in_mlx_lm
from .schema import CheckResult
from .subject import Subject

CHECK = "quantize"
BITS = (4, 8)
GROUP_SIZE = 64
BASE_DTYPE = "bfloat16"  # the checkpoint dtype unless the config names a half dtype

# Bounds by bits, calibrated on correct ports of the installed mlx-lm (docs/tolerances.md).
# Quality: the quantized model against the unquantized one.
# Random tiny models with sharp attention and large logits are far more sensitive than
# trained ones (18 correct ports: mean KL up to 3.3 and top-1 down to 0.15 at 4 bits, KL
# up to 0.26 at 8 bits): these bounds catch gross breakage only (a garbage model has
# top-1 near 1/vocab and stage rel L2 near 1.4); the fidelity bound below is the tight one.
KL_BOUND = {4: 8.0, 8: 1.0}  # mean KL(unquantized || quantized) per position, nats
TOP1_BOUND = {4: 0.05, 8: 0.5}  # minimum top-1 agreement with the unquantized model
STAGE_BOUND = {4: 1.2, 8: 0.5}  # rel L2 of each stage's hidden states
# Fidelity: the reloaded quantized model against the unquantized model whose quantized
# weights were quantized and dequantized in place (same group size and bits), both run
# in float32 on the same bfloat16-derived values. Only accumulation order separates the
# two, so anything the convert/reload path changed besides the weights' quantization
# (sanitize run twice, a per-layer setting lost in the saved config, a quantized layer
# computing something else) stands out.
FIDELITY_BOUND = 1e-4


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A real word-level tokenizer over the tiny vocabulary: mlx_lm.convert loads and
    saves the checkpoint's tokenizer, and runs unpatched when there is one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Every special token named, in the vocabulary: the class transformers picks for the
    # model_type (Qwen2Tokenizer, ...) adds its own default for any left out (Qwen2's pad
    # "<|endoftext|>": 513 tokens for a vocabulary of 512).
    last = f"t{vocab_size - 1}"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token=last,
                            eos_token=last, pad_token=last).save_pretrained(directory)
    # Read back as mlx-lm's loader reads it, here in our own frame: a tokenizer of ours
    # that does not load is our driver's error, not a finding of mlx_lm.convert.
    from transformers import AutoTokenizer

    loaded = len(AutoTokenizer.from_pretrained(directory))
    if loaded != vocab_size:
        raise compat.DriverError("transformers", f"the tiny tokenizer to read back with "
                                 f"{vocab_size} tokens", f"{loaded}")


def convert(source: Path, target: Path, bits: int, vocab_size: int) -> str:
    """mlx_lm.convert.convert with quantization, as a user runs it, on a copy of `source`
    given a tokenizer; returns what it printed."""
    import os

    from . import compat

    given = target.with_name(target.name + "-source")
    given.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not (given / file.name).exists():
            os.symlink(file.resolve(), given / file.name)
    write_tokenizer(given, vocab_size)
    log = io.StringIO()
    # convert prints progress: keep stdout clean for `--json -`
    with contextlib.redirect_stdout(log):
        compat.mlx_convert_quantized(given, target, bits, GROUP_SIZE)
    return log.getvalue()


def convert_dtype(config: dict[str, Any]) -> str | None:
    """The dtype mlx_lm.convert casts to, read as convert.py reads it: top-level
    `torch_dtype`, else `text_config.dtype` (a top-level `dtype` is not read)."""
    dtype = config.get("torch_dtype")
    text = config.get("text_config")
    if dtype is None and isinstance(text, dict):
        dtype = text.get("dtype")
    return dtype if dtype in ("float16", "bfloat16", "float32") else None


def next_token_stats(ref_logits: np.ndarray, q_logits: np.ndarray) -> dict[str, float]:
    """KL(ref || q) per position (nats), its mean and max, and top-1 agreement."""
    ref = ref_logits.reshape(-1, ref_logits.shape[-1]).astype(np.float64)
    cand = q_logits.reshape(-1, q_logits.shape[-1]).astype(np.float64)
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = cand - cand.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(np.mean(ref.argmax(-1) == cand.argmax(-1)))}


def quantization_map(fresh: Any, quantized: Any, predicate: Any) -> dict[str, Any]:
    """Which modules were quantized, and why the others were not."""
    modules = dict(quantized.named_modules())
    quantized_paths: list[str] = []
    left: dict[str, str] = {}
    for path, module in fresh.named_modules():
        if not path or not hasattr(module, "to_quantized"):
            continue
        after = modules.get(path)
        if after is not None and "scales" in after:
            quantized_paths.append(path)
            continue
        weight = module.get("weight") if isinstance(module, dict) else None
        if weight is not None and weight.shape[-1] % GROUP_SIZE != 0:
            left[path] = (f"{type(module).__name__}: input width {weight.shape[-1]} is not a "
                          f"multiple of group size {GROUP_SIZE}")
        elif predicate is not None:
            left[path] = f"{type(module).__name__}: the model's quant_predicate returns False"
        else:
            left[path] = f"{type(module).__name__}: not quantized"
    # matrices in classes nn.quantize does not handle (conv1d, custom layers)
    not_quantizable: dict[str, str] = {}
    for path, module in fresh.named_modules():
        if not path or hasattr(module, "to_quantized"):
            continue
        for name, value in module.items():
            if hasattr(value, "ndim") and value.ndim >= 2:
                not_quantizable[f"{path}.{name}"] = (f"{type(module).__name__} "
                                                     f"{tuple(value.shape)}")
    return {"quantized": quantized_paths, "left_unquantized": left,
            "not_quantizable": not_quantizable}


def fake_quantized(source: Path, quantized: Any, dtype: str) -> tuple[Any, list[str]]:
    """The unquantized model with each weight that `quantized` holds quantized replaced by
    its quantize-dequantize round trip; the paths that could not be paired."""
    import mlx.core as mx

    from . import mlx_side

    model, _, _ = mlx_side.load(source)
    model.set_dtype(mx.float32)
    fresh = dict(model.named_modules())
    updates = []
    unpaired = []
    for path, qm in quantized.named_modules():
        if not path or "scales" not in qm:
            continue
        module = fresh.get(path)
        if module is None or "weight" not in module:
            unpaired.append(path)
            continue
        # quantize the weight in the dtype convert quantized it in; dequantize in float32
        weight = module["weight"].astype(getattr(mx, dtype))
        parts = mx.quantize(weight, qm.group_size, qm.bits, mode=qm.mode)
        scales = parts[1].astype(mx.float32)
        biases = parts[2].astype(mx.float32) if len(parts) > 2 else None
        restored = mx.dequantize(parts[0], scales, biases, qm.group_size, qm.bits,
                                 mode=qm.mode)
        updates.append((f"{path}.weight", restored))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return model, unpaired


def _stage_rows(ref: Any, cand: Any, config: dict[str, Any], bound: float) -> list[Any]:
    rows, _, _ = layers.compare_stages(ref, cand, config, bound)
    return rows


def check_bits(subject: Subject, bits: int, source: Path, want: str, ref_model: Any,
               ref_capture: Any, workdir: Path) -> CheckResult:
    """One bit width; `want` is the dtype convert leaves the model in."""
    from . import mlx_side

    start = time.perf_counter()
    result = subject.result(CHECK, verdict="pass", summary="")
    result.metrics = {"bits": bits, "group_size": GROUP_SIZE, "base_dtype": want,
                      "kl_bound": KL_BOUND[bits], "top1_bound": TOP1_BOUND[bits],
                      "stage_bound": STAGE_BOUND[bits]}
    target = workdir / f"q{bits}"
    try:
        log = convert(source, target, bits, _vocab_size(subject))
    except Exception as e:
        if isinstance(e, compat.DriverError) or not raised_in_mlx_lm(e):
            raise
        result.verdict = "fail"
        result.first_divergent_layer = "load"
        result.summary = (f"{bits}-bit: mlx_lm.convert fails on this model: "
                          f"{mlx_side.describe_import_error(e)}")
        return _done(result, start)
    result.details["convert_log"] = log.strip().splitlines()[-4:]
    try:
        model, config = compat.mlx_load_model(target, strict=True)
    except Exception as e:
        if isinstance(e, compat.DriverError) or not raised_in_mlx_lm(e):
            raise
        # convert worked, so the model's code cannot load its own output: sanitize is not
        # idempotent, or the saved config does not rebuild the same quantized layers
        result.verdict = "fail"
        result.first_divergent_layer = "load"
        result.summary = (f"{bits}-bit: mlx-lm's own converted output does not load back "
                          f"(sanitize not idempotent?): {mlx_side.describe_import_error(e)}")
        return _done(result, start)

    qmap = quantization_map(ref_model, model, getattr(ref_model, "quant_predicate", None))
    result.details["quantized_modules"] = len(qmap["quantized"])
    result.details["left_unquantized"] = qmap["left_unquantized"]
    result.details["not_quantizable"] = qmap["not_quantizable"]
    result.metrics["quantized_modules"] = len(qmap["quantized"])
    result.metrics["left_unquantized"] = len(qmap["left_unquantized"])
    per_layer = config.get("quantization", {})
    result.details["per_layer_quantization"] = {k: v for k, v in per_layer.items()
                                                if isinstance(v, dict)}

    # the dtype check again, on the reloaded quantized model
    params = tracing.parameter_dtypes(model)
    wrong = sorted(k for k, d in params.items() if d in tracing.FLOAT_NAMES and d != want)
    result.details["parameters_not_in_dtype"] = {k: params[k] for k in wrong}
    try:
        with tracing.cpu_gather_mm():
            calls, logits_dtype, capture = tracing.traced_forward(model, subject.ids)
    except Exception as e:
        if not raised_in_mlx_lm(e):
            raise
        # e.g. a tied lm_head computed from `embed_tokens.weight` (packed after quantization)
        # instead of `embed_tokens.as_linear`
        result.verdict = "fail"
        result.summary = (f"{bits}-bit: the reloaded quantized model's forward fails: "
                          f"{mlx_side.describe_import_error(e)}")
        return _done(result, start)
    stages, layer_list = tracing.stages(calls, layers.layer_count(subject.config))
    stages.append(("logits", "", logits_dtype))
    result.details["stage_dtypes"] = {name: d for name, _, d in stages}
    bad_stage = next(((n, p) for n, p, d in stages if d != want), None)
    upcast = None
    if bad_stage is not None:
        name, prefix = bad_stage
        upcast = tracing.locate_upcast(model, calls, name, prefix, layer_list, want)
        result.details["upcast"] = upcast

    stats = next_token_stats(ref_capture.logits, capture.logits)
    result.metrics.update(stats)
    rows = _stage_rows(ref_capture, capture, subject.config, STAGE_BOUND[bits])
    result.details["stage_rel_l2_vs_unquantized"] = {r.name: r.rel_l2 for r in rows}
    result.metrics["max_stage_rel_l2"] = max((r.rel_l2 for r in rows), default=None)
    broken = next((r for r in rows if not r.ok), None)

    # fidelity, in float32: the quantized model's scales and other parameters upcast
    # (its packed weights stay as they are) against its weights quantized in place
    import mlx.core as mx

    fq_model, unpaired = fake_quantized(source, model, want)
    model.set_dtype(mx.float32)
    fq_capture = mlx_side.forward(fq_model, subject.ids)
    q32_capture = mlx_side.forward(model, subject.ids)
    fidelity = layers.judge(fq_capture, q32_capture, subject.config, "float32",
                            subject.variant.name, CHECK, tolerance=FIDELITY_BOUND)
    result.layers = fidelity.layers
    result.metrics["fidelity_max_rel_l2"] = fidelity.metrics.get("max_rel_l2")
    result.metrics["fidelity_bound"] = FIDELITY_BOUND
    if unpaired:
        result.details["fidelity_unpaired"] = unpaired

    problems = []
    if wrong:
        problems.append(f"{len(wrong)} parameters not {want} (first: {wrong[0]} "
                        f"{params[wrong[0]]})")
    if bad_stage is not None and upcast is not None:
        problems.append(f"hidden states leave {want} at {bad_stage[0]}: float32 enters at "
                        f"{upcast['module']}")
    if stats["kl_mean"] > KL_BOUND[bits]:
        problems.append(f"mean KL {stats['kl_mean']:.3g} > {KL_BOUND[bits]}")
    if stats["top1_agreement"] < TOP1_BOUND[bits]:
        problems.append(f"top-1 agreement {stats['top1_agreement']:.3f} < {TOP1_BOUND[bits]}")
    if fidelity.verdict == "fail":
        result.first_divergent_layer = fidelity.first_divergent_layer
        result.localization = fidelity.localization
        where = (f" ({fidelity.localization.part}, {fidelity.localization.module})"
                 if fidelity.localization else "")
        problems.append(f"the reloaded model differs from its own weights quantized in place "
                        f"from {fidelity.first_divergent_layer}{where}: rel_l2 "
                        f"{fidelity.metrics['max_rel_l2']:.3g} > {FIDELITY_BOUND}")
    elif fidelity.verdict == "error":
        problems.append(f"fidelity: {fidelity.summary}")
    if broken is not None:
        result.first_divergent_layer = result.first_divergent_layer or broken.name
        problems.append(f"first stage beyond the bound: {broken.name} rel_l2 "
                        f"{broken.rel_l2:.3g} > {STAGE_BOUND[bits]}")
    elif bad_stage is not None:
        result.first_divergent_layer = result.first_divergent_layer or bad_stage[0]
    unq = qmap["left_unquantized"]
    unq_text = (f"; left unquantized: {', '.join(list(unq)[:3])}"
                f"{' ...' if len(unq) > 3 else ''}" if unq else "")
    if problems:
        result.verdict = "fail"
        result.summary = f"{bits}-bit: " + "; ".join(problems) + unq_text
    else:
        result.summary = (f"{bits}-bit: {len(qmap['quantized'])} modules quantized, reloads; "
                          f"KL {stats['kl_mean']:.2e} <= {KL_BOUND[bits]}, top-1 "
                          f"{stats['top1_agreement']:.3f} >= {TOP1_BOUND[bits]}, max stage "
                          f"rel_l2 {result.metrics['max_stage_rel_l2']:.3g} <= "
                          f"{STAGE_BOUND[bits]}; matches its weights quantized in place "
                          f"(rel_l2 {result.metrics['fidelity_max_rel_l2']:.2e} <= "
                          f"{FIDELITY_BOUND}); stays {want}{unq_text}")
    return _done(result, start)


def _vocab_size(subject: Subject) -> int:
    return int(subject.hf_model.config.get_text_config().vocab_size)


def _done(result: CheckResult, start: float) -> CheckResult:
    result.duration_s = time.perf_counter() - start
    return result


def run(subject: Subject) -> list[CheckResult]:
    from . import mlx_side

    cast = convert_dtype(subject.config)
    stored = cast if cast in dtypes.HALF_DTYPES else BASE_DTYPE
    want = cast or stored
    source = dtypes.half_checkpoint(subject.checkpoint, stored)
    ref_model, _, weights = mlx_side.load(source)
    if ref_model is None:
        return [subject.result(CHECK, verdict="fail", weights=weights, first_divergent_layer="load",
                               summary=f"the {stored} checkpoint does not load strictly")]
    with tracing.cpu_gather_mm():
        ref_capture = mlx_side.forward(ref_model, subject.ids)
    workdir = Path(tempfile.mkdtemp(prefix="mlx-verify-quantize-"))
    try:
        return [check_bits(subject, bits, source, want, ref_model, ref_capture, workdir)
                for bits in BITS]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
