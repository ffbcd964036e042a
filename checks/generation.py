"""The `generation` check: decoding with the model's own caches, against transformers.

Three measurements, one result each (`details["part"]`):

- greedy: N tokens decoded greedily after the parity prompt. MLX decodes with the
  caches `make_prompt_cache` returns, one token at a time; transformers decodes the
  same tokens with its own cache (an explicit `past_key_values` loop fed MLX's
  tokens, which is transformers' own greedy decoding up to the first mismatch). At
  the first mismatch both candidates must be a near tie on both sides.
- kv-cache: the logits of every decode step equal (1) one full MLX forward over the
  same sequence without a cache and (2) transformers' incremental decoding. At the
  first divergent step the step is re-run with every module captured on both sides,
  and the per-layer comparison names the layer and module.
- batch: prompts of different lengths through mlx-lm's BatchGenerator (right-padded
  prefill rolled into left padding, batch caches) equal the single-prompt runs.
- batch-chunked: the same prompts handed whole to mlx-lm's PromptProcessingBatch with
  prefill_step_size 16: the caches' lengths are set once and read again in each later
  chunk, which only holds if every layer advances its cache; equal the single runs too.
- kv-quantized: what `--kv-bits` does (generate.maybe_quantize_kv_cache): after the
  prompt every KV cache becomes a QuantizedKVCache (8 bits, groups of 32), and the
  decode steps, fed the same tokens, stay within a calibrated bound of the
  full-precision decode; the attention then runs mlx-lm's quantized path. Keys are
  quantized along head_dim, so it needs head_dim a multiple of 32: the tiny default
  (16) cannot, the head-dim variant (32) can, and runs only this part.

Bounds are calibrated on correct ports; see docs/tolerances.md ("generation and long").
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import compare, compat, layers
from .schema import CheckResult
from .subject import Subject

CHECK = "generation"
DECODE_STEPS = 16
BATCH_STEPS = 8
# Prompt slices of the parity prompt for the batch: different lengths, different starts.
BATCH_SLICES = ((0, 48), (7, 42), (20, 39))
# The chunked batch prefill's step: the prompts' 47, 34 and 18 tokens before their last
# take 3, 3 and 2 chunks, so every padded prompt's lengths are read in a second chunk.
BATCH_CHUNK = 16

# rel L2 of one step's logits against transformers' cache: correct fp32 ports measure
# up to 2.2e-6 (attention) and 7.5e-6 (qwen3_next, gated delta net state); half
# precision as the per-stage parity bound (bf16 measured up to 1.4e-2).
KV_TOLERANCE = {**compare.LAYER_TOLERANCE, "float32": 3e-5}
# MLX cache vs MLX full forward: same kernels on one machine, measured 0 to 2.6e-7.
SELF_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
# Near tie: each side's top-2 logit gap / std of the step's logits. A flip needs the two
# gaps to sum below twice the largest logit error (greedy's `max_logit_error_std`):
# correct ports measure <= 7e-6 std in float32, and over 13 ports <= 0.236 in bfloat16
# and <= 5.08e-2 in float16, both qwen3_5 (its gated delta net); docs/tolerances.md,
# "Half precision".
TIE_BOUND = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.12}
# Batched vs single: rel L2 of the log-probabilities (same kernels, padded shapes).
BATCH_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
# --kv-bits: 8-bit keys and values in groups of 32 (MLX's smallest group) against the
# full-precision decode of the same tokens, rel L2 of each step's logits. Correct ports
# measure 3.9e-3 (qwen3), 1.1e-2 (olmo2), 1.7e-2 (llama), 2.7e-2 (mistral) over 15 steps
# on their head-dim variants; a port whose attention mishandles the quantized cache
# raises or moves the logits by order 1.
KV_BITS = 8
KV_GROUP = 32
KV_QUANT_TOLERANCE = 1e-1


@dataclass
class Decode:
    """One greedy decode: logits of the prompt pass and of every step."""

    prompt_logits: np.ndarray  # (prompt, vocab): the prompt pass
    step_logits: np.ndarray  # (steps, vocab): step 0 is the prompt's last position
    tokens: list[int]  # greedy token of each step
    cache_types: list[str]


def _mlx_cache_types(cache: list[Any]) -> list[str]:
    names = []
    for c in cache:
        name = type(c).__name__
        inner = getattr(c, "caches", None)
        if inner:
            name += "(" + ",".join(type(i).__name__ for i in inner) + ")"
        names.append(name)
    return names


def mlx_decode(model: Any, prompt: np.ndarray, steps: int,
               forced: list[int] | None = None) -> Decode:
    """Prompt pass, then one token at a time with the model's own caches; greedy
    unless `forced` gives the tokens to feed."""
    import mlx.core as mx
    cache = compat.mlx_make_prompt_cache(model)
    logits = model(mx.array(prompt), cache=cache).astype(mx.float32)
    prompt_logits = np.array(logits[0])
    steps_out = [prompt_logits[-1]]
    tokens = [int(np.argmax(steps_out[-1]))]
    for k in range(1, steps):
        fed = forced[k - 1] if forced is not None else tokens[-1]
        logits = model(mx.array([[fed]]), cache=cache).astype(mx.float32)
        steps_out.append(np.array(logits[0, -1]))
        tokens.append(int(np.argmax(steps_out[-1])))
    return Decode(prompt_logits, np.stack(steps_out), tokens, _mlx_cache_types(cache))


def hf_decode(model: Any, prompt: np.ndarray, forced: list[int]) -> Decode:
    """transformers' incremental decoding with its own cache, fed `forced` tokens."""
    import torch

    keyword = compat.hf_cache_keyword(model)
    # each step's position said explicitly: without it some models ask the cache
    # (granitemoehybrid's get_seq_length raises on a cache of linear-attention layers only)
    positions = compat.hf_forward_has(model, "position_ids")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        cache = compat.hf_returned_cache(out, keyword)
        prompt_logits = out.logits[0].float().numpy().copy()
        steps_out = [prompt_logits[-1]]
        for step, token in enumerate(forced):
            extra = ({"position_ids": torch.tensor([[prompt.shape[1] + step]])}
                     if positions else {})
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{keyword: cache},
                        **extra)
            cache = compat.hf_returned_cache(out, keyword)
            steps_out.append(out.logits[0, -1].float().numpy().copy())
    logits = np.stack(steps_out)
    return Decode(prompt_logits, logits, [int(t) for t in logits.argmax(-1)],
                  [type(cache).__name__])


