"""Every use of a transformers, mlx-lm or mlx API beyond their most stable public surface.

The engine must give the same verdict on every supported release of each library
(pyproject.toml states the ranges; constraints/ holds the validated lock). The APIs
below have changed between releases, or are private, or are conventions that a release
can change without an error (transformers swallows an unknown forward keyword in
`**kwargs`). Each function here is written for every supported release and checks the
assumption it rests on; where the API is not what it expects it raises DriverError,
naming the library, its version and the assumption. It never guesses.

A DriverError is our driver's failure, never the port's: the engine turns it into
verdict `error` ("reference driver: ..." when the transformers side is at fault).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np


class DriverError(Exception):
    """An API of transformers, mlx-lm or mlx is not what the engine relies on."""

    def __init__(self, library: str, assumption: str, found: str = ""):
        self.library = library
        self.version = library_version(library)
        self.assumption = assumption
        side = "reference driver" if library == "transformers" else "MLX driver"
        text = f"{side}: {library} {self.version}: expected {assumption}"
        super().__init__(text + (f"; found {found}" if found else ""))


def library_version(library: str) -> str:
    from importlib import metadata

    module = {"mlx-lm": "mlx_lm", "mlx": "mlx.core"}.get(library, library)
    try:
        loaded = importlib.import_module(module)
        version = getattr(loaded, "__version__", None)
        if version:
            return str(version)
    except Exception:  # the version is only a label here; the import error shows elsewhere
        pass
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "unknown"


def _parameters(function: Any) -> dict[str, inspect.Parameter]:
    # inspect follows __wrapped__, so decorated forwards (deprecate_kwarg) show their own
    return dict(inspect.signature(function).parameters)


# --- transformers ---------------------------------------------------------------------


def hf_known_model_types() -> set[str]:
    """Every model_type transformers has a config class for."""
    from transformers.models.auto import configuration_auto

    names = getattr(configuration_auto, "CONFIG_MAPPING_NAMES", None)
    if not isinstance(names, dict) or not names:
        raise DriverError("transformers", "models.auto.configuration_auto.CONFIG_MAPPING_NAMES, "
                          "a dict of model_type -> config class name",
                          type(names).__name__)
    return set(names)


def hf_causal_lm_model_types() -> set[str]:
    """The model_types AutoModelForCausalLM builds."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", None)
    if not isinstance(names, dict):
        raise DriverError("transformers", "models.auto.modeling_auto."
                          "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, a dict", type(names).__name__)
    return set(names)


def hf_causal_lm_class_name(model_type: str) -> str | None:
    """The class name AutoModelForCausalLM builds for a model_type, if any."""
    from transformers.models.auto import modeling_auto

    hf_causal_lm_model_types()  # raises when the table is not what we read
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


def hf_image_text_model_types() -> dict[str, str]:
    """model_type -> class name of AutoModelForImageTextToText (multimodal models whose
    text path is what mlx-lm ports); empty when this transformers has no such table."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", None)
    return {k: v for k, v in names.items() if isinstance(v, str)} if isinstance(names, dict) else {}


def hf_model_class_name(model_type: str) -> str | None:
    """The class transformers builds a model_type's checkpoint with: its causal LM, or
    for a multimodal model without one, the image-text-to-text model (run on text only,
    the path mlx-lm ports)."""
    return hf_causal_lm_class_name(model_type) or hf_image_text_model_types().get(model_type)


def hf_auto_model(model_type: str) -> Any:
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a multimodal model_type
    that has no causal LM (see hf_model_class_name)."""
    import transformers

    if (hf_causal_lm_class_name(model_type) is None
            and model_type in hf_image_text_model_types()):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def hf_load_causal_lm(checkpoint: Path, dtype: str) -> tuple[Any, dict[str, list[str]]]:
    """The model (hf_auto_model) from a checkpoint directory with eager attention, and its
    loading info (missing, unexpected, mismatched keys)."""
    import json

    import torch

    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type", "")
    loaded = hf_auto_model(model_type).from_pretrained(
        checkpoint, dtype=getattr(torch, dtype), attn_implementation="eager",
        output_loading_info=True)
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], dict)):
        raise DriverError("transformers", "from_pretrained(output_loading_info=True) to return "
                          "(model, info dict)", type(loaded).__name__)
    model, info = loaded
    if not {"missing_keys", "mismatched_keys"} <= set(info):
        raise DriverError("transformers", "loading info with missing_keys and mismatched_keys",
                          f"keys {', '.join(info)}")
    if str(getattr(model.config, "_attn_implementation", "eager")) != "eager":
        raise DriverError("transformers", "eager attention as asked",
                          str(model.config._attn_implementation))
    return model, info


