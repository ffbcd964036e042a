"""What the differential run shares between its two trees is keyed so it can never answer
for another config or checkpoint: transformers' reading of a config by the config's
content, file digests by file identity and stats (a rewrite in place is seen), and one
traced MLX forward gives what tracing and capturing apart gave.

Real files and transformers' real config validation; no stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from mlx_verify.checks import config_keys, engine, hf_side, mlx_side, tracing

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512}
# transformers' own validation refuses this one: 64 is not a multiple of 5 heads
REFUSED = {**LLAMA, "num_attention_heads": 5}


def write_config(directory: Path, config: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "config.json").write_text(text)
    return directory


def config_entries(shared: dict) -> int:
    return sum(1 for key in shared if key[0] == "config")


def test_config_refusal_is_shared_by_content_only(tmp_path: Path) -> None:
    with hf_side.shared_reference() as shared:
        accepted = write_config(tmp_path / "a", LLAMA)
        assert config_keys.transformers_refuses(accepted) is None
        refused = write_config(tmp_path / "b", REFUSED)
        message = config_keys.transformers_refuses(refused)
        assert message is not None and "validate_architecture" in message
        assert config_entries(shared) == 2
        # the same bytes in a fresh directory (the base run's): the same answer, remembered
        assert config_keys.transformers_refuses(write_config(tmp_path / "c", LLAMA)) is None
        assert config_entries(shared) == 2
        # the accepted directory's config rewritten in place: judged on its new content
        write_config(accepted, REFUSED)
        assert config_keys.transformers_refuses(accepted) == message
        # a refusal naming the file says the path of the directory asked about
        broken = "{not json"
        first = config_keys.transformers_refuses(write_config(tmp_path / "d", broken))
        second = config_keys.transformers_refuses(write_config(tmp_path / "e", broken))
        assert first is not None and second is not None
        assert str(tmp_path / "e") in second and str(tmp_path / "d") not in second
        assert second == first.replace(str(tmp_path / "d"), str(tmp_path / "e"))
        # a directory that is not there is transformers' to refuse, and not remembered
        gone = config_keys.transformers_refuses(tmp_path / "missing")
        assert gone is not None and str(tmp_path / "missing") in gone
    # outside a differential run nothing is remembered
    assert hf_side.SHARED is None
    assert config_keys.transformers_refuses(accepted) == message


def test_a_file_rewritten_in_place_gets_its_new_digest(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    link = tmp_path / "linked" / "model.safetensors"  # how the config check reuses weights
    link.parent.mkdir()
    os.symlink(weights, link)
    time.sleep(hf_side.RACY_S + 0.1)  # settled: its digest may be remembered
    with hf_side.shared_reference() as shared:
        assert hf_side.file_digest(weights) == hashlib.sha256(b"A" * 4096).hexdigest()
        remembered = [key for key in shared if key[0] == "file_digest"]
        assert len(remembered) == 1
        assert hf_side.file_digest(link) == hf_side.file_digest(weights)
        # same size, same inode, mtime put back: ctime moves, and a fresh change is
        # never remembered (it could change again within one timestamp tick)
        stat = weights.stat()
        with open(weights, "r+b") as f:
            f.write(b"B" * 4096)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert weights.stat().st_mtime_ns == stat.st_mtime_ns
        assert hf_side.file_digest(weights) == hashlib.sha256(b"B" * 4096).hexdigest()
        assert hf_side.file_digest(link) == hashlib.sha256(b"B" * 4096).hexdigest()
        with open(weights, "r+b") as f:
            f.write(b"C" * 4096)
        assert hf_side.file_digest(weights) == hashlib.sha256(b"C" * 4096).hexdigest()
        assert [key for key in shared if key[0] == "file_digest"] == remembered


def test_checkpoint_key_follows_content_not_path(tmp_path: Path) -> None:
    first = write_config(tmp_path / "one", LLAMA)
    (first / "model.safetensors").write_bytes(b"weights")
    second = write_config(tmp_path / "two", LLAMA)
    os.symlink(first / "model.safetensors", second / "model.safetensors")
    with hf_side.shared_reference():
        assert hf_side.checkpoint_key(first) == hf_side.checkpoint_key(second)
        write_config(second, {**LLAMA, "rms_norm_eps": 1e-3})
        assert hf_side.checkpoint_key(first) != hf_side.checkpoint_key(second)


def test_one_traced_forward_equals_tracing_and_capturing_apart() -> None:
    import mlx.core as mx

    subject = engine.load_subject("qwen3")
    model = subject.mlx_model
    model.set_dtype(mx.bfloat16)
    calls, logits_dtype, capture = tracing.traced_forward(model, subject.ids)
    apart: dict[str, tracing.Call] = {}
    with tracing.dtype_recording(model, apart):
        logits = model(mx.array(subject.ids))
    mx.eval(logits)
    alone = mlx_side.forward(model, subject.ids)
    assert logits_dtype == tracing.dtype_name(logits.dtype) == "bfloat16"
    assert calls == apart and len(calls) > 10
    assert np.array_equal(capture.logits, alone.logits)
    assert capture.order == alone.order
    for path in alone.outputs:
        for mine, theirs in ((capture.outputs, alone.outputs), (capture.inputs, alone.inputs)):
            if theirs[path] is None:
                assert mine[path] is None
            else:
                assert np.array_equal(mine[path], theirs[path]), path
