"""The MLX-side capture: one forward of a PR's model, its logits written out as data.

Runs inside the sandbox (workers/sandbox.py), as its own process, apart from the check
run: `python -I -m mlx_verify.workers.capture --mlx-lm TREE --case DIR IDS.npy /dev/fd/N
[--case ...] [--dtype D]`, one case per variant of a model_type. For each case it loads the
checkpoint with the PR's own mlx-lm loader (`mlx_lm.utils.load_model`, strict weights),
runs the token ids through the model, and writes the logits as a float32 .npy to the
descriptor the runner opened; a case that raises is said on stderr and the next one
runs. It writes no verdict: the runner (workers/crosscheck.py) compares those logits with
transformers', which it computes itself, on checkpoints and token ids it drew at random
for this run.

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


def capture(utils: types.ModuleType, checkpoint: Path, ids: np.ndarray,
            dtype: str) -> np.ndarray:
    import mlx.core as mx

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
    parser.add_argument("--case", nargs=3, action="append", required=True,
                        metavar=("CHECKPOINT", "IDS", "OUT"))
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    utils = import_tree(args.mlx_lm)
    failed = 0
    for index, (checkpoint, ids_file, out_file) in enumerate(args.case):
        try:
            ids = np.load(ids_file, allow_pickle=False)
            logits = capture(utils, Path(checkpoint), ids, args.dtype)
        except Exception as e:  # the runner reads no logits for this case, and says why
            first = str(e).splitlines()[0][:200] if str(e) else ""
            print(f"capture case {index}: {type(e).__name__}: {first}", file=sys.stderr)
            failed += 1
            continue
        with open(out_file, "wb") as out:
            np.save(out, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
