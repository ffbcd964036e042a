"""Tiny checkpoints: a real or default transformers config with only the sizes shrunk.

Every behavioural setting (RoPE, layer pattern, windows, softcaps, norms, routing,
biases, multipliers) is kept; the config.json keeps the format of its source
(top-level `rope_theta`/`rope_scaling`, or nested `rope_parameters`), because real
users load the real file and transformers 5's `save_pretrained` rewrites the format.
Weights start from transformers' own init and are then rescaled so that attention
is sharp, norms and biases are not identities, and logits are large enough for
softcaps and routing to matter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from . import compat

SYNTH_VERSION = 3  # bump when the checkpoint recipe changes: it is part of the cache key

HIDDEN = 64
HEADS = 4
VOCAB = 512
MAX_EXPERTS = 8

# Config keys holding a size, and the size they shrink to. Applied only when the
# source value is an int larger than the target.
SIZE_KEYS: dict[str, int] = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "dim": HIDDEN,
    "intermediate_size": 128, "ffn_hidden_size": 128, "n_inner": 128, "ffn_dim": 128,
    "intermediate_size_mlp": 128, "shared_intermediate_size": 64,
    "moe_intermediate_size": HIDDEN, "expert_ffn_hidden_size": HIDDEN,
    "shared_expert_intermediate_size": HIDDEN, "moe_shared_expert_intermediate_size": HIDDEN,
    "share_expert_dim": HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS,
    "num_sliding_attention_heads": HEADS,
    "vocab_size": VOCAB,
    "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 24,
    "index_head_dim": 16, "index_n_heads": 2,
    "state_size": 16, "ssm_state_size": 16, "mamba_d_state": 16,
    "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_n_heads": 8, "mamba_num_heads": 8,
    "mamba_d_ssm": 128, "mamba_dt_rank": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": HEADS, "linear_head_dim": 16,
    "lru_width": HIDDEN, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
    "chunk_size": 16, "mamba_chunk_size": 16,
}

MLP_WIDTH_KEYS = ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim",
                  "intermediate_size_mlp")
EXPERT_COUNT_KEYS = (
    "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class SynthError(Exception):
    """The config cannot be turned into a tiny checkpoint (bad or unsupported input)."""


def default_config(model_type: str) -> dict[str, Any]:
    """transformers' own default config for a model_type, as a dict in its native format."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise SynthError(f"transformers has no config for model_type {model_type!r}") from e
    # what save_pretrained writes: the keys that differ from PreTrainedConfig's defaults
    out = compat.hf_config_diff_dict(config)
    out.pop("transformers_version", None)
    out["model_type"] = model_type
    if not out.get("architectures"):
        architecture = _causal_lm_class(model_type)
        if architecture:
            out["architectures"] = [architecture]
    return out


