"""Which side's half precision moves the logits: per-position relative L2 of MLX in half
and of transformers in half, each against transformers' float32 forward over the same
tiny float32 checkpoint (and MLX float32 for scale). The evidence behind holding the
half-precision `long`, `chunked` and `kv-cache` rows to transformers float32 within
transformers' own half error (docs/tolerances.md, "Half precision at length").

    .venv/bin/python bench/measure_half_noise.py MODEL_TYPE DTYPE TOKENS [VARIANT]

One line per comparison: the largest per-position error and where, the median, and the
largest over the last 16 positions (what the long row judges).
"""

from __future__ import annotations

import argparse

import numpy as np


def per_position(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(candidate - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def main() -> None:
    import mlx.core as mx

    from mlx_verify.checks import engine, hf_side, mlx_side, synth

    parser = argparse.ArgumentParser()
    parser.add_argument("model_type")
    parser.add_argument("dtype", choices=("bfloat16", "float16"))
    parser.add_argument("tokens", type=int)
    parser.add_argument("variant", nargs="?", default="default")
    args = parser.parse_args()
    variants = {v.name: v for v in engine.all_variants(
        args.model_type, synth.default_config(args.model_type), from_file=False)}
    config = variants[args.variant].config
    checkpoint = synth.write_checkpoint(config, 0, dtype="float32")
    ids = synth.token_ids(engine._vocab(config), args.tokens, 1)
    reference = hf_side.plain_forward(hf_side.load(checkpoint, "float32"), ids)[0]
    hf_half = hf_side.plain_forward(hf_side.load(checkpoint, args.dtype), ids)[0]
    model, _, _ = mlx_side.load(checkpoint)
    mlx_float32 = mlx_side.plain_forward(model, ids)[0]
    model.set_dtype(getattr(mx, args.dtype))
    mlx_half = mlx_side.plain_forward(model, ids)[0]
    reference, hf_half, mlx_float32, mlx_half = (a.astype(np.float64) for a in (
        reference, hf_half, mlx_float32, mlx_half))
    for name, candidate, against in (
            ("MLX half vs transformers float32", mlx_half, reference),
            ("transformers half vs transformers float32", hf_half, reference),
            ("MLX half vs transformers half", mlx_half, hf_half),
            ("MLX float32 vs transformers float32", mlx_float32, reference)):
        errors = per_position(candidate, against)
        print(f"{args.model_type}/{args.variant} {args.dtype} {args.tokens} tokens, {name}: "
              f"max {errors.max():.3e} at position {int(errors.argmax())}, median "
              f"{np.median(errors):.2e}, last 16 max {errors[-16:].max():.2e}")


if __name__ == "__main__":
    main()
