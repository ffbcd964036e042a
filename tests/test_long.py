"""The `long` check: clean ports pass at 2048 tokens (no window) and across a small
window (in process); a sliding-window mask off by one in a copy of mlx_lm fails `long`
at the window's edge while `layers` (48 tokens, inside the window) passes. Its chunked
row: clean ports pass; RotatingKVCache's concat path without its write-index reset
(mlx-lm 358b4d2a reverted) fails it while the single prefill passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Edit, copy_mlx_lm
from tests.test_generation import run_check_subprocess, window_config


def run_in_process(model_type: str, cache_dir: Path, config_file: str | None = None):
    os.environ["MLX_VERIFY_CACHE"] = str(cache_dir)
    from mlx_verify.checks import engine, long_context
    from mlx_verify.checks.mlx_side import use_mlx_lm

    use_mlx_lm(None)
    subject = engine.load_subject(model_type, config_file=config_file)
    result, chunked = long_context.run(subject)
    assert chunked.details["part"] == "chunked"
    return result, chunked


def test_windows_and_length() -> None:
    from mlx_verify.checks import long_context

    assert long_context.windows({"sliding_window": 16}) == [16]
    assert long_context.windows({"sliding_window": 16, "use_sliding_window": False}) == []
    assert long_context.windows({"text_config": {"sliding_window": 32}}) == [32]
    assert long_context.sequence_length([]) == 2048
    assert long_context.sequence_length([16]) == 4 * 16 + 64
    assert long_context.sequence_length([4096]) == 2048  # too long to cross: the default cap


@pytest.mark.parametrize("model_type", ["llama", "mamba"])
def test_clean_long_prefill_passes(model_type: str, cache_dir: Path) -> None:
    result, chunked = run_in_process(model_type, cache_dir)
    assert result.verdict == "pass", result.summary
    assert result.metrics["tokens"] == 2048
    assert result.metrics["tail_positions"] == 16
    assert result.layers and result.layers[-1].name == "logits"
    assert chunked.verdict == "pass", chunked.summary
    assert chunked.metrics["tokens"] == 384 and chunked.metrics["window"] is None


def test_clean_sliding_window_passes(cache_dir: Path, tmp_path: Path) -> None:
    result, chunked = run_in_process("gemma3_text", cache_dir,
                                     window_config(tmp_path, "gemma3_text", sliding_window=16))
    assert result.verdict == "pass", result.summary
    assert result.metrics["tokens"] == 4 * 16 + 64
    assert result.metrics["min_window_crossings"] >= 4
    assert chunked.verdict == "pass", chunked.summary
    assert chunked.metrics["window"] == 16 and chunked.metrics["tokens"] == 2 * 16 + 64
    assert "RotatingKVCache" in chunked.details["caches"]


def test_chunk_schedule_takes_every_kind_of_update() -> None:
    from mlx_verify.checks import long_context

    sizes = long_context.chunk_schedule(96, 16)
    assert sum(sizes) == 96
    assert sizes[:2] == [24, 11]  # past the window, then a chunk on a non-empty cache
    assert sizes[2:6] == [1, 1, 1, 21]  # steps that wrap the cache, then a longer chunk
    assert sizes[6:10] == [1, 1, 1, 11]  # and a shorter one
    assert long_context.chunked_plan(128, [16]) == (96, 16, 16)
    assert long_context.chunked_plan(2048, [4096]) == (384, 64, None)
    assert long_context.chunked_plan(300, []) == (300, 64, None)
    assert sum(long_context.chunk_schedule(300, 64)) == 300


def test_window_off_by_one_fails_long_not_layers(cache_dir: Path, tmp_path: Path) -> None:
    """The mask lets one key too many into the window. A 64-token window is longer than
    the 48-token parity prompt, so `layers` cannot see it; the 320-token prefill can,
    from exactly position 64 on, in the first sliding layer."""
    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/base.py",
        "mask = mask & (linds < rinds + window_size)",
        "mask = mask & (linds <= rinds + window_size)",
    )])
    config = window_config(tmp_path, "gemma3_text", sliding_window=64)
    checks = run_check_subprocess("long", "gemma3_text", root, cache_dir, tmp_path,
                                  ["--config", config])
    layers = [c for c in checks if c["check"] == "layers"]
    assert layers[0]["verdict"] == "pass", layers[0]["summary"]
    (long,) = [c for c in checks if c["check"] == "long" and not c["details"].get("part")]
    assert long["verdict"] == "fail", long["summary"]
    assert long["metrics"]["tokens"] == 4 * 64 + 64
    assert long["metrics"]["first_divergent_position"] == 64
    assert long["first_divergent_layer"] == "layers.0"
    assert long["layers"][1]["layer_type"] == "sliding_attention"
    assert long["localization"]["part"] == "attention"
    assert any("window" in f for f in long["localization"]["facts"])


def test_rotating_cache_concat_index_bug_fails_chunked_not_long(cache_dir: Path,
                                                               tmp_path: Path) -> None:
    """mlx-lm 358b4d2a reverted: RotatingKVCache's concat path reorders a wrapped cache
    without resetting its write index, so the next multi-token update keeps one key too
    many. One prefill never takes that path (the long row and layers pass); the chunked
    row's first multi-token update after single steps on the wrapped cache raises in
    mlx-lm, and the row says so with the call and the side."""
    config = window_config(tmp_path, "gemma3_text", sliding_window=16)
    clean = copy_mlx_lm(tmp_path / "clean", [])
    checks = run_check_subprocess("long", "gemma3_text", clean, cache_dir, tmp_path,
                                  ["--config", config])
    (chunked,) = [c for c in checks if c["details"].get("part") == "chunked"]
    assert chunked["verdict"] == "pass", chunked["summary"]

    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/cache.py",
        "            self.values = self._temporal_order(self.values)\n"
        "            self._idx = self.keys.shape[2]\n",
        "            self.values = self._temporal_order(self.values)\n",
    )])
    checks = run_check_subprocess("long", "gemma3_text", root, cache_dir, tmp_path,
                                  ["--config", config])
    rows = {c["details"].get("part"): c for c in checks if c["check"] == "long"}
    layers = [c for c in checks if c["check"] == "layers"]
    assert layers[0]["verdict"] == "pass", layers[0]["summary"]
    assert rows[None]["verdict"] == "pass", rows[None]["summary"]
    chunked = rows["chunked"]
    assert chunked["verdict"] == "fail", chunked["summary"]
    assert chunked["details"]["side"] == "mlx-lm"
    assert chunked["details"]["failing_call"] == 5  # 24, 11, 1, 1, 1, then 21 tokens
    assert "a multi-token update after single-token steps" in chunked["summary"]
    assert "mlx-lm raises" in chunked["summary"]


def test_rope_offset_dropped_for_chunks_fails_chunked_at_the_layer(cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    """llama's RoPE takes cache.offset only for single-token steps: one prefill (offset 0)
    and decoding agree with transformers, the second chunk is rotated as if at position
    0. The chunked row names call 1 and localizes it to layers.0's attention."""
    root = copy_mlx_lm(tmp_path / "tree", [Edit(
        "models/llama.py",
        "            queries = self.rope(queries, offset=cache.offset)\n"
        "            keys = self.rope(keys, offset=cache.offset)\n",
        "            offset = cache.offset if queries.shape[2] == 1 else 0\n"
        "            queries = self.rope(queries, offset=offset)\n"
        "            keys = self.rope(keys, offset=offset)\n",
    )])
    checks = run_check_subprocess("long", "llama", root, cache_dir, tmp_path)
    rows = {c["details"].get("part"): c for c in checks if c["check"] == "long"}
    assert rows[None]["verdict"] == "pass", rows[None]["summary"]
    chunked = rows["chunked"]
    assert chunked["verdict"] == "fail", chunked["summary"]
    assert chunked["details"]["side"] == "mlx-lm"
    assert chunked["metrics"]["first_divergent_call"] == 1
    assert chunked["metrics"]["first_divergent_position"] == 72
    assert chunked["first_divergent_layer"] == "layers.0"
    assert chunked["localization"]["part"] == "attention"
    assert any("differs from MLX's own single prefill" in f
               for f in chunked["localization"]["facts"])
    # the localized replay is call 1 after call 0 on the same cache: its logits reproduce
    # the call's divergence (call_rel_l2 keeps 3 digits)
    replayed = next(r for r in chunked["layers"] if r["name"] == "logits")
    assert replayed["rel_l2"] == pytest.approx(chunked["details"]["call_rel_l2"][1], rel=5e-3)