def complete_default_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' default config with the keys of `_default_completions` filled in,
    and what was filled: key -> {"value", "source"}."""
    out = copy.deepcopy(config)
    done: dict[str, Any] = {}
    for key, (value, source) in _default_completions(out).items():
        # a dotted key is one inside nested configs (text_config.rope_parameters.x)
        *parents, leaf = key.split(".")
        target = out
        for parent in parents:
            target = target.setdefault(parent, {}) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        # dicts are completed inside; `architectures` is no key of transformers' config
        # (default_config writes its class name), so a checkpoint's own name replaces it;
        # a COMPUTED_ATTRIBUTES key holds transformers' computed value, not the checkpoint's
        computed = key in COMPUTED_ATTRIBUTES.get(config.get("model_type"), {})
        if (target.get(leaf) is None or isinstance(value, dict) or key == "architectures"
                or computed):
            target[leaf] = value
            done[key] = {"value": value, "source": source}
            for derived in COMPUTED_ATTRIBUTES.get(config.get("model_type"), {}).get(key, ()):
                out.pop(derived, None)
    return out, done


# Keys of transformers' default config that hold what its config class computed, where a
# checkpoint's key means something else (BailingHybridConfig turns the checkpoint's
# head_dim, the KDA head width, into linear_head_dim and sets head_dim to
# qk_rope_head_dim): key -> the computed keys dropped with it (transformers computes
# them again from the checkpoint's keys; kept, they override that computation).
COMPUTED_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "bailing_hybrid": {"head_dim": ("linear_head_dim", "linear_num_heads",
                                    "linear_conv_kernel_dim")},
}


# Keys transformers' default config leaves out (or None) that every real checkpoint of
# the architecture carries, and without which one side cannot build the model: key ->
# (value, where the value comes from). Applied to transformers' default config only,
# where the key is absent or None; the variant lists each completion (`completions`).
def _default_completions(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    model_type = config.get("model_type")
    layers = config.get("num_hidden_layers")
    if model_type == "dbrx":
        attn = dict(config.get("attn_config") or {})
        if attn.get("clip_qkv") is not None:
            return {}
        attn["clip_qkv"] = 8
        return {"attn_config": (attn, "attn_config.clip_qkv 8, from the config.json of "
                                      "databricks/dbrx-base and dbrx-instruct; transformers' "
                                      "default None makes both sides clamp with no bound")}
    if model_type == "lfm2_moe" and isinstance(layers, int):
        pattern = ["conv", "conv", "full_attention"]
        return {"layer_types": ([pattern[i % 3] for i in range(layers)],
                                "chosen by mlx-verify (conv, conv, full_attention repeated) so "
                                "both layer kinds run: transformers' default has no layer_types "
                                "and its own model cannot be built without them "
                                "(modeling_lfm2_moe indexes config.layer_types)")}
    if model_type == "longcat_flash":
        return {"attention_method": ("MLA", "the one attention transformers' "
                                            "modeling_longcat_flash implements"),
                "zero_expert_type": ("identity", "transformers' modeling_longcat_flash: zero "
                                                 "experts return their input"),
                "mla_scale_q_lora": (True, "transformers' modeling_longcat_flash always scales "
                                           "q by (hidden_size / q_lora_rank) ** 0.5"),
                "mla_scale_kv_lora": (True, "transformers' modeling_longcat_flash always scales "
                                            "k by (hidden_size / kv_lora_rank) ** 0.5")}
    if model_type == "exaone_moe" and isinstance(config.get("mlp_layer_types"), list):
        return {"is_moe_layer": ([t == "sparse" for t in config["mlp_layer_types"]],
                                 "transformers' mlp_layer_types (sparse -> true), which "
                                 "ExaoneMoeConfig computes from first_k_dense_replace")}
    if model_type == "minimax":
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
        factor = config.get("partial_rotary_factor") or 1.0
        out = {"shared_intermediate_size": (0, "transformers' modeling_minimax has no shared "
                                               "expert (mlx-lm declares the key, never uses "
                                               "it)")}
        if isinstance(head_dim, int):
            out["rotary_dim"] = (int(head_dim * factor),
                                 "head_dim x partial_rotary_factor (None: 1.0), the dims "
                                 "transformers' MiniMax rotary embedding covers")
        return out
    if model_type == "bailing_hybrid":
        return {"head_dim": (config.get("linear_head_dim", _class_default(model_type, "head_dim")),
                             "BailingHybridConfig's head_dim (128, the KDA head width, "
                             "documented for inclusionAI/Ling-3.0-Flash), which its "
                             "__post_init__ copies to linear_head_dim before setting head_dim "
                             "to qk_rope_head_dim: the default config holds the computed 64; "
                             "linear_head_dim, linear_num_heads, linear_conv_kernel_dim "
                             "(computed from head_dim, num_attention_heads, "
                             "short_conv_kernel_size) dropped"),
                "moe_shared_expert_intermediate_size": (
                    config.get("moe_intermediate_size"),
                    "moe_intermediate_size: transformers' modeling_bailing_hybrid sizes its "
                    "shared expert moe_intermediate_size x n_shared_experts; mlx-lm's "
                    "bailing_moe_v3 reads this key (its default 512 is no size of "
                    "transformers' default)"),
                "architectures": (["BailingMoeV3ForCausalLM"],
                                  "the architectures of inclusionAI/Ling-3.0-Flash, the "
                                  "checkpoint transformers' BailingHybridConfig documents (KDA "
                                  "+ MLA); mlx-lm's MODEL_ARCHITECTURE_REMAPPING sends "
                                  "(bailing_hybrid, BailingMoeV3ForCausalLM) to its KDA port "
                                  "bailing_moe_v3, and every other bailing_hybrid config to "
                                  "bailing_hybrid.py, the lightning-attention port of Ling 2.5")}
    if model_type == "glm_moe_dsa":
        return {"topk_method": ("noaux_tc", "zai-org/GLM-5's config.json "
                                            "(tests/fixtures/configs/glm-5.json)"),
                "scoring_func": ("sigmoid", "zai-org/GLM-5's config.json; transformers' "
                                            "modeling_glm_moe_dsa routes with a sigmoid"),
                "moe_layer_freq": (1, "zai-org/GLM-5's config.json: every layer past "
                                      "first_k_dense_replace is MoE, as transformers' "
                                      "mlp_layer_types says")}
    if model_type == "kimi_linear" and isinstance(config.get("layer_types"), list):
        types = config["layer_types"]
        mlp_types = config.get("mlp_layer_types") or []
        return {"linear_attn_config": (
                    {"full_attn_layers": [i + 1 for i, t in enumerate(types)
                                          if t == "full_attention"],
                     "kda_layers": [i + 1 for i, t in enumerate(types)
                                    if t == "linear_attention"],
                     "num_heads": config.get("linear_num_heads"),
                     "head_dim": config.get("linear_head_dim"),
                     "short_conv_kernel_size": config.get("linear_conv_kernel_dim")},
                    "the checkpoint form KimiLinearConfig.__post_init__ reads (1-based layer "
                    "lists, num_heads, head_dim, short_conv_kernel_size), from transformers' "
                    "layer_types and linear_* values"),
                "first_k_dense_replace": (
                    next((i for i, t in enumerate(mlp_types) if t != "dense"), 0),
                    "the dense layers leading transformers' mlp_layer_types (KimiLinearConfig "
                    "reads first_k_dense_replace from checkpoints, 1 when absent)"),
                "rope_theta": (10000.0, "unused by both sides (transformers' "
                                        "modeling_kimi_linear and mlx-lm's KimiMLAAttention "
                                        "rotate nothing: NoPE MLA); mlx-lm requires the key")}
    if model_type == "mimo_v2_flash" and isinstance(config.get("layer_types"), list):
        params = config.get("rope_parameters") or {}
        full, local = params.get("full_attention", {}), params.get("sliding_attention", {})
        fixture = ("XiaomiMiMo/MiMo-V2-Flash's config.json "
                   "(tests/fixtures/configs/mimo-v2-flash.json)")
        window = config.get("sliding_window")
        kv = config.get("num_key_value_heads")
        return {
            "hybrid_layer_pattern": ([int(t == "sliding_attention") for t in config["layer_types"]],
                                     "transformers' layer_types (sliding -> 1), the form of "
                                     + fixture),
            "moe_layer_freq": ([int(t == "sparse") for t in config.get("mlp_layer_types") or []],
                               "transformers' mlp_layer_types (sparse -> 1), the form of "
                               + fixture),
            "add_swa_attention_sink_bias": (True, fixture + "; transformers' modeling_mimo_v2_flash"
                                                  " gives sliding layers sinks"),
            "add_full_attention_sink_bias": (False, fixture + "; transformers gives full "
                                                    "layers none"),
            "sliding_window_size": (window - 1 if isinstance(window, int) else None,
                                    "transformers' sliding_window - 1 (its config sets "
                                    "sliding_window = sliding_window_size + 1); 128 in " + fixture),
            "n_shared_experts": (None, fixture + " (null); transformers has no shared expert"),
            "topk_method": ("noaux_tc", fixture),
            "scoring_func": ("sigmoid", fixture + "; transformers routes with a sigmoid"),
            "layernorm_epsilon": (config.get("rms_norm_eps"),
                                  "transformers' rms_norm_eps; 1e-05 in " + fixture),
            "rope_theta": (full.get("rope_theta"), "transformers' rope_parameters."
                                                   "full_attention; 5000000 in " + fixture),
            "swa_rope_theta": (local.get("rope_theta"), "transformers' rope_parameters."
                                                        "sliding_attention; 10000 in " + fixture),
            "partial_rotary_factor": (full.get("partial_rotary_factor"),
                                      "transformers' rope_parameters; 0.334 in " + fixture),
            "swa_num_attention_heads": (config.get("num_attention_heads"),
                                        "transformers' num_attention_heads (its sliding layers "
                                        "use the model's); equal in " + fixture),
            "swa_num_key_value_heads": (2 * kv if isinstance(kv, int) else None,
                                        "2 x num_key_value_heads, what transformers' "
                                        "modeling_mimo_v2_flash hard-codes; 8 = 2 x 4 in "
                                        + fixture),
            "swa_head_dim": (config.get("head_dim"), "transformers' head_dim (one for both "
                                                     "kinds); equal in " + fixture),
            "swa_v_head_dim": (config.get("v_head_dim"), "transformers' v_head_dim (one for "
                                                         "both kinds); equal in " + fixture),
        }
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        text = config.get("text_config") or {}
        if "mrope_section" in (text.get("rope_parameters") or {}):
            return {}
        checkpoint = "Qwen/Qwen2-VL-7B-Instruct" if model_type == "qwen2_vl" else \
            "Qwen/Qwen2.5-VL-7B-Instruct"
        return {"text_config.rope_parameters.mrope_section": (
            [16, 24, 24],
            f"{checkpoint}'s config.json (rope_scaling mrope_section); transformers' "
            f"modeling_{model_type} falls back to the same list when the key is absent, "
            "which fits only head_dim 128: written, it shrinks with head_dim")}
    if model_type == "mamba2" and isinstance(config.get("hidden_size"), int):
        return {"intermediate_size": (config["hidden_size"] * (config.get("expand") or 2),
                                      "hidden_size x expand, the mixer width of transformers' "
                                      "Mamba2Mixer; mlx-lm's mamba2 requires the key and "
                                      "computes the width as num_heads x head_dim")}
    if model_type == "gpt_bigcode" and isinstance(config.get("n_embd"), int):
        return {"n_inner": (4 * config["n_embd"],
                            "4 x n_embd: what transformers' GPTBigCodeMLP uses when n_inner is "
                            "None, and what bigcode/starcoder and santacoder's config.json "
                            "carry; mlx-lm builds its MLP from n_inner")}
    if model_type == "solar_open":
        params = config.get("rope_parameters") or {}
        return {"first_k_dense_replace": (0, "transformers' modeling_solar_open: every "
                                             "decoder layer is a SolarOpenMoE"),
                "partial_rotary_factor": (params.get("partial_rotary_factor", 1.0),
                                          "transformers' modeling_solar_open reads it from "
                                          "rope_parameters, 1.0 when absent"),
                "intermediate_size": (config.get("moe_intermediate_size"),
                                      "unused (no dense layer); moe_intermediate_size")}
    return {}


def _causal_lm_class(model_type: str) -> str | None:
    from .compat import hf_model_class_name

    return hf_model_class_name(model_type)


# Legacy names of RoPE keys that transformers 5 still reads (it pops them while
# building rope_parameters) but never writes; Hub checkpoints of the architecture use them.
LEGACY_ROPE_KEYS: dict[str, dict[str, str]] = {
    "gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"},
    "dbrx": {"rope_theta": "attn_config.rope_theta"},  # a key of the nested attn_config
}

# Keys Hub checkpoints carry that transformers 5 neither declares nor reads: each is a
# copy of a key it does read, so writing it changes nothing for transformers.
LEGACY_COPIES: dict[str, dict[str, str]] = {
    "gpt2": {"n_ctx": "n_positions"},  # GPT-2 configs carry n_ctx == n_positions
    "lfm2": {"block_dim": "hidden_size"},  # LFM2 configs carry block_dim == hidden_size
}

# Keys Hub checkpoints carry that transformers 5 reads once, converts into a new key
# and then serves as a read-only property: written from the property, the new key
# dropped (key -> the key it replaces, None when it replaces nothing).
LEGACY_PROPERTIES: dict[str, dict[str, str | None]] = {
    "nemotron_h": {"hybrid_override_pattern": "layers_block_type", "num_hidden_layers": None},
}

# Layer-type names Hub checkpoints of the architecture use where transformers 5 renames
# them on load (configuration_utils._LEGACY_LAYER_TYPE_REMAP): new name -> old name.
LEGACY_LAYER_TYPE_NAMES: dict[str, dict[str, str]] = {
    "granitemoehybrid": {"linear_attention": "mamba", "full_attention": "attention"},
}

# Per-layer overrides (per_layer_config) that Hub checkpoints give as one key for all
# full-attention layers, which transformers 5 turns into per_layer_config on load
# (configuration_gemma4): override key -> Hub key.
LEGACY_GLOBAL_LAYER_KEYS: dict[str, dict[str, str]] = {
    "gemma4_text": {"head_dim": "global_head_dim",
                    "num_key_value_heads": "num_global_key_value_heads"},
}

# Keys Hub checkpoints carry for behaviour transformers 5 hard-codes (it has no such
# key): written with the one value transformers implements.
LEGACY_CONSTANTS: dict[str, dict[str, Any]] = {
    # modeling_apertus: MLP without bias, q/k RMSNorm, pre-norm only
    "apertus": {"mlp_bias": False, "qk_norm": True, "post_norm": False},
    # modeling_minimax_m2: no shared expert
    "minimax_m2": {"shared_intermediate_size": 0},
}

# Architectures whose Hub checkpoints give partial RoPE as a dimension count, rotary_dim
# (= partial_rotary_factor * head_dim), which transformers 5 reads (configuration_minimax_m2).
LEGACY_ROTARY_DIM = ("minimax_m2",)


def config_format(config: dict[str, Any]) -> str:
    if "rope_parameters" in config:
        return "rope_parameters"
    legacy_names = {name for names in LEGACY_ROPE_KEYS.values() for name in names.values()}
    if any(k in config for k in ("rope_theta", "rope_scaling", *legacy_names)):
        return "legacy"
    return "unknown"


def to_legacy_format(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers 5 config dict -> the format transformers 4 wrote and Hub checkpoints
    carry: `rope_parameters` as top-level rope_theta / rope_scaling (None when RoPE is
    unscaled, as transformers 4 wrote it) / partial_rotary_factor, under the
    architecture's own names where it has them (LEGACY_ROPE_KEYS), then `hub_key_names`.

    Lossless or refused: the caller checks the round trip (`legacy_is_lossless`).
    """
    out = copy.deepcopy(config)
    model_type = out.get("model_type", "")
    params = out.pop("rope_parameters", None)
    if params:
        per_layer_type = all(isinstance(v, dict) for v in params.values())
        main = dict(params.get("full_attention", next(iter(params.values())))
                    if per_layer_type else params)
        names = LEGACY_ROPE_KEYS.get(model_type, {})
        theta = main.pop("rope_theta", 10000.0)
        parent, _, key = names.get("rope_theta", "rope_theta").rpartition(".")
        (out.setdefault(parent, {}) if parent else out)[key] = theta
        if model_type in LEGACY_ROTARY_DIM and isinstance(out.get("head_dim"), int):
            out["rotary_dim"] = int(main.pop("partial_rotary_factor", 1.0) * out["head_dim"])
        if "partial_rotary_factor" in main:
            key = names.get("partial_rotary_factor", "partial_rotary_factor")
            out[key] = main.pop("partial_rotary_factor")
        rope_type = main.get("rope_type", "default")
        out["rope_scaling"] = {**main, "type": rope_type} if rope_type != "default" else None
        local = params.get("sliding_attention") if per_layer_type else None
        if local and local.get("rope_theta") != theta:
            # gemma3-style local RoPE base
            out["rope_local_base_freq"] = local.get("rope_theta")
    return hub_key_names(out)


