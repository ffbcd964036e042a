"""The `rope` check.

(a) The rotation each side actually applies, measured rather than read from config:
    MLX: each decoder layer's RoPE module applied to one-hot vectors at position 1
    gives the rotation matrix: which dims pair up (interleaved or half-split), how
    many are rotated, the angle per pair (the frequency) and any magnitude scale.
    transformers: the (cos, sin) its attention modules receive at position 1.
    The summary states the effective base each side applies.
(b) Far-position parity: a short prompt placed near the start, middle and end of
    max_position_embeddings (and past it for dynamic NTK and longrope), without
    computing a prefix: transformers gets `position_ids`, MLX a stand-in cache carrying
    the offset (identity update, causal mask over the new tokens only). With no prefix
    RoPE attention depends only on relative positions, so this isolates what depends on
    the absolute position: dynamic NTK, longrope short/long factors, position-scaled
    attention, learned position tables. (An offset missing from decoding with a real
    cache is the generation check's job.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import compare, compat, config_keys, hf_side, layers, mlx_side, synth
from .schema import CheckResult
from .subject import Subject

FAR_TOKENS = 16
FREQ_TOLERANCE = 1e-4  # relative, per rotated pair, at position 1
# Far-position bound, per stage, at last position p: max(LAYER_TOLERANCE[dtype],
# FAR_DRIFT * p * 2^-24) where the rotation both sides apply at p agrees to float32
# rounding (no pair's angle differs by more than ANGLE_AGREES * p * 2^-24 rad), else the
# flat parity bound. Both libraries round the angle p * inv_freq to float32 from inv_freq
# values that differ in the last bits, so a correct port drifts linearly with p, while a
# scaling disagreement changes the angles themselves. Calibrated on correct ports at
# 16k-250k (bench/calibrate_rope.py, docs/tolerances.md): drift up to 0.25 * p * 2^-24
# and angle differences up to 0.66 * p * 2^-24; scaling disagreements differ in angle
# by 100 * p * 2^-24 and more.
FAR_DRIFT = 1.0
ANGLE_AGREES = 4.0
ANGLE_ULP = 2.0 ** -24
# RoPE types whose rotation depends on the absolute position beyond the trained length
EXTRAPOLATING = ("dynamic", "longrope")


def _rope_type(config: dict[str, Any]) -> str:
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict):
            return str(value.get("rope_type") or value.get("type") or "default")
    return "default"


def far_positions(config: dict[str, Any], tokens: int) -> list[int]:
    """Near the start, middle and end of max_position_embeddings; past the end too where
    the RoPE type extrapolates (with no prefix, attention sees only relative positions,
    so only absolute-position effects can differ here)."""
    max_pos = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(max_pos, int) or max_pos <= 4 * tokens:
        return []
    positions = {4 * tokens, max_pos // 2, max_pos - tokens}
    if _rope_type(config) in EXTRAPOLATING:
        positions.add(2 * max_pos)
    return sorted(positions)


class OffsetCache:
    """Stands in for a KV cache holding `offset` earlier tokens that are never attended:
    RoPE sees the offset, attention sees only the new tokens, causally."""

    def __init__(self, offset: int):
        self.offset = offset
        self.keys = None
        self.values = None

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        self.offset += keys.shape[2]
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, N: int, return_array: bool = False,  # noqa: N803 (mlx-lm's name)
                  window_size: int | None = None) -> Any:
        if N == 1:
            return None
        if return_array or (window_size and N > window_size):
            return compat.mlx_causal_mask(N, window_size=window_size)
        return "causal"

    def is_trimmable(self) -> bool:
        return False

    @property
    def state(self) -> tuple[Any, Any]:
        return self.keys, self.values

    def empty(self) -> bool:
        return self.keys is None


def offset_caches(model: Any, offset: int) -> list[Any] | None:
    """The model's own caches with every attention KV cache replaced by an OffsetCache;
    None when the model has no attention caches (pure SSM: no positions). A cache class
    the driver does not know raises DriverError: left in place it would sit at offset 0
    and the far positions would silently be near ones."""
    replaced = 0

    def swap(item: Any) -> Any:
        nonlocal replaced
        role = compat.cache_role(item)
        if role == "attention":
            replaced += 1
            return OffsetCache(offset)
        if role == "container":
            item.caches = [swap(c) for c in compat.cache_children(item)]
        return item

    caches = [swap(c) for c in compat.mlx_make_prompt_cache(model)]
    return caches if replaced else None


def only_attention_caches(model: Any) -> bool:
    """Every cache of the model is an attention cache (no recurrent state)."""
    def roles(item: Any) -> list[str]:
        role = compat.cache_role(item)
        if role == "container":
            return [r for c in compat.cache_children(item) for r in roles(c)]
        return [role]

    return all(r == "attention" for c in compat.mlx_make_prompt_cache(model) for r in roles(c))


# --- (a) the rotation each side applies -------------------------------------------------


def describe_rotation(matrix: np.ndarray) -> dict[str, Any]:
    """Pairs, layout, angles and scale from the rotation matrix (columns = images of e_j)."""
    dims = matrix.shape[0]
    pairs: list[tuple[int, int, float, float]] = []
    seen: set[int] = set()
    for j in range(dims):
        if j in seen:
            continue
        column = matrix[:, j].copy()
        column[j] = 0.0
        k = int(np.argmax(np.abs(column)))
        if abs(column[k]) < 1e-9 and abs(matrix[j, j] - 1.0) < 1e-7:
            continue  # not rotated
        seen.update((j, k))
        angle = math.atan2(matrix[k, j], matrix[j, j])
        scale = math.hypot(matrix[k, j], matrix[j, j])
        pairs.append((j, k, angle, scale))
    rotated = 2 * len(pairs)
    if pairs and all(k == j + 1 for j, k, _, _ in pairs):
        layout = "interleaved"
    elif pairs and all(k == j + rotated // 2 for j, k, _, _ in pairs):
        layout = "half-split"
    else:
        layout = "other" if pairs else "none"
    return {"rotated_dims": rotated, "layout": layout,
            "freqs": [abs(a) for _, _, a, _ in pairs],
            "scale": float(np.mean([s for *_, s in pairs])) if pairs else 1.0}


def describe_cos_sin(cos: np.ndarray, sin: np.ndarray) -> dict[str, Any]:
    """The same description from transformers' cos and sin vectors at one position.

    Full-width vectors repeat each angle twice (the repeat says the layout); a vector
    whose angles are all distinct holds one entry per rotated pair (GPT-J hands its
    layers half-width vectors and pairs the dims inside its attention): then the layout
    is not in the vectors, and is reported as such."""
    width = cos.shape[-1]
    half = width // 2
    if np.allclose(cos[:half], cos[half:]) and np.allclose(sin[:half], sin[half:]):
        rotated, layout, angles_cos, angles_sin = width, "half-split", cos[:half], sin[:half]
    elif np.allclose(cos[0::2], cos[1::2]) and np.allclose(sin[0::2], sin[1::2]):
        rotated, layout, angles_cos, angles_sin = width, "interleaved", cos[0::2], sin[0::2]
    else:
        rotated, layout, angles_cos, angles_sin = 2 * width, "not in the vectors", cos, sin
    return {"rotated_dims": rotated, "layout": layout,
            "freqs": [abs(math.atan2(s, c)) for c, s in zip(angles_cos, angles_sin, strict=True)],
            "scale": float(np.mean(np.hypot(angles_cos, angles_sin)))}


def effective_base(freqs: list[float], rotated_dims: int) -> float | None:
    """The base b of freq_i = b^(-2i/d) that the first two frequencies imply."""
    if len(freqs) < 2 or freqs[1] <= 0 or freqs[0] <= freqs[1]:
        return None
    return (freqs[0] / freqs[1]) ** (rotated_dims / 2)


def mlx_rotations(model: Any, head_dim: int,
                  offset: int = 1) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Per decoder layer, the rotation its first RoPE module applies at position `offset`;
    and per layer, why it could not be measured (the module raised)."""
    import mlx.core as mx

    from .mlx_side import describe_import_error

    out: dict[int, dict[str, Any]] = {}
    unmeasured: dict[int, str] = {}
    for index, layer in enumerate(getattr(model, "layers", [])):
        rope = next((m for _, m in layer.named_modules() if "rope" in type(m).__name__.lower()),
                    None)
        if rope is None:
            continue
        # a layer with its own head width (gemma4's global layers: global_head_dim)
        own = next((m.head_dim for _, m in layer.named_modules()
                    if isinstance(getattr(m, "head_dim", None), int)), None)
        dims = own or head_dim
        eye = mx.eye(dims).reshape(dims, 1, 1, dims)  # batch of one-hot vectors
        try:
            rotated = rope(eye, offset=offset)
            matrix = np.array(rotated.astype(mx.float32)).reshape(dims, dims).T
        except Exception as e:  # e.g. a partial-rotary module that wants its own width
            unmeasured[index] = f"{type(rope).__name__}(one-hot x {dims}) raised " \
                                f"{describe_import_error(e)}"
            continue
        out[index] = {"module": type(rope).__name__, **describe_rotation(matrix)}
    return out, unmeasured


