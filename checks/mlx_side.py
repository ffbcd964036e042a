"""The MLX side: import mlx_lm from a chosen tree, load a checkpoint, capture every module.

Nothing here imports mlx_lm at module import time, so `use_mlx_lm(path)` can put a PR
checkout first on sys.path before the package is first imported.
"""

from __future__ import annotations

import copy
import glob
import importlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .schema import WeightsReport


class MlxLmError(Exception):
    """The chosen mlx_lm tree cannot be used (bad path, import error in its code)."""


class PortCrash(Exception):
    """The model file raises while building the model or sanitizing its weights: a finding."""


@dataclass
class MlxLmInfo:
    path: str
    version: str
    git_sha: str | None


# The mlx[cpu] wheel for Linux links the reference (netlib) BLAS: a 1024x1024 matmul
# takes 1.5 s on this project's CPU, 0.09 s with OpenBLAS. Preloaded, OpenBLAS's
# cblas_sgemm takes the place of the wheel's (docs/benchmarks.md). Debian: the package
# libopenblas0-serial (one thread: the sweep and the runners run a process per core).
OPENBLAS_GLOB = "/usr/lib/*-linux-gnu/openblas-serial/libopenblas.so.0"


def fast_blas_env() -> dict[str, str]:
    """LD_PRELOAD for a process that will run MLX on the CPU: OpenBLAS when installed,
    nothing when LD_PRELOAD is already set or MLX_VERIFY_BLAS=reference."""
    import os

    if (not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD")
            or os.environ.get("MLX_VERIFY_BLAS") == "reference"):
        return {}
    found = sorted(glob.glob(OPENBLAS_GLOB))
    return {"LD_PRELOAD": found[0]} if found else {}


