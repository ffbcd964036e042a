"""The MLX-side capture: one forward of a PR's model, its logits written out as data.

Runs inside the sandbox (workers/sandbox.py), as its own process, apart from the check
run: `python -I -m mlx_verify.workers.capture --mlx-lm TREE --checkpoint DIR --ids IDS.npy
--out /dev/fd/N [--dtype D]`. It loads the checkpoint with the PR's own mlx-lm loader
(`mlx_lm.utils.load_model`, strict weights), runs the token ids through the model, and
writes the logits as a float32 .npy to the descriptor the runner opened. It writes no
verdict: the runner (workers/crosscheck.py) compares those logits with transformers',
which it computes itself, on a checkpoint and token ids it drew at random for this run.

transformers and torch are hidden from this process (the runner mounts empty,
read-only directories over their packages), so the PR's code cannot ask transformers
for the answer. mlx_lm's package `__init__` imports its tokenizer code, which imports
transformers; the capture therefore imports `mlx_lm` as a bare package (its `__init__`
not run) with a stand-in `mlx_lm.tokenizer_utils`, and then the PR's `mlx_lm.utils`.

Imports only numpy and MLX at module level: nothing of transformers, torch or githubkit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def _tokenizer_stand_in() -> types.ModuleType:
    """What mlx_lm.utils imports from tokenizer_utils; the capture loads no tokenizer."""
    module = types.ModuleType("mlx_lm.tokenizer_utils")

    class TokenizerWrapper:  # a name mlx_lm.utils imports; never used by load_model
        pass

    def load(*args, **kwargs):
        raise RuntimeError("the capture loads no tokenizer")

    module.TokenizerWrapper = TokenizerWrapper
    module.load = load
    return module


def import_tree(tree: Path) -> types.ModuleType:
    """mlx_lm.utils of the tree, without running mlx_lm/__init__.py (see the module doc)."""
    package_dir = tree.resolve() / "mlx_lm"
    if not (package_dir / "utils.py").is_file():
        raise SystemExit(f"capture: no mlx_lm/utils.py in {tree}")
    spec = importlib.machinery.ModuleSpec("mlx_lm", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(package_dir)]
    package.__file__ = str(package_dir / "__init__.py")
    sys.modules["mlx_lm"] = package
    sys.modules["mlx_lm.tokenizer_utils"] = _tokenizer_stand_in()
    return importlib.import_module("mlx_lm.utils")


def capture(tree: Path, checkpoint: Path, ids: np.ndarray, dtype: str) -> np.ndarray:
    import mlx.core as mx

    utils = import_tree(tree)
    loaded = utils.load_model(checkpoint, strict=True)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype))
    logits = model(mx.array(ids))
    mx.eval(logits)
    return np.array(logits.astype(mx.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx_verify.workers.capture")
    parser.add_argument("--mlx-lm", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--ids", required=True, type=Path)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    ids = np.load(args.ids, allow_pickle=False)
    logits = capture(args.mlx_lm, args.checkpoint, ids, args.dtype)
    with open(args.out, "wb") as out:
        np.save(out, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
