"""Variants that find bugs: the settings where ports break most, each as its own tiny
checkpoint so a failure names the setting.

Which variants an architecture gets:
- rope-theta: a non-default base, wherever the config has a RoPE base.
- rope-linear / rope-dynamic / rope-yarn / rope-llama3: where the MLX ModelArgs claims
  scaled RoPE (declares rope_scaling or rope_parameters); rope-longrope only where
  transformers' own config for the architecture names longrope (phi3). Ports are held
  to what they claim, not to settings no checkpoint of theirs uses.
- tied-embeddings / untied-embeddings: the other value of tie_word_embeddings, where the
  MLX ModelArgs declares it. Tied, the scales at the two ends of the shared matrix
  (embedding_multiplier, lm_head_multiplier, logits_scaling) that sit at 1.0 are set to
  distinct other values: at 1.0 a tied head that drops one (or their ratio) computes
  the same logits (falcon_h1 before c27c94a0).
- head-dim: head_dim != hidden_size / num_attention_heads, where the config has head_dim.
- multi-query: num_key_value_heads = 1 where kv-heads applies with more than one KV
  head (a port hard-coding one KV head loads only here: recurrent_gemma).
- kv-heads: grouped-query attention (num_key_value_heads = num_attention_heads // 2) where
  the config has as many KV heads as query heads (llama's, phi3's defaults) and the port
  declares num_key_value_heads, so a wrong KV repeat or a fused qkv split sized by the
  query heads shows; not for MLA (kv_lora_rank), whose KV heads are the query heads.
- sliding-window: a window (16) shorter than the parity prompt, where the MLX ModelArgs
  declares sliding_window or the source config sets one.
- softcap: active softcaps lowered so they engage strongly, where the config has them.
- eps: large, distinct norm epsilons, so a hard-coded or swapped eps shows.
- feature-switches: features transformers' default config leaves off and the port's own
  ModelArgs defaults turn on (booleans, and layer counts such as num_kv_shared_layers).
- index-topk: the sparse-attention indexer's index_topk (DeepSeek-V3.2, GLM-5: 2048,
  kept by the shrink) below the parity prompt, so the indexer's top-k selection runs;
  with 8 indexer heads, where the config has index_topk and the port declares it. Its
  rows are this config's (reach `config`): every prompt past 2048 tokens of the real
  checkpoint takes that branch.
- config-format-*: the same config in the other format (transformers 5 `rope_parameters`
  vs top-level rope_theta/rope_scaling), with a non-default base so a dropped base shows.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from . import compat
from .schema import Variant

ALT_THETA = 500000.0
WINDOW = 16
ATTN_SOFTCAP = 5.0
FINAL_SOFTCAP = 3.0
EPS_VALUES = (0.05, 0.02, 0.01)
# Values for the head and embedding scales of the tied-embeddings variant, assigned in
# config order: distinct, so no two of them cancel in a ratio.
HEAD_SCALE_VALUES = (2.0, 0.5, 4.0)
# index-topk: 16 of the 48-token parity prompt selected. 8 indexer heads (the shrink
# gives 2): a key's index score is a weighted sum over heads of ReLU(q.k), exactly 0 for
# about a quarter of the keys with 2 heads (2^-8 with 8); the choice among equal scores
# is arbitrary and torch.topk and mx.argpartition make it differently (measured on
# released deepseek_v32 with 2 heads: at query 36 only 15 keys scored above 0, the 16th
# key differed, layers.0 rel_l2 0.106).
INDEX_TOPK = 16
INDEX_HEADS = 8
# Variants whose rows are the config's own (engine.reach_of): they shrink a size the
# default checkpoint keeps real, so the default's short prompts never take the branch
# every long prompt of the real checkpoint takes.
CONFIG_REACH_VARIANTS = ("index-topk",)

ROPE_BASE_KEYS = ("rope_theta", "rotary_emb_base")


def mlx_args_fields(config: dict[str, Any]) -> set[str]:
    """The config keys the MLX ModelArgs for this config declares (others are dropped)."""
    from .mlx_side import MlxLmError, model_classes

    try:
        _, args_class = model_classes(config)
    except MlxLmError:
        return set()
    return compat.mlx_args_fields(args_class)


def transformers_names_longrope(model_type: str) -> bool:
    """transformers' config module of this architecture mentions longrope (phi3 and
    kin): only those are given a longrope variant."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    return "longrope" in inspect.getsource(inspect.getmodule(config_class))


