"""The `layers` check: per-stage parity and localization of the first divergence.

Stages: the embeddings (input of the first decoder layer, so embedding scaling is
included), each decoder layer's output, the final norm (output of the inner model),
and the logits. Modules are paired by their path, which mlx-lm ports keep from
transformers because weights are loaded by name; the decoder-layer list and the
inner model may sit under different prefixes on the two sides.

Inside the first divergent stage every paired sub-module's input and output are
compared. The first sub-module to finish with a divergent output is the lead: if
its inputs agree, its own computation differs; if not, the code of its parent that
runs before it (RoPE, scaling, masking, residual glue) does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compare, compat, differential, locations
from .mlx_side import Capture
from .render import num
from .schema import CheckResult, LayerRow, Localization, Part
from .subject import Subject

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def decoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the config that describes the decoder: a multimodal config's
    text_config (gemma3, llama4, qwen3_5), else the config itself."""
    text = config.get("text_config")
    if isinstance(text, dict) and not any(isinstance(config.get(k), int)
                                          for k in LAYER_COUNT_KEYS):
        return text
    return config


def layer_count(config: dict[str, Any]) -> int | None:
    config = decoder_config(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def find_layer_list(paths: list[str], n_layers: int) -> str | None:
    """The path P whose children P.0 .. P.{n-1} exist (and P.n does not)."""
    present = set(paths)
    candidates = []
    for path in paths:
        parent, _, last = path.rpartition(".")
        if last == "0" and parent and all(f"{parent}.{i}" in present for i in range(n_layers)):
            if f"{parent}.{n_layers}" not in present:
                candidates.append(parent)
    if not candidates:
        return None
    # prefer the shallowest list, e.g. model.layers over model.layers.0.mlp.experts
    return min(candidates, key=lambda p: (p.count("."), p))


@dataclass
class PathMap:
    hf_layers: str
    mlx_layers: str
    # (layer index, transformers child name) -> MLX child name, for children the two
    # libraries name differently (transformers 5 `mlp` vs mlx-lm `block_sparse_moe`)
    aliases: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def hf_base(self) -> str:
        return self.hf_layers.rpartition(".")[0]

    @property
    def mlx_base(self) -> str:
        return self.mlx_layers.rpartition(".")[0]

    def to_mlx(self, hf_path: str) -> str:
        if hf_path == self.hf_layers or hf_path.startswith(self.hf_layers + "."):
            rest = hf_path[len(self.hf_layers) + 1:].split(".")
            if len(rest) >= 2 and rest[0].isdigit():
                rest[1] = self.aliases.get((int(rest[0]), rest[1]), rest[1])
            return ".".join([self.mlx_layers, *rest]) if rest != [""] else self.mlx_layers
        if self.hf_base and (hf_path == self.hf_base or hf_path.startswith(self.hf_base + ".")):
            rest = hf_path[len(self.hf_base):]
            return (self.mlx_base + rest) if self.mlx_base else rest.lstrip(".")
        return hf_path


def _children(capture: Capture, parent: str) -> list[str]:
    """Names of the direct children of `parent` that ran, in the order they finished."""
    depth = parent.count(".") + 1
    return [p.rsplit(".", 1)[-1] for p in capture.order
            if p.startswith(parent + ".") and p.count(".") == depth]


def pair_children(hf: Capture, mlx: Capture, paths: PathMap, n_layers: int) -> None:
    """Pair the decoder-layer children that only one side names, by order and shape."""
    for index in range(n_layers):
        hf_parent, mlx_parent = f"{paths.hf_layers}.{index}", f"{paths.mlx_layers}.{index}"
        hf_names, mlx_names = _children(hf, hf_parent), _children(mlx, mlx_parent)
        hf_only = [n for n in hf_names if n not in mlx_names]
        mlx_only = [n for n in mlx_names if n not in hf_names]
        for hf_name, mlx_name in zip(hf_only, mlx_only, strict=False):
            hf_out = hf.outputs.get(f"{hf_parent}.{hf_name}")
            mlx_out = mlx.outputs.get(f"{mlx_parent}.{mlx_name}")
            if hf_out is not None and mlx_out is not None and hf_out.shape == mlx_out.shape:
                paths.aliases[(index, hf_name)] = mlx_name


def classify(relative_path: str, class_name: str) -> Part:
    """What kind of code a module is, from its name and class (deepest word wins)."""
    cls = class_name.lower()
    last = relative_path.rsplit(".", 1)[-1].lower()
    if "norm" in last or last.startswith("ln") or "norm" in cls:
        return "norm"
    if any(w in cls for w in ("mamba", "ssm", "gateddelta", "shortconv", "lineartention",
                              "linearattention", "recurrent", "rglru", "conv")):
        return "ssm"
    words = relative_path.lower().split(".")
    for word in reversed(words):
        if word in ("experts", "router", "gate", "shared_expert", "shared_experts",
                    "block_sparse_moe", "moe", "switch_mlp") or "expert" in word:
            return "moe"
        if word in ("mixer", "conv1d", "ssm", "mamba", "linear_attn") and "attention" not in cls:
            return "ssm"
        if "attn" in word or "attention" in word:
            return "attention"
        if word in ("mlp", "feed_forward", "ffn", "block_sparse_moe") or "mlp" in word:
            return "moe" if any(w in cls for w in ("moe", "sparse", "expert")) else "mlp"
    if "attention" in cls:
        return "attention"
    if "mlp" in cls or "feedforward" in cls:
        return "mlp"
    return "unknown"


def _row(name: str, index: int | None, layer_type: str | None, mlx: np.ndarray,
         ref: np.ndarray, tolerance: float) -> LayerRow:
    m = compare.metrics(mlx, ref)
    row = LayerRow(name=name, index=index, layer_type=layer_type, tolerance=tolerance,
                   ok=m["rel_l2"] <= tolerance, **m)
    differential.record(row, mlx, ref)  # kept only in a differential run (--base)
    return row


def _layer_types(config: dict[str, Any], n_layers: int) -> list[str | None]:
    for key in ("layer_types", "layers_block_type", "block_types"):
        value = config.get(key)
        if isinstance(value, list) and len(value) == n_layers:
            return [str(v) for v in value]
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == n_layers:
        names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
        return [names.get(c, c) for c in pattern]
    return [None] * n_layers


def compare_stages(hf: Capture, mlx: Capture, config: dict[str, Any],
                   tolerance: float) -> tuple[list[LayerRow], PathMap | None, str | None]:
    """The per-stage rows; a reason string when the model structure could not be paired."""
    n_layers = layer_count(config)
    hf_paths = list(hf.classes)
    mlx_paths = list(mlx.classes)
    rows: list[LayerRow] = []
    if n_layers is None:
        return rows, None, "config has no layer count"
    hf_layers = find_layer_list(hf_paths, n_layers)
    mlx_layers = find_layer_list(mlx_paths, n_layers)
    if hf_layers is None or mlx_layers is None:
        side = "transformers" if hf_layers is None else "MLX"
        return rows, None, f"no list of {n_layers} decoder layers found in the {side} model"
    paths = PathMap(hf_layers, mlx_layers)
    pair_children(hf, mlx, paths, n_layers)
    types = _layer_types(decoder_config(config), n_layers)

    first_hf, first_mlx = f"{hf_layers}.0", f"{mlx_layers}.0"
    emb_ref, emb_mlx = hf.inputs.get(first_hf), mlx.inputs.get(first_mlx)
    if emb_ref is not None and emb_mlx is not None and emb_ref.shape == emb_mlx.shape:
        rows.append(_row("embeddings", None, None, emb_mlx, emb_ref, tolerance))
    for i in range(n_layers):
        ref, out = hf.outputs.get(f"{hf_layers}.{i}"), mlx.outputs.get(f"{mlx_layers}.{i}")
        if ref is None or out is None or ref.shape != out.shape:
            shape_ref = None if ref is None else ref.shape
            shape_mlx = None if out is None else out.shape
            return rows, paths, f"layer {i} outputs not comparable: {shape_ref} vs {shape_mlx}"
        rows.append(_row(f"layers.{i}", i, types[i], out, ref, tolerance))
    base_ref = hf.outputs.get(paths.hf_base) if paths.hf_base else None
    base_mlx = mlx.outputs.get(paths.mlx_base) if paths.mlx_base else None
    if base_ref is not None and base_mlx is not None and base_ref.shape == base_mlx.shape:
        rows.append(_row("final_norm", None, None, base_mlx, base_ref, tolerance))
    if hf.logits is not None and mlx.logits is not None:
        if hf.logits.shape != mlx.logits.shape:
            return rows, paths, f"logits shapes differ: {hf.logits.shape} vs {mlx.logits.shape}"
        rows.append(_row("logits", None, None, mlx.logits, hf.logits, tolerance))
    return rows, paths, None


def localize(row: LayerRow, hf: Capture, mlx: Capture, paths: PathMap,
             tolerance: float) -> Localization:
    if row.name == "embeddings":
        return _localize_outside(row, "embedding", hf, mlx, paths, tolerance)
    if row.name == "final_norm":
        return _localize_outside(row, "final_norm", hf, mlx, paths, tolerance)
    if row.name == "logits":
        found = Localization(
            stage="logits", module="lm_head", part="lm_head", inputs_agree=True,
            output_rel_l2=row.rel_l2,
            facts=["final hidden states agree; logits differ (lm_head, tying, "
                   "logit scaling or softcapping)"],
        )
        # the root model's code applies lm_head (or the tied embedding) and the softcap
        found = with_sources(found, hf, mlx, paths, "", "lm_head")
        if found.mlx_call is None:  # tied: the embedding applied as the output projection
            found.mlx_call = locations.call_location(mlx.types.get(""), "as_linear", "mlx",
                                                     attribute=False)
        return found
    prefix = f"{paths.hf_layers}.{row.index}"
    return _localize_within(row.name, prefix, hf, mlx, paths, tolerance)


def _compared(hf: Capture, mlx: Capture, paths: PathMap, hf_path: str):
    mlx_path = paths.to_mlx(hf_path)
    out = compare.rel_l2(mlx.outputs.get(mlx_path), hf.outputs.get(hf_path))
    inp = compare.rel_l2(mlx.inputs.get(mlx_path), hf.inputs.get(hf_path))
    return mlx_path, inp, out


def _localize_within(stage: str, prefix: str, hf: Capture, mlx: Capture, paths: PathMap,
                     tolerance: float) -> Localization:
    agreeing: list[str] = []
    for hf_path in hf.order:
        if not hf_path.startswith(prefix + "."):
            continue
        mlx_path, inp, out = _compared(hf, mlx, paths, hf_path)
        if out is None:
            continue
        if out <= tolerance:
            agreeing.append(hf_path)
            continue
        relative = hf_path[len(prefix) + 1:]
        if inp is None or inp <= tolerance:
            part = classify(relative, hf.classes.get(hf_path, ""))
            facts = [f"{relative}: inputs agree (rel_l2 {num(inp)}), output differs "
                     f"(rel_l2 {num(out)})" if inp is not None else
                     f"{relative}: the first sub-module whose output differs (rel_l2 "
                     f"{num(out)}); its input was not captured on both sides, so whether "
                     "its own code or the code before it differs is not measured"]
            found = Localization(stage=stage, module=hf_path, part=part,
                                 inputs_agree=None if inp is None else True,
                                 input_rel_l2=inp, output_rel_l2=out,
                                 agreeing_before=_siblings(agreeing, hf_path), facts=facts)
            return with_sources(found, hf, mlx, paths, hf_path, None)
        # The input already differs. Climb to the outermost enclosing module whose input
        # differs too: the code that runs before it, in its parent, is at fault.
        while True:
            up = hf_path.rpartition(".")[0]
            if up == prefix:
                break
            up_input = _compared(hf, mlx, paths, up)[1]
            if up_input is None or up_input <= tolerance:
                break
            hf_path, inp = up, up_input
        relative = hf_path[len(prefix) + 1:]
        parent = hf_path.rpartition(".")[0]
        parent_rel = parent[len(prefix) + 1:] if parent != prefix else ""
        part = (classify(parent_rel, hf.classes.get(parent, "")) if parent_rel else "residual")
        before = _siblings(agreeing, hf_path)
        facts = [f"input of {relative} differs (rel_l2 {num(inp)})"
                 + (f" while {', '.join(p.rsplit('.', 1)[-1] for p in before)} agree"
                    if before else "")]
        if part == "attention":
            facts.append("between the projections: RoPE, attention scale, mask, softmax, "
                         "softcap or sinks")
        found = Localization(stage=stage, module=parent, part=part, inputs_agree=False,
                             input_rel_l2=inp, output_rel_l2=out, agreeing_before=before,
                             facts=facts)
        return with_sources(found, hf, mlx, paths, parent, hf_path)
    found = Localization(
        stage=stage, module=prefix, part="residual", inputs_agree=True,
        agreeing_before=agreeing[-6:],
        facts=[f"all {len(agreeing)} paired sub-modules agree; the layer's own code "
               "(residual adds, scaling, ordering) differs"],
    )
    return with_sources(found, hf, mlx, paths, prefix, None)


def _siblings(agreeing: list[str], hf_path: str) -> list[str]:
    parent = hf_path.rpartition(".")[0]
    return [p for p in agreeing if p.rpartition(".")[0] == parent]


def _localize_outside(row: LayerRow, part: Part, hf: Capture, mlx: Capture, paths: PathMap,
                      tolerance: float) -> Localization:
    """Divergence before the first layer or after the last: check the modules outside the
    decoder-layer list."""
    facts = []
    lead = None
    for hf_path in hf.order:
        if hf_path.startswith(paths.hf_layers + ".") or hf_path == paths.hf_layers:
            continue
        mlx_path, inp, out = _compared(hf, mlx, paths, hf_path)
        if out is None:
            continue
        if out > tolerance and lead is None:
            lead = hf_path
            facts.append(f"{hf_path}: output rel_l2 {num(out)}, input rel_l2 {num(inp)}")
    if not facts:
        facts.append(f"{row.name} differs (rel_l2 {num(row.rel_l2)}) while every paired "
                     "module outside the decoder layers agrees: the code between them "
                     "(embedding scale, final norm placement) differs")
    found = Localization(stage=row.name, module=lead or paths.hf_base or row.name, part=part,
                         inputs_agree=None, output_rel_l2=row.rel_l2, facts=facts)
    return with_sources(found, hf, mlx, paths, lead if lead is not None else paths.hf_base,
                        None)


def _direct_child(parent: str, path: str) -> str:
    """The name under `parent` on the way to `path` ("mlp" for parent "l.0", "l.0.mlp.up")."""
    rest = path[len(parent) + 1:] if parent else path
    return rest.split(".", 1)[0]


def with_sources(found: Localization, hf: Capture, mlx: Capture, paths: PathMap,
                 module: str, called: str | None) -> Localization:
    """Source locations of a localization: `module` (a transformers path, "" for the root)
    is the code at fault; `called` is its sub-module whose input differs, or None when
    the module's own output differs (then its call in its parent is given)."""
    mlx_module = paths.to_mlx(module) if module else ""
    mlx_cls = mlx.types.get(mlx_module)
    hf_cls = hf.types.get(module)
    if locations.library_of(mlx_cls) == "mlx":
        found.mlx_source = locations.method_location(mlx_cls, "mlx")
        if called is not None:
            child = _direct_child(mlx_module, paths.to_mlx(called))
            owner = mlx_cls
        else:  # the call of the module itself, in the nearest parent that is a module
            parent, child = mlx_module.rpartition(".")[0], mlx_module.rpartition(".")[2]
            while parent and parent not in mlx.types:
                parent, child = parent.rpartition(".")[0], parent.rpartition(".")[2]
            while child.isdigit() and parent:  # an item of a list: the list's name
                parent, child = parent.rpartition(".")[0], parent.rpartition(".")[2]
            owner = mlx.types.get(parent) if mlx_module else None
        found.mlx_call = locations.call_location(owner, child, "mlx")
        if found.mlx_call is not None and found.mlx_source is None:
            found.mlx_source = locations.method_location(owner, "mlx")
    if locations.library_of(hf_cls) == "torch":  # not when both sides are MLX (quantize)
        found.hf_source = locations.method_location(hf_cls, "torch")
    return found


def run(subject: Subject) -> list[CheckResult]:
    from . import hf_side, mlx_side

    hf = hf_side.forward(subject.hf_model, subject.ids)
    mlx = mlx_side.forward(subject.mlx_model, subject.ids)
    result = judge(hf, mlx, subject.config, subject.dtype, subject.variant.name, "layers")
    # The captures must not change what they capture: the same forward without hooks
    # (transformers) or without patched classes (MLX) gives the same logits.
    plain = {"transformers": hf_side.plain_forward(subject.hf_model, subject.ids),
             "mlx": mlx_side.plain_forward(subject.mlx_model, subject.ids)}
    for library, captured in (("transformers", hf.logits), ("mlx", mlx.logits)):
        # bit-identical (non-finite values included: a broken port can overflow) is no effect
        same = (captured is not None and captured.shape == plain[library].shape
                and np.array_equal(captured, plain[library], equal_nan=True))
        moved = 0.0 if same else compare.rel_l2(captured, plain[library])
        result.metrics[f"capture_effect_{library}_rel_l2"] = moved
        if moved is None or moved > CAPTURE_TOLERANCE:
            side = "reference driver" if library == "transformers" else "MLX driver"
            result.verdict = "error"
            result.summary = (f"{side}: {library} {compat.library_version(library)}: logits "
                              f"with every module captured differ from a plain forward "
                              f"(rel_l2 {num(moved)} > {CAPTURE_TOLERANCE:.0e}): the capture "
                              "changes the model")
            break
    return [result]


# Hooks and patched classes only copy tensors: the same kernels on the same inputs give
# the same logits (measured 0.0 on every clean port).
CAPTURE_TOLERANCE = 1e-6


def judge(hf: Capture, mlx: Capture, config: dict[str, Any], dtype: str, variant: str,
          check: str, tolerance: float | None = None) -> CheckResult:
    """Rows, verdict, first divergence and its localization for two captures of one input."""
    start = time.perf_counter()
    tolerance = tolerance or compare.LAYER_TOLERANCE[dtype]
    rows, paths, problem = compare_stages(hf, mlx, config, tolerance)
    ids_tokens = hf.logits.shape[1] if hf.logits is not None else 0
    result = CheckResult(check=check, variant=variant, verdict="pass", summary="",
                         layers=rows)
    result.metrics = {
        "tokens": int(ids_tokens),
        "tolerance_rel_l2": tolerance,
        "max_rel_l2": max((r.rel_l2 for r in rows), default=None),
        "logits_rel_l2": next((r.rel_l2 for r in rows if r.name == "logits"), None),
        "top1_agreement": float(np.mean(hf.logits.argmax(-1) == mlx.logits.argmax(-1))),
    }
    failing = [r for r in rows if not r.ok]
    if not rows:
        result.verdict = "error"
        result.summary = f"measured nothing: no stage compared ({problem or 'no outputs'})"
    elif problem is not None and not failing:
        result.verdict = "error"
        result.summary = f"cannot pair the two models: {problem}"
    elif failing:
        first = failing[0]
        result.verdict = "fail"
        result.first_divergent_layer = first.name
        if paths is not None:
            result.localization = localize(first, hf, mlx, paths, tolerance)
        where = (f", {result.localization.part} ({result.localization.module})"
                 if result.localization else "")
        result.summary = (f"first divergence at {first.name}{where}: rel_l2 {first.rel_l2:.2e} "
                          f"> {tolerance:.0e}; logits rel_l2 {rows[-1].rel_l2:.2e}")
    else:
        result.summary = (f"{len(rows)} stages agree: max rel_l2 "
                          f"{result.metrics['max_rel_l2']:.2e} <= {tolerance:.0e}")
    result.duration_s = time.perf_counter() - start
    return result
