"""Half-precision dtype tracing of an MLX model: the dtypes going into and out of every
module in call order, the forward's stages (embeddings, each layer, final norm), and the
place float32 enters a stage (module, parameter, or the float32 lines of its code).

Used by the `dtype` check (checks/dtypes.py) and again by `quantize` on the reloaded
quantized model.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import layers, mlx_side

FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Call:
    """One module call: the dtypes of its floating array inputs and outputs."""

    path: str
    cls: str
    start: int  # call order
    end: int = -1  # completion order (children first)
    input: str | None = None  # dtype of the first floating input (the hidden states)
    inputs: list[str] = field(default_factory=list)  # every floating input
    output: str | None = None  # dtype of the first floating output


def _float_arrays(value: Any) -> Iterator[Any]:
    import mlx.core as mx

    if isinstance(value, mx.array):
        if mx.issubdtype(value.dtype, mx.floating):
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_arrays(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_arrays(item)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("mlx.core.")


@contextmanager
def dtype_recording(model: Any, calls: dict[str, Call]) -> Iterator[None]:
    """Record the raw dtypes of every module call, first call of each module only
    (mlx_side.recording converts arrays to float32; here only their dtypes are kept)."""
    classes = {p: type(m).__name__ for p, m in model.named_modules() if p}
    counter = {"start": 0, "end": 0}

    def make_wrapper(original: Any, paths: dict[int, str]) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            path = paths.get(id(self))
            call = None
            if path is not None and path not in calls:
                call = Call(path=path, cls=classes[path], start=counter["start"])
                counter["start"] += 1
                found = [dtype_name(a.dtype) for a in _float_arrays([args, kwargs])]
                call.inputs = found
                call.input = found[0] if found else None
                calls[path] = call
            out = original(self, *args, **kwargs)
            if call is not None:
                first = next(_float_arrays(out), None)
                call.output = None if first is None else dtype_name(first.dtype)
                call.end = counter["end"]
                counter["end"] += 1
            return out

        return wrapper

    with mlx_side.patched_calls(model, make_wrapper):
        yield


def traced_forward(model: Any, ids: np.ndarray) -> tuple[dict[str, Call], str, mlx_side.Capture]:
    """The dtype recording and `mlx_side.forward` in one forward: the module calls' dtypes,
    the logits dtype and the capture of every module (the dtype and quantize checks need
    all three of the same model; a second forward would compute the same arrays again)."""
    calls: dict[str, Call] = {}
    with dtype_recording(model, calls):
        capture = mlx_side.forward(model, ids)
    assert capture.logits_dtype is not None
    return calls, capture.logits_dtype, capture


def parameter_dtypes(model: Any) -> dict[str, str]:
    from mlx.utils import tree_flatten

    return {k: dtype_name(v.dtype) for k, v in tree_flatten(model.parameters())}


Stage = tuple[str, str, str | None]  # (stage name, module path prefix, output dtype)


def stages(calls: dict[str, Call], n_layers: int | None) -> tuple[list[Stage], str | None]:
    """(stage name, module path prefix, output dtype) in forward order, and the layer list."""
    paths = list(calls)
    layer_list = layers.find_layer_list(paths, n_layers) if n_layers else None
    found: list[Stage] = []
    if layer_list is None:
        return found, None
    first = calls.get(f"{layer_list}.0")
    if first is not None:
        found.append(("embeddings", "", first.input))
    for i in range(n_layers or 0):
        call = calls.get(f"{layer_list}.{i}")
        if call is not None:
            found.append((f"layers.{i}", f"{layer_list}.{i}", call.output))
    base = layer_list.rpartition(".")[0]
    if base and base in calls:
        found.append(("final_norm", base, calls[base].output))
    return found, layer_list


def _called_parent(calls: dict[str, Call], path: str) -> str:
    """The nearest ancestor that was called (a layer list like `model.layers` is not)."""
    parent = path.rpartition(".")[0]
    while parent and parent not in calls:
        parent = parent.rpartition(".")[0]
    return parent


def _children(calls: dict[str, Call], parent: str) -> list[Call]:
    return sorted((c for p, c in calls.items() if _called_parent(calls, p) == parent),
                  key=lambda c: c.start)


def _float32_lines(module: Any) -> list[str]:
    """Lines of the module's own __call__ that mention float32: the usual constant."""
    try:
        source, first_line = inspect.getsourcelines(type(module).__call__)
        file = inspect.getsourcefile(type(module).__call__) or "?"
    except (OSError, TypeError):
        return []
    return [f"{Path(file).name}:{first_line + i}: {line.strip()}"
            for i, line in enumerate(source) if "float32" in line]