def _rope_base(config: dict[str, Any]) -> tuple[str, float] | None:
    for key in ROPE_BASE_KEYS:
        if isinstance(config.get(key), (int, float)):
            return key, float(config[key])
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), (int, float)):
        return "rope_parameters.rope_theta", float(params["rope_theta"])
    return None


def _set_rope_base(config: dict[str, Any], value: float) -> dict[str, Any]:
    out = copy.deepcopy(config)
    found = _rope_base(out)
    if found is None:
        return out
    key, _ = found
    if key.startswith("rope_parameters"):
        out["rope_parameters"]["rope_theta"] = value
    else:
        out[key] = value
    return out


def _alt_theta(config: dict[str, Any]) -> float:
    found = _rope_base(config)
    return 10000.0 if found and found[1] == ALT_THETA else ALT_THETA


def _head_dim(config: dict[str, Any]) -> int:
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    return config.get("hidden_size", 64) // config.get("num_attention_heads", 4)


def scaling_parameters(rope_type: str, config: dict[str, Any]) -> dict[str, Any]:
    max_pos = int(config.get("max_position_embeddings") or 4096)
    original = max(max_pos // 4, 64)
    half = int(config.get("partial_rotary_factor", 1.0) * _head_dim(config)) // 2
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": 4.0}
    if rope_type == "dynamic":
        return {"rope_type": "dynamic", "factor": 4.0}
    if rope_type == "yarn":
        return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original}
    if rope_type == "llama3":
        return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    if rope_type == "longrope":
        return {"rope_type": "longrope", "original_max_position_embeddings": original,
                "short_factor": [1.0 + 0.05 * i for i in range(half)],
                "long_factor": [1.0 + 0.5 * i for i in range(half)]}
    raise ValueError(rope_type)