def text_config_to_legacy(config: dict[str, Any]) -> dict[str, Any] | None:
    """The config with its text_config's RoPE in the legacy format too (a multimodal
    config keeps its RoPE there), None when the text config has no rope_parameters."""
    text = config.get("text_config")
    if not (isinstance(text, dict) and "rope_parameters" in text):
        return None
    return {**copy.deepcopy(config), "text_config": to_legacy_format(text)}


def hub_key_names(config: dict[str, Any]) -> dict[str, Any]:
    """Key names and values Hub checkpoints carry, with the RoPE format left as it is:

    - head_dim written explicitly where transformers 5 computes it (transformers 4
      stored it, so its checkpoints carry it);
    - a key stored under one of two names transformers treats as the same key (its
      config class's `attribute_map`) goes under the name the mlx-lm port reads; which
      of the two real checkpoints use differs by architecture;
    - LEGACY_PROPERTIES, LEGACY_GLOBAL_LAYER_KEYS, LEGACY_LAYER_TYPE_NAMES,
      LEGACY_CONSTANTS and LEGACY_COPIES.
    """
    from transformers import AutoConfig

    out = copy.deepcopy(config)
    model_type = out.get("model_type", "")
    config_class = _config_class(model_type)
    if config_class is not None:
        hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
        aliases = getattr(config_class, "attribute_map", {})
        if ("head_dim" not in out and "head_dim" not in _declared_fields(config_class)
                and "head_dim" not in aliases and isinstance(hidden, int)
                and isinstance(heads, int) and heads > 0 and hidden % heads == 0):
            out["head_dim"] = hidden // heads
        mlx_fields = _mlx_fields(out)
        for alias, stored in aliases.items():
            if (stored in out and alias not in out and alias in mlx_fields
                    and stored not in mlx_fields):
                out[alias] = out.pop(stored)
    properties = LEGACY_PROPERTIES.get(model_type, {})
    if properties:
        data = {k: v for k, v in config.items() if k != "model_type"}
        loaded = AutoConfig.for_model(model_type, **data)
        for key, replaced in properties.items():
            out[key] = getattr(loaded, key)
            if replaced is not None:
                out.pop(replaced, None)
    global_keys = LEGACY_GLOBAL_LAYER_KEYS.get(model_type, {})
    overrides = out.get("per_layer_config")
    full = [str(i) for i, t in enumerate(out.get("layer_types") or []) if t == "full_attention"]
    if (global_keys and isinstance(overrides, dict) and overrides
            and sorted(int(k) for k in overrides) == [int(k) for k in full]
            and all(v == next(iter(overrides.values())) for v in overrides.values())
            and set(next(iter(overrides.values()))) <= set(global_keys)):
        for key, value in out.pop("per_layer_config")[next(iter(overrides))].items():
            out[global_keys[key]] = value
    names = LEGACY_LAYER_TYPE_NAMES.get(model_type, {})
    for key in ("layer_types", "layers_block_type"):
        if names and isinstance(out.get(key), list):
            out[key] = [names.get(t, t) for t in out[key]]
    for key, value in LEGACY_CONSTANTS.get(model_type, {}).items():
        out.setdefault(key, value)
    for key, source_key in LEGACY_COPIES.get(model_type, {}).items():
        if key not in out and source_key in out:
            out[key] = out[source_key]
    if isinstance(out.get("text_config"), dict) and out["text_config"].get("model_type"):
        out["text_config"] = hub_key_names(out["text_config"])
    return out