def _std(logits: np.ndarray) -> float:
    return float(np.std(logits.astype(np.float64))) or 1.0


def tie_gaps(a: np.ndarray, b: np.ndarray, token_a: int, token_b: int) -> tuple[float, float]:
    """How far each side prefers its own token over the other's, in units of the
    step's logits std."""
    gap_a = (float(a[token_a]) - float(a[token_b])) / _std(a)
    gap_b = (float(b[token_b]) - float(b[token_a])) / _std(b)
    return gap_a, gap_b


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return k
    return None


def _rel(candidate: np.ndarray, reference: np.ndarray) -> float:
    return compare.metrics(candidate, reference)["rel_l2"]


def _error(subject: Subject, part: str, what: str, e: Exception) -> CheckResult:
    from .mlx_side import backend_limitation, describe_import_error

    limitation = backend_limitation(e)
    if limitation is not None:
        return subject.result(CHECK, verdict="skip", summary=f"{part}: {limitation}",
                              details={"part": part})
    return subject.result(CHECK, verdict="error", summary=f"{part}: {what} raised "
                          f"{describe_import_error(e)}", details={"part": part})


def kv_quantized_result(subject: Subject) -> CheckResult:
    """Decoding with the KV caches quantized after the prompt (`--kv-bits 8`) against
    the same decode in full precision."""
    import mlx.core as mx

    start = time.perf_counter()
    details: dict[str, Any] = {"part": "kv-quantized", "bits": KV_BITS, "group_size": KV_GROUP}
    model = subject.mlx_model
    caches = compat.mlx_make_prompt_cache(model)
    if not any(hasattr(c, "to_quantized") for c in caches):
        return subject.result(CHECK, verdict="skip", details=details,
                              summary="kv-quantized: measured nothing: no cache of this model "
                                      "converts to a QuantizedKVCache")
    logits = model(mx.array(subject.ids), cache=caches)
    mx.eval(logits)
    # the widths quantized: the last axis of the keys and of the values each cache holds
    # after the prompt (MLA caches hold values narrower than their keys)
    head_dims = sorted({int(getattr(c, name).shape[-1]) for c in caches
                        if hasattr(c, "to_quantized") for name in ("keys", "values")
                        if getattr(c, name, None) is not None})
    odd = [d for d in head_dims if d % KV_GROUP]
    if odd or not head_dims:
        return subject.result(CHECK, verdict="skip", details=details,
                              summary=f"kv-quantized: not measurable on this variant: cached "
                                      f"key/value width {odd or 'unknown'} is not a multiple "
                                      f"of MLX's smallest quantization group ({KV_GROUP})")
    full = mlx_decode(model, subject.ids, DECODE_STEPS)
    quantize = compat.mlx_lm_callable("mlx_lm.generate", "maybe_quantize_kv_cache",
                                      ("prompt_cache", "quantized_kv_start", "kv_group_size",
                                       "kv_bits"))
    quantize(caches, 0, KV_GROUP, KV_BITS)
    details["caches"] = _mlx_cache_types(caches)
    if not any(type(c).__name__ == "QuantizedKVCache" for c in caches):
        return subject.result(CHECK, verdict="skip", details=details,
                              summary="kv-quantized: measured nothing: maybe_quantize_kv_cache "
                                      "converted no cache")
    steps = []
    for token in full.tokens[:-1]:
        out = model(mx.array([[token]]), cache=caches).astype(mx.float32)
        steps.append(np.array(out[0, -1]))
    rels = [_rel(step, full.step_logits[k + 1]) for k, step in enumerate(steps)]
    worst = int(np.argmax(rels))
    ok = rels[worst] <= KV_QUANT_TOLERANCE
    details["step_rel_l2"] = [float(f"{r:.3g}") for r in rels]
    return subject.result(
        CHECK, verdict="pass" if ok else "fail", details=details,
        duration_s=time.perf_counter() - start,
        metrics={"max_rel_l2": rels[worst], "tolerance": KV_QUANT_TOLERANCE,
                 "worst_step": worst + 1, "head_dim": head_dims[-1]},
        summary=f"kv-quantized: {len(rels)} decode steps with {KV_BITS}-bit KV caches (group "
                f"{KV_GROUP}) {'within' if ok else 'beyond'} the full-precision decode: max "
                f"rel_l2 {rels[worst]:.2e} {'<=' if ok else '>'} {KV_QUANT_TOLERANCE:.0e} "
                f"(step {worst + 1})")