def hf_config_class(model_type: str) -> Any:
    """transformers' config class for a model_type, or None when it has none."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def hf_config_fields(config_class: Any) -> set[str]:
    """The keys a config class declares: dataclass fields (transformers >= 5.x strict
    configs) or its __init__ parameters (older configs)."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    return set(_parameters(config_class.__init__))


def hf_config_diff_dict(config: Any) -> dict[str, Any]:
    """What save_pretrained writes: the keys that differ from the config class defaults."""
    to_diff = getattr(config, "to_diff_dict", None)
    if to_diff is None:
        raise DriverError("transformers", "PreTrainedConfig.to_diff_dict()",
                          f"{type(config).__name__} has none")
    out = to_diff()
    if not isinstance(out, dict):
        raise DriverError("transformers", "to_diff_dict() returns a dict", type(out).__name__)
    return out


# The forward keyword that carries the cache: `cache` since transformers 5.24 (the old
# names stay as deprecated aliases until 5.40), `past_key_values` before, and
# `cache_params` for Mamba-style models before 5.24. Newest first.
CACHE_KEYWORDS = ("cache", "past_key_values", "cache_params")


def hf_cache_keyword(model: Any) -> str:
    """The keyword this model's forward takes its cache under, read off its signature."""
    params = _parameters(model.forward)
    for keyword in CACHE_KEYWORDS:
        if keyword in params:
            return keyword
    raise DriverError("transformers", f"{type(model).__name__}.forward to take its cache as "
                      f"one of {', '.join(CACHE_KEYWORDS)}",
                      f"parameters {', '.join(p for p in params if p != 'self')}")


def hf_returned_cache(output: Any, keyword: str) -> Any:
    """The cache a forward with use_cache=True returned: output field `cache` since 5.24
    (the old names stay as deprecated aliases), else the field named like the keyword."""
    for field in dict.fromkeys(("cache", keyword)):
        value = getattr(output, field, None)
        if value is not None:
            return value
    fields = list(output.keys()) if callable(getattr(output, "keys", None)) else []
    raise DriverError("transformers", f"{type(output).__name__} to return the cache as "
                      f"`cache` or `{keyword}` when use_cache=True",
                      f"fields {', '.join(fields) or 'none'}")


def hf_forward_has(model: Any, keyword: str) -> bool:
    return keyword in _parameters(model.forward)


def hf_forward_takes(model: Any, keyword: str) -> None:
    """Raise unless the model's forward names `keyword` (an unknown keyword would vanish
    into **kwargs)."""
    params = _parameters(model.forward)
    if keyword not in params:
        found = ", ".join(p for p in params if p != "self")
        raise DriverError("transformers", f"{type(model).__name__}.forward to take "
                          f"`{keyword}`", f"parameters {found}")


def hf_cos_sin(pair: tuple[Any, Any], at_position_zero: tuple[Any, Any]) -> tuple[Any, Any]:
    """(cos, sin) from the two rotary tensors a decoder layer is handed, told apart by
    value at position 0 (sin 0 = 0; cos 0 = 1, times the attention scale yarn and
    longrope fold in), never by their order: GPT-J hands its layers (sin, cos).
    `at_position_zero` is the same pair at position 0."""
    first, second = (np.asarray(x, dtype=np.float64).reshape(-1) for x in at_position_zero)

    def is_sin(x: np.ndarray) -> bool:
        return bool(np.allclose(x, 0.0, atol=1e-6))

    def is_cos(x: np.ndarray) -> bool:
        return bool(x.size and x[0] > 1e-3 and np.allclose(x, x[0], rtol=1e-5, atol=0.0))

    if is_cos(first) and is_sin(second):
        return pair
    if is_sin(first) and is_cos(second):
        return pair[1], pair[0]
    raise DriverError("transformers", "of the two rotary tensors a layer is handed, one "
                      "constant and positive (cos) and the other all 0 (sin) at position 0",
                      f"values {first[:3].round(4).tolist()} and "
                      f"{second[:3].round(4).tolist()}")