def port_reads_rope_parameters_only(config: dict[str, Any]) -> bool:
    """The mlx-lm ModelArgs declares rope_parameters and none of the legacy RoPE keys, or
    requires rope_parameters (no default: glm_moe_dsa derives its rope_theta from it):
    the checkpoints it was written for carry transformers 5's format."""
    fields = _mlx_fields(config)
    legacy_names = {name for names in LEGACY_ROPE_KEYS.values() for name in names.values()}
    if "rope_parameters" not in fields:
        return False
    return (not fields & {"rope_theta", "rope_scaling", *legacy_names}
            or "rope_parameters" not in _mlx_defaults(config))


def _config_class(model_type: str) -> Any:
    from .compat import hf_config_class

    return hf_config_class(model_type)


def _class_default(model_type: Any, name: str) -> Any:
    """The default transformers' config class of this model_type gives `name` (None when
    unknown, or when it computes it: llama's head_dim)."""
    import dataclasses

    config_class = _config_class(model_type) if isinstance(model_type, str) else None
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return None
    field = next((f for f in dataclasses.fields(config_class) if f.name == name), None)
    return None if field is None or field.default is dataclasses.MISSING else field.default


def _declared_fields(config_class: Any) -> set[str]:
    from .compat import hf_config_fields

    return hf_config_fields(config_class)


def _mlx_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the mlx-lm ModelArgs for this config (empty if none)."""
    from .compat import mlx_args_defaults
    from .mlx_side import MlxLmError, model_classes

    try:
        _, args_class = model_classes(config)
    except MlxLmError:
        return {}
    return mlx_args_defaults(args_class)


def _mlx_fields(config: dict[str, Any]) -> set[str]:
    """The config keys the mlx-lm ModelArgs for this config declares (empty if none)."""
    from .variants import mlx_args_fields

    return mlx_args_fields(config)


def _layer_count(config: dict[str, Any]) -> tuple[str, int] | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    return None


def _is_index_list(key: str, value: Any, n_layers: int) -> bool:
    """A list of layer indices (lfm2's full_attn_idxs, mlp_only_layers), not a per-layer list."""
    if not isinstance(value, list) or not ("idx" in key or key.endswith("_layers")):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_layers for v in value):
        return False
    return all(a < b for a, b in zip(value, value[1:], strict=False))


def _layers_needed(config: dict[str, Any], n_layers: int) -> int:
    """Fewest layers that keep one of each layer type and the layer pattern's first period."""
    needed = 2
    for key, value in config.items():
        if key == "per_layer_config" and isinstance(value, dict) and value:
            # layers with overrides are a layer type of their own
            needed = max(needed, min(int(k) for k in value) + 1)
            continue
        if _is_index_list(key, value, n_layers):
            # layers listed and layers not listed are two types: keep the first of each
            listed = set(value)
            firsts = [min(listed, default=None),
                      next((i for i in range(n_layers) if i not in listed), None)]
            needed = max(needed, *(i + 1 for i in firsts if i is not None))
            continue
        if (isinstance(value, list) and key.endswith("types") and 0 < len(value) < n_layers
                and all(isinstance(v, str) for v in value)):
            # a pattern cycled over the layers (recurrent_gemma block_types): its first
            # occurrence of each type
            needed = max(needed, *(value.index(v) + 1 for v in set(value)))
            continue
        if isinstance(value, (list, str)) and len(value) == n_layers and n_layers > 2:
            seen: set[Any] = set()
            for i, item in enumerate(value):
                item_key = json.dumps(item, sort_keys=True)
                if item_key not in seen:
                    seen.add(item_key)
                    needed = max(needed, i + 1)
    for key in ("sliding_window_pattern", "attn_layer_period", "full_attention_interval",
                "decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 1 < value:
            # one whole period, however long: a pattern longer than the layer list is no
            # model (mlx-lm indexes the pattern's last layer)
            needed = max(needed, value)
    for key in ("attn_layer_offset", "expert_layer_offset", "first_k_dense_replace",
                "num_dense_layers"):
        value = config.get(key)
        if isinstance(value, int) and 0 < value < n_layers:
            needed = max(needed, min(value, 2) + 2)
    return min(needed, n_layers)


# Sizes the source ties together stay tied after shrinking (when they are tied in the
# source): (key, operation, operands). MLA attention rotates a head_dim-wide slice and
# has qk_head_dim = nope + rope; Mamba-2 mixers have d_ssm = heads * head width.
TIED_SIZES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("head_dim", "equal", ("qk_rope_head_dim",)),
    ("qk_head_dim", "sum", ("qk_nope_head_dim", "qk_rope_head_dim")),
    ("mamba_d_ssm", "product", ("mamba_n_heads", "mamba_d_head")),
)


