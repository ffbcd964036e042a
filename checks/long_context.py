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

A second row (`details["part"] == "chunked"`) runs a prefix of the same prompt through
the model's own caches in several calls instead of one: two multi-token chunks back to
back (a prompt longer than prefill_step_size), then single-token steps fed the prompt's
next tokens and multi-token chunks in turn (a prompt cache reused for a new turn after
decoding). With a sliding window the first chunk fills the cache past the window, the
single steps make the rotating cache wrap in place, and the next chunks take its
multi-token (concat) path on a wrapped cache, shorter and longer than the window. Every
position is compared with transformers' full forward over the prompt, which the first
row already computed: the single steps are decode steps whose reference is that same
forward (teacher forcing), so no transformers decoding is run.

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
# bugs measure 1e-2 and more. Half precision, against transformers float32 (raised to
# 2x transformers' own half error there): correct ports up to 5.9e-2 in bfloat16 and
# 6.6e-3 in float16 (docs/tolerances.md, "Half precision").
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


def _slice_array(array: np.ndarray | None, length: int, start: int,
                 n: int) -> np.ndarray | None:
    """Positions start .. start+n-1 along the first axis (after batch) of size `length`."""
    if array is None:
        return None
    for axis in range(1, array.ndim):
        if array.shape[axis] == length:
            return np.take(array, np.arange(start, start + n), axis=axis)
    return array


def positions(capture: Capture, length: int, start: int, n: int) -> Capture:
    """The capture of a `length`-token forward cut to positions start .. start+n-1."""
    return Capture(
        inputs={k: _slice_array(v, length, start, n) for k, v in capture.inputs.items()},
        outputs={k: _slice_array(v, length, start, n) for k, v in capture.outputs.items()},
        order=list(capture.order), classes=dict(capture.classes),
        logits=_slice_array(capture.logits, length, start, n), types=dict(capture.types),
    )


def tail(capture: Capture, length: int, n: int) -> Capture:
    return positions(capture, length, length - n, n)


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
    n = min(TAIL, length)
    hf_half, hf_noise = None, None
    if subject.dtype != "float32":
        # Half precision: rounding on either side grows with length and recurrence
        # (docs/tolerances.md, "Half precision at length"). As in the dtype check, MLX is
        # held to transformers' float32 forward on the same weights, within
        # max(LONG_TOLERANCE, HF_RATIO x transformers' own half error there).
        from .dtypes import HF_RATIO

        hf_half, hf = hf, hf_side.forward(hf_side.load(subject.checkpoint, dtype="float32"),
                                          ids)
        hf_rows, _, _ = layers.compare_stages(tail(hf, length, n), tail(hf_half, length, n),
                                              subject.config, tol)
        hf_noise = max((r.rel_l2 or 0.0 for r in hf_rows), default=0.0)
        tol = max(tol, HF_RATIO * hf_noise)
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
        "reference": "transformers float32" if hf_half is not None else "transformers",
        "transformers_half_max_rel_l2": hf_noise,
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
                          f"{tol:.1e})" + (f"; {shortened}" if shortened else ""))
    elif result.verdict == "fail":
        where = (f" from position {first_bad}" if first_bad is not None else "")
        result.summary = (f"{length}-token prefill{window_text}: logits diverge{where}; "
                          + (result.summary or "; ".join(facts)))
    else:
        result.summary = f"{length}-token prefill{window_text}: {result.summary}"
    result.duration_s = time.perf_counter() - start
    return [result, _guarded_chunked(subject, ids, hf, hf_half, mlx.logits, window_sizes)]


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


# --- chunked prefill -----------------------------------------------------------------

# Tokens of the chunked run without a (crossable) window: enough for several chunks and
# steps of every kind; transformers' logits at these positions are its full forward's.
CHUNKED_TOKENS = 384
CHUNK_BASE = 64  # the chunk size unit without a window
SINGLE_STEPS = 3  # single-token steps between multi-token chunks
# rel L2 of the chunked run's logits against transformers, per call (a chunk's positions
# together, a single step alone); see docs/tolerances.md ("Chunked prefill"; in half
# precision, raised to 2x transformers' own half error: "Half precision").
CHUNKED_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}