def locate_upcast(model: Any, calls: dict[str, Call], stage: str, prefix: str,
                  layer_list: str | None, want: str) -> dict[str, Any]:
    """Where float32 enters inside one stage: the first module (completion order) whose
    hidden-state input has the half dtype and whose output does not; then its float32
    parameters, or the child calls around the switch and the float32 lines of its code."""
    modules = dict(model.named_modules())

    first_layer = calls.get(f"{layer_list}.0") if layer_list else None

    def inside(path: str) -> bool:
        if prefix:
            return path == prefix or path.startswith(prefix + ".")
        if stage == "embeddings" and first_layer is not None:
            # what runs before the first layer: the embedding and the model's own code
            return calls[path].start < first_layer.start
        return layer_list is None or not (path == layer_list or path.startswith(layer_list + "."))

    ordered = sorted((c for p, c in calls.items() if inside(p) and c.end >= 0),
                     key=lambda c: c.end)
    lead = next((c for c in ordered if c.input == want and c.output not in (None, want)), None)
    if lead is None:
        lead = next((c for c in ordered if c.output not in (None, want)), None)
    if lead is None:
        # e.g. logits from a tied `embed_tokens.as_linear` (no module call) or a cast in
        # the top-level model's own code
        lines = _float32_lines(model)
        facts = ["no module call inside the stage returned a non-half dtype: the "
                 f"top-level {type(model).__name__}.__call__ changes it"]
        if lines:
            facts.append("float32 in its code: " + "; ".join(lines[:3]))
        return {"stage": stage, "module": prefix or type(model).__name__,
                "float32_lines": lines, "facts": facts}
    module = modules.get(lead.path)
    own = {k: dtype_name(v.dtype) for k, v in
           (module.parameters().items() if module is not None else [])
           if hasattr(v, "dtype")}
    float_params = [f"{lead.path}.{k}" for k, d in own.items() if d != want]
    facts = [f"{lead.path} ({lead.cls}): input {lead.input}, output {lead.output}"]
    found: dict[str, Any] = {"stage": stage, "module": lead.path, "class": lead.cls,
                             "input": lead.input, "output": lead.output}
    if float_params:
        found["parameters"] = float_params
        facts.append("parameter(s) not in " + want + ": " + ", ".join(
            f"{p} ({own[p[len(lead.path) + 1:]]})" for p in float_params))
    else:
        kids = _children(calls, lead.path)
        before = [c.path for c in kids if c.input in (want, None) and c.output in (want, None)
                  and not any(k.start < c.start and k.input not in (want, None) for k in kids)]
        after = next((c for c in kids if c.input not in (want, None)), None)
        if kids:
            where = f"in the code of {lead.path} itself"
            if before:
                where += f", after {before[-1]}"
            if after is not None:
                where += f", before {after.path} (which receives {after.input})"
            facts.append(f"no parameter of {lead.path} is outside {want}: float32 enters {where}")
            found["after"] = before[-1] if before else None
            found["before"] = after.path if after is not None else None
        else:
            facts.append(f"no parameter of {lead.path} is outside {want}: a float32 constant "
                         "or an explicit cast in its code")
        lines = _float32_lines(module) if module is not None else []
        if lines:
            found["float32_lines"] = lines
            facts.append("float32 in its code: " + "; ".join(lines[:3]))
    found["facts"] = facts
    return found


@contextmanager
def cpu_gather_mm() -> Iterator[dict[str, int]]:
    """MLX's CPU backend runs gather_mm (MoE experts) in float32 only. On CPU, compute
    it in float32 and return the dtype the GPU kernel returns (the promoted input
    dtype), so MoE models can be traced and compared in half precision. Yields a
    count of the emulated calls."""
    import mlx.core as mx

    emulated = {"calls": 0}
    if mx.default_device() != mx.cpu:
        yield emulated
        return
    original = mx.gather_mm

    def gather_mm(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        out_dtype = mx.result_type(a, b)
        emulated["calls"] += 1
        return original(a.astype(mx.float32), b.astype(mx.float32), *args,
                        **kwargs).astype(out_dtype)

    mx.gather_mm = gather_mm
    try:
        yield emulated
    finally:
        mx.gather_mm = original
