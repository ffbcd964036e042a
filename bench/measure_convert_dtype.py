"""Measurement: does `mlx_lm.convert --dtype bfloat16` of the float32 tiny checkpoint
separate a correct port from one whose conversion rounds a parameter the port keeps in
float32? Aimed at bench_real_bugs' `qwen3_5-A_log-cast-to-half` (1fd521c3: no
`cast_predicate`, so convert casts `A_log` to bfloat16).

For the clean copy of the installed mlx-lm and the bugged copy (the bench's own reversal),
each in its own process:
- mlx_lm.convert.convert(dtype="bfloat16") of the float32 checkpoint (with a tokenizer,
  as users run it), then mlx-lm's loader on the output;
- the parameters the converted model holds in float32;
- logits rel L2 of the converted model against transformers float32 on the float32
  checkpoint, run in bfloat16 (as loaded) and upcast to float32 (weights' rounding only);
- transformers' own bfloat16 load of the same checkpoint: its logits rel L2 and the dtype
  it gives A_log, also for a file that stores A_log in float32 with `torch_dtype`
  bfloat16 (the layout of the released Qwen3.5 checkpoints).

    nice -n 10 .venv/bin/python bench/measure_convert_dtype.py [MODEL_TYPE] [BUG_ID]

Prints one line per tree. Not a timed benchmark: a measurement behind a verdict rule.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(tree: str | None, model_type: str) -> dict[str, object]:
    from mlx_verify.checks import mlx_side

    mlx_side.use_mlx_lm(tree)
    import mlx.core as mx
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mlx_verify.checks import compare, engine, hf_side, quantize, tracing

    subject = engine.load_subject(model_type)
    work = Path(tempfile.mkdtemp(prefix="measure-convert-"))
    try:
        given = work / "source"
        given.mkdir()
        for file in subject.checkpoint.iterdir():
            if file.is_file():
                (given / file.name).symlink_to(file.resolve())
        quantize.write_tokenizer(given, quantize._vocab_size(subject))
        convert = importlib.import_module("mlx_lm.convert").convert
        with contextlib.redirect_stdout(io.StringIO()):
            convert(hf_path=str(given), mlx_path=str(work / "out"), dtype="bfloat16")
        model, _, _ = mlx_side.load(work / "out")
        kept = sorted(k for k, d in tracing.parameter_dtypes(model).items() if d == "float32")
        reference = hf_side.plain_forward(hf_side.load(subject.checkpoint), subject.ids)
        as_loaded = compare.rel_l2(mlx_side.plain_forward(model, subject.ids), reference)
        model.set_dtype(mx.float32)
        upcast = compare.rel_l2(mlx_side.plain_forward(model, subject.ids), reference)
        hf_half = hf_side.load(subject.checkpoint, dtype="bfloat16")
        hf_half_rel = compare.rel_l2(hf_side.plain_forward(hf_half, subject.ids), reference)
        hf_a_log = sorted({str(p.dtype) for n, p in hf_half.named_parameters()
                           if n.endswith("A_log")})
        # the released layout: bfloat16 tensors, A_log stored in float32, torch_dtype bf16
        mixed = work / "mixed"
        mixed.mkdir()
        for file in subject.checkpoint.glob("*.safetensors"):
            tensors = load_file(file)
            save_file({k: v if k.endswith("A_log") else v.to(torch.bfloat16)
                       for k, v in tensors.items()}, mixed / file.name,
                      metadata={"format": "pt"})
        config = json.loads((subject.checkpoint / "config.json").read_text())
        config["torch_dtype"] = "bfloat16"
        (mixed / "config.json").write_text(json.dumps(config))
        auto = AutoModelForCausalLM.from_pretrained(mixed, dtype="auto")
        auto_a_log = sorted({str(p.dtype) for n, p in auto.named_parameters()
                             if n.endswith("A_log")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"tree": tree or "installed", "float32_after_convert": len(kept),
            "first_float32": kept[0] if kept else None,
            "logits_rel_l2_bf16_vs_hf_fp32": as_loaded,
            "logits_rel_l2_upcast_vs_hf_fp32": upcast,
            "hf_bf16_logits_rel_l2": hf_half_rel, "hf_bf16_A_log_dtype": hf_a_log,
            "hf_auto_A_log_dtype_file_stores_fp32": auto_a_log}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        tree = None if sys.argv[2] == "-" else sys.argv[2]
        print(json.dumps(measure(tree, sys.argv[3])))
        return 0
    model_type = sys.argv[1] if len(sys.argv) > 1 else "qwen3_5"
    bug_id = sys.argv[2] if len(sys.argv) > 2 else "qwen3_5-A_log-cast-to-half"
    sys.path.insert(0, str(HERE))
    import bench_real_bugs

    bug = next(b for b in bench_real_bugs.BUGS if b.id == bug_id)
    package = bench_real_bugs.installed_mlx_lm()
    root = Path(tempfile.mkdtemp(prefix="measure-convert-trees-"))
    try:
        trees = {"clean": bench_real_bugs.copy_tree(package, root / "clean", None),
                 bug_id: bench_real_bugs.copy_tree(package, root / "bugged", bug)}
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, "--one", str(tree), model_type],
                                 capture_output=True, text=True, check=True)
            print(name, out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