def _with_scaling(config: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    if "original_max_position_embeddings" in out and "original_max_position_embeddings" in scaling:
        # phi3-style configs carry it at the top level too; both must agree
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if isinstance(out.get("rope_parameters"), dict):
        theta = out["rope_parameters"].get("rope_theta", 10000.0)
        out["rope_parameters"] = {"rope_theta": theta, **scaling}
        if "original_max_position_embeddings" in scaling:
            out["max_position_embeddings"] = scaling["original_max_position_embeddings"] * 4
    else:
        out["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
        if "original_max_position_embeddings" in scaling:
            out["max_position_embeddings"] = scaling["original_max_position_embeddings"] * 4
    return out


def bug_finding_variants(model_type: str, default: Variant,
                         other_format: dict[str, Any] | None) -> list[Variant]:
    """The variants to run besides `default`, for this architecture."""
    config = default.config
    fmt = default.config_format
    mlx_fields = mlx_args_fields(config)
    out: list[Variant] = []

    def add(name: str, description: str, new_config: dict[str, Any],
            overrides: dict[str, Any], config_format: str = fmt) -> None:
        out.append(Variant(name=name, description=description, config_format=config_format,
                           config=new_config, overrides=overrides))

    base = _rope_base(config)
    if base is not None:
        theta = _alt_theta(config)
        add("rope-theta", f"RoPE base {theta:g} instead of {base[1]:g}",
            _set_rope_base(config, theta), {base[0]: theta})
        claims_scaling = bool({"rope_scaling", "rope_parameters"} & mlx_fields)
        types = ["linear", "dynamic", "yarn", "llama3"] if claims_scaling else []
        if claims_scaling and transformers_names_longrope(model_type):
            types.append("longrope")
        for rope_type in types:
            scaling = scaling_parameters(rope_type, config)
            new = _with_scaling(config, scaling)
            add(f"rope-{rope_type}", f"{rope_type} RoPE scaling", new,
                {"rope_scaling": scaling,
                 "max_position_embeddings": new.get("max_position_embeddings")})

    # Flipping tying only tests ports that claim both (declare the key); a port that
    # supports one value is held to it by the default variant.
    if isinstance(config.get("tie_word_embeddings"), bool) and "tie_word_embeddings" in mlx_fields:
        tied = not config["tie_word_embeddings"]
        overrides: dict[str, Any] = {"tie_word_embeddings": tied}
        if tied:
            # a tied head must combine the embedding's and the head's scales itself
            overrides.update(head_scales(config))
        new = {**copy.deepcopy(config), **overrides}
        description = ", ".join(f"{k}={v}" for k, v in overrides.items())
        add("tied-embeddings" if tied else "untied-embeddings", description, new, overrides)

    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if "head_dim" in config and isinstance(hidden, int) and isinstance(heads, int):
        if config.get("head_dim") in (None, hidden // heads):
            new = {**copy.deepcopy(config), "head_dim": 2 * (hidden // heads)}
            add("head-dim", f"head_dim {new['head_dim']} != hidden_size / heads "
                f"({hidden // heads})", new, {"head_dim": new["head_dim"]})

    kv = kv_heads_override(config, mlx_fields)
    if kv is not None:
        key, heads, kv_heads = kv
        *parents, leaf = key.split(".")
        new = copy.deepcopy(config)
        (new[parents[0]] if parents else new)[leaf] = kv_heads
        add("kv-heads", f"num_key_value_heads {kv_heads} < num_attention_heads {heads} "
            "(grouped-query attention)", new, {key: kv_heads})
        if kv_heads > 1:
            # one KV head, as real checkpoints of several architectures have (Gemma 2B,
            # RecurrentGemma, Falcon): the branch a port that hard-codes it does take
            mqa = copy.deepcopy(config)
            (mqa[parents[0]] if parents else mqa)[leaf] = 1
            add("multi-query", f"num_key_value_heads 1 < num_attention_heads {heads} "
                "(multi-query attention)", mqa, {key: 1})

    # A window is tested where the port claims one or the source config sets one.
    if "sliding_window" in config and ("sliding_window" in mlx_fields
                                       or config.get("sliding_window") is not None):
        new = {**copy.deepcopy(config), "sliding_window": WINDOW}
        add("sliding-window", f"sliding_window {WINDOW}, shorter than the prompt", new,
            {"sliding_window": WINDOW})

    softcaps = {k: v for k, v in config.items()
                if "softcap" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if softcaps:
        new = copy.deepcopy(config)
        overrides = {}
        for key in softcaps:
            value = ATTN_SOFTCAP if ("attn" in key or "attention" in key) else FINAL_SOFTCAP
            new[key] = overrides[key] = value
        add("softcap", "softcaps lowered so they engage: " +
            ", ".join(f"{k}={v}" for k, v in overrides.items()), new, overrides)

    eps_keys = [k for k, v in config.items()
                if "eps" in k and isinstance(v, float) and not isinstance(v, bool)]
    if eps_keys:
        new = copy.deepcopy(config)
        overrides = {key: EPS_VALUES[i % len(EPS_VALUES)] for i, key in enumerate(eps_keys)}
        new.update(overrides)
        add("eps", "large, distinct norm epsilons: " +
            ", ".join(f"{k}={v}" for k, v in overrides.items()), new, overrides)

    switches = feature_switches(config)
    if switches:
        new = {**copy.deepcopy(config), **switches}
        add("feature-switches", "switched on as the port's own ModelArgs defaults have them "
            "(its checkpoints' settings), off in transformers' default: " +
            ", ".join(f"{k}={v}" for k, v in switches.items()), new, switches)

    topk = config.get("index_topk")
    if (isinstance(topk, int) and not isinstance(topk, bool) and topk > INDEX_TOPK
            and "index_topk" in mlx_fields):
        heads = max(config.get("index_n_heads") or 0, INDEX_HEADS)
        overrides = {"index_topk": INDEX_TOPK, "index_n_heads": heads}
        add("index-topk", f"index_topk {INDEX_TOPK} (from {topk}) below the prompt, so the "
            f"sparse-attention indexer selects; {heads} indexer heads",
            {**copy.deepcopy(config), **overrides}, overrides)

    if other_format is not None and _rope_base(other_format) is not None:
        theta = _alt_theta(other_format)
        new = _set_rope_base(other_format, theta)
        other = "rope_parameters" if "rope_parameters" in new else "legacy"
        add(f"config-format-{other}",
            f"the same config in the {other} format, RoPE base {theta:g}", new,
            {"format": other, "rope_theta": theta}, config_format=other)
    return out


def head_scales(config: dict[str, Any]) -> dict[str, float]:
    """The scalar scales applied at the embedding or at the head (embedding_multiplier,
    lm_head_multiplier, logits_scaling, logit_scale) that are 1.0 in this config, each
    given a distinct other value. Scales elsewhere in the layers are the config check's
    (perturbed one at a time on the default variant)."""
    keys = [k for k, v in config.items()
            if isinstance(v, float) and v == 1.0
            and any(end in k for end in ("embedding", "lm_head", "logit"))
            and any(word in k for word in ("multiplier", "scal"))]
    return {key: HEAD_SCALE_VALUES[i % len(HEAD_SCALE_VALUES)] for i, key in enumerate(keys)}


def kv_heads_override(config: dict[str, Any], mlx_fields: set[str]
                      ) -> tuple[str, int, int] | None:
    """(key, query heads, KV heads) of the kv-heads variant, None where it does not apply:
    the config (or a multimodal config's text_config, where the decoder's sizes are) has
    num_key_value_heads == num_attention_heads, an even head count and no kv_lora_rank
    (MLA), and the port declares num_key_value_heads (a top-level ModelArgs that does not
    was never written for grouped checkpoints: olmo). A text_config is read by the port's
    own text ModelArgs, which this cannot see: it is tried."""
    section, prefix = config, ""
    if not isinstance(config.get("num_attention_heads"), int) and \
            isinstance(config.get("text_config"), dict):
        section, prefix = config["text_config"], "text_config."
    heads, kv_heads = section.get("num_attention_heads"), section.get("num_key_value_heads")
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or isinstance(heads, bool):
        return None
    if kv_heads != heads or heads < 2 or heads % 2 or section.get("kv_lora_rank"):
        return None
    if not prefix and "num_key_value_heads" not in mlx_fields:
        return None
    return f"{prefix}num_key_value_heads", heads, heads // 2


def feature_switches(config: dict[str, Any]) -> dict[str, Any]:
    """Features transformers' default config leaves off that the port's ModelArgs turns on
    by default (mlx-lm's defaults follow the checkpoints it was written for): a boolean
    False here and True there, or a layer count 0 here and positive there (gemma4_text's
    num_kv_shared_layers: 0 in transformers' default, 20 of 35 in mlx-lm's and in real
    Gemma 4 checkpoints), scaled to the tiny layer count. Without them the code behind
    those switches is never run."""
    from .mlx_side import MlxLmError, model_classes

    try:
        _, args_class = model_classes(config)
    except MlxLmError:
        return {}
    defaults = compat.mlx_args_defaults(args_class)
    layers = config.get("num_hidden_layers")
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "tie_word_embeddings":
            continue  # the tied-embeddings variant
        port = defaults.get(key)
        if value is False and port is True:
            out[key] = True
        elif (value == 0 and not isinstance(value, bool) and isinstance(port, int)
              and not isinstance(port, bool) and port > 0 and key.endswith("_layers")
              and isinstance(layers, int) and layers >= 2):
            count = _shared_layer_count(config, layers)
            types = config.get("layer_types")
            if count is None and isinstance(types, list) and len(types) == layers:
                # one period of the layer pattern has no earlier layer of the last one's
                # type (gemma4: 5 sliding, 1 full): two periods, the second reusing
                out.update(num_hidden_layers=2 * layers, layer_types=types * 2)
                count = layers
            if count:
                out[key] = count
    return out


def _shared_layer_count(config: dict[str, Any], layers: int) -> int | None:
    """The most of the last layers (at most half) that can reuse earlier ones: with a
    layer_types list, the layers kept must include every type of those that reuse
    (transformers refuses a KV-shared layer with no earlier layer of its type)."""
    types = config.get("layer_types")
    for count in range(max(1, layers // 2), 0, -1):
        if not isinstance(types, list) or len(types) != layers:
            return count
        if set(types[layers - count:]) <= set(types[:layers - count]):
            return count
    return None


def to_rope_parameters_format(config: dict[str, Any]) -> dict[str, Any] | None:
    """What transformers 5's save_pretrained writes for this config (None if it cannot)."""
    from transformers import AutoConfig

    data = copy.deepcopy(config)
    model_type = data.pop("model_type")
    # an exception here is transformers refusing its own default config: it propagates
    out = compat.hf_config_diff_dict(AutoConfig.for_model(model_type, **data))
    out.pop("transformers_version", None)
    out["model_type"] = model_type
    if config.get("architectures"):
        out["architectures"] = config["architectures"]
    return out if "rope_parameters" in out else None