ROPE_OFFSET_DROPPED_FOR_CHUNKS = Edit(
    "models/llama.py",
    "            queries = self.rope(queries, offset=cache.offset)\n"
    "            keys = self.rope(keys, offset=cache.offset)\n",
    "            offset = cache.offset if queries.shape[2] == 1 else 0\n"
    "            queries = self.rope(queries, offset=offset)\n"
    "            keys = self.rope(keys, offset=offset)\n")


def test_half_precision_is_held_to_transformers_float32_within_its_own_noise(
        cache_dir: Path, tmp_path: Path) -> None:
    """qwen3_5's gated delta net in bfloat16: at single positions either side's rounding
    reaches 0.2 against transformers' float32 forward, so the chunked row (single-token
    calls) and the kv-cache row failed a correct port against transformers' half forward.
    Held to transformers float32 within 2x transformers' own half error there (the dtype
    check's rule), they pass; the RoPE-offset bug in a chunk still fails in bfloat16."""
    clean = copy_mlx_lm(tmp_path / "clean", [])
    (tmp_path / "q").mkdir()
    (tmp_path / "b").mkdir()
    rows = {(c["check"], c["details"].get("part")): c for c in run_check_subprocess(
        "long", "qwen3_5", clean, cache_dir, tmp_path / "q", ["--dtype", "bfloat16",
                                                                "--checks", "long,generation"])}
    for key in (("long", None), ("long", "chunked"), ("generation", "kv-cache")):
        row = rows[key]
        assert row["verdict"] == "pass", (key, row["summary"])
        assert row["metrics"]["reference"] == "transformers float32", (key, row)
        noise = row["metrics"]["transformers_half_max_rel_l2"]
        assert noise is not None and noise > 1e-2, (key, row)  # measured, not assumed
    bugged = copy_mlx_lm(tmp_path / "bugged", [ROPE_OFFSET_DROPPED_FOR_CHUNKS])
    chunked = next(c for c in run_check_subprocess(
        "long", "llama", bugged, cache_dir, tmp_path / "b", ["--dtype", "bfloat16"])
        if c["check"] == "long" and c["details"].get("part") == "chunked")
    assert chunked["verdict"] == "fail", chunked["summary"]
    assert chunked["metrics"]["first_divergent_call"] == 1