def blas_library() -> str | None:
    """The BLAS library this process has loaded (Linux), e.g. libopenblas.so.0."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line.lower()}
    except OSError:
        return None
    # numpy's scipy_openblas64_ copy has suffixed symbols: MLX cannot bind to it
    names = sorted(Path(p).name for p in paths
                   if p.startswith("/") and "scipy_openblas" not in p)
    return next((n for n in names if "openblas" in n), names[0] if names else None)


# the directories use_mlx_lm put first on sys.path (switch_mlx_lm takes them off again)
INSERTED_ROOTS: list[str] = []


def use_mlx_lm(path: str | None) -> MlxLmInfo:
    """Import mlx_lm, from `path` (a directory holding the mlx_lm package) when given."""
    if path is not None:
        root = Path(path).expanduser().resolve()
        if not (root / "mlx_lm" / "__init__.py").is_file():
            raise MlxLmError(
                f"{path}: no mlx_lm package there (expected {root}/mlx_lm/__init__.py)"
            )
        if "mlx_lm" in sys.modules:
            loaded = Path(sys.modules["mlx_lm"].__file__).resolve().parent.parent
            if loaded != root:
                raise MlxLmError(f"mlx_lm was already imported from {loaded}, not {root}")
        sys.path.insert(0, str(root))
        INSERTED_ROOTS.append(str(root))
    try:
        mlx_lm = importlib.import_module("mlx_lm")
        importlib.import_module("mlx_lm.utils")
    except (Exception, SystemExit) as e:  # some model files call sys.exit on import
        raise MlxLmError(f"cannot import mlx_lm: {describe_import_error(e)}") from e
    package_dir = Path(mlx_lm.__file__).resolve().parent
    if path is not None and package_dir.parent != Path(path).expanduser().resolve():
        raise MlxLmError(f"mlx_lm imported from {package_dir}, not from {path}")
    return MlxLmInfo(
        path=str(package_dir),
        version=getattr(mlx_lm, "__version__", "unknown"),
        git_sha=_git_sha(package_dir),
    )


def switch_mlx_lm(path: str) -> MlxLmInfo:
    """Import mlx_lm from another tree in this process (the base of a differential run):
    every mlx_lm module of the tree imported before is dropped first. Our modules import
    mlx_lm inside functions only, so nothing keeps the old tree's classes."""
    while INSERTED_ROOTS:  # only the trees put first on sys.path, never site-packages
        root = INSERTED_ROOTS.pop()
        if root in sys.path:
            sys.path.remove(root)
    for name in [n for n in sys.modules if n == "mlx_lm" or n.startswith("mlx_lm.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return use_mlx_lm(path)


def _git_sha(directory: Path) -> str | None:
    """HEAD of the checkout that tracks this mlx_lm package; None for an installed copy
    (which may sit inside some other repository's ignored venv)."""
    try:
        tracked = subprocess.run(
            ["git", "-C", str(directory), "ls-files", "--error-unmatch", "__init__.py"],
            capture_output=True, text=True, timeout=10,
        )
        if tracked.returncode != 0:
            return None
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def describe_import_error(e: BaseException) -> str:
    """One line naming the file and line of a syntax or import error in model code."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError in {e.filename}:{e.lineno}: {e.msg}"
    tb = e.__traceback__
    location = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "mlx_lm" in filename:
            location = f" ({filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}{location}"


def backend_limitation(e: BaseException) -> str | None:
    """A reason when MLX's backend, not the port, cannot run the model in half precision
    (MLX's CPU backend runs some ops, e.g. gather_mm of MoE layers, in float32 only)."""
    text = str(e)
    if "only supports float32" not in text:
        return None
    import mlx.core as mx

    return (f"the MLX {mx.default_device()} backend cannot run this model in half precision "
            f"({text})")


def config_problem(config: dict[str, Any]) -> str | None:
    """Why mlx-lm's ModelArgs cannot be built from `config` (e.g. required keys missing),
    or None. Checked before a checkpoint is synthesized; an import error in the model
    file raises MlxLmError."""
    _, args_class = model_classes(config)
    try:
        # a copy: some ModelArgs write into the dicts they are given (gemma3 sets
        # text_config["vocab_size"]), which would change the config we go on to write
        args_class.from_dict(copy.deepcopy(config))
    except Exception as e:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    return None


def model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """(Model, ModelArgs) of the mlx_lm.models file mlx-lm picks for a config (remapping
    applied). Every failure to import it is an MlxLmError, SystemExit included: some
    model files call sys.exit when an optional package is missing."""
    from .compat import DriverError, mlx_model_classes

    try:
        return mlx_model_classes(config)
    except DriverError:
        raise
    except ValueError as e:
        raise MlxLmError(f"mlx-lm has no model for this config: {e}") from e
    except (Exception, SystemExit) as e:
        raise MlxLmError(f"cannot import the mlx-lm model file: {describe_import_error(e)}") from e


def load(checkpoint: Path) -> tuple[Any, dict[str, Any], WeightsReport]:
    """Load through mlx-lm's own loader with strict weights; mismatches become a report.

    The weight comparison is done first, by hand, so the names can be listed; when
    they all match, `load_model(strict=True)` loads for real.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .compat import mlx_load_config, mlx_load_model

    config = mlx_load_config(checkpoint)
    model_class, args_class = model_classes(config)

    weights: dict[str, Any] = {}
    for wf in sorted(glob.glob(str(checkpoint / "model*.safetensors"))):
        weights.update(mx.load(wf))
    try:
        model = model_class(args_class.from_dict(config))
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
    except (Exception, SystemExit) as e:  # the port fails on a config transformers runs
        raise PortCrash(f"mlx-lm cannot build the model: {describe_import_error(e)}") from e
    expected = dict(tree_flatten(model.parameters()))
    report = WeightsReport(
        missing=sorted(set(expected) - set(weights)),
        unexpected=sorted(set(weights) - set(expected)),
        mismatched=sorted(
            f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(weights)
            if tuple(weights[k].shape) != tuple(expected[k].shape)
        ),
    )
    if report.missing or report.unexpected or report.mismatched:
        return None, config, report
    model, config = mlx_load_model(checkpoint, strict=True)
    return model, config, report


@dataclass
class Capture:
    """Inputs and outputs of every module of one forward pass, as float32 numpy."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # completion order (children first)
    classes: dict[str, str] = field(default_factory=dict)
    logits: np.ndarray | None = None
    # path ("" for the root) -> module class: where its source sits (checks.locations)
    types: dict[str, type] = field(default_factory=dict)
    logits_dtype: str | None = None  # the dtype the model returned its logits in (MLX)


def _first_array(value: Any) -> Any:
    import mlx.core as mx

    if isinstance(value, mx.array):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_array(item)
            if found is not None:
                return found
    return None


def _to_numpy(array: Any) -> np.ndarray | None:
    import mlx.core as mx

    if array is None or array.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return None
    return np.array(array.astype(mx.float32))


@contextmanager
def patched_calls(model: Any, make_wrapper: Callable[[Any, dict[int, str]], Any]
                  ) -> Iterator[None]:
    """Wrap `__call__` on every module class of `model` for the duration.

    MLX has no hooks; patching the classes leaves the module tree and its weights
    untouched. `make_wrapper(original, paths)` gets the original `__call__` and the module
    paths by `id(module)`.
    """
    import mlx.nn as nn

    paths = {id(m): p for p, m in model.named_modules() if p}
    patched: dict[type, Any] = {}
    for module_type in {type(m) for _, m in model.named_modules()}:
        for cls in module_type.__mro__:
            if cls in patched or not issubclass(cls, nn.Module) or "__call__" not in cls.__dict__:
                continue
            patched[cls] = cls.__dict__["__call__"]
    for cls, original in patched.items():
        cls.__call__ = make_wrapper(original, paths)
    try:
        yield
    finally:
        for cls, original in patched.items():
            cls.__call__ = original


@contextmanager
def recording(model: Any, capture: Capture) -> Iterator[None]:
    """Record every module's first call: its first array input and output."""
    for path, module in model.named_modules():
        capture.types[path] = type(module)
        if path:
            capture.classes[path] = type(module).__name__

    def make_wrapper(original: Any, paths: dict[int, str]) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            path = paths.get(id(self))
            if path is not None and path not in capture.outputs:
                arg = _first_array(args[:1]) if args else _first_array(list(kwargs.values())[:1])
                capture.inputs[path] = arg
                capture.outputs[path] = _first_array(out)
                capture.order.append(path)
            return out

        return wrapper

    with patched_calls(model, make_wrapper):
        yield


def forward(model: Any, ids: np.ndarray, cache: Any = None) -> Capture:
    import mlx.core as mx

    capture = Capture()
    with recording(model, capture):
        logits = model(mx.array(ids), cache=cache)
    mx.eval(logits)
    capture.logits = np.array(logits.astype(mx.float32))
    capture.logits_dtype = str(logits.dtype).removeprefix("mlx.core.")
    capture.inputs = {k: _to_numpy(v) for k, v in capture.inputs.items()}
    capture.outputs = {k: _to_numpy(v) for k, v in capture.outputs.items()}
    return capture


def plain_forward(model: Any, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    logits = model(mx.array(ids))
    mx.eval(logits)
    return np.array(logits.astype(mx.float32))
