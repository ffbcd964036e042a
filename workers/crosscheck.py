"""Final-logit parity measured outside the sandbox (runs on runners, trusted code).

The check run's results come from the process that imported the PR's code, which can
write any results it likes (issue 11). For the headline measurement, the final logits
of each model_type's default variant, the runner measures again itself:

1. it builds the default variant's config and a tiny checkpoint (checks/synth.py, the
   recipe of the checks) into a fresh directory of its own, with a weight seed drawn from
   `secrets`, and draws the token ids the same way: a PR cannot precompute the answer;
2. transformers' logits are computed here, in the runner's process (checks/hf_side.py);
3. the PR's mlx-lm runs one forward in a separate sandboxed process
   (workers/capture.py, transformers and torch hidden), which writes its logits as a
   .npy through a descriptor the runner opened: data, no verdict;
4. the .npy is read with a size bound, refused unless it is a regular file of the
   expected shape and dtype, and compared with the calibrated bound of the layers check
   (checks/compare.py LAYER_TOLERANCE, docs/tolerances.md).

`cross_check` returns one CrossCheck (workers/jobs.py): pass (confirmed), fail (the
logits differ beyond the bound) or error (nothing could be measured, with why).
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlx_verify.workers import sandbox
from mlx_verify.workers.jobs import CrossCheck

CAPTURE_TOKENS = 48  # checks/engine.py PARITY_TOKENS: the layers check's prompt length
NPY_HEADER_MAX = 4096


class CaptureRefused(Exception):
    """The capture file is not logits of the expected shape: one line saying why."""


def read_capture(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 logits the sandboxed capture wrote to `path`: a regular file (not a
    symlink, FIFO or device: read_regular_file), at most the bytes `shape` needs plus a
    .npy header, of exactly that shape and dtype. CaptureRefused otherwise."""
    limit = int(np.prod(shape)) * 4 + NPY_HEADER_MAX
    try:
        data = sandbox.read_regular_file(path, limit + 1)
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise CaptureRefused(f"capture file refused: {why}") from None
    if len(data) > limit:
        raise CaptureRefused(f"capture file refused: larger than the {limit} bytes "
                             f"logits of shape {shape} take")
    if not data:
        raise CaptureRefused("the capture wrote no logits")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise CaptureRefused(f"capture file refused: not a .npy array ({type(e).__name__})"
                             ) from None
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise CaptureRefused(f"capture file refused: dtype "
                             f"{getattr(array, 'dtype', type(array).__name__)}, not float32")
    if tuple(array.shape) != tuple(shape):
        raise CaptureRefused(f"capture file refused: shape {tuple(array.shape)}, expected "
                             f"{tuple(shape)}")
    return array