def chunk_schedule(total: int, base: int) -> list[int]:
    """Token counts of the successive model calls, summing to `total`: chunks of
    base + 8 and base // 2 + 3 back to back, then SINGLE_STEPS single steps and a chunk
    in turn, the chunks alternating between base + 5 and base // 2 + 3 tokens."""
    sizes = [base + 8, base // 2 + 3]
    chunks = (base + 5, base // 2 + 3)
    turn = 0
    while sum(sizes) < total:
        sizes += [1] * SINGLE_STEPS + [chunks[turn % 2]]
        turn += 1
    while sum(sizes) > total:  # the last call ends at the prefix's end
        excess = sum(sizes) - total
        if sizes[-1] > excess:
            sizes[-1] -= excess
        else:
            sizes.pop()
    return sizes


def chunked_plan(length: int, window_sizes: list[int]) -> tuple[int, int, int | None]:
    """(tokens, base, window): the prefix the chunked run covers, its chunk size unit and
    the window it crosses. With a window that fits twice in the prompt, the window is the
    unit and the prefix crosses it twice; otherwise CHUNKED_TOKENS with CHUNK_BASE."""
    crossable = [w for w in window_sizes if 2 * w + 64 <= length]
    if crossable:
        window = max(crossable)
        return 2 * window + 64, window, window
    return min(length, CHUNKED_TOKENS), CHUNK_BASE, None


def mlx_chunked_logits(model: Any, ids: np.ndarray, sizes: list[int],
                       stop: int | None = None) -> tuple[list[np.ndarray], Any]:
    """The logits of each call of the schedule with one prompt cache (the first `stop`
    calls when given), and that cache."""
    import mlx.core as mx

    cache = compat.mlx_make_prompt_cache(model)
    out, at = [], 0
    for size in sizes[:stop]:
        logits = model(mx.array(ids[:, at:at + size]), cache=cache).astype(mx.float32)
        out.append(np.array(logits[0]))
        at += size
    return out, cache


def chunked_result(subject: Subject, ids: np.ndarray, hf: Capture, hf_half: Capture | None,
                   single_logits: np.ndarray, window_sizes: list[int]) -> CheckResult:
    """The prompt's prefix in several calls through one cache vs transformers' forward
    (its float32 forward in half precision, `hf_half` then giving the noise floor)."""
    from .engine import raised_in
    from .generation import TIE_BOUND, tie_gaps
    from .mlx_side import backend_limitation, describe_import_error

    start = time.perf_counter()
    length = ids.shape[1]
    tokens, base, window = chunked_plan(length, window_sizes)
    sizes = chunk_schedule(tokens, base)
    tol = CHUNKED_TOLERANCE[subject.dtype]
    starts = [int(a) for a in np.cumsum([0, *sizes[:-1]])]
    details: dict[str, Any] = {"part": "chunked", "calls": sizes}
    calls = (f"{tokens} tokens in {len(sizes)} calls "
             f"({sum(1 for s in sizes if s > 1)} multi-token, "
             f"{sum(1 for s in sizes if s == 1)} single-token)")
    try:
        outs, cache = mlx_chunked_logits(subject.mlx_model, ids, sizes)
    except Exception as e:
        details["exception"] = describe_import_error(e)
        if (limitation := backend_limitation(e)) is not None:
            return subject.result(CHECK, verdict="skip", details=details,
                                  summary=f"chunked: {limitation}")
        side = raised_in(e)
        details["side"] = side
        if side != "mlx-lm":
            return subject.result(CHECK, verdict="error", details=details,
                                  duration_s=time.perf_counter() - start,
                                  summary=f"chunked: the driver raised ({side}): "
                                          f"{describe_import_error(e)}")
        failed_at = _failed_call(subject.mlx_model, ids, sizes)
        where = ""
        if failed_at is not None:
            k = failed_at
            details["failing_call"] = k
            where = (f" at call {k} ({sizes[k]} token(s) at positions {starts[k]}.."
                     f"{starts[k] + sizes[k] - 1}, {_kind(sizes, k)})")
        return subject.result(CHECK, verdict="fail", details=details,
                              duration_s=time.perf_counter() - start,
                              first_divergent_layer=f"call {failed_at}"
                              if failed_at is not None else None,
                              summary=f"chunked: mlx-lm raises on {calls}{where}: "
                                      f"{describe_import_error(e)}")
    details["caches"] = sorted({type(c).__name__ for c in cache})
    reference = hf.logits[0]
    noise = None
    if hf_half is not None:
        # transformers' own half error at the same positions, per call: the noise floor
        # (a single position measures up to 0.12 in float16 on qwen3_5, either side)
        from .dtypes import HF_RATIO

        noise = max(_rel_or_inf(hf_half.logits[0, a:a + s], reference[a:a + s])
                    for a, s in zip(starts, sizes, strict=True))
        tol = max(tol, HF_RATIO * noise)
    chunked = np.concatenate(outs)
    if chunked.shape != reference[:tokens].shape:
        details["side"] = "mlx-lm"
        return subject.result(CHECK, verdict="fail", details=details,
                              duration_s=time.perf_counter() - start,
                              summary=f"chunked: {calls} give logits of shape "
                                      f"{chunked.shape}, transformers "
                                      f"{reference[:tokens].shape}")
    # same shapes (checked above): rel_l2 gives a number; None only for the single
    # prefill's logits when they have another shape (that row fails for it)
    per_call = [_rel_or_inf(out, reference[a:a + len(out)])
                for out, a in zip(outs, starts, strict=True)]
    vs_single = [_rel_or_inf(out, single_logits[0, a:a + len(out)])
                 for out, a in zip(outs, starts, strict=True)]
    worst = int(np.argmax(per_call))
    bad = [k for k, rel in enumerate(per_call) if rel > tol]
    # greedy: each position's top token, a mismatch allowed only as a near tie
    bound = TIE_BOUND[subject.dtype]
    mlx_top, hf_top = chunked.argmax(-1), reference[:tokens].argmax(-1)
    flips = []
    for position in np.nonzero(mlx_top != hf_top)[0]:
        gaps = tie_gaps(chunked[position], reference[position], int(mlx_top[position]),
                        int(hf_top[position]))
        if max(gaps) > bound:
            flips.append((int(position), gaps))
    metrics: dict[str, Any] = {
        "tokens": tokens, "calls": len(sizes), "tolerance_rel_l2": tol,
        "max_rel_l2": per_call[worst], "worst_call": worst,
        "max_vs_single_prefill_rel_l2": max(vs_single),
        "top1_agreement": float(np.mean(mlx_top == hf_top)),
        "window": window,
        "reference": "transformers float32" if noise is not None else "transformers",
        "transformers_half_max_rel_l2": noise,
    }
    details["call_rel_l2"] = [float(f"{r:.3g}") for r in per_call]
    details["call_vs_single_prefill_rel_l2"] = [float(f"{r:.3g}") for r in vs_single]
    if not bad and not flips:
        return subject.result(CHECK, verdict="pass", metrics=metrics, details=details,
                              duration_s=time.perf_counter() - start,
                              summary=f"chunked: {calls} agree with transformers at every "
                                      f"position (max rel_l2 {per_call[worst]:.1e} <= "
                                      f"{tol:.1e}, call {worst})")
    k = min(bad) if bad else starts.index(max(a for a in starts if a <= flips[0][0]))
    details["side"] = "mlx-lm"
    facts = [f"calls before {k} agree (max rel_l2 {max(per_call[:k], default=0.0):.1e}); "
             f"call {k} ({_kind(sizes, k)}, positions {starts[k]}..{starts[k] + sizes[k] - 1})"
             f" differs: rel_l2 {per_call[k]:.2e} (tol {tol:.1e})"]
    if vs_single[k] > tol:
        facts.append(f"it differs from MLX's own single prefill of the same tokens too "
                     f"(rel_l2 {vs_single[k]:.2e}): the cache's update path for this kind "
                     "of call (offset, concat or rotation, mask, state carry-over)")
    else:
        facts.append(f"it equals MLX's own single prefill (rel_l2 {vs_single[k]:.1e}): the "
                     "same positions differ without chunking too")
    if flips:
        position, gaps = flips[0]
        facts.append(f"greedy: first top-token mismatch not a near tie at position "
                     f"{position} (gaps {gaps[0]:.1e}, {gaps[1]:.1e} x logits std, bound "
                     f"{bound:.0e})")
    metrics["first_divergent_call"] = k
    metrics["first_divergent_position"] = starts[k]
    result = subject.result(CHECK, verdict="fail", metrics=metrics, details=details,
                            first_divergent_layer=f"call {k}", summary="")
    _localize_call(subject, result, ids, hf, sizes, starts, k, tol)
    details["facts"] = facts
    where = (f"; at {result.first_divergent_layer}, {result.localization.part} "
             f"({result.localization.module})" if result.localization else "")
    if result.localization is not None:
        result.localization.facts = facts + result.localization.facts
    result.first_divergent_layer = result.first_divergent_layer or f"call {k}"
    result.summary = (f"chunked: {calls}: call {k} ({_kind(sizes, k)}, position "
                      f"{starts[k]}) diverges from transformers, rel_l2 {per_call[k]:.2e} > "
                      f"{tol:.1e}{where}")
    result.duration_s = time.perf_counter() - start
    return result


def _guarded_chunked(subject: Subject, ids: np.ndarray, hf: Capture, hf_half: Capture | None,
                     single_logits: np.ndarray, window_sizes: list[int]) -> CheckResult:
    """chunked_result; anything it raises past its own MLX run is a row naming the side,
    so the long row beside it is kept."""
    from .engine import raised_in
    from .mlx_side import describe_import_error

    try:
        return chunked_result(subject, ids, hf, hf_half, single_logits, window_sizes)
    except Exception as e:
        side = raised_in(e)
        return subject.result(CHECK, verdict="fail" if side == "mlx-lm" else "error",
                              details={"part": "chunked", "side": side},
                              summary=f"chunked: {side} raised {describe_import_error(e)}")


def _rel_or_inf(candidate: np.ndarray, reference: np.ndarray) -> float:
    rel = compare.rel_l2(candidate, reference)
    return float("inf") if rel is None else float(rel)


def _kind(sizes: list[int], k: int) -> str:
    if sizes[k] == 1:
        return "a single-token step"
    if k == 0:
        return "the first chunk, on an empty cache"
    after = "single-token steps" if sizes[k - 1] == 1 else "a chunk"
    return f"a multi-token update after {after}"


def _failed_call(model: Any, ids: np.ndarray, sizes: list[int]) -> int | None:
    """Which call of the schedule raises (the schedule is re-run call by call, each
    evaluated before the next)."""
    import mlx.core as mx

    cache = compat.mlx_make_prompt_cache(model)
    at = 0
    for k, size in enumerate(sizes):
        try:
            mx.eval(model(mx.array(ids[:, at:at + size]), cache=cache))
        except Exception:
            return k
        at += size
    return None


def _localize_call(subject: Subject, result: CheckResult, ids: np.ndarray, hf: Capture,
                   sizes: list[int], starts: list[int], k: int, tolerance: float) -> None:
    """Call k re-run with every module captured, against transformers' forward at the
    same positions: the per-layer rows name the layer and module."""
    from . import mlx_side

    try:
        _, cache = mlx_chunked_logits(subject.mlx_model, ids, sizes, stop=k)
        mlx = mlx_side.forward(subject.mlx_model, ids[:, starts[k]:starts[k] + sizes[k]],
                               cache=cache)
    except Exception as e:
        result.details["localization_error"] = f"{type(e).__name__}: {e}"[:300]
        return
    judged = layers.judge(positions(hf, ids.shape[1], starts[k], sizes[k]), mlx,
                          subject.config, subject.dtype, subject.variant.name, CHECK,
                          tolerance)
    result.layers = judged.layers
    result.first_divergent_layer = judged.first_divergent_layer
    result.localization = judged.localization
    result.details["call_capture"] = judged.summary