# --- mlx-lm ---------------------------------------------------------------------------


def mlx_model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """(Model, ModelArgs) of the file mlx-lm picks for a config, remapping applied, with
    mlx-lm's own (private) resolver. Errors of the model file propagate."""
    utils = importlib.import_module("mlx_lm.utils")
    get_classes = getattr(utils, "_get_classes", None)
    if get_classes is None:
        raise DriverError("mlx-lm", "mlx_lm.utils._get_classes(config) -> (Model, ModelArgs)",
                          "no such function")
    return get_classes(config)


def mlx_remapping() -> dict[str, str]:
    """model_type -> mlx_lm.models file, from every remapping table mlx_lm.utils holds
    (MODEL_REMAPPING, and any table a newer release adds under a *REMAPPING* name)."""
    utils = importlib.import_module("mlx_lm.utils")
    tables = {name: value for name, value in vars(utils).items()
              if "REMAPPING" in name.upper() and isinstance(value, dict)}
    if "MODEL_REMAPPING" not in tables:
        raise DriverError("mlx-lm", "mlx_lm.utils.MODEL_REMAPPING, a dict", "none")
    out: dict[str, str] = {}
    for name in sorted(tables):
        for key, value in tables[name].items():
            if isinstance(key, str) and isinstance(value, str):
                out.setdefault(key, value)
    return out


def mlx_args_fields(args_class: Any) -> set[str]:
    """The config keys a ModelArgs class declares (from_dict drops every other key)."""
    if dataclasses.is_dataclass(args_class):
        return {f.name for f in dataclasses.fields(args_class)}
    return set(_parameters(args_class))


def mlx_args_defaults(args_class: Any) -> dict[str, Any]:
    """The defaults a ModelArgs class declares, where it declares one (a dataclass field
    or an __init__ keyword)."""
    if dataclasses.is_dataclass(args_class):
        return {f.name: f.default for f in dataclasses.fields(args_class)
                if f.default is not dataclasses.MISSING}
    return {name: param.default for name, param in _parameters(args_class).items()
            if param.default is not inspect.Parameter.empty}


def mlx_load_config(checkpoint: Path) -> dict[str, Any]:
    from mlx_lm.utils import load_config

    return load_config(checkpoint)


def mlx_load_model(checkpoint: Path, strict: bool = True) -> tuple[Any, dict[str, Any]]:
    """mlx-lm's own loader, strict weights, called with keywords it declares only."""
    from mlx_lm.utils import load_model

    params = _parameters(load_model)
    if "strict" not in params:
        raise DriverError("mlx-lm", "mlx_lm.utils.load_model(path, strict=...)",
                          f"parameters {', '.join(params)}")
    loaded = load_model(Path(checkpoint), strict=strict)
    if not (isinstance(loaded, tuple) and len(loaded) == 2):
        raise DriverError("mlx-lm", "load_model to return (model, config)",
                          type(loaded).__name__)
    return loaded


def mlx_make_prompt_cache(model: Any) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


# Cache classes by role. Attention caches hold keys and values and carry `offset`; the
# far-position stand-in replaces them. Recurrent caches hold a state and no positions.
ATTENTION_CACHES = ("KVCache", "RotatingKVCache", "ChunkedKVCache", "QuantizedKVCache",
                    "ConcatenateKVCache")
RECURRENT_CACHES = ("ArraysCache", "MambaCache")
CONTAINER_CACHES = ("CacheList",)


