"""The engine's driver under broken assumptions: each test breaks one thing the driver
relies on in transformers or mlx-lm, the way a release could, and asserts the verdict
is `error` naming the side, never pass, skip or fail.

In-process tests wrap a real transformers model or a real MLX model; the mlx-lm
changes are edits of a copy of the installed mlx_lm, run through the CLI.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Edit, copy_mlx_lm, run_cli


@pytest.fixture(scope="module")
def llama(cache_dir: Path) -> Any:
    os.environ["MLX_VERIFY_CACHE"] = str(cache_dir)
    from mlx_verify.checks import engine
    from mlx_verify.checks.mlx_side import use_mlx_lm

    use_mlx_lm(None)
    return engine.load_subject("llama")


def with_forward(subject: Any, forward: Any) -> Any:
    """The subject with its transformers model's forward replaced (same weights)."""
    import copy

    model = copy.copy(subject.hf_model)
    model.forward = forward
    model.__call__ = forward
    clone = copy.copy(subject)
    clone.hf_model = _Called(model, forward)
    return clone


class _Called:
    """A transformers model whose call goes through the given forward."""

    def __init__(self, model: Any, forward: Any):
        self._model, self.forward = model, forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def by_part(results: list[Any]) -> dict[str, Any]:
    return {r.details.get("part"): r for r in results}


def test_a_cache_keyword_renamed_away_is_a_reference_error(llama: Any) -> None:
    from mlx_verify.checks import generation

    original = llama.hf_model.forward

    def forward(input_ids: Any = None, use_cache: bool = False, kv: Any = None,
                **kwargs: Any) -> Any:  # the cache goes by a name the driver does not know
        return original(input_ids=input_ids, use_cache=use_cache, cache=kv, **kwargs)

    parts = by_part(generation.run(with_forward(llama, forward)))
    for part in ("greedy", "kv-cache"):
        assert parts[part].verdict == "error", parts[part].summary
        assert "reference driver: transformers" in parts[part].summary
        assert "cache" in parts[part].summary


def test_a_swallowed_cache_keyword_is_caught_by_the_reference_self_check(llama: Any) -> None:
    """transformers 5.24: an unknown keyword vanishes into **kwargs and every decode step
    runs one token at position 0. The driver's keyword is in the signature, but ignored."""
    from mlx_verify.checks import generation

    original = llama.hf_model.forward

    def forward(input_ids: Any = None, use_cache: bool = False, cache: Any = None,
                **kwargs: Any) -> Any:
        return original(input_ids=input_ids, use_cache=use_cache, **kwargs)  # cache dropped

    parts = by_part(generation.run(with_forward(llama, forward)))
    for part in ("greedy", "kv-cache"):
        assert parts[part].verdict == "error", parts[part].summary
        assert "incremental decoding" in parts[part].summary
        assert "differs from its own full forward" in parts[part].summary
        assert "MLX not judged" in parts[part].summary
    assert parts["batch"].verdict == "pass"  # MLX alone: still measured


def test_cos_and_sin_are_told_apart_by_value_not_order() -> None:
    from mlx_verify.checks import compat

    angles = np.array([0.0, 0.5, 0.25])
    cos, sin = np.cos(angles), np.sin(angles)
    zero_cos, zero_sin = np.ones(3), np.zeros(3)
    assert compat.hf_cos_sin((cos, sin), (zero_cos, zero_sin))[0] is cos
    swapped = compat.hf_cos_sin((sin, cos), (zero_sin, zero_cos))
    assert swapped[0] is cos and swapped[1] is sin
    scaled = compat.hf_cos_sin((1.2 * cos, 1.2 * sin), (1.2 * zero_cos, zero_sin))  # yarn
    assert np.allclose(scaled[0], 1.2 * cos)
    with pytest.raises(compat.DriverError, match="transformers .*position 0"):
        compat.hf_cos_sin((cos, cos), (zero_cos, zero_cos))


def test_swapped_rotary_tensors_give_the_same_rotation_facts(llama: Any) -> None:
    from mlx_verify.checks import rope

    plain = rope.compare_rotations(llama)
    layers = [m for p, m in llama.hf_model.named_modules() if p.endswith(("layers.0",
                                                                           "layers.1"))]

    def swap(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (sin, cos)}

    handles = [m.register_forward_pre_hook(swap, with_kwargs=True) for m in layers]
    try:
        swapped = rope.compare_rotations(llama)
    finally:
        for handle in handles:
            handle.remove()
    assert plain.verdict == swapped.verdict == "pass"
    assert swapped.details["facts"] == plain.details["facts"]
    assert "base 10000" in swapped.details["facts"]


