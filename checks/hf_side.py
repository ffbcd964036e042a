"""The transformers side: the reference model and a capture of every module's input/output."""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .mlx_side import Capture

# While a differential run is on (`shared_reference`), the transformers side is computed
# once for both trees: loaded models by (checkpoint content, dtype), forwards by model and
# inputs, config readings by config content (`config_memo`), file digests by file stats.
SHARED: dict[tuple[Any, ...], Any] | None = None


@contextmanager
def shared_reference() -> Iterator[dict[tuple[Any, ...], Any]]:
    global SHARED
    SHARED = {}
    try:
        yield SHARED
    finally:
        SHARED = None


def memo(name: str, model: Any, inputs: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """compute() once per (model, inputs) while the transformers side is shared: a
    transformers-only computation of a check, e.g. its incremental decoding."""
    if SHARED is None:
        return compute()
    key = (name, id(model), _inputs_key(*inputs))
    if key not in SHARED:
        SHARED[key] = (model, compute())  # the model kept alive keeps its id unique
    return SHARED[key][1]


def _inputs_key(*values: Any) -> str:
    digest = hashlib.sha256()
    for value in values:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for key in sorted(value):
                digest.update(key.encode())
                digest.update(_inputs_key(value[key]).encode())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


CONTENT_KEY_MAX_BYTES = 256 * 1024 * 1024


# A file changed less than this long ago may change again within the same timestamp tick
# (Linux keeps file times at a coarse clock's resolution, a few ms): its digest is not
# remembered, the way git treats a racily clean index entry.
RACY_S = 2.0


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes. While the transformers side is shared, remembered by the
    file's identity and stats (real path, device, inode, size, mtime and ctime in ns), so
    the base run does not rehash what the PR run hashed (the config check links the same
    weights into fresh directories). A rewrite changes ctime, which no one can set back;
    a file changed within RACY_S is hashed every time; the memo lives as long as the
    differential run."""
    if SHARED is None:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    real = path.resolve()
    identity = _identity(real)
    key = ("file_digest", str(real), *identity)
    if key in SHARED:
        return SHARED[key]
    digest = hashlib.sha256(real.read_bytes()).hexdigest()
    settled = time.time_ns() - int(RACY_S * 1e9)
    if _identity(real) == identity and max(identity[3], identity[4]) < settled:
        SHARED[key] = digest  # unchanged while read, and not changed just before
    return digest


def _identity(path: Path) -> tuple[int, ...]:
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def checkpoint_key(checkpoint: Path) -> str:
    """A tiny checkpoint by its content: checks write theirs to fresh temporary dirs
    (config perturbations, half-precision copies), the same bytes on both trees."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    if sum(p.stat().st_size for p in files) > CONTENT_KEY_MAX_BYTES:
        return str(checkpoint.resolve())  # real weights: their path is their identity
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


# what transformers reads to build a config: config.json and any file it names (versioned
# configuration files); everything in the directory but the weights, to be sure
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")


def config_memo(name: str, checkpoint: Path, compute: Callable[[], Any]) -> Any:
    """compute() once per checkpoint config content while the transformers side is shared:
    what transformers makes of a checkpoint's config alone (its config class's validation,
    its reading of the RoPE keys), which the base run would repeat on the same bytes in a
    fresh directory. Keyed by every file but the weights; the result is deep-copied out,
    so a caller changing it cannot change the memo. `compute` must not depend on the
    directory's path (say it with a placeholder instead)."""
    if SHARED is None:
        return compute()
    try:
        files = sorted(p for p in Path(checkpoint).iterdir()
                       if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
        key = ("config", name, tuple((p.name, file_digest(p)) for p in files))
    except OSError:
        return compute()  # unreadable: not remembered, transformers says what it says
    if key not in SHARED:
        SHARED[key] = compute()
    return copy.deepcopy(SHARED[key])


def load(checkpoint: Path, dtype: str = "float32") -> Any:
    if SHARED is None:
        return _load(checkpoint, dtype)
    key = ("load", checkpoint_key(Path(checkpoint)), dtype)
    if key not in SHARED:
        SHARED[key] = _load(checkpoint, dtype)
    return SHARED[key]


def _load(checkpoint: Path, dtype: str) -> Any:
    from .compat import hf_load_causal_lm

    # eager attention: the plainest reading of the modeling code, and the only one
    # that implements softcapping and sinks for every model
    model, info = hf_load_causal_lm(checkpoint, dtype)
    problems = [f"{kind}: {', '.join(map(str, names))}" for kind, names in info.items()
                if names and kind in ("missing_keys", "mismatched_keys")]
    if problems:
        # transformers would fill these with random values: not the checkpoint's model
        raise WeightsMismatch("; ".join(problems))
    model.eval()
    return model


class WeightsMismatch(Exception):
    """The checkpoint does not hold every weight the transformers model needs."""


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):  # ModelOutput
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _to_numpy(tensor: Any) -> np.ndarray | None:
    if tensor is None or not tensor.is_floating_point():
        return None
    return tensor.detach().float().cpu().numpy().copy()


def forward(model: Any, ids: np.ndarray, **kwargs: Any) -> Capture:
    """One forward with hooks on every module: inputs copied before the call (modules
    may modify them in place), outputs after."""
    if SHARED is None:
        return _forward(model, ids, **kwargs)
    key = ("forward", id(model), _inputs_key(ids, kwargs))
    if key not in SHARED:
        SHARED[key] = (model, _forward(model, ids, **kwargs))  # the model keeps its id
    return SHARED[key][1]


def _forward(model: Any, ids: np.ndarray, **kwargs: Any) -> Capture:
    import torch

    capture = Capture()
    handles = []

    def pre_hook(path: str):
        def hook(module: Any, args: tuple, kw: dict) -> None:
            if path in capture.inputs:
                return
            value = args[0] if args else kw.get("hidden_states", next(iter(kw.values()), None))
            capture.inputs[path] = _to_numpy(_first_tensor(value))

        return hook

    def post_hook(path: str):
        def hook(module: Any, args: tuple, kw: dict, out: Any) -> None:
            if path in capture.outputs:
                return
            capture.outputs[path] = _to_numpy(_first_tensor(out))
            capture.order.append(path)

        return hook

    for path, module in model.named_modules():
        capture.types[path] = type(module)
        if not path:
            continue
        capture.classes[path] = type(module).__name__
        handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), use_cache=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    capture.logits = out.logits.detach().float().numpy()
    return capture


def plain_forward(model: Any, ids: np.ndarray) -> np.ndarray:
    if SHARED is None:
        return _plain_forward(model, ids)
    key = ("plain_forward", id(model), _inputs_key(ids))
    if key not in SHARED:
        SHARED[key] = (model, _plain_forward(model, ids))
    return SHARED[key][1].copy()


def _plain_forward(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), use_cache=False)
    return out.logits.detach().float().numpy()