def cache_role(cache: Any) -> str:
    """'attention', 'recurrent' or 'container' for a cache make_prompt_cache returned,
    by the class it derives from in mlx_lm.models.cache; unknown classes raise."""
    from mlx_lm.models import cache as cache_module

    for role, names in (("container", CONTAINER_CACHES), ("recurrent", RECURRENT_CACHES),
                        ("attention", ATTENTION_CACHES)):
        classes = tuple(getattr(cache_module, n) for n in names if hasattr(cache_module, n))
        if classes and isinstance(cache, classes):
            return role
    known = ", ".join(ATTENTION_CACHES + RECURRENT_CACHES + CONTAINER_CACHES)
    raise DriverError("mlx-lm", "every cache from make_prompt_cache to derive from a known "
                      f"class of mlx_lm.models.cache ({known})",
                      f"{type(cache).__module__}.{type(cache).__name__}")


def cache_children(cache: Any) -> list[Any]:
    children = getattr(cache, "caches", None)
    if not isinstance(children, (list, tuple)):
        raise DriverError("mlx-lm", "CacheList.caches, a list", type(children).__name__)
    return list(children)


def mlx_lm_callable(module_name: str, name: str, keywords: tuple[str, ...]) -> Any:
    """`module_name.name`, checked to take every keyword the driver passes. The module is
    imported by its full name: the package re-exports functions called `generate` and
    `convert` that shadow the modules as attributes."""
    found = getattr(importlib.import_module(module_name), name, None)
    if found is None:
        raise DriverError("mlx-lm", f"{module_name}.{name}", "no such name")
    params = _parameters(found)
    if any(k not in params for k in keywords):
        raise DriverError("mlx-lm", f"{name}({', '.join(keywords)})",
                          f"parameters {', '.join(p for p in params if p != 'self')}")
    return found


BATCH_GENERATOR_ARGS = ("max_tokens", "prefill_batch_size", "completion_batch_size")