def run(subject: Subject) -> list[CheckResult]:
    from . import hf_side, mlx_side

    if subject.variant.name != "default" and not subject.stands_in:
        # head-dim variant: wide enough heads for the quantized KV cache (see above)
        return [_guarded_kv_quantized(subject)]
    start = time.perf_counter()
    prompt = subject.ids
    singles: SingleRuns = {}
    try:
        mlx_run = mlx_decode(subject.mlx_model, prompt, DECODE_STEPS)
    except Exception as e:
        failed = _error(subject, "greedy", "MLX decoding with make_prompt_cache", e)
        return [failed, _error(subject, "kv-cache", "MLX decoding with make_prompt_cache", e),
                batch_result(subject, singles), batch_chunked_result(subject, singles),
                _guarded_kv_quantized(subject)]
    try:
        forced = mlx_run.tokens[:-1]
        hf_run = hf_side.memo("hf_decode", subject.hf_model, (prompt, forced),
                              lambda: hf_decode(subject.hf_model, prompt, forced))
    except Exception as e:
        return [_error(subject, "greedy", "transformers incremental decoding", e),
                _error(subject, "kv-cache", "transformers incremental decoding", e),
                batch_result(subject, singles), batch_chunked_result(subject, singles)]
    sequence = np.concatenate([prompt, np.array([mlx_run.tokens[:-1]], dtype=prompt.dtype)], 1)
    # The reference proves itself first: transformers' incremental decoding must equal its
    # own full forward over the same tokens, or the driver is not decoding what it means
    # to (transformers 5.24 renamed the cache keyword; an unknown one is swallowed).
    problem = reference_decoding_problem(subject, hf_run, sequence)
    if problem is not None:
        failed = [subject.result(CHECK, verdict="error", summary=f"{part}: {problem}",
                                 details={"part": part}) for part in ("greedy", "kv-cache")]
        return [*failed, batch_result(subject, singles), batch_chunked_result(subject, singles)]
    full = mlx_side.plain_forward(subject.mlx_model, sequence)[0]
    hf_float32 = None
    if subject.dtype != "float32":
        # half precision: the kv-cache row holds MLX to transformers' float32 decode of the
        # same tokens, within its own half error (the dtype check's rule; a recurrent
        # state's rounding grows step by step on either side)
        try:
            hf_float32 = hf_decode(hf_side.load(subject.checkpoint, dtype="float32"), prompt,
                                   forced)
        except Exception as e:
            return [greedy_result(subject, mlx_run, hf_run),
                    _error(subject, "kv-cache", "transformers float32 incremental decoding", e),
                    batch_result(subject, singles), batch_chunked_result(subject, singles),
                    _guarded_kv_quantized(subject)]
    results = [greedy_result(subject, mlx_run, hf_run),
               kv_result(subject, mlx_run, hf_run, full, hf_float32)]
    for result in results:
        result.duration_s = time.perf_counter() - start
    results.append(batch_result(subject, singles))
    results.append(batch_chunked_result(subject, singles))
    results.append(_guarded_kv_quantized(subject))
    return results