def _same_for_transformers(model_type: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether transformers reads the two config dicts as the same configuration."""
    from transformers import AutoConfig

    def read(config: dict[str, Any]) -> dict[str, Any]:
        data = {k: v for k, v in config.items() if k != "model_type"}
        out = AutoConfig.for_model(model_type, **data).to_dict()
        out.pop("transformers_version", None)
        return out

    try:
        return json.dumps(read(a), sort_keys=True, default=str) == \
            json.dumps(read(b), sort_keys=True, default=str)
    except Exception:
        return False


def default_config(model_type: str, claimed: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The default variant's tiny config, and where it came from. Built here with the
    runner's own (released) mlx-lm deciding the format (checks/engine.py make_variants);
    the config the sandboxed run reports is used instead only when transformers reads it
    as the same configuration (the PR's port may read the other RoPE format or key name),
    so a PR cannot choose a smaller or different model to be measured on."""
    from mlx_verify.checks import engine, synth

    built = engine.make_variants(synth.default_config(model_type), from_file=False)[0].config
    if claimed is None or claimed == built:
        return built, "built by the runner"
    if isinstance(claimed, dict) and claimed.get("model_type") == model_type and \
            _same_for_transformers(model_type, claimed, built):
        return claimed, "the check run's, read by transformers as the runner's"
    return built, "built by the runner (the check run's config differs)"


def claimed_default(report: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """What a sandboxed model report claims for the default variant: the layers check's
    verdict there (the report's own verdict when it has no such row), and its config."""
    verdict = next((c.get("verdict") for c in report.get("checks") or []
                    if c.get("check") == "layers" and c.get("variant") == "default"),
                   report.get("verdict"))
    config = next((v.get("config") for v in report.get("variants") or []
                   if v.get("name") == "default"), None)
    return verdict, config


def cross_check(*, model_type: str, claimed: str | None, claimed_config: dict[str, Any] | None,
                src: Path, work: Path, writable: Path, env: dict[str, str], dtype: str,
                memory_mb: int,
                timeout_s: float, file_size: int) -> CrossCheck:
    """One model_type's final logits, measured outside the sandbox (see the module doc)."""
    from mlx_verify.checks import compare, engine, hf_side, synth

    started = time.monotonic()
    bound = compare.LAYER_TOLERANCE[dtype]
    fields: dict[str, Any] = {"model_type": model_type, "variant": "default",
                              "claimed": claimed, "bound": bound, "dtype": dtype,
                              "tokens": CAPTURE_TOKENS}

    def done(verdict: str, reason: str | None = None, **more: Any) -> CrossCheck:
        return CrossCheck(verdict=verdict, reason=reason, **fields, **more,
                          duration_s=round(time.monotonic() - started, 2))

    trusted = work / "trusted" / model_type
    trusted.mkdir(parents=True, exist_ok=False)
    os.chmod(work / "trusted", 0o755)
    os.chmod(trusted, 0o755)
    try:
        config, origin = default_config(model_type, claimed_config)
        weight_seed, ids_seed = secrets.randbelow(2**31), secrets.randbelow(2**31)
        checkpoint = synth.write_checkpoint(config, weight_seed, root=trusted)
    except Exception as e:
        return done("error", f"the runner cannot build the default checkpoint: "
                             f"{synth._one_line(e)}")
    fields["config_origin"] = origin
    for path in [checkpoint, *checkpoint.iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    ids = np.random.default_rng(ids_seed).integers(
        4, engine._vocab(config), size=(1, CAPTURE_TOKENS), dtype=np.int64)
    ids_path = trusted / "ids.npy"
    np.save(ids_path, ids, allow_pickle=False)
    os.chmod(ids_path, 0o644)
    try:
        reference = hf_side.plain_forward(hf_side.load(checkpoint, dtype=dtype), ids)
    except Exception as e:
        return done("error", f"transformers cannot build or run the model here: "
                             f"{synth._one_line(e)}")

    run_dir = work / f"capture-{model_type}"
    run_dir.mkdir()
    out_path = run_dir / "logits.npy"
    out_fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    command = [sys.executable, "-I", "-m", "mlx_verify.workers.capture", "--mlx-lm", str(src),
               "--checkpoint", str(checkpoint), "--ids", str(ids_path),
               "--out", f"/dev/fd/{out_fd}", "--dtype", dtype]
    stderr_path = run_dir / "stderr.txt"
    try:
        with open(run_dir / "stdout.txt", "wb") as stdout, open(stderr_path, "wb") as stderr:
            finished = sandbox.run(
                command, env=env, writable=writable, readable=[src, trusted],
                settings=sandbox.load_sandbox_settings(), memory_mb=memory_mb,
                file_size=file_size, timeout_s=timeout_s, stdout=stdout, stderr=stderr,
                pass_fds=(out_fd,), hidden=sandbox.hidden_packages())
    finally:
        os.close(out_fd)
    if finished.timeout or finished.code != 0:
        why = "timed out" if finished.timeout else f"exit status {finished.code}"
        try:
            tail = sandbox.read_regular_file(stderr_path, 2048, tail=True).decode(
                errors="replace")
        except OSError:
            tail = ""
        lines = [line for line in tail.splitlines() if line.strip()]
        return done("error", f"the sandboxed capture gave no logits: {why}"
                             + (f": {lines[-1][:200]}" if lines else ""))
    try:
        logits = read_capture(out_path, tuple(reference.shape))
    except CaptureRefused as e:
        return done("error", str(e))
    measured = compare.metrics(logits, reference)
    rel_l2 = measured["rel_l2"]
    top1 = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    if not np.all(np.isfinite(logits)) or not np.isfinite(rel_l2):
        return done("fail", "non-finite MLX logits", rel_l2=None, top1_agreement=top1)
    return done("pass" if rel_l2 <= bound else "fail", rel_l2=rel_l2, top1_agreement=top1)