def mlx_batch_generate(model: Any, prompts: list[list[int]], steps: int
                       ) -> list[tuple[list[int], list[np.ndarray]]]:
    """mlx-lm's BatchGenerator, greedy, no stop tokens: tokens and log-probs per prompt."""
    generator_class = mlx_lm_callable("mlx_lm.generate", "BatchGenerator",
                                      BATCH_GENERATOR_ARGS)
    for method in ("insert", "next_generated", "close"):
        if not callable(getattr(generator_class, method, None)):
            raise DriverError("mlx-lm", f"BatchGenerator.{method}()", "no such method")
    gen = generator_class(model, max_tokens=steps, prefill_batch_size=len(prompts),
                          completion_batch_size=len(prompts))
    try:
        uids = gen.insert(prompts, [steps] * len(prompts))
        out: dict[int, tuple[list[int], list[np.ndarray]]] = {u: ([], []) for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                _record_response(out, r, "BatchGenerator")
    finally:
        gen.close()
    return [out[u] for u in uids]


PROMPT_BATCH_ARGS = ("model", "uids", "caches", "prefill_step_size", "max_tokens")


def mlx_batch_generate_chunked(model: Any, prompts: list[list[int]], steps: int,
                               step_size: int) -> list[tuple[list[int], list[np.ndarray]]]:
    """mlx-lm's batch prefill and decode, greedy, with the whole prompts handed to
    PromptProcessingBatch at once: its prompt() right-pads them, sets the caches' lengths
    once (`prepare`) and runs them in chunks of `step_size` tokens, then generate() rolls
    the padding into left padding and decodes (GenerationBatch). BatchGenerator takes the
    same two classes but hands prompt() at most prefill_step_size tokens per call."""
    batch_class = mlx_lm_callable("mlx_lm.generate", "PromptProcessingBatch",
                                  PROMPT_BATCH_ARGS)
    if not callable(getattr(batch_class, "generate", None)):
        raise DriverError("mlx-lm", "PromptProcessingBatch.generate()", "no such method")
    uids = list(range(len(prompts)))
    batch = batch_class(model=model, uids=list(uids),
                        caches=[mlx_make_prompt_cache(model) for _ in prompts],
                        prefill_step_size=step_size, max_tokens=[steps] * len(prompts))
    generation = batch.generate([list(p) for p in prompts])
    if not callable(getattr(generation, "next", None)):
        raise DriverError("mlx-lm", "GenerationBatch.next()", "no such method")
    out: dict[int, tuple[list[int], list[np.ndarray]]] = {u: ([], []) for u in uids}
    for _ in range(steps):
        for r in generation.next():
            _record_response(out, r, "GenerationBatch")
    return [out[u] for u in uids]


def _record_response(out: dict[int, tuple[list[int], list[np.ndarray]]], response: Any,
                     source: str) -> None:
    """One decoded token of a batch response (uid, token, logprobs) into `out`."""
    import mlx.core as mx

    for field in ("uid", "token", "logprobs"):
        if not hasattr(response, field):
            raise DriverError("mlx-lm", f"{source} responses with `{field}`",
                              f"{type(response).__name__} without it")
    out[response.uid][0].append(int(response.token))
    out[response.uid][1].append(np.array(response.logprobs.astype(mx.float32)))


CONVERT_ARGS = ("hf_path", "mlx_path", "quantize", "q_group_size", "q_bits")


def mlx_convert_quantized(source: Path, target: Path, bits: int, group_size: int) -> None:
    """mlx_lm.convert.convert with quantization, unpatched: `source` must hold a
    tokenizer (convert loads and saves one)."""
    convert = mlx_lm_callable("mlx_lm.convert", "convert", CONVERT_ARGS)
    convert(hf_path=str(source), mlx_path=str(target), quantize=True,
            q_group_size=group_size, q_bits=bits)


def mlx_causal_mask(n: int, window_size: int | None = None) -> Any:
    from mlx_lm.models.base import create_causal_mask

    params = _parameters(create_causal_mask)
    if window_size is not None and "window_size" not in params:
        raise DriverError("mlx-lm", "create_causal_mask(N, window_size=...)",
                          f"parameters {', '.join(params)}")
    return (create_causal_mask(n, window_size=window_size) if window_size is not None
            else create_causal_mask(n))



# --- the environment ------------------------------------------------------------------

# Pins whose versions decide a verdict: a lock is in use only if all of these match.
DECIDING_PACKAGES = ("transformers", "torch", "mlx", "mlx-lm", "numpy", "safetensors")


def lock_dirs() -> list[Path]:
    """Where the validated locks are: MLX_VERIFY_LOCK_DIR, else constraints/ of the
    source tree this package runs from (a clone or an editable install)."""
    import os

    found = [Path(os.environ["MLX_VERIFY_LOCK_DIR"])] if os.environ.get("MLX_VERIFY_LOCK_DIR") \
        else []
    return found + [Path(__file__).resolve().parent.parent / "constraints"]


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def lock_in_use() -> str:
    """Which lock file this environment was installed from, by comparing the installed
    versions with each lock's pins: 'constraints/lock.txt (sha256 1a2b3c4d)', or
    'none: transformers 5.25.0 (lock.txt has 5.24.0), ...'."""
    import hashlib
    from importlib import metadata

    installed = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        installed[name] = dist.version.split("+", 1)[0]
    closest: tuple[int, str, list[str]] | None = None
    for directory in lock_dirs():
        for path in sorted(directory.glob("*.txt")) if directory.is_dir() else []:
            pins = read_lock(path)
            differing = [f"{n} {installed.get(n, 'missing')} ({path.name} has {pins[n]})"
                         for n in DECIDING_PACKAGES
                         if n in pins and installed.get(n) != pins[n].split("+", 1)[0]]
            if not differing:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
                return f"{path.parent.name}/{path.name} (sha256 {digest})"
            if closest is None or len(differing) < closest[0]:
                closest = (len(differing), path.name, differing)
    if closest is None:
        return "none: no constraints/ lock found beside the package (MLX_VERIFY_LOCK_DIR)"
    return "none: " + ", ".join(closest[2])