def _guarded_kv_quantized(subject: Subject) -> CheckResult:
    try:
        return kv_quantized_result(subject)
    except NotImplementedError as e:
        # mlx-lm's own cache says it cannot (RotatingKVCache.to_quantized): --kv-bits is
        # not supported for this model, in mlx-lm itself
        from .mlx_side import describe_import_error

        return subject.result(CHECK, verdict="skip", details={"part": "kv-quantized"},
                              summary=f"kv-quantized: not supported by mlx-lm for this model: "
                                      f"{describe_import_error(e)}")
    except Exception as e:
        from .engine import raised_in
        from .mlx_side import describe_import_error

        if raised_in(e) == "mlx-lm":
            # the port's attention raises on mlx-lm's own quantized cache
            return subject.result(CHECK, verdict="fail", details={"part": "kv-quantized",
                                                                  "side": "mlx-lm"},
                                  summary=f"kv-quantized: mlx-lm raises decoding with "
                                          f"{KV_BITS}-bit KV caches: {describe_import_error(e)}")
        return _error(subject, "kv-quantized", "decoding with quantized KV caches", e)


def reference_decoding_problem(subject: Subject, hf_run: Decode,
                               sequence: np.ndarray) -> str | None:
    """Why transformers' incremental decoding cannot serve as the reference, or None."""
    from . import hf_side

    full = hf_side.plain_forward(subject.hf_model, sequence)[0]
    prompt_len = subject.ids.shape[1]
    tol = KV_TOLERANCE[subject.dtype]
    steps = [_rel(hf_run.step_logits[k], full[prompt_len - 1 + k])
             for k in range(len(hf_run.step_logits))]
    worst = int(np.argmax(steps))
    if steps[worst] <= tol:
        return None
    return (f"reference driver: transformers {compat.library_version('transformers')} "
            f"incremental decoding ({compat.hf_cache_keyword(subject.hf_model)}=...) differs "
            f"from its own full forward at step {worst} (rel_l2 {steps[worst]:.2e} > "
            f"{tol:.0e}): MLX not judged")


def greedy_result(subject: Subject, mlx_run: Decode, hf_run: Decode) -> CheckResult:
    bound = TIE_BOUND[subject.dtype]
    prompt_len = subject.ids.shape[1]
    k = first_mismatch(mlx_run.tokens, hf_run.tokens)
    metrics: dict[str, Any] = {
        "steps": len(mlx_run.tokens), "prompt_tokens": prompt_len, "tie_bound": bound,
        "tokens_agreeing": len(mlx_run.tokens) if k is None else k,
        "first_mismatch_step": k,
        # what TIE_BOUND is calibrated on: the largest logit error of a step (both sides
        # fed the same tokens), in units of that step's logits std
        "max_logit_error_std": max(
            (float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / _std(b)
             for a, b in zip(mlx_run.step_logits, hf_run.step_logits, strict=True)),
            default=0.0),
    }
    details: dict[str, Any] = {"part": "greedy", "mlx_tokens": mlx_run.tokens,
                               "transformers_tokens": hf_run.tokens[: (k or 0) + 1]
                               if k is not None else hf_run.tokens}
    if k is None:
        return subject.result(CHECK, verdict="pass", metrics=metrics, details=details,
                              summary=f"greedy: {len(mlx_run.tokens)}/{len(mlx_run.tokens)} "
                                      "tokens agree with transformers")
    mlx_gap, hf_gap = tie_gaps(mlx_run.step_logits[k], hf_run.step_logits[k],
                               mlx_run.tokens[k], hf_run.tokens[k])
    step_rel = _rel(mlx_run.step_logits[k], hf_run.step_logits[k])
    metrics.update({"first_mismatch_position": prompt_len + k - 1, "mlx_gap": mlx_gap,
                    "transformers_gap": hf_gap, "step_logits_rel_l2": step_rel})
    tie = mlx_gap <= bound and hf_gap <= bound
    where = (f"step {k} (the prompt pass)" if k == 0
             else f"step {k} (position {prompt_len + k - 1})")
    text = (f"{where}: MLX picks {mlx_run.tokens[k]}, transformers {hf_run.tokens[k]}; "
            f"gaps {mlx_gap:.1e} (MLX) and {hf_gap:.1e} (transformers) x logits std, "
            f"tie bound {bound:.0e}; step logits rel_l2 {step_rel:.2e}")
    if tie:
        return subject.result(CHECK, verdict="pass", metrics=metrics, details=details,
                              summary=f"greedy: {k} tokens agree, then a near tie at {text}")
    return subject.result(CHECK, verdict="fail", metrics=metrics, details=details,
                          first_divergent_layer=f"step {k}",
                          summary=f"greedy: first mismatch at {text}")