def hf_rotations(model: Any, config: dict[str, Any], vocab: int,
                 position: int = 1) -> dict[int, dict[str, Any]]:
    """Per decoder layer, the cos and sin transformers hands its attention at `position`,
    told apart by their values at position 0 (compat.hf_cos_sin)."""
    import torch

    compat.hf_forward_takes(model, "position_ids")
    n_layers = layers.layer_count(config) or 0
    paths = [p for p, _ in model.named_modules()]
    container = layers.find_layer_list(paths, n_layers)
    if container is None:
        return {}
    seen: dict[int, tuple[Any, Any]] = {}
    handles = []
    for index in range(n_layers):
        layer = model.get_submodule(f"{container}.{index}")

        def hook(module: Any, args: tuple, kwargs: dict, index: int = index) -> None:
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, dict):  # some models pass one entry per layer type
                pe = next(iter(pe.values()), None)
            if isinstance(pe, (tuple, list)) and len(pe) == 2 and index not in seen:
                seen[index] = (pe[0].detach().float().numpy(), pe[1].detach().float().numpy())

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    token = min(5, vocab - 1)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[token, token]]),
                  position_ids=torch.tensor([[0, position]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for index, pair in seen.items():
        rows = [x.reshape(-1, x.shape[-1]) for x in pair]
        if any(r.shape[0] != 2 for r in rows):
            raise compat.DriverError("transformers", "rotary tensors of one row per position "
                                     "(2 positions given)",
                                     f"shapes {[tuple(x.shape) for x in pair]}")
        cos, sin = compat.hf_cos_sin((rows[0][1], rows[1][1]), (rows[0][0], rows[1][0]))
        out[index] = {"module": "position_embeddings", **describe_cos_sin(cos, sin)}
    return out


def _head_dim(config: dict[str, Any]) -> int:
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden = config.get("hidden_size") or config.get("n_embd") or 64
    heads = config.get("num_attention_heads") or config.get("n_head") or 4
    return hidden // heads


def compare_rotations(subject: Subject) -> CheckResult:
    config = subject.config
    head_dim = _head_dim(layers.decoder_config(config))
    mlx_side_rot, unmeasured = mlx_rotations(subject.mlx_model, head_dim)
    result = subject.result("rope", verdict="pass", summary="")
    result.metrics["check_part"] = "rotation"
    if not compat.hf_forward_has(subject.hf_model, "position_ids") and not mlx_side_rot \
            and not unmeasured:
        result.verdict = "skip"
        result.summary = ("measured nothing: no positions on either side (transformers' "
                          "forward takes no position_ids, no RoPE module in the MLX layers)")
        return result
    vocab = int(subject.ids.max()) + 1
    hf_side_rot = hf_side.memo("hf_rotations", subject.hf_model, (vocab,),
                               lambda: hf_rotations(subject.hf_model, config, vocab))
    if not mlx_side_rot and not hf_side_rot and not unmeasured:
        result.verdict = "skip"
        result.summary = ("measured nothing: no RoPE module in the MLX layers and no rotary "
                          "tensors handed to the transformers layers")
        return result
    problems: list[str] = []
    per_layer = {}
    for index in sorted(set(mlx_side_rot) | set(hf_side_rot)):
        m, h = mlx_side_rot.get(index), hf_side_rot.get(index)
        per_layer[index] = {"mlx": m, "transformers": h}
        if m is None or h is None:
            if m is None and index in unmeasured:
                continue  # not measured: said below, never a finding
            if h is not None and h["rotated_dims"]:
                problems.append(f"layer {index}: transformers rotates {h['rotated_dims']} "
                                "dims, MLX applies no RoPE module")
            continue
        if m["rotated_dims"] != h["rotated_dims"]:
            problems.append(f"layer {index}: MLX rotates {m['rotated_dims']} dims, "
                            f"transformers {h['rotated_dims']}")
        if m["layout"] != h["layout"] and "not in the vectors" not in (m["layout"], h["layout"]):
            problems.append(f"layer {index}: MLX layout {m['layout']}, transformers {h['layout']}")
        n = min(len(m["freqs"]), len(h["freqs"]))
        if n:
            rel = max(abs(a - b) / max(abs(b), 1e-12)
                      for a, b in zip(m["freqs"][:n], h["freqs"][:n], strict=True))
            per_layer[index]["max_freq_rel_diff"] = rel
            if rel > FREQ_TOLERANCE:
                problems.append(f"layer {index}: frequencies differ by up to {rel:.1%}")
        if abs(m["scale"] - h["scale"]) > FREQ_TOLERANCE * max(1.0, h["scale"]):
            problems.append(f"layer {index}: MLX scales rotated dims by {m['scale']:.4f}, "
                            f"transformers by {h['scale']:.4f}")
    first = min(per_layer)
    m, h = per_layer[first]["mlx"], per_layer[first]["transformers"]

    def fact(side: dict[str, Any] | None, name: str) -> str:
        if side is None:
            return f"{name}: not measurable"
        base = effective_base(side["freqs"], side["rotated_dims"])
        base_text = f"base {base:.6g}" if base else "base n/a"
        return (f"{name} applies {base_text}, {side['rotated_dims']} dims {side['layout']}, "
                f"scale {side['scale']:.4g}")

    result.summary = f"{fact(m, 'MLX')}; {fact(h, 'transformers')}"
    reading = config_keys.reference_reading(subject.checkpoint, config)
    if problems:
        result.verdict = "fail"
        result.summary = f"{problems[0]}; {result.summary}"
        # transformers reads the file's RoPE keys other than literally for some layer
        # types: when only those layers differ, that reading is the side that differs
        types = getattr(subject.hf_model.config.get_text_config(), "layer_types", None) or []
        read_otherwise = {t for r in reading for t in r["layer_types"]}
        failing = {int(text.split(":")[0].split()[1]) for text in problems}
        if reading and types and all(i < len(types) and types[i] in read_otherwise
                                     for i in failing):
            result.details["side"] = config_keys.READING_SIDE
            result.summary += (f"; only {'/'.join(sorted(read_otherwise))} layers differ, "
                               f"where {'; '.join(r['fact'] for r in reading)}: the side "
                               "that differs is transformers' reading of the file")
    elif unmeasured:
        # our driver could not apply the port's RoPE module: the rotation is not measured
        first_unmeasured = min(unmeasured)
        result.verdict = "error"
        result.summary = (f"MLX driver: rotation of layer {first_unmeasured} not measured: "
                          f"{unmeasured[first_unmeasured]}")
    result.details = {**result.details, "problems": problems,
                      "reference_reading": [r["fact"] for r in reading],
                      "unmeasured": {str(i): t for i, t in unmeasured.items()},
                      "facts": f"{fact(m, 'MLX')}; {fact(h, 'transformers')}",
                      "per_layer": {
        str(i): {side: (None if v is None or isinstance(v, float) else
                        {k: x for k, x in v.items() if k != "freqs"} |
                        {"freqs": [round(f, 9) for f in v["freqs"]]})
                 if side in ("mlx", "transformers") else v
                 for side, v in entry.items()}
        for i, entry in per_layer.items()}}
    return result


# --- (b) far positions --------------------------------------------------------------------


def far_tolerance(dtype: str, last_position: int) -> float:
    """The per-stage bound at a far position whose rotation agrees: the parity bound, or
    float32 angle rounding grown with the position (FAR_DRIFT), whichever is larger."""
    return max(compare.LAYER_TOLERANCE[dtype], FAR_DRIFT * last_position * ANGLE_ULP)


def angle_difference(subject: Subject, position: int) -> tuple[float | None, str | None]:
    """The largest difference (rad) of one rotated pair's angle at `position` between the
    rotation MLX's RoPE modules apply and the (cos, sin) transformers hands its layers,
    over the layers both measure, or None and why it was not measured. Run right after
    the forward at that position: transformers' dynamic NTK keeps the scaling of the
    longest sequence it has seen (its rotary module is stateful)."""
    from .mlx_side import describe_import_error

    head_dim = _head_dim(layers.decoder_config(subject.config))
    try:
        mlx, _ = mlx_rotations(subject.mlx_model, head_dim, offset=position)
        vocab = int(subject.ids.max()) + 1
        # transformers-only, the same in the base run of a differential run: computed once
        # per model, position and config (the PR run computes it right after its forward)
        hf = hf_side.memo("hf_rotations_at", subject.hf_model,
                          (vocab, position, subject.config),
                          lambda: hf_rotations(subject.hf_model, subject.config, vocab,
                                               position=position))
    except Exception as e:  # said in the row: the rounding allowance then applies unmeasured
        return None, f"rotation at {position} not measured: {describe_import_error(e)}"
    worst = None
    for index in set(mlx) & set(hf):
        a, b = mlx[index]["freqs"], hf[index]["freqs"]
        n = min(len(a), len(b))
        if n:
            diff = max(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True))
            worst = diff if worst is None else max(worst, diff)
    if worst is None:
        return None, f"rotation at {position} not measured: no layer with a RoPE module " \
                     "on the MLX side and rotary tensors on the transformers side"
    return worst, None


def far_parity(subject: Subject, positions: list[int] | None = None) -> list[CheckResult]:
    """One row per far position (`far_positions` unless given: bench/calibrate_rope.py)."""
    import torch

    config = subject.config
    ids = subject.ids[:, :FAR_TOKENS]
    if positions is None:
        positions = far_positions(layers.decoder_config(config), FAR_TOKENS)
    if not positions:
        return [subject.result("rope", verdict="skip",
                               summary="measured nothing: no max_position_embeddings to "
                                       "place the prompt in",
                               metrics={"check_part": "far-positions"})]
    if offset_caches(subject.mlx_model, 0) is None:
        return [subject.result("rope", verdict="skip",
                               summary="measured nothing: no attention caches, so no positions",
                               metrics={"check_part": "far-positions"})]
    compat.hf_forward_takes(subject.hf_model, "position_ids")
    self_check = hf_side.memo("reference_far_problem", subject.hf_model,
                              (ids, only_attention_caches(subject.mlx_model)),
                              lambda: reference_far_problem(subject, ids))
    if self_check.startswith("reference driver"):
        return [subject.result("rope", verdict="error", summary=self_check,
                               metrics={"check_part": "far-positions"})]
    results = []
    for position in positions:
        caches = offset_caches(subject.mlx_model, position)  # not None: checked above
        position_ids = torch.arange(position, position + ids.shape[1])[None]
        hf = hf_side.forward(subject.hf_model, ids, position_ids=position_ids)
        mlx = mlx_side.forward(subject.mlx_model, ids, cache=caches)
        last = position + ids.shape[1] - 1
        angle, unmeasured = angle_difference(subject, last)
        rounding = ANGLE_AGREES * last * ANGLE_ULP
        flat = compare.LAYER_TOLERANCE[subject.dtype]
        tolerance = far_tolerance(subject.dtype, last) if angle is None or angle <= rounding \
            else flat
        result = layers.judge(hf, mlx, config, subject.dtype, subject.variant.name, "rope",
                              tolerance)
        result.summary = f"positions {position}..{last}: {result.summary}"
        result.metrics.update({"check_part": "far-positions", "position": position,
                               "drift_per_position_ulp": _drift(result, last),
                               "max_angle_diff": angle, "angle_rounding_bound": rounding})
        if angle is not None and angle > rounding:
            result.details["tolerance_rule"] = (
                f"the rotations at position {last} differ by up to {angle:.2e} rad, more than "
                f"float32 rounding ({ANGLE_AGREES:g} x {last} x 2^-24 = {rounding:.1e}): the "
                f"flat bound {flat:.0e} applies")
            if result.verdict == "fail":
                result.summary += f"; RoPE angles at {last} differ by up to {angle:.2e} rad"
        elif tolerance > flat:
            result.details["tolerance_rule"] = (
                f"max({flat:.0e}, {FAR_DRIFT:g} x {last} x 2^-24) = {tolerance:.2e}: float32 "
                f"rounds RoPE angles at about position x 2^-24 on each side; the rotations "
                + (f"agree to {angle:.1e} rad (<= {rounding:.1e})" if angle is not None else
                   f"are not measured at this position ({unmeasured})"))
        result.details["reference_self_check"] = self_check
        results.append(result)
    return results


def _drift(result: CheckResult, last_position: int) -> float | None:
    """The largest stage error in units of last_position * 2^-24 (FAR_DRIFT's unit)."""
    worst = result.metrics.get("max_rel_l2")
    return float(worst) / (last_position * ANGLE_ULP) if isinstance(worst, float) else None


# A small offset for the reference's own check: a real prefix of this many tokens.
SELF_CHECK_OFFSET = 24


def reference_far_problem(subject: Subject, ids: np.ndarray) -> str:
    """transformers' side of the stand-in (position_ids, no prefix) against the same
    tokens after a real prefix it may not attend to (attention_mask 0): the two must
    agree, or transformers is not reading position_ids as the stand-in assumes. Returns
    the fact measured, or a 'reference driver: ...' problem."""
    import torch

    if not only_attention_caches(subject.mlx_model):
        return ("reference self-check not run: recurrent layers read a masked prefix into "
                "their state, so a real prefix is no stand-in for them")
    model = subject.hf_model
    compat.hf_forward_takes(model, "attention_mask")
    n = ids.shape[1]
    prefix = synth.token_ids(int(ids.max()) + 1, SELF_CHECK_OFFSET, subject.seed + 3)
    full_ids = np.concatenate([prefix, ids], axis=1)
    with torch.no_grad():
        stand_in = model(input_ids=torch.from_numpy(ids), use_cache=False,
                         position_ids=torch.arange(SELF_CHECK_OFFSET, SELF_CHECK_OFFSET + n)[None])
        real = model(input_ids=torch.from_numpy(full_ids), use_cache=False,
                     attention_mask=torch.tensor([[0] * SELF_CHECK_OFFSET + [1] * n]),
                     position_ids=torch.arange(SELF_CHECK_OFFSET + n)[None])
    rel = compare.rel_l2(stand_in.logits.float().numpy(), real.logits[:, -n:].float().numpy())
    tol = compare.LAYER_TOLERANCE[subject.dtype]
    if rel is None or rel > tol:
        return (f"reference driver: transformers {compat.library_version('transformers')} at "
                f"positions {SELF_CHECK_OFFSET}..{SELF_CHECK_OFFSET + n - 1} from position_ids "
                f"alone differs from the same tokens after a masked {SELF_CHECK_OFFSET}-token "
                f"prefix (logits rel_l2 {rel:.2e} > {tol:.0e}): far positions not judged")
    return (f"reference self-check: position_ids alone equal a masked {SELF_CHECK_OFFSET}-token "
            f"prefix in transformers (logits rel_l2 {rel:.1e} <= {tol:.0e})")


def run(subject: Subject) -> list[CheckResult]:
    try:
        rotation = compare_rotations(subject)
    except compat.DriverError as e:
        rotation = subject.result("rope", verdict="error", summary=str(e),
                                  metrics={"check_part": "rotation"})
    try:
        far = far_parity(subject)
    except compat.DriverError as e:
        far = [subject.result("rope", verdict="error", summary=str(e),
                              metrics={"check_part": "far-positions"})]
    if rotation.verdict == "fail" and far and all(r.verdict == "pass" for r in far):
        # The transformers side is read off the cos/sin it hands each layer, which is not
        # always the rotation it applies: deepseek_v3 permutes q and k for rope_interleave,
        # NoPE layers (afmoe, gemma4) are handed cos/sin they ignore. Outputs that agree
        # at every far position say the applied rotations agree.
        problems = rotation.details.pop("problems", [])
        rotation.details["unconfirmed"] = problems
        rotation.verdict = "pass"
        rotation.summary = (f"{rotation.details['facts']}; read off its layers' inputs, "
                            f"{problems[0]}, but "
                            f"outputs agree at all {len(far)} far positions: transformers "
                            "applies a rotation other than the one it hands its layers")
    return [rotation, *far]