def _tied_value(config: dict[str, Any], operation: str, operands: tuple[str, ...]) -> int | None:
    values = [config.get(k) for k in operands]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    if operation == "equal":
        return values[0]
    if operation == "sum":
        return sum(values)
    return math.prod(values)


def _keep_tied_sizes(source: dict[str, Any], out: dict[str, Any]) -> None:
    for key, operation, operands in TIED_SIZES:
        value = source.get(key)
        if isinstance(value, int) and value == _tied_value(source, operation, operands):
            out[key] = _tied_value(out, operation, operands)


SSM_HEAD_DIM = 16


def _shrink_ssm_heads(source: dict[str, Any], out: dict[str, Any]) -> None:
    """Mamba-2 mixers whose heads tile the expanded width (num_heads * head_dim ==
    hidden_size * expand, which transformers' Mamba2Config requires) keep tiling it: the
    head width shrinks and the head count follows; groups of heads stay groups."""
    heads, head_dim = source.get("num_heads"), source.get("head_dim")
    hidden, expand = source.get("hidden_size"), source.get("expand")
    sizes = (heads, head_dim, hidden, expand, out.get("hidden_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        return
    if heads * head_dim != hidden * expand or "num_attention_heads" in source:
        return
    out["head_dim"] = min(head_dim, SSM_HEAD_DIM)
    out["num_heads"] = max(1, out["hidden_size"] * expand // out["head_dim"])
    groups = source.get("n_groups")
    if isinstance(groups, int) and 1 < groups < heads and heads % groups == 0:
        # fewer groups than heads in the source: still several heads per group
        out["n_groups"] = 2 if out["num_heads"] % 2 == 0 and out["num_heads"] > 2 else 1


# Attention sizes of one kind of layer, next to the model-wide ones (MiMo-V2-Flash's
# sliding-window layers: swa_num_attention_heads, swa_num_key_value_heads, swa_head_dim,
# swa_v_head_dim): prefix -> the keys they shadow.
LAYER_KIND_PREFIXES = ("swa_",)
LAYER_KIND_SIZES = ("num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim")


def _shrink_layer_kind_sizes(source: dict[str, Any], out: dict[str, Any]) -> None:
    """A layer kind's own attention sizes shrink with the model-wide ones, or its tiny
    layers keep the real sizes (64 heads over a 64-wide hidden state: no checkpoint's).
    Equal ones stay equal, a whole multiple stays that multiple; others keep their
    relation (grouped KV heads stay grouped, a head width of its own stays distinct)."""
    for prefix in LAYER_KIND_PREFIXES:
        for base in LAYER_KIND_SIZES:
            key, value, model_wide = prefix + base, source.get(prefix + base), source.get(base)
            if not isinstance(value, int) or isinstance(value, bool) or base not in out:
                continue
            if value == model_wide:
                out[key] = out[base]
            elif isinstance(model_wide, int) and model_wide > 0 and value % model_wide == 0:
                # a whole multiple of the model-wide size stays one: transformers'
                # mimo_v2_flash hard-codes its sliding layers' KV heads as 2 x the model's
                out[key] = out[base] * (value // model_wide)
            elif base == "num_attention_heads":
                out[key] = out[base]
            elif base == "num_key_value_heads":
                heads = source.get(prefix + "num_attention_heads", source.get(base))
                out[key] = (out.get(key.replace(base, "num_attention_heads"), HEADS)
                            if value == heads else 1 if value == 1 else 2)
            else:  # a head width of its own: the tiny width of its kind, kept distinct
                out[key] = out[base] * 2 if out[base] * 2 <= 64 else out[base] // 2


# Lists with one entry per rotated pair (longrope's factors) or that split the rotated
# pairs into sections (mrope): they follow the rotary dims when head_dim shrinks.
PER_PAIR_LISTS = ("long_factor", "short_factor")
PAIR_SECTION_LISTS = ("mrope_section",)


def _rotated_pairs(config: dict[str, Any]) -> int | None:
    """Rotated pairs per head: head_dim (or hidden / heads) x partial_rotary_factor / 2,
    or rotary_dim / 2 (GPT-J style)."""
    if isinstance(config.get("rotary_dim"), int):
        return config["rotary_dim"] // 2
    head_dim = config.get("head_dim")
    if not isinstance(head_dim, int):
        hidden = next((config[k] for k in ("hidden_size", "d_model", "n_embd")
                       if isinstance(config.get(k), int)), None)
        heads = next((config[k] for k in ("num_attention_heads", "n_head", "n_heads")
                      if isinstance(config.get(k), int)), None)
        if not hidden or not heads:
            return None
        head_dim = hidden // heads
    params = config.get("rope_parameters")
    factor = config.get("partial_rotary_factor")
    if not isinstance(factor, (int, float)) and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    factor = factor if isinstance(factor, (int, float)) and 0 < factor <= 1 else 1.0
    return int(head_dim * factor) // 2


def _resample(values: list[Any], n: int) -> list[Any]:
    """n entries spread evenly over the list, first and last kept (a ramp stays a ramp)."""
    if n <= 1:
        return values[:n]
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def _split_sections(sections: list[int], total: int) -> list[int]:
    """Sections of `total` pairs in the proportions of the source's, each at least 1."""
    whole = sum(sections)
    out = [max(1, round(s * total / whole)) for s in sections]
    out[out.index(max(out))] += total - sum(out)
    return out


def _shrink_rotary_lists(source: dict[str, Any], out: dict[str, Any]) -> None:
    """Per-pair lists of the RoPE settings (top-level rope_scaling / rope_parameters, or
    one entry per layer type) resized to the tiny rotary dims; lists of any other length
    are left alone (transformers' validation says so if they are wrong)."""
    old, new = _rotated_pairs(source), _rotated_pairs(out)
    if not old or not new or old == new:
        return

    def shrink(settings: Any) -> None:
        if not isinstance(settings, dict):
            return
        if all(isinstance(v, dict) for v in settings.values()) and settings:
            for inner in settings.values():  # one entry per layer type
                shrink(inner)
            return
        for key in PER_PAIR_LISTS:
            value = settings.get(key)
            if isinstance(value, list) and len(value) == old:
                settings[key] = _resample(value, new)
        for key in PAIR_SECTION_LISTS:
            value = settings.get(key)
            if (isinstance(value, list) and value and all(isinstance(v, int) for v in value)
                    and sum(value) == old and new >= len(value)):
                settings[key] = _split_sections(value, new)

    for key in ("rope_scaling", "rope_parameters"):
        shrink(out.get(key))


# size key -> value when transformers' default leaves it None (None: the head count)
SIZE_FALLBACKS: dict[str, int | None] = {
    "num_key_value_heads": None, "head_dim": HIDDEN // HEADS,
    "n_routed_experts": MAX_EXPERTS, "num_experts_per_tok": 2, "n_shared_experts": 1,
}


def _shrink_layer_override(override: Any, source: dict[str, Any], tiny: dict[str, Any]) -> Any:
    """A per-layer override (gemma4 per_layer_config): head_dim keeps its ratio to the
    model's head_dim, kv heads stay grouped."""
    if not isinstance(override, dict):
        return override
    out = dict(override)
    if isinstance(out.get("head_dim"), int) and isinstance(source.get("head_dim"), int):
        out["head_dim"] = max(2, out["head_dim"] * tiny["head_dim"] // source["head_dim"])
    if isinstance(out.get("num_key_value_heads"), int):
        heads = tiny.get("num_attention_heads", HEADS)
        out["num_key_value_heads"] = min(out["num_key_value_heads"], 2, heads)
    return out


# Kimi-Linear checkpoints keep their linear-attention sizes and 1-based layer lists in
# one nested dict (transformers' KimiLinearConfig reads it over its own linear_* keys).
LINEAR_ATTN_SIZES = {"num_heads": "linear_num_heads", "head_dim": "linear_head_dim"}
LINEAR_ATTN_LAYER_LISTS = ("full_attn_layers", "kda_layers")


def _shrink_linear_attn_config(linear: dict[str, Any], keep: int) -> dict[str, Any]:
    out = dict(linear)
    for key, size_key in LINEAR_ATTN_SIZES.items():
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > SIZE_KEYS[size_key]:
            out[key] = SIZE_KEYS[size_key]
    for key in LINEAR_ATTN_LAYER_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [i for i in out[key] if isinstance(i, int) and i <= keep]
    return out


def _cannot_build(config: dict[str, Any]) -> bool:
    """transformers fails to build a (meta-device) model from this config: None used as a
    number."""
    import torch
    from transformers import AutoConfig

    data = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(config.get("model_type", ""), **data)
        with torch.device("meta"):
            compat.hf_auto_model(config.get("model_type", "")).from_config(hf_config)
    except TypeError:
        return True
    except Exception:
        return False
    return False


# (nested config, key) of an encoder's output width, tied to text_config's hidden_size
# when the source ties them.
ENCODER_OUTPUT_WIDTHS = (("audio_config", "out_hidden_size"), ("vision_config", "out_hidden_size"))


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """Sizes shrunk, every other key kept as it was (format included)."""
    out = copy.deepcopy(config)
    for key in ("quantization_config", "auto_map", "_name_or_path"):
        out.pop(key, None)
    for nested in ("text_config", "vision_config", "audio_config", "attn_config",
                   "ffn_config"):
        if isinstance(out.get(nested), dict):
            out[nested] = shrink_config(out[nested])
    text = out.get("text_config")
    source_text = config.get("text_config")
    for nested, key in ENCODER_OUTPUT_WIDTHS:
        encoder, source_encoder = out.get(nested), config.get(nested)
        if (isinstance(encoder, dict) and isinstance(source_encoder, dict)
                and isinstance(text, dict) and isinstance(source_text, dict)
                and isinstance(source_text.get("hidden_size"), int)
                and source_encoder.get(key) == source_text["hidden_size"]):
            # an encoder whose output lands on the text embeddings keeps their width
            # (transformers' MuseSparkConfig requires audio out_hidden_size == hidden_size)
            encoder[key] = text.get("hidden_size")
    if (isinstance(text, dict) and isinstance(text.get("vocab_size"), int)
            and "vocab_size" not in out):
        # Multimodal ports (mlx-lm's gemma3) read a top-level vocab_size whose default is
        # the real model's and overwrite text_config's with it: the shrunk vocabulary is
        # said at the top too. transformers reads text_config's and ignores this copy.
        out["vocab_size"] = text["vocab_size"]

    orig_heads = next((out[k] for k in ("num_attention_heads", "n_head", "n_heads")
                       if isinstance(out.get(k), int)), None)
    orig_hidden = next(
        (out[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(out.get(k), int)), None
    )
    orig_head_dim = out.get("head_dim")
    orig_kv = out.get("num_key_value_heads")

    for key, target in SIZE_KEYS.items():
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > target:
            out[key] = target
            # an MLP width that is a whole multiple of the hidden size stays one: some
            # ports hard-code the multiple (gpt_neox: 4 * hidden)
            if key in MLP_WIDTH_KEYS and isinstance(orig_hidden, int) and orig_hidden > 0:
                multiple, rest = divmod(value, orig_hidden)
                if rest == 0 and 1 <= multiple <= 8:
                    out[key] = multiple * HIDDEN

    # Grouped-query attention stays grouped, MQA stays MQA, MHA stays MHA.
    heads = out.get("num_attention_heads", HEADS)
    if isinstance(orig_kv, int) and orig_heads:
        if orig_kv == orig_heads:
            out["num_key_value_heads"] = heads
        elif orig_kv == 1:
            out["num_key_value_heads"] = 1
        else:
            out["num_key_value_heads"] = 2
    # A head_dim that differs from hidden/heads keeps differing.
    if isinstance(orig_head_dim, int) and orig_hidden and orig_heads:
        if orig_head_dim * orig_heads == orig_hidden:
            out["head_dim"] = HIDDEN // HEADS
        else:
            out["head_dim"] = 32
    if (orig_head_dim is None and isinstance(orig_hidden, int) and orig_heads
            and _class_default(out.get("model_type"), "head_dim") == orig_hidden // orig_heads):
        # the file leaves head_dim to transformers' class default (nemotron_h: 128), which
        # is its hidden / heads there: said explicitly, or the tiny model's transformers
        # side keeps 128 where hidden / heads shrank (a size no checkpoint has)
        out["head_dim"] = out.get("hidden_size", HIDDEN) // out.get("num_attention_heads", HEADS)
    if isinstance(out.get("rotary_dim"), int) and isinstance(orig_hidden, int) and orig_heads:
        # gpt-j style partial rotary by count: keep the same fraction of the head
        source_head = orig_head_dim if isinstance(orig_head_dim, int) else orig_hidden // orig_heads
        tiny_head = out["head_dim"] if isinstance(orig_head_dim, int) else HIDDEN // HEADS
        frac = out["rotary_dim"] / source_head
        out["rotary_dim"] = max(2, int(round(frac * tiny_head / 2)) * 2)
    _keep_tied_sizes(config, out)
    _shrink_ssm_heads(config, out)
    _shrink_layer_kind_sizes(config, out)
    _shrink_rotary_lists(config, out)

    # Experts: fewer, but routing still chooses (top-k < experts) and groups still group.
    for key in EXPERT_COUNT_KEYS:
        value = out.get(key)
        if isinstance(value, int) and value > MAX_EXPERTS:
            out[key] = MAX_EXPERTS
    n_experts = next((out[k] for k in EXPERT_COUNT_KEYS if isinstance(out.get(k), int)), None)
    if n_experts:
        for key in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k"):
            if isinstance(out.get(key), int) and out[key] >= n_experts:
                out[key] = max(1, n_experts // 4)
            elif isinstance(out.get(key), int) and out[key] > 2:
                out[key] = 2
        if isinstance(out.get("n_group"), int) and out["n_group"] > 1:
            out["n_group"] = 4 if n_experts % 4 == 0 else 2
            out["topk_group"] = min(out.get("topk_group") or 2, 2)
        if isinstance(out.get("num_expert_group"), int) and out["num_expert_group"] > 1:
            out["num_expert_group"] = 4 if n_experts % 4 == 0 else 2
            if isinstance(out.get("topk_group"), int):
                out["topk_group"] = min(out["topk_group"], 2)
        if isinstance(out.get("n_shared_experts"), int) and out["n_shared_experts"] > 1:
            out["n_shared_experts"] = 1

    if isinstance(out.get("time_step_rank"), int):
        out["time_step_rank"] = math.ceil(out.get("hidden_size", HIDDEN) / 16)

    layer_count = _layer_count(out)
    if layer_count is not None:
        key, n_layers = layer_count
        keep = _layers_needed(out, n_layers)
        for k, value in list(out.items()):
            if _is_index_list(k, value, n_layers):
                out[k] = [i for i in value if i < keep]
            elif (isinstance(value, (list, str)) and len(value) == n_layers
                  and k not in TOKEN_ID_KEYS):
                out[k] = value[:keep]
        if isinstance(out.get("per_layer_config"), dict):
            overrides = out["per_layer_config"].items()
            out["per_layer_config"] = {k: _shrink_layer_override(v, config, out)
                                       for k, v in overrides if int(k) < keep}
        if isinstance(out.get("linear_attn_config"), dict):
            out["linear_attn_config"] = _shrink_linear_attn_config(out["linear_attn_config"],
                                                                   keep)
        for k in ("max_window_layers", "moe_layer_end_index", "num_nextn_predict_layers"):
            if isinstance(out.get(k), int) and out[k] > keep:
                out[k] = keep if k != "num_nextn_predict_layers" else 0
        out[key] = keep

    # Some transformers defaults leave a size None that its own model code needs (its
    # default model cannot be built): the documented fallback, or the smallest MoE
    # that still routes.
    if any(out.get(k, 0) is None for k in SIZE_FALLBACKS) and _cannot_build(out):
        for key, value in SIZE_FALLBACKS.items():
            if key in out and out[key] is None:
                out[key] = out.get("num_attention_heads", HEADS) if value is None else value

    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key in TOKEN_ID_KEYS:
            value = out.get(key)
            if key not in out:
                # left to transformers' class default (smollm3's pad_token_id 128004): a
                # row of the real vocabulary, past the tiny one (the embedding refuses it)
                default = _class_default(out.get("model_type"), key)
                value = default if isinstance(default, int) and default >= vocab else None
            if isinstance(value, int) and value >= vocab:
                out[key] = vocab - 1 - TOKEN_ID_KEYS.index(key)
            elif isinstance(value, list):
                out[key] = [v if v < vocab else vocab - 1 for v in value]
    return out


def _is_norm(module_name: str, module: Any) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name or module_name.rsplit(".", 1)[-1].startswith(("ln", "norm"))


def _q_or_k(name: str) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return last.startswith(("q_", "k_", "q", "k", "query", "key", "qkv", "wqkv", "c_attn")) and (
        "proj" in last or last in ("q", "k", "query", "key", "c_attn", "wqkv", "qkv")
    )


def init_weights(model: Any, seed: int) -> None:
    """Rescale transformers' init so that the paths ports get wrong affect the output.

    - matrices: std 1/sqrt(fan_in) (unit-variance activations), q/k projections x2
      so attention is sharp, the up/gate projections x1.5 so activations leave their
      linear region (exact vs tanh GELU differ there), lm_head x4.
    - embeddings: std 1.
    - a parameter transformers left constant (norm weights of 1 or 0, zero biases,
      zero router biases, zero sinks) gets noise, so ignoring it shows.
    - other non-constant vectors (SSM A_log, dt bias, ...) keep transformers' init.
    - a floating-point buffer transformers saves (persistent) and initialises to zeros
      (deepseek_v3's router e_score_correction_bias) gets noise too: at zero, a port that
      drops it from expert selection computes the same function. It is written into the
      checkpoint, so both sides read the same values.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = getattr(model.config, "hidden_size", None) or HIDDEN
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = (mod_name, module, p_name)

    with torch.no_grad():
        for full_name, param in model.named_parameters():
            mod_name, module, p_name = owners[full_name]
            data = param.data
            if isinstance(module, torch.nn.Embedding) or "embed" in full_name and data.dim() == 2:
                data.copy_(torch.randn(data.shape, generator=gen))
                continue
            if data.dim() >= 2 and isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                fan_in = data[0].numel()
                std = 1.0 / math.sqrt(fan_in)
                if _q_or_k(mod_name):
                    std *= 2.0
                elif mod_name.endswith(("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3")):
                    std *= 1.5
                elif mod_name.endswith("lm_head"):
                    std *= 4.0
                data.copy_(torch.randn(data.shape, generator=gen) * std)
                continue
            if data.dim() >= 2:
                # fused expert tensors and the like: sizes are shrunk so that
                # hidden == expert width, so 1/sqrt(hidden) is the fan-in either way
                data.copy_(torch.randn(data.shape, generator=gen) / math.sqrt(hidden))
                continue
            flat = data.flatten()
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                value = float(flat[0])
                if _is_norm(mod_name, module) and p_name == "weight":
                    noise = torch.rand(data.shape, generator=gen) - 0.5
                    data.copy_(value + noise if value != 0 else noise)
                elif value == 0.0:
                    data.copy_(torch.randn(data.shape, generator=gen) * 0.1)
                else:
                    noise = (torch.rand(data.shape, generator=gen) - 0.5) * 0.4
                    data.copy_(value * (1.0 + noise))
        # after every parameter, so the parameters' draws are those of SYNTH_VERSION 2
        for _, buffer in zero_persistent_buffers(model):
            buffer.copy_(torch.randn(buffer.shape, generator=gen) * ZERO_BUFFER_STD)


ZERO_BUFFER_STD = 0.1  # as zero-valued parameters (biases, router biases) get


def zero_persistent_buffers(model: Any) -> list[tuple[str, Any]]:
    """(name, buffer) of the floating-point buffers `save_pretrained` writes (not in a
    module's non-persistent set) whose values are all zero: state the checkpoint carries
    (router correction biases), not computed tables (inv_freq is non-persistent)."""
    out = []
    for mod_name, module in model.named_modules():
        transient = getattr(module, "_non_persistent_buffers_set", set())
        for b_name, buffer in module.named_buffers(recurse=False):
            if (buffer is None or b_name in transient or not buffer.is_floating_point()
                    or buffer.numel() == 0 or bool(buffer.any())):
                continue
            out.append((f"{mod_name}.{b_name}" if mod_name else b_name, buffer))
    return out


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def cache_root() -> Path:
    root = os.environ.get("MLX_VERIFY_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-verify"


def checkpoint_key(config: dict[str, Any], seed: int, dtype: str) -> str:
    blob = json.dumps(
        {"config": config, "seed": seed, "dtype": dtype, "synth": SYNTH_VERSION, **_versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _hf_dict(config: dict[str, Any]) -> dict[str, Any]:
    """What transformers makes of a config dict, for comparing two formats."""
    from transformers import AutoConfig

    data = copy.deepcopy(config)
    model_type = data.pop("model_type")
    loaded = AutoConfig.for_model(model_type, **data).to_dict()
    loaded.pop("transformers_version", None)
    return loaded


def legacy_is_lossless(v5_config: dict[str, Any], legacy_config: dict[str, Any]) -> bool:
    """transformers reads both to the same config. Keys `hub_key_names` adds that
    transformers 5 keeps as plain attributes without using them (an explicit head_dim,
    LEGACY_CONSTANTS, LEGACY_COPIES) must hold the value transformers computes or copies;
    a rope "type" next to an equal "rope_type" is the same setting, and so is a top-level
    partial_rotary_factor equal to the nested one."""
    try:
        v5, legacy = _hf_dict(v5_config), _hf_dict(legacy_config)
    except Exception:
        return False
    model_type = legacy_config.get("model_type", "")
    derived = {k: v5.get(source) for k, source in LEGACY_COPIES.get(model_type, {}).items()}
    derived.update(LEGACY_CONSTANTS.get(model_type, {}))
    v5_rope = v5.get("rope_parameters")
    hidden, heads = v5.get("hidden_size"), v5.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        derived.setdefault("head_dim", hidden // heads)
    if isinstance(v5_rope, dict):
        # some configs (phi3) keep a top-level partial_rotary_factor next to the nested one
        factor = v5_rope.get("partial_rotary_factor")
        derived["partial_rotary_factor"] = factor
        if isinstance(v5.get("head_dim"), int):
            derived["rotary_dim"] = int((factor or 1.0) * v5["head_dim"])
        # an explicit full rotation is the default
        if factor is None and isinstance(legacy.get("rope_parameters"), dict):
            if legacy["rope_parameters"].get("partial_rotary_factor") == 1.0:
                legacy["rope_parameters"].pop("partial_rotary_factor")
    for key in set(legacy) - set(v5):
        if key in derived and legacy[key] == derived[key]:
            legacy.pop(key)
    for name in LEGACY_ROPE_KEYS.get(model_type, {}).values():
        # a RoPE base kept in a nested config (dbrx attn_config) next to the one transformers 5 uses
        parent, _, key = name.rpartition(".")
        nested, v5_nested = legacy.get(parent), v5.get(parent)
        if (isinstance(nested, dict) and isinstance(v5_nested, dict) and key not in v5_nested
                and isinstance(v5_rope, dict) and nested.get(key) == v5_rope.get("rope_theta")):
            nested.pop(key)
    return _without_type_alias(v5) == _without_type_alias(legacy)


def _without_type_alias(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_type_alias(v) for k, v in value.items()
                if not (k == "type" and value.get("rope_type") == v)}
    if isinstance(value, list):
        return [_without_type_alias(v) for v in value]
    return value


def write_checkpoint(config: dict[str, Any], seed: int, dtype: str = "float32",
                     root: Path | None = None) -> Path:
    """Build (or reuse from the cache) a tiny checkpoint whose config.json is exactly `config`.
    `root`: a directory of the caller's own instead of the shared cache (the runner's
    cross-check builds a fresh one per job: nothing another process wrote is reused)."""
    target = (root if root is not None else cache_root() / "checkpoints") / \
        checkpoint_key(config, seed, dtype)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target

    import torch
    from transformers import AutoConfig

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    try:
        hf_config = AutoConfig.from_pretrained(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SynthError(f"transformers rejects the config: {_one_line(e)}") from e
    torch.manual_seed(seed)
    try:
        model = compat.hf_auto_model(hf_config.model_type).from_config(
            hf_config, dtype=torch.float32)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SynthError(f"transformers cannot build the model: {_one_line(e)}") from e
    init_weights(model, seed)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp)
    _restore_checkpoint_names(tmp, config)
    # save_pretrained rewrote config.json in transformers 5's format: put the source back.
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen_config = tmp / "generation_config.json"
    gen_config.unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


# Tensor names transformers 5's save_pretrained writes on every layer by reversing one
# load-time rename (conversion_mapping.py), where the architecture's checkpoints carry
# that name on one kind of layer only: model_type -> (per-layer list key, the layer
# kind whose tensors are renamed back, the saved name, the checkpoint's name).
# kimi_linear: `.block_sparse_moe.` -> `.mlp.` is reversed on the dense layer too, whose
# MLP Moonshot's modeling_kimi.py names `mlp`; bailing_hybrid: `.self_attn.dense.` ->
# `.self_attn.o_proj.` is reversed on the KDA layers too, whose projection is `o_proj`
# (only the MLA layers' is `dense`: mlx-lm's bailing_moe_v3 reads both).
SAVED_NAME_FIXES: dict[str, tuple[str, str, str, str]] = {
    "kimi_linear": ("mlp_layer_types", "dense", ".block_sparse_moe.", ".mlp."),
    "bailing_hybrid": ("layer_types", "linear_attention", ".attention.dense.",
                       ".attention.o_proj."),
}


def _restore_checkpoint_names(checkpoint: Path, config: dict[str, Any]) -> None:
    fix = SAVED_NAME_FIXES.get(config.get("model_type", ""))
    kinds = config.get(fix[0]) if fix else None
    if fix is None or not isinstance(kinds, list):
        return
    from safetensors.torch import load_file, save_file

    _, kind, saved, real = fix
    prefixes = tuple(f"model.layers.{i}{saved}" for i, t in enumerate(kinds) if t == kind)
    index_file = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for path in sorted(checkpoint.glob("model*.safetensors")):
        tensors = load_file(path)
        renamed = {(name.replace(saved, real, 1) if name.startswith(prefixes) else name): t
                   for name, t in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(path), metadata={"format": "pt"})
            if index is not None:
                index["weight_map"] = {(n.replace(saved, real, 1) if n.startswith(prefixes)
                                        else n): f for n, f in index["weight_map"].items()}
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2))


def without_key_prefix(checkpoint: Path, prefix: str) -> Path | None:
    """A copy of a checkpoint whose tensor names lose `prefix` (the base model's naming:
    what a checkpoint saved from the base model class carries), None when no name has
    it. Cached next to the checkpoint."""
    from safetensors.torch import load_file, save_file

    target = checkpoint.with_name(checkpoint.name + "-base-names")
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    files = sorted(checkpoint.glob("model*.safetensors"))
    tensors = {name: t for f in files for name, t in load_file(f).items()}
    if not any(name.startswith(prefix) for name in tensors):
        return None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(checkpoint / "config.json", tmp / "config.json")
    save_file({name.removeprefix(prefix): t for name, t in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def token_ids(vocab_size: int, length: int, seed: int, batch: int = 1) -> np.ndarray:
    """Seeded random prompt ids; 0..3 avoided (often special tokens with zeroed embeddings)."""
    rng = np.random.default_rng(seed)
    return rng.integers(4, vocab_size, size=(batch, length), dtype=np.int64)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