def kv_result(subject: Subject, mlx_run: Decode, hf_run: Decode,
              full: np.ndarray, hf_float32: Decode | None = None) -> CheckResult:
    """MLX incremental vs MLX full forward and vs transformers incremental (in half
    precision its float32 decode, `hf_run` then giving the noise floor)."""
    dtype = subject.dtype
    cross_tol, self_tol = KV_TOLERANCE[dtype], SELF_TOLERANCE[dtype]
    prompt_len = subject.ids.shape[1]
    steps = len(mlx_run.tokens)
    noise = None
    if hf_float32 is not None:
        from .dtypes import HF_RATIO

        noise = max([_rel(hf_run.prompt_logits, hf_float32.prompt_logits)]
                    + [_rel(hf_run.step_logits[k], hf_float32.step_logits[k])
                       for k in range(steps)])
        cross_tol = max(cross_tol, HF_RATIO * noise)
        hf_run = hf_float32
    # Full forward positions prompt_len-1 .. prompt_len+steps-2 are the decode steps.
    full_steps = full[prompt_len - 1:]
    vs_full = [_rel(mlx_run.step_logits[k], full_steps[k]) for k in range(steps)]
    vs_hf = [_rel(mlx_run.step_logits[k], hf_run.step_logits[k]) for k in range(steps)]
    prefill_vs_full = _rel(mlx_run.prompt_logits, full[:prompt_len])
    prefill_vs_hf = _rel(mlx_run.prompt_logits, hf_run.prompt_logits)
    metrics: dict[str, Any] = {
        "steps": steps, "prompt_tokens": prompt_len,
        "tolerance_vs_full": self_tol, "tolerance_vs_transformers": cross_tol,
        "prefill_vs_full_rel_l2": prefill_vs_full, "prefill_vs_transformers_rel_l2": prefill_vs_hf,
        "max_step_vs_full_rel_l2": max(vs_full), "max_step_vs_transformers_rel_l2": max(vs_hf),
        "caches": ",".join(sorted(set(mlx_run.cache_types))),
        "reference": "transformers float32" if noise is not None else "transformers",
        "transformers_half_max_rel_l2": noise,
    }
    details: dict[str, Any] = {
        "part": "kv-cache", "mlx_caches": mlx_run.cache_types,
        "transformers_cache": hf_run.cache_types[0],
        "step_vs_full_rel_l2": vs_full, "step_vs_transformers_rel_l2": vs_hf,
    }
    bad_full = [k for k in range(steps) if vs_full[k] > self_tol]
    bad_hf = [k for k in range(steps) if vs_hf[k] > cross_tol]
    prefill_ok = prefill_vs_full <= self_tol and prefill_vs_hf <= cross_tol
    if not bad_full and not bad_hf and prefill_ok:
        return subject.result(
            CHECK, verdict="pass", metrics=metrics, details=details,
            summary=f"kv-cache: prefill and {steps} decode steps with "
                    f"{metrics['caches']} agree with one full forward (max rel_l2 "
                    f"{max(vs_full):.1e} <= {self_tol:.0e}) and with transformers' "
                    f"cache (max {max(vs_hf):.1e} <= {cross_tol:.1e})")
    k = min(bad_full + bad_hf) if (bad_full or bad_hf) else 0
    metrics["first_divergent_step"] = k
    metrics["first_divergent_position"] = prompt_len + k - 1
    facts = []
    if not prefill_ok:
        k = 0
        metrics["first_divergent_step"] = 0
        if prefill_vs_full > self_tol:
            facts.append(f"the prompt pass with the cache differs from the same pass without "
                         f"a cache (rel_l2 {prefill_vs_full:.2e}): the cache's prefill path "
                         "(mask from make_mask, update_and_fetch) is at fault")
        else:
            facts.append(f"the prompt pass differs from transformers with and without a "
                         f"cache (rel_l2 {prefill_vs_hf:.2e}): not a cache bug, see `layers`")
    else:
        facts.append(f"the prompt pass agrees (rel_l2 {prefill_vs_hf:.1e} vs transformers); "
                     f"decoding diverges from step {k} (position {prompt_len + k - 1}): the "
                     "cache path (RoPE offset, cache update, decode mask, state carry-over)")
        if k in bad_full:
            facts.append(f"step {k} also differs from MLX's own full forward (rel_l2 "
                         f"{vs_full[k]:.2e}): MLX is inconsistent with itself")
        else:
            facts.append(f"step {k} equals MLX's own full forward: the same positions differ "
                         "without a cache too")
    result = subject.result(CHECK, verdict="fail", summary="", metrics=metrics, details=details)
    _localize_step(subject, result, mlx_run, k)
    details["facts"] = facts
    where = (f"at layer {result.first_divergent_layer}, {result.localization.part} "
             f"({result.localization.module})" if result.localization else "")
    result.summary = (f"kv-cache: step {k} (position {prompt_len + k - 1}) diverges: "
                      f"vs full forward rel_l2 {vs_full[k]:.2e} (tol {self_tol:.0e}), vs "
                      f"transformers {vs_hf[k]:.2e} (tol {cross_tol:.1e}); prompt pass "
                      f"{'agrees' if prefill_ok else 'differs'}{'; ' + where if where else ''}")
    if result.localization is not None:
        result.localization.facts = facts + result.localization.facts
    return result


