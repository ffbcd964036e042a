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
import tempfile
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


def runner_variants(model_type: str, source: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """variant name -> tiny config, built here with the runner's own (released) mlx-lm
    and mlx-verify (checks/engine.py all_variants): from transformers' default config, or
    from a Hub config.json (`source`) as `mlx-verify check --config` builds it."""
    from mlx_verify.checks import engine, synth

    if source is None:
        found = engine.all_variants(model_type, synth.default_config(model_type),
                                    from_file=False)
    else:
        found = engine.all_variants(model_type, source, from_file=True)
    return {v.name: v.config for v in found}


def variant_config(model_type: str, variant: str, claimed: dict[str, Any] | None,
                   built: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The config one variant is measured on, and where it came from: the runner's own
    (`built`, runner_variants), or the config the sandboxed run reports only when
    transformers reads it as the same configuration (the PR's port may read the other
    RoPE format or key name), so a PR cannot choose a smaller or different model to be
    measured on. A variant the runner does not build (the PR's ModelArgs gained a field
    the released mlx-lm lacks) is measured on the claimed config, said so; None when
    there is none to measure on."""
    claim_ok = isinstance(claimed, dict) and claimed.get("model_type") == model_type
    if variant not in built:
        if claim_ok:
            return claimed, "the check run's (the runner's mlx-lm builds no such variant)"
        return None, "the runner builds no such variant and the check run gave no config"
    if claimed is None or claimed == built[variant]:
        return built[variant], "built by the runner"
    if claim_ok and _same_for_transformers(model_type, claimed, built[variant]):
        return claimed, "the check run's, read by transformers as the runner's"
    return built[variant], "built by the runner (the check run's config differs)"


def claimed_variants(report: dict[str, Any]) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """What a sandboxed model report claims: variant -> (the layers check's verdict there,
    the variant's config). The default variant takes the report's own verdict when it has
    no layers row."""
    configs = {str(v.get("name")): v.get("config") for v in report.get("variants") or []}
    claims = {str(c.get("variant")): (c.get("verdict"), configs.get(str(c.get("variant"))))
              for c in report.get("checks") or [] if c.get("check") == "layers"}
    if "default" not in claims:
        claims["default"] = (report.get("verdict"), configs.get("default"))
    return claims


def cross_check(*, model_type: str, claimed: str | None, claimed_config: dict[str, Any] | None,
                src: Path, work: Path, writable: Path, env: dict[str, str], dtype: str,
                memory_mb: int, timeout_s: float, file_size: int) -> CrossCheck:
    """One model_type's default variant, measured outside the sandbox."""
    from mlx_verify.checks import engine, synth

    try:
        built = {"default": engine.make_variants(synth.default_config(model_type),
                                                 from_file=False)[0].config}
    except Exception as e:
        built_error: str | None = synth._one_line(e)
        built = {}
    else:
        built_error = None
    (checked,) = cross_check_model(
        model_type=model_type, claims={"default": (claimed, claimed_config)}, built=built,
        built_error=built_error, src=src, work=work, writable=writable, env=env,
        dtype=dtype, memory_mb=memory_mb, timeout_s=timeout_s, file_size=file_size)
    return checked


def cross_check_model(*, model_type: str,
                      claims: dict[str, tuple[str | None, dict[str, Any] | None]],
                      built: dict[str, dict[str, Any]], built_error: str | None = None,
                      src: Path, work: Path, writable: Path, env: dict[str, str], dtype: str,
                      memory_mb: int, timeout_s: float, file_size: int) -> list[CrossCheck]:
    """The final logits of each claimed variant of one model_type, measured outside the
    sandbox (see the module doc): one transformers forward here per variant, and one
    sandboxed capture process for all of them (it imports the PR's mlx-lm once)."""
    from mlx_verify.checks import compare, engine, hf_side, synth

    started = time.monotonic()
    bound = compare.LAYER_TOLERANCE[dtype]
    done: list[CrossCheck] = []

    def result(variant: str, verdict: str, reason: str | None = None,
               **more: Any) -> CrossCheck:
        return CrossCheck(model_type=model_type, variant=variant, verdict=verdict,
                          claimed=claims[variant][0], bound=bound, dtype=dtype,
                          tokens=CAPTURE_TOKENS, reason=reason, **more,
                          duration_s=round(time.monotonic() - started, 2))

    trusted_root = work / "trusted"
    trusted_root.mkdir(exist_ok=True)
    os.chmod(trusted_root, 0o755)
    # one directory per call: a model_type can run on the default and on Hub configs
    trusted = Path(tempfile.mkdtemp(prefix=f"{model_type}-", dir=trusted_root))
    os.chmod(trusted, 0o755)
    run_dir = Path(tempfile.mkdtemp(prefix=f"capture-{model_type}-", dir=work))
    # (variant, checkpoint, ids file, transformers' logits, config origin, out file, fd)
    cases: list[tuple[str, Path, Path, np.ndarray, str, Path, int]] = []
    for index, variant in enumerate(claims):
        if built_error is not None:
            done.append(result(variant, "error", f"the runner cannot build the {variant} "
                                                 f"checkpoint: {built_error}"))
            continue
        config, origin = variant_config(model_type, variant, claims[variant][1], built)
        if config is None:
            done.append(result(variant, "error", f"not measured: {origin}",
                               config_origin=None))
            continue
        case_dir = trusted / f"case-{index}"
        case_dir.mkdir()
        os.chmod(case_dir, 0o755)
        try:
            weight_seed, ids_seed = secrets.randbelow(2**31), secrets.randbelow(2**31)
            checkpoint = synth.write_checkpoint(config, weight_seed, root=case_dir)
        except Exception as e:
            done.append(result(variant, "error", f"the runner cannot build the {variant} "
                                                 f"checkpoint: {synth._one_line(e)}",
                               config_origin=origin))
            continue
        for path in [checkpoint, *checkpoint.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        ids = np.random.default_rng(ids_seed).integers(
            4, engine._vocab(config), size=(1, CAPTURE_TOKENS), dtype=np.int64)
        ids_path = case_dir / "ids.npy"
        np.save(ids_path, ids, allow_pickle=False)
        os.chmod(ids_path, 0o644)
        try:
            reference = hf_side.plain_forward(hf_side.load(checkpoint, dtype=dtype), ids)
        except Exception as e:
            done.append(result(variant, "error", f"transformers cannot build or run the "
                                                 f"model here: {synth._one_line(e)}",
                               config_origin=origin))
            continue
        out_path = run_dir / f"logits-{index}.npy"
        out_fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        cases.append((variant, checkpoint, ids_path, reference, origin, out_path, out_fd))
    if not cases:
        return done
    command = [sys.executable, "-I", "-m", "mlx_verify.workers.capture", "--mlx-lm", str(src),
               "--dtype", dtype]
    for _, checkpoint, ids_path, _, _, _, out_fd in cases:
        command += ["--case", str(checkpoint), str(ids_path), f"/dev/fd/{out_fd}"]
    stderr_path = run_dir / "stderr.txt"
    try:
        with open(run_dir / "stdout.txt", "wb") as stdout, open(stderr_path, "wb") as stderr:
            finished = sandbox.run(
                command, env=env, writable=writable, readable=[src, trusted],
                settings=sandbox.load_sandbox_settings(), memory_mb=memory_mb,
                file_size=file_size, timeout_s=timeout_s, stdout=stdout, stderr=stderr,
                pass_fds=tuple(case[6] for case in cases), hidden=sandbox.hidden_packages())
    finally:
        for case in cases:
            os.close(case[6])
    why = "timed out" if finished.timeout else f"exit status {finished.code}"
    try:
        tail = sandbox.read_regular_file(stderr_path, 4096, tail=True).decode(errors="replace")
    except OSError:
        tail = ""
    lines = [line for line in tail.splitlines() if line.strip()]
    for index, (variant, _, _, reference, origin, out_path, _) in enumerate(cases):
        try:
            logits = read_capture(out_path, tuple(reference.shape))
        except CaptureRefused as e:
            if str(e) != "the capture wrote no logits":
                done.append(result(variant, "error", str(e), config_origin=origin))
                continue
            said = [line for line in lines if line.startswith(f"capture case {index}: ")]
            last = said[-1].split(": ", 1)[1] if said else (lines[-1] if lines else "")
            done.append(result(variant, "error", f"the sandboxed capture gave no logits: "
                                                 f"{why}" + (f": {last[:200]}" if last else ""),
                               config_origin=origin))
            continue
        measured = compare.metrics(logits, reference)
        rel_l2 = measured["rel_l2"]
        top1 = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        if not np.all(np.isfinite(logits)) or not np.isfinite(rel_l2):
            done.append(result(variant, "fail", "non-finite MLX logits", rel_l2=None,
                               top1_agreement=top1, config_origin=origin))
            continue
        done.append(result(variant, "pass" if rel_l2 <= bound else "fail", rel_l2=rel_l2,
                           top1_agreement=top1, config_origin=origin))
    order = list(claims)
    total = round(time.monotonic() - started, 2)  # one capture measured them all
    return [c.model_copy(update={"duration_s": total})
            for c in sorted(done, key=lambda c: order.index(c.variant))]
