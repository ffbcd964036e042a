"""The `long` check: one long prefill compared with transformers at the last positions.

The parity prompt of `layers` is 48 tokens: a sliding window longer than that, or a
mask that goes wrong only once a window is crossed, never shows there. Here the
prefill is long enough to cross every sliding window at least 4 times (4 x window
+ 64 tokens), or 2048 tokens when there is no window (or the window is too long to
cross on a CPU). MLX runs the prefill with the model's own caches (the path
`generate` takes); transformers runs its eager attention without a cache.

The verdict is the per-layer comparison (`layers.judge`) restricted to the last 16
positions, so a failure names the layer and the module. The logits of every
position are compared too: the first divergent position (e.g. exactly the window
size) says where the mask or the positions go wrong. A second MLX pass without a
cache separates the cache's prefill path from the model code.

Bounds are calibrated on correct ports; see docs/tolerances.md ("generation and long").
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import compare, compat, layers, synth
from .mlx_side import Capture
from .schema import CheckResult
from .subject import Subject

CHECK = "long"
LONG_TOKENS = 2048  # without a (crossable) window
MAX_TOKENS = 4 * 1024 + 64  # longest prefill: eager attention on 2 CPU cores
TAIL = 16  # compared positions at the end
WINDOW_CROSSINGS = 4
# Wall-time budget for the two long forwards, projected from a 256-token probe of
# both as time ~ tokens^2 (attention; llama measures ~tokens^1.7 from 256 to 2048).
# Past the budget a second probe at 512 measures the real exponent: some ports scale
# worse (mlx-lm's jamba: 2.3 s at 256 tokens, 12.2 s at 512, ~200 s at 2048).
TIME_BUDGET_S = 90.0
PROBE_TOKENS = 256
MIN_TOKENS = 512
WINDOW_KEYS = ("sliding_window", "attention_window", "sliding_window_size", "window_size")
# rel L2 per stage over the last positions. Errors grow with length, on the MLX side
# (CPU attention accumulates in fp32 over every key): correct fp32 ports measure up to
# 1.9e-5 at 2048 tokens (phi3), vs ~1e-6 at 48 (docs/tolerances.md). Window and mask
# bugs measure 1e-2 and more. bfloat16 (both sides in bf16): up to 3.0e-2 (mamba);
# float16 keeps the per-stage half bound (not measured at length).
LONG_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}


def windows(config: dict[str, Any]) -> list[int]:
    """The sliding-window sizes the config declares (both libraries read these keys)."""
    text = config.get("text_config")
    sources = [config] + ([text] if isinstance(text, dict) else [])
    found = set()
    for source in sources:
        if source.get("use_sliding_window") is False:
            continue
        for key in WINDOW_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.add(value)
    return sorted(found)


def sequence_length(window_sizes: list[int]) -> int:
    if window_sizes:
        needed = WINDOW_CROSSINGS * max(window_sizes) + 64
        if needed <= MAX_TOKENS:
            return needed
    return LONG_TOKENS


def _tail_array(array: np.ndarray | None, length: int, n: int) -> np.ndarray | None:
    """The last n positions along the first axis (after batch) of size `length`."""
    if array is None:
        return None
    for axis in range(1, array.ndim):
        if array.shape[axis] == length:
            return np.take(array, np.arange(length - n, length), axis=axis)
    return array


def tail(capture: Capture, length: int, n: int) -> Capture:
    return Capture(
        inputs={k: _tail_array(v, length, n) for k, v in capture.inputs.items()},
        outputs={k: _tail_array(v, length, n) for k, v in capture.outputs.items()},
        order=list(capture.order), classes=dict(capture.classes),
        logits=_tail_array(capture.logits, length, n), types=dict(capture.types),
    )


def per_position_rel_l2(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a = candidate.astype(np.float64)[0]
    b = reference.astype(np.float64)[0]
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)


def run(subject: Subject) -> list[CheckResult]:
    import mlx.core as mx

    from . import hf_side, mlx_side

    start = time.perf_counter()
    tol = LONG_TOLERANCE[subject.dtype]
    window_sizes = windows(subject.config)
    planned = sequence_length(window_sizes)
    text = layers.decoder_config(subject.config)
    max_pos = text.get("max_position_embeddings") or text.get("n_positions")
    if isinstance(max_pos, int) and 0 < max_pos < planned:
        # no longer than the model's positions: a learned table (gpt2) has no row beyond
        planned = max_pos
    vocab = int(subject.hf_model.config.get_text_config().vocab_size or synth.VOCAB)
    length, probe_s, projected_s = affordable_length(subject, planned, vocab)
    ids = synth.token_ids(vocab, length, subject.seed + 1)

    hf = hf_side.forward(subject.hf_model, ids)
    cache = compat.mlx_make_prompt_cache(subject.mlx_model)
    try:
        mlx = mlx_side.forward(subject.mlx_model, ids, cache=cache)
    except RuntimeError as e:
        limitation = mlx_side.backend_limitation(e)
        if limitation is None:
            raise
        return [subject.result(CHECK, verdict="skip", summary=limitation,
                               duration_s=time.perf_counter() - start)]
    mx.clear_cache()

    n = min(TAIL, length)
    result = layers.judge(tail(hf, length, n), tail(mlx, length, n), subject.config,
                          subject.dtype, subject.variant.name, CHECK, tol)
    per_pos = per_position_rel_l2(mlx.logits, hf.logits)
    no_cache_tail = cache_vs_no_cache = None
    if result.verdict != "pass":
        # MLX without a cache (slow on CPU: only to localize): is the cache path at fault?
        no_cache_logits = mlx_side.plain_forward(subject.mlx_model, ids)
        no_cache_tail = compare.rel_l2(no_cache_logits[:, -n:], hf.logits[:, -n:])
        cache_vs_no_cache = compare.rel_l2(mlx.logits[:, -n:], no_cache_logits[:, -n:])
    bad = np.nonzero(per_pos > tol)[0]
    # Single positions are noisier than the 16-position tail: only said when it fails.
    first_bad = int(bad[0]) if bad.size and result.verdict == "fail" else None
    crossings = {w: round(length / w, 2) for w in window_sizes}
    result.metrics.update({
        "tokens": length, "planned_tokens": planned, "probe_s": probe_s,
        "projected_s": projected_s, "tail_positions": n,
        "windows": ",".join(map(str, window_sizes)) or None,
        "min_window_crossings": min(crossings.values()) if crossings else None,
        "first_divergent_position": first_bad,
        "max_position_logits_rel_l2": float(per_pos.max()),
        "no_cache_tail_logits_rel_l2": no_cache_tail,
        "cache_vs_no_cache_tail_rel_l2": cache_vs_no_cache,
    })
    result.details = {
        "caches": sorted({type(c).__name__ for c in cache}),
        # error profile: max per-position logits rel_l2 per block of positions
        "logits_rel_l2_by_block": _profile(per_pos),
    }
    facts = []
    if first_bad is not None:
        at_window = [w for w in window_sizes if first_bad in (w - 1, w, w + 1)]
        agree = (f"logits agree up to position {first_bad - 1} and diverge"
                 if first_bad else "logits diverge")
        facts.append(f"{agree} from position {first_bad} (rel_l2 {per_pos[first_bad]:.2e})"
                     + (f", the edge of the {at_window[0]}-token window: sliding-window mask"
                        if at_window else ""))
    if cache_vs_no_cache is not None and cache_vs_no_cache > tol:
        facts.append(f"the cached prefill differs from MLX's own forward without a cache "
                     f"(rel_l2 {cache_vs_no_cache:.2e}): the cache's prefill mask path")
    elif cache_vs_no_cache is not None:
        facts.append(f"MLX without a cache gives the same logits (rel_l2 "
                     f"{cache_vs_no_cache:.1e}): the model code or its mask, not the cache")
    shortened = ""
    if length < planned:
        shortened = (f"shortened from {planned} to {length} tokens: probes of both forwards "
                     f"at {PROBE_TOKENS} and {2 * PROBE_TOKENS} tokens project "
                     f"{projected_s:.0f} s at {planned} (budget {TIME_BUDGET_S:.0f} s)")
        facts.append(shortened)
    uncrossed = [w for w in window_sizes if length < WINDOW_CROSSINGS * w]
    if uncrossed:
        facts.append(f"window(s) {', '.join(map(str, uncrossed))} not crossed "
                     f"{WINDOW_CROSSINGS} times within {length} tokens (cap)")
    result.details["facts"] = facts
    if result.localization is not None:
        result.localization.facts = facts + result.localization.facts
    window_text = ""
    if window_sizes and min(crossings.values()) >= 1:
        window_text = (f", window {'/'.join(map(str, window_sizes))} crossed "
                       f"{min(crossings.values()):g}x")
    elif window_sizes:
        window_text = f", window {'/'.join(map(str, window_sizes))} not reached"

    if result.verdict == "pass":
        result.summary = (f"{length}-token prefill{window_text}: last {n} positions agree at "
                          f"every stage (max rel_l2 {result.metrics['max_rel_l2']:.1e} <= "
                          f"{tol:.0e})" + (f"; {shortened}" if shortened else ""))
    elif result.verdict == "fail":
        where = (f" from position {first_bad}" if first_bad is not None else "")
        result.summary = (f"{length}-token prefill{window_text}: logits diverge{where}; "
                          + (result.summary or "; ".join(facts)))
    else:
        result.summary = f"{length}-token prefill{window_text}: {result.summary}"
    result.duration_s = time.perf_counter() - start
    return [result]


def _probe(subject: Subject, vocab: int, tokens: int) -> float:
    import mlx.core as mx

    from . import hf_side

    ids = synth.token_ids(vocab, tokens, subject.seed + 2)
    start = time.perf_counter()
    hf_side.plain_forward(subject.hf_model, ids)
    # the same path as the measured run: some ports are slower with a cache
    cache = compat.mlx_make_prompt_cache(subject.mlx_model)
    logits = subject.mlx_model(mx.array(ids), cache=cache)
    mx.eval(logits)
    return time.perf_counter() - start


def affordable_length(subject: Subject, planned: int,
                      vocab: int) -> tuple[int, float, float | None]:
    """`planned`, or fewer tokens (a multiple of 64, at least MIN_TOKENS) when probes of
    both forwards project past the time budget; the probe time and the projection."""
    if planned <= 2 * PROBE_TOKENS:
        return planned, 0.0, None
    probe_s = _probe(subject, vocab, PROBE_TOKENS)
    if probe_s * (planned / PROBE_TOKENS) ** 2 <= TIME_BUDGET_S:
        return planned, probe_s, None
    probe2_s = _probe(subject, vocab, 2 * PROBE_TOKENS)
    # measured growth from 256 to 512 tokens, plus a margin: it steepens with length
    exponent = max(1.0, math.log2(max(probe2_s, 1e-9) / max(probe_s, 1e-9))) + 0.25
    projected = probe2_s * (planned / (2 * PROBE_TOKENS)) ** exponent
    if projected <= TIME_BUDGET_S:
        return planned, probe_s + probe2_s, projected
    affordable = 2 * PROBE_TOKENS * (TIME_BUDGET_S / probe2_s) ** (1 / exponent)
    length = max(MIN_TOKENS, min(planned, int(affordable) // 64 * 64))
    return length, probe_s + probe2_s, projected


def _profile(per_pos: np.ndarray, blocks: int = 16) -> list[dict[str, float | int]]:
    size = max(1, -(-per_pos.size // blocks))
    return [{"from": int(i), "to": int(min(i + size, per_pos.size) - 1),
             "max_rel_l2": float(per_pos[i:i + size].max())}
            for i in range(0, per_pos.size, size)]