def _localize_step(subject: Subject, result: CheckResult, mlx_run: Decode, k: int) -> None:
    """Re-run decode step k with every module captured on both sides; per-layer rows."""
    from . import hf_side, mlx_side

    try:
        mlx_capture = _mlx_capture_step(subject.mlx_model, subject.ids, mlx_run.tokens, k,
                                        mlx_side)
        hf_capture = _hf_capture_step(subject.hf_model, subject.ids, mlx_run.tokens, k, hf_side)
    except Exception as e:
        result.details["localization_error"] = f"{type(e).__name__}: {e}"[:300]
        return
    judged = layers.judge(hf_capture, mlx_capture, subject.config, subject.dtype,
                          subject.variant.name, CHECK, KV_TOLERANCE[subject.dtype])
    result.layers = judged.layers
    result.first_divergent_layer = judged.first_divergent_layer
    result.localization = judged.localization
    result.details["step_capture"] = judged.summary


def _mlx_capture_step(model: Any, prompt: np.ndarray, tokens: list[int], k: int,
                      mlx_side: Any) -> Any:
    import mlx.core as mx
    cache = compat.mlx_make_prompt_cache(model)
    if k == 0:
        return mlx_side.forward(model, prompt, cache=cache)
    model(mx.array(prompt), cache=cache)
    for token in tokens[: k - 1]:
        model(mx.array([[token]]), cache=cache)
    return mlx_side.forward(model, np.array([[tokens[k - 1]]]), cache=cache)


def _hf_capture_step(model: Any, prompt: np.ndarray, tokens: list[int], k: int,
                     hf_side: Any) -> Any:
    import torch

    keyword = compat.hf_cache_keyword(model)
    if k == 0:
        return hf_side.forward(model, prompt)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        cache = compat.hf_returned_cache(out, keyword)
        for token in tokens[: k - 1]:
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{keyword: cache})
            cache = compat.hf_returned_cache(out, keyword)
    # hf_side.forward passes use_cache=False; the cache given is still read and updated.
    return hf_side.forward(model, np.array([[tokens[k - 1]]]), **{keyword: cache})


# prompt -> its single-prompt greedy run: the two batch rows compare with the same runs
SingleRuns = dict[tuple[int, ...], Decode]


def batch_result(subject: Subject, singles: SingleRuns | None = None) -> CheckResult:
    """BatchGenerator on prompts of different lengths vs single-prompt greedy runs."""
    return _batch_row(subject, "batch", lambda prompts: compat.mlx_batch_generate(
        subject.mlx_model, prompts, BATCH_STEPS), "BatchGenerator", singles)


def batch_chunked_result(subject: Subject, singles: SingleRuns | None = None) -> CheckResult:
    """The same prompts prefilled together in chunks of BATCH_CHUNK tokens with the
    caches' lengths set once (PromptProcessingBatch), vs single-prompt greedy runs."""
    return _batch_row(subject, "batch-chunked", lambda prompts: compat.mlx_batch_generate_chunked(
        subject.mlx_model, prompts, BATCH_STEPS, BATCH_CHUNK), "PromptProcessingBatch", singles)