def test_rotary_tensors_that_are_neither_cos_nor_sin_are_a_reference_error(llama: Any) -> None:
    from mlx_verify.checks import rope

    layers = [m for p, m in llama.hf_model.named_modules() if p.endswith("layers.0")]

    def garble(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (cos + 0.5, sin + 0.5)}

    handle = layers[0].register_forward_pre_hook(garble, with_kwargs=True)
    try:
        results = rope.run(llama)
    finally:
        handle.remove()
    rotation = next(r for r in results if r.metrics.get("check_part") == "rotation")
    assert rotation.verdict == "error", rotation.summary
    assert rotation.summary.startswith("reference driver: transformers")


def test_an_unknown_cache_class_is_an_error_not_offset_zero(llama: Any) -> None:
    from mlx_lm.models.cache import KVCache

    from mlx_verify.checks import rope

    class OwnCache:  # behaves like a KVCache, derives from no class the driver knows
        def __init__(self) -> None:
            self._inner = KVCache()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    model = llama.mlx_model
    model.make_cache = lambda: [OwnCache() for _ in model.layers]
    try:
        results = rope.run(llama)
    finally:
        del model.make_cache
    far = [r for r in results if r.metrics.get("check_part") == "far-positions"]
    assert [r.verdict for r in far] == ["error"], [r.summary for r in far]
    assert "OwnCache" in far[0].summary and "MLX driver: mlx-lm" in far[0].summary


def test_a_transformers_loader_that_raises_is_an_error(cache_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_verify.checks import engine, hf_side
    from mlx_verify.checks.mlx_side import use_mlx_lm

    monkeypatch.setenv("MLX_VERIFY_CACHE", str(cache_dir))
    use_mlx_lm(None)

    def load(checkpoint: Path, dtype: str = "float32") -> Any:
        raise RuntimeError("the reference loader broke")

    monkeypatch.setattr(hf_side, "load", load)
    report = engine.verify("llama", checks=("layers",), variant_names=("default",))
    assert [c.verdict for c in report.checks] == ["error"]
    assert "transformers cannot load" in report.checks[0].summary
    assert report.verdict == "error"


def test_a_renamed_batch_generator_argument_is_an_mlx_driver_error(cache_dir: Path,
                                                                   tmp_path: Path) -> None:
    tree = copy_mlx_lm(tmp_path / "tree", [
        Edit("generate.py", "        prefill_batch_size: int = 8,\n",
             "        prefill_size: int = 8,\n"),
        Edit("generate.py", "        self.prefill_batch_size = prefill_batch_size\n",
             "        self.prefill_batch_size = prefill_batch_size = prefill_size\n"),
    ])
    run = run_cli(["check", "llama", "--mlx-lm", str(tree), "--checks", "generation",
                   "--variants", "default"], cache_dir, tmp_path / "results.json")
    assert run.returncode in (0, 1, 2) and run.results is not None, run.stderr[-2000:]
    parts = {c["details"].get("part"): c for c in run.report("llama")["checks"]}
    assert parts["batch"]["verdict"] == "error", parts["batch"]["summary"]
    assert parts["batch"]["summary"].startswith("batch: MLX driver: mlx-lm")
    assert "prefill_size" in parts["batch"]["summary"]
    assert parts["greedy"]["verdict"] == parts["kv-cache"]["verdict"] == "pass"


def test_the_compat_module_reads_the_cache_keyword_off_the_signature(llama: Any) -> None:
    from mlx_verify.checks import compat

    keyword = compat.hf_cache_keyword(llama.hf_model)
    assert keyword in inspect.signature(llama.hf_model.forward).parameters
    import transformers

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert keyword == ("cache" if major_minor >= (5, 24) else "past_key_values")


def test_a_tiny_tokenizer_that_does_not_load_is_a_driver_error(
        llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlx_lm.convert loads the tokenizer we give the tiny checkpoint; one that does not
    load must not read as "convert fails on this model" (a finding against MLX)."""
    import transformers

    from mlx_verify.checks import engine

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained",
                        lambda self, directory, **kwargs: None)  # writes nothing
    results = engine.run_check("quantize", llama)
    assert [r.verdict for r in results] == ["error"], [r.summary for r in results]
    assert "quantize failed to run" in results[0].summary