def _batch_row(subject: Subject, part: str, run_batched: Any, driver: str,
               singles: SingleRuns | None) -> CheckResult:
    singles = {} if singles is None else singles
    start = time.perf_counter()
    dtype = subject.dtype
    prompts = [subject.ids[0, a:b].tolist() for a, b in BATCH_SLICES]
    details: dict[str, Any] = {"part": part, "prompt_lengths": [len(p) for p in prompts]}
    if part == "batch-chunked":
        details["prefill_step_size"] = BATCH_CHUNK
        # Latent: mlx-lm 0.32's BatchGenerator hands PromptProcessingBatch.prompt() at most
        # prefill_step_size tokens per call (generate.py), so only a caller of prompt()
        # with longer prompts takes its chunk loop; the config's own use does not.
        details["reach"] = "latent"
    caches = compat.mlx_make_prompt_cache(subject.mlx_model)
    cant = sorted({type(c).__name__ for c in caches if not hasattr(c, "merge")})
    if cant:
        return subject.result(CHECK, verdict="skip", details=details,
                              duration_s=time.perf_counter() - start,
                              summary=f"{part}: mlx-lm cannot batch {', '.join(cant)} "
                                      "(no merge): not supported for this model")
    try:
        batched = run_batched(prompts)
    except Exception as e:
        from .mlx_side import backend_limitation, describe_import_error

        details["exception"] = describe_import_error(e)
        if (limitation := backend_limitation(e)) is not None:
            return subject.result(CHECK, verdict="skip", details=details,
                                  duration_s=time.perf_counter() - start,
                                  summary=f"{part}: {limitation}")
        if isinstance(e, compat.DriverError) or not raised_in_mlx_lm(e):
            # our driver failed: nothing was measured
            details["side"] = "mlx-verify"
            return subject.result(CHECK, verdict="error", details=details,
                                  duration_s=time.perf_counter() - start,
                                  summary=f"{part}: {e}" if isinstance(e, compat.DriverError)
                                  else f"{part}: the driver raised {describe_import_error(e)}")
        # mlx-lm's own batch path crashes on this model: a finding on the MLX side
        details["side"] = "mlx-lm"
        return subject.result(CHECK, verdict="fail", details=details,
                              duration_s=time.perf_counter() - start,
                              first_divergent_layer="step 0",
                              summary=f"{part}: mlx-lm's {driver} raises on this model: "
                                      f"{describe_import_error(e)}")
    # The same batch again: mlx-lm repeats itself bit for bit on fixed inputs, or the row's
    # numbers are noise a differential run must not read as worse or better (mamba2's
    # batch-chunked: ssm.py gathers the state decay past a call shorter than the lengths,
    # 0.23 and 0.25 on two runs of one tree).
    repeat_text = ""
    try:
        again = run_batched(prompts)
        differs = max((_rel(a, b) for (_, first_lp), (_, again_lp) in zip(
            batched, again, strict=True) for a, b in zip(first_lp, again_lp, strict=True)),
            default=0.0)
        if differs > 0 or [t for t, _ in batched] != [t for t, _ in again]:
            repeat_text = (f"; run twice on the same inputs it differs (log-probs rel_l2 up "
                           f"to {differs:.1e}): nondeterministic")
    except Exception as e:  # raised only the second time: as nondeterministic, said
        repeat_text = f"; run twice, the second run raises ({type(e).__name__})"
    if repeat_text:
        details["nondeterministic"] = repeat_text.removeprefix("; ")
    ignores_padding = _state_ignores_padding(subject.mlx_model, caches)
    tol, bound = BATCH_TOLERANCE[dtype], TIE_BOUND[dtype]
    worst = 0.0
    failure: str | None = None
    first: tuple[int, int] | None = None
    agreeing_tokens = 0
    longest = max(map(len, prompts))
    for i, prompt in enumerate(prompts):
        if tuple(prompt) not in singles:
            singles[tuple(prompt)] = mlx_decode(subject.mlx_model, np.array([prompt]),
                                                BATCH_STEPS)
        single = singles[tuple(prompt)]
        single_lp = _log_softmax(single.step_logits)
        tokens, logprobs = batched[i]
        k_tok = first_mismatch(tokens, single.tokens)
        last = BATCH_STEPS if k_tok is None else k_tok + 1  # compare up to the mismatch
        for k in range(last):
            rel = _rel(logprobs[k], single_lp[k])
            worst = max(worst, rel)
            if rel > tol and failure is None:
                first = (i, k)
                failure = (f"prompt {i} (length {len(prompt)}, left padding "
                           f"{longest - len(prompt)}) step {k}: log-probs "
                           f"rel_l2 {rel:.2e} > {tol:.0e}")
        if k_tok is not None and failure is None:
            gap_b, gap_s = tie_gaps(logprobs[k_tok], single_lp[k_tok], tokens[k_tok],
                                    single.tokens[k_tok])
            if gap_b > bound or gap_s > bound:
                first = (i, k_tok)
                failure = (f"prompt {i} step {k_tok}: batch token {tokens[k_tok]} vs single "
                           f"{single.tokens[k_tok]}, not a near tie (gaps {gap_b:.1e}, "
                           f"{gap_s:.1e})")
        agreeing_tokens += BATCH_STEPS if k_tok is None else k_tok
    metrics: dict[str, Any] = {"prompts": len(prompts), "steps": BATCH_STEPS,
                               "tolerance_rel_l2": tol, "max_logprobs_rel_l2": worst,
                               "tokens_agreeing": agreeing_tokens}
    elapsed = time.perf_counter() - start
    padded = first is not None and longest > len(prompts[first[0]])
    if failure is not None and ignores_padding and padded:
        # mlx-lm batches these caches but the model never reads the padding: a known
        # limitation of the model file, not something a port can be held to here.
        details["measured"] = failure
        return subject.result(CHECK, verdict="skip", metrics=metrics, details=details,
                              duration_s=elapsed,
                              summary=f"{part}: {ignores_padding} never reads the padding "
                                      "(no SSM mask or lengths from ArraysCache): mlx-lm does "
                                      f"not support batching prompts of different lengths "
                                      f"for it (measured: {failure}){repeat_text}")
    chunks = f", prefilled in chunks of {BATCH_CHUNK} tokens" if part == "batch-chunked" else ""
    if failure is None:
        return subject.result(CHECK, verdict="pass", metrics=metrics, details=details,
                              duration_s=elapsed,
                              summary=f"{part}: {len(prompts)} left-padded prompts (lengths "
                                      f"{', '.join(str(len(p)) for p in prompts)}{chunks}) x "
                                      f"{BATCH_STEPS} steps equal single runs (max rel_l2 "
                                      f"{worst:.1e} <= {tol:.0e}){repeat_text}")
    assert first is not None
    if first[1] == 0 and part == "batch-chunked":
        stage = (f"first step: the padded prefill of all but the last prompt token in chunks "
                 f"of {BATCH_CHUNK} (the caches' lengths set once, read again in every "
                 "later chunk), then the last token")
    elif first[1] == 0:
        stage = ("first step: the padded prefill of all but the last prompt token, then the "
                 "last token (padding mask, left_padding, lengths)")
    else:
        stage = "decoding with the batch cache"
    details["facts"] = [f"first divergence in the {stage}"]
    details["side"] = "mlx-lm"
    return subject.result(CHECK, verdict="fail", metrics=metrics, details=details,
                          duration_s=elapsed, first_divergent_layer=f"step {first[1]}",
                          summary=f"{part}: {failure}{chunks}; in the {stage}{repeat_text}")


def raised_in_mlx_lm(e: BaseException) -> bool:
    """Whether the exception was raised inside mlx-lm's code (a finding) rather than ours."""
    from pathlib import Path

    tb = e.__traceback__
    while tb is not None:
        if "mlx_lm" in Path(tb.tb_frame.f_code.co_filename).parts:
            return True
        tb = tb.tb_next
    return False


def _state_ignores_padding(model: Any, caches: list[Any]) -> str | None:
    """The model file's name when it keeps a recurrent state (ArraysCache) but its
    source never asks the cache for a padding mask or lengths."""
    import sys

    from mlx_lm.models.cache import ArraysCache, CacheList

    flat = []
    for c in caches:
        flat.extend(c.caches if isinstance(c, CacheList) else [c])
    if not any(isinstance(c, ArraysCache) for c in flat):
        return None
    module = sys.modules.get(type(model).__module__)
    source = inspect.getsource(module) if module is not None else ""
    if any(word in source for word in ("create_ssm_mask", "make_mask", "lengths",
                                       "left_padding")):
        return None
    return f"models/{type(model).__module__.rsplit('.', 1)[-1]}.py"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
