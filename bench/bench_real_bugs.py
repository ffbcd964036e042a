"""Benchmark: real porting bugs from mlx-lm's own fix history, replayed against the
installed mlx-lm, and which of them the default differential run catches.

Each bug is a fix commit of ml-explore/mlx-lm whose fixed code is still in the installed
model file (mlx-lm 0.32.2). Its reversal is a list of exact text replacements (fixed ->
buggy) that puts the bug back into a copy of the installed package; the unedited copy is
the base. Then, as the bot runs a PR:

    mlx-verify check MODEL_TYPE --mlx-lm BUGGED_TREE --base BASE_TREE --json r.json

with every default check and variant. A bug is caught when some differential row reads
`new` or `worse`; missed when none does; error when the run could not give a verdict
(exit 2, or a bugged file that no longer imports although the bug is no crash).

    nice -n 10 .venv/bin/python bench/bench_real_bugs.py [--only ID,ID] [--cache DIR]
        [--json FILE] [--resume] [--jobs N] [--list] [--validate]

With --json, each run's own results JSON is kept in FILE.d/ID.json (to read a miss).

Every replacement must match exactly once in the installed file: the bench checks all of
them before it runs anything and refuses (exit 2) otherwise, so a change in mlx-lm shows
as a refusal, not as a silently clean tree. Writes a Markdown table to stdout;
docs/benchmarks.md ("Real porting bugs") holds the latest results.

The replacements quote short lines of mlx-lm (MIT license, Copyright © 2023-2025 Apple
Inc.) as its fix commits changed them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).parent / "mlx-verify")
RUN_TIMEOUT_S = 1800
CAUGHT_CHANGES = ("new", "worse")


@dataclass(frozen=True)
class RealBug:
    id: str
    model_type: str
    file: str  # relative to the mlx_lm package, e.g. "models/llama.py"
    commit: str  # the fix commit in ml-explore/mlx-lm
    description: str  # what the bug does (what the fix fixed)
    replacements: tuple[tuple[str, str], ...]  # (fixed text in 0.32.2, buggy text), in order
    crash: bool = False  # the bug is a crash: the bugged file need not import
    # replacements in further files, for a bug that lived in two files at once
    also: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def edits(self) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
        """(file, replacements) for every file the reversal touches."""
        return ((self.file, self.replacements), *self.also)


# The table keeps each replacement as lines of the model file read.
# fmt: off
BUGS: tuple[RealBug, ...] = (
    RealBug(
        "lfm2_moe-softmax-routing",
        "lfm2_moe",
        "models/lfm2_moe.py",
        "04a19108",
        "router uses softmax and adds expert_bias to the routing weights (HF: sigmoid, "
        "bias only for selection, routed_scaling_factor)",
        (
            (
                "        routing_weights = mx.sigmoid(self.gate(x))\n\n"
                "        k = self.top_k\n"
                "        if self.use_expert_bias:\n"
                "            scores_for_routing = routing_weights.astype(mx.float32) +"
                " self.expert_bias\n"
                "            inds = mx.argpartition(scores_for_routing, kth=-k, axis=-1)[...,"
                " -k:]\n"
                "        else:\n"
                "            inds = mx.argpartition(routing_weights, kth=-k, axis=-1)[..., -k:]\n"
                "        inds = mx.stop_gradient(inds)\n\n"
                "        scores = mx.take_along_axis(routing_weights, inds, axis=-1)\n"
                "        if self.norm_topk_prob:\n"
                "            scores = scores / (mx.sum(scores, axis=-1, keepdims=True) + 1e-6)\n"
                "        scores = scores * self.routed_scaling_factor\n",
                "        gates = self.gate(x).astype(mx.float32)\n"
                "        gates = mx.softmax(gates, axis=-1)\n\n"
                "        if self.use_expert_bias:\n"
                "            gates += self.expert_bias\n\n"
                "        k = self.top_k\n"
                "        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]\n"
                "        inds = mx.stop_gradient(inds)\n\n"
                "        scores = mx.take_along_axis(gates, inds, axis=-1)\n"
                "        if self.norm_topk_prob:\n"
                "            scores /= mx.sum(scores, axis=-1, keepdims=True) + 1e-20\n",
            ),
        ),
    ),
    RealBug(
        "granite-tied-lm-head-kept",
        "granite",
        "models/granite.py",
        "d39cfec1",
        "no sanitize: a tied checkpoint that carries lm_head.weight fails the strict load",
        (
            (
                "    def sanitize(self, weights):\n"
                "        if self.args.tie_word_embeddings:\n"
                '            weights.pop("lm_head.weight", None)\n'
                "        return weights\n",
                "",
            ),
        ),
    ),
    RealBug(
        "apertus-tie-ignored",
        "apertus",
        "models/apertus.py",
        "e92138cb",
        "tie_word_embeddings ignored: always a separate lm_head",
        (
            (
                "        if not args.tie_word_embeddings:\n"
                "            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size,"
                " bias=False)\n",
                "        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                "            out = self.model.embed_tokens.as_linear(out)\n"
                "        else:\n"
                "            out = self.lm_head(out)\n"
                "        return out\n",
                "        return self.lm_head(out)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                '            weights.pop("lm_head.weight", None)\n',
                "",
            ),
        ),
    ),
    RealBug(
        "mixtral-tie-ignored",
        "mixtral",
        "models/mixtral.py",
        "7d6c5e4a",
        "tie_word_embeddings ignored: always a separate lm_head",
        (
            (
                "        if not args.tie_word_embeddings:\n"
                "            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size,"
                " bias=False)\n",
                "        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                "            return self.model.embed_tokens.as_linear(out)\n"
                "        else:\n"
                "            return self.lm_head(out)\n",
                "        return self.lm_head(out)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                '            weights.pop("lm_head.weight", None)\n',
                "",
            ),
        ),
    ),
    RealBug(
        "qwen3_moe-tie-ignored",
        "qwen3_moe",
        "models/qwen3_moe.py",
        "7d6c5e4a",
        "tie_word_embeddings ignored: always a separate lm_head",
        (
            (
                "        if not args.tie_word_embeddings:\n"
                "            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size,"
                " bias=False)\n",
                "        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                "            out = self.model.embed_tokens.as_linear(out)\n"
                "        else:\n"
                "            out = self.lm_head(out)\n"
                "        return out\n",
                "        return self.lm_head(out)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                '            weights.pop("lm_head.weight", None)\n',
                "",
            ),
        ),
    ),
    RealBug(
        "hunyuan_v1_dense-always-tied",
        "hunyuan_v1_dense",
        "models/hunyuan_v1_dense.py",
        "64574e19",
        "lm_head always tied to the embeddings, even with tie_word_embeddings false",
        (
            (
                "        if not args.tie_word_embeddings:\n"
                "            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size,"
                " bias=False)\n",
                "",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                "            return self.model.embed_tokens.as_linear(out)\n"
                "        else:\n"
                "            return self.lm_head(out)\n",
                "        return self.model.embed_tokens.as_linear(out)\n",
            ),
            (
                "    def sanitize(self, weights):\n"
                "        if self.args.tie_word_embeddings:\n"
                '            weights.pop("lm_head.weight", None)\n'
                "        return weights\n",
                "",
            ),
        ),
    ),
    RealBug(
        "phi3-tie-ignored",
        "phi3",
        "models/phi3.py",
        "b8bbbca6",
        "tie_word_embeddings ignored: always a separate lm_head (Phi-4-mini is tied)",
        (
            (
                "        if not args.tie_word_embeddings:\n"
                "            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size,"
                " bias=False)\n",
                "        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)\n",
            ),
            (
                "        if self.args.tie_word_embeddings:\n"
                "            out = self.model.embed_tokens.as_linear(out)\n"
                "        else:\n"
                "            out = self.lm_head(out)\n"
                "        return out\n",
                "        return self.lm_head(out)\n",
            ),
        ),
    ),
    RealBug(
        "phi3-partial-rotary-ignored",
        "phi3",
        "models/phi3.py",
        "b8bbbca6",
        "partial_rotary_factor ignored: every head dim rotated",
        (
            (
                "        rope_dim = int(head_dim * args.partial_rotary_factor)\n",
                "        rope_dim = head_dim\n",
            ),
        ),
    ),
    RealBug(
        "falcon_h1-tied-mup-scale-dropped",
        "falcon_h1",
        "models/falcon_h1.py",
        "c27c94a0",
        "tied lm_head misses the muP lm_head_multiplier / embedding_multiplier scale",
        (
            (
                "            return out * (self.args.lm_head_multiplier / "
                "self.args.embedding_multiplier)\n",
                "            return out\n",
            ),
        ),
    ),
    RealBug(
        "nemotron_h-dt-clamp-default",
        "nemotron_h",
        "models/nemotron_h.py",
        "6ddfdda1",
        "dt clamped below at time_step_min when time_step_limit is absent (HF: (0, inf))",
        (
            (
                "        if self.time_step_limit is None:\n"
                '            self.time_step_limit = (0.0, float("inf"))\n',
                "        if self.time_step_limit is None and self.time_step_min is not None:\n"
                '            self.time_step_limit = (self.time_step_min, float("inf"))\n',
            ),
        ),
    ),
    RealBug(
        "nemotron_h-head-dim-ignored",
        "nemotron_h",
        "models/nemotron_h.py",
        "0f268680",
        "attention head_dim from the config ignored (hidden_size // heads)",
        (
            (
                "        self.head_dim = (\n"
                "            args.head_dim\n"
                "            if args.head_dim is not None\n"
                "            else (args.hidden_size // args.num_attention_heads)\n"
                "        )\n"
                "        self.num_key_value_heads = args.num_key_value_heads\n",
                "        self.head_dim = self.hidden_size // self.num_heads\n"
                "        self.num_key_value_heads = args.num_key_value_heads\n",
            ),
        ),
    ),
    RealBug(
        "qwen3_next-gated-norm-half-precision",
        "qwen3_next",
        "models/qwen3_next.py",
        "cff7273a",
        "gated RMSNorm's SwiGLU computed in the input half precision (HF: float32)",
        (
            (
                "            return precise_swiglu(hidden_states, gate, x)\n",
                "            return swiglu(gate, x)\n",
            ),
            ("            return x.astype(hidden_states.dtype)\n", "            return x\n"),
        ),
    ),
    RealBug(
        "qwen3_next-delta-rule-no-decay",
        "qwen3_next",
        "models/gated_delta.py",
        "d6c45998",
        "gated delta rule: the state is not decayed by g before each step",
        (("    state = state * decay\n", ""),),
    ),
    RealBug(
        "qwen3_next-decay-gate-half",
        "qwen3_next",
        "models/gated_delta.py",
        "735a43b2",
        "gated delta decay g cast back to the input half precision (fixed: kept float32)",
        (
            (
                "    return mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))\n",
                "    return mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))"
                ".astype(\n"
                "        a.dtype\n"
                "    )\n",
            ),
        ),
    ),
    RealBug(
        "qwen3_5-A_log-cast-to-half",
        "qwen3_5",
        "models/qwen3_5.py",
        "1fd521c3",
        "no cast_predicate: A_log is cast to the checkpoint's half precision on load",
        (
            (
                '            if path.endswith("A_log"):\n'
                "                return False\n"
                "            return True\n",
                "            return True\n",
            ),
        ),
    ),
    RealBug(
        "qwen3_5-cache-not-advanced",
        "qwen3_5",
        "models/qwen3_5.py",
        "ed7884cb",
        "GatedDeltaNet does not advance the cache offset",
        (
            (
                "            cache[1] = state\n            cache.advance(S)\n",
                "            cache[1] = state\n",
            ),
        ),
    ),
    RealBug(
        "lfm2-rope-parameters-ignored",
        "lfm2",
        "models/lfm2.py",
        "9c113f70",
        "transformers 5 nested rope_parameters not read (rope_theta stays the default)",
        (
            (
                '        if self.rope_parameters is not None and "rope_theta" in '
                "self.rope_parameters:\n"
                '            self.rope_theta = self.rope_parameters["rope_theta"]\n'
                "        if self.num_key_value_heads is None:\n",
                "        if self.num_key_value_heads is None:\n",
            ),
        ),
    ),
    RealBug(
        "deepseek_v32-indexer-rope-interleaved",
        "deepseek_v32",
        "models/deepseek_v32.py",
        "2ed22318",
        "indexer RoPE always interleaved (traditional=True); HF: "
        "indexer_rope_interleave, false for DeepSeek-V3.2",
        (
            (
                "            traditional=args.indexer_rope_interleave,\n",
                "            traditional=True,\n",
            ),
        ),
    ),
    RealBug(
        "qwen3_moe-switch-swiglu-swapped",
        "qwen3_moe",
        "models/switch_layers.py",
        "5261ab85",
        "SwiGLU in the shared switch layer computes silu(up) * gate",
        (("        return swiglu(gate, x)\n", "        return swiglu(x, gate)\n"),),
    ),
    RealBug(
        "gemma3_text-window-mask-off-by-one",
        "gemma3_text",
        "models/base.py",
        "6fd60d3e",
        "sliding-window causal mask lets each query see window_size + 1 keys",
        (
            (
                "        mask = mask & (linds < rinds + window_size)\n",
                "        mask = mask & (linds <= rinds + window_size)\n",
            ),
        ),
    ),
    RealBug(
        "gemma3_text-masks-swapped",
        "gemma3_text",
        "models/gemma3_text.py",
        "9a11a81a",
        "global mask built from the first (sliding) layer's cache and the sliding mask "
        "from a global layer's cache",
        (
            (
                "        global_mask = create_attention_mask(h, cache[self.sliding_window_pattern"
                " - 1])\n",
                "        global_mask = create_attention_mask(h, cache[0])\n",
            ),
            (
                "                cache[0],\n                window_size=self.window_size,\n",
                "                cache[self.sliding_window_pattern - 1],\n"
                "                window_size=self.window_size,\n",
            ),
        ),
    ),
    RealBug(
        "gemma3_text-rope-scaling-on-local-layers",
        "gemma3_text",
        "models/gemma3_text.py",
        "b343a055",
        "rope_scaling applied to the sliding (local) layers too; HF scales only the global layers",
        (
            (
                "        if self.is_sliding:\n"
                "            self.rope = initialize_rope(\n"
                "                dims=head_dim,\n"
                "                base=args.rope_local_base_freq,\n"
                "                traditional=False,\n"
                "            )\n"
                "        else:\n"
                "            self.rope = initialize_rope(\n"
                "                dims=head_dim,\n"
                "                base=args.rope_theta,\n"
                "                traditional=False,\n"
                "                max_position_embeddings=args.max_position_embeddings,\n"
                "                scaling_config=args.rope_scaling,\n"
                "            )\n",
                "        self.rope = initialize_rope(\n"
                "            dims=head_dim,\n"
                "            base=(args.rope_local_base_freq if self.is_sliding else"
                " args.rope_theta),\n"
                "            traditional=False,\n"
                "            max_position_embeddings=args.max_position_embeddings,\n"
                "            scaling_config=args.rope_scaling,\n"
                "        )\n",
            ),
        ),
    ),
    RealBug(
        "gemma3_text-fp16-residual-overflow",
        "gemma3_text",
        "models/gemma3_text.py",
        "c9f747bf",
        "float16 residual additions not computed in float32 and clipped (overflow to inf)",
        (
            (
                "        h = clip_residual(x, self.post_attention_layernorm(r))\n",
                "        h = x + self.post_attention_layernorm(r)\n",
            ),
            (
                "        out = clip_residual(h, self.post_feedforward_layernorm(r))\n",
                "        out = h + self.post_feedforward_layernorm(r)\n",
            ),
        ),
    ),
    RealBug(
        "glm4-partial-rotary-ignored",
        "glm4",
        "models/glm4.py",
        "cff94b7f",
        "partial_rotary_factor ignored: every head dim rotated",
        (
            (
                "            dims=int(self.head_dim * args.partial_rotary_factor),\n",
                "            dims=self.head_dim,\n",
            ),
        ),
    ),
    RealBug(
        "deepseek_v3-lora-norm-eps",
        "deepseek_v3",
        "models/deepseek_v3.py",
        "81f9d821",
        "q_a/kv_a RMSNorms use MLX's default eps 1e-5 instead of 1e-6",
        (
            (
                "            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)\n",
                "            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank)\n",
            ),
            (
                "        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)\n",
                "        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank)\n",
            ),
        ),
    ),
    RealBug(
        "deepseek_v3-topk-weights-biased",
        "deepseek_v3",
        "models/deepseek_v3.py",
        "81f9d821",
        "routing weights gathered from the bias-corrected scores (HF: the unbiased sigmoid)",
        (
            (
                "    scores = mx.take_along_axis(orig_scores, inds, axis=-1)\n",
                "    scores = mx.take_along_axis(scores, inds, axis=-1)\n",
            ),
        ),
    ),
    RealBug(
        "deepseek_v2-lora-norm-eps",
        "deepseek_v2",
        "models/deepseek_v2.py",
        "d79ba690",
        "q_a/kv_a RMSNorms use MLX's default eps 1e-5 instead of 1e-6",
        (
            (
                "            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)\n",
                "            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank)\n",
            ),
            (
                "        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)\n",
                "        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank)\n",
            ),
        ),
    ),
    RealBug(
        "olmo3-rope-scaling-on-sliding-layers",
        "olmo3",
        "models/olmo3.py",
        "743f4f77",
        "rope_scaling applied to the sliding layers and plain RoPE to the full-attention "
        "ones (inverted layer test)",
        (
            (
                '        if args.layer_types[layer_idx] != "full_attention":\n',
                '        if args.layer_types[layer_idx] == "full_attention":\n',
            ),
        ),
    ),
    RealBug(
        "gpt2-positions-not-offset",
        "gpt2",
        "models/gpt2.py",
        "db368f25",
        "learned position embeddings not offset by the cache: every decoding step reads position 0",
        (
            (
                "        position_ids = mx.arange(L) + offset[..., None]\n",
                "        position_ids = mx.arange(L)\n",
            ),
        ),
    ),
    RealBug(
        "gpt_bigcode-positions-not-offset",
        "gpt_bigcode",
        "models/gpt_bigcode.py",
        "d09376c5",
        "learned position embeddings not offset by the cache",
        (
            (
                "            position_ids = mx.array(np.arange(cache[0].offset, cache[0].offset"
                " + L))\n",
                "            position_ids = mx.array(np.arange(L))\n",
            ),
        ),
    ),
    RealBug(
        "cohere2-full-mask-everywhere",
        "cohere2",
        "models/cohere2.py",
        "465b107c",
        "sliding-window layers get the global causal mask",
        (
            (
                "            mask = full_mask if is_global else swa_mask\n",
                "            mask = full_mask\n",
            ),
        ),
    ),
    RealBug(
        "gemma2-bool-mask-added",
        "gemma2",
        "models/gemma2.py",
        "1dc5de4f",
        "boolean mask added to the scores (+1/+0) instead of masking them",
        (
            (
                "            if mask.dtype == mx.bool_:\n"
                "                scores = mx.where(\n"
                "                    mask, scores, mx.array(mx.finfo(scores.dtype).min,"
                " scores.dtype)\n"
                "                )\n"
                "            else:\n"
                "                scores = scores + mask\n",
                "            scores = scores + mask\n",
            ),
        ),
    ),
    RealBug(
        "gemma2-query-pre-attn-scalar-ignored",
        "gemma2",
        "models/gemma2.py",
        "9020453e",
        "attention scale from head_dim instead of query_pre_attn_scalar",
        (
            (
                "        self.scale = 1.0 / (args.query_pre_attn_scalar**0.5)\n",
                "        self.scale = head_dim**-0.5\n",
            ),
        ),
    ),
    RealBug(
        "gemma2-final-softcap-missing",
        "gemma2",
        "models/gemma2.py",
        "9020453e",
        "final logit softcapping not applied",
        (
            (
                "        out = mx.tanh(out / self.final_logit_softcapping)\n"
                "        out = out * self.final_logit_softcapping\n",
                "",
            ),
        ),
    ),
    RealBug(
        "gemma2-attn-softcap-missing",
        "gemma2",
        "models/gemma2.py",
        "9020453e",
        "attention logit softcapping not applied",
        (
            (
                "        scores = mx.tanh(scores / self.attn_logit_softcapping)\n"
                "        scores *= self.attn_logit_softcapping\n",
                "",
            ),
        ),
    ),
    RealBug(
        "recurrent_gemma-first-step-norm",
        "recurrent_gemma",
        "models/recurrent_gemma.py",
        "6ca67fee",
        "RG-LRU: the first position's input is scaled by sqrt(1 - a^2) "
        "(HF resets the multiplier to 1 there)",
        (("        if cache is None:\n            multiplier[:, 0, :] = 1.0\n", ""),),
    ),
    RealBug(
        "llama-head-dim-ignored",
        "llama",
        "models/llama.py",
        "333087c8",
        "head_dim from the config ignored (hidden_size // heads; Mistral NeMo)",
        (
            (
                "        self.head_dim = head_dim = args.head_dim or args.hidden_size // n_heads\n",
                "        self.head_dim = head_dim = args.hidden_size // n_heads\n",
            ),
        ),
    ),
    RealBug(
        "mamba-conv1d-sanitize-not-idempotent",
        "mamba",
        "models/mamba.py",
        "620c8dbf",
        "sanitize moves the conv1d axes of already-converted weights again (reload after "
        "convert breaks)",
        (
            (
                '            if "conv1d.weight" in k and v.shape[-1] != 1:\n',
                '            if "conv1d.weight" in k and v.ndim == 3:\n',
            ),
        ),
    ),
    RealBug(
        "recurrent_gemma-conv1d-sanitize-not-idempotent",
        "recurrent_gemma",
        "models/recurrent_gemma.py",
        "620c8dbf",
        "sanitize moves the conv_1d axes of already-converted weights again",
        (
            (
                '            if "conv_1d.weight" in k and v.shape[-1] != 1:\n',
                '            if "conv_1d.weight" in k and v.ndim == 3:\n',
            ),
        ),
    ),
    RealBug(
        "step3p5-norm-shift-not-idempotent",
        "step3p5",
        "models/step3p5.py",
        "b77ec6b9",
        "sanitize adds 1 to every norm weight, also of already-converted checkpoints",
        (
            (
                '            if is_vanilla and k.endswith(".weight") and "norm" in k:\n',
                '            if k.endswith(".weight") and ("layernorm" in k or "norm" in k):\n',
            ),
        ),
    ),
    RealBug(
        "step3p5-decode-ignores-sliding-window",
        "step3p5",
        "models/step3p5.py",
        "25a4c836+8162aaad",
        "sliding layers keep a full KVCache and single-token decoding gets no window mask: "
        "decoding attends past the window (step3p5 as first released)",
        (
            (
                "        return [\n"
                "            (\n"
                "                RotatingKVCache(max_size=self.args.sliding_window)\n"
                "                if layer.is_sliding\n"
                "                else KVCache()\n"
                "            )\n"
                "            for layer in self.layers\n"
                "        ]\n",
                "        return [KVCache() for _ in self.layers]\n",
            ),
        ),
        also=(
            (
                "models/cache.py",
                (
                    (
                        "    if window_size is not None:\n"
                        "        return create_causal_mask(N, offset, window_size=window_size)\n"
                        "    elif N == 1:\n"
                        "        return None\n",
                        "    if N == 1:\n"
                        "        return None\n"
                        "    elif window_size is not None:\n"
                        "        return create_causal_mask(N, offset, window_size=window_size)\n",
                    ),
                ),
            ),
        ),
    ),
    RealBug(
        "gpt_neox-parallel-residual-ignored",
        "gpt_neox",
        "models/gpt_neox.py",
        "2aa31f95",
        "use_parallel_residual ignored: always the parallel residual",
        (
            (
                "        if self.use_parallel_residual:\n            residual = x\n",
                "        if True:\n            residual = x\n",
            ),
        ),
    ),
    RealBug(
        "internlm3-rope-scaling-misread",
        "internlm3",
        "models/internlm3.py",
        "13425df6",
        "rope_scaling read by a hand-written dynamic-NTK RoPE: linear factor as NTK scale, "
        "2.0 when unscaled, sequence length taken from the heads axis",
        (
            (
                "        self.rope = initialize_rope(\n"
                "            head_dim,\n"
                "            base=args.rope_theta,\n"
                "            traditional=args.rope_traditional,\n"
                "            scaling_config=args.rope_scaling,\n"
                "            max_position_embeddings=args.max_position_embeddings,\n"
                "        )\n",
                "        rope_scale = (\n"
                '            1 / args.rope_scaling["factor"]\n'
                "            if args.rope_scaling is not None\n"
                '            and args.rope_scaling["rope_type"] == "linear"\n'
                "            else 2.0\n"
                "        )\n\n"
                "        self.rope = DynamicNTKScalingRoPE(\n"
                "            head_dim,\n"
                "            max_position_embeddings=args.max_position_embeddings,\n"
                "            traditional=args.rope_traditional,\n"
                "            base=args.rope_theta,\n"
                "            scale=rope_scale,\n"
                "        )\n",
            ),
        ),
    ),
    RealBug(
        "cohere2-rotating-cache-index",
        "cohere2",
        "models/cache.py",
        "358b4d2a",
        "RotatingKVCache concat path does not reset its write index after reordering",
        (
            (
                "            self.values = self._temporal_order(self.values)\n"
                "            self._idx = self.keys.shape[2]\n",
                "            self.values = self._temporal_order(self.values)\n",
            ),
        ),
    ),
    RealBug(
        "mamba2-batched-ssm-mask",
        "mamba2",
        "models/ssm.py",
        "a4e32ef5",
        "chunked SSM scan passes the whole padding mask to every chunk",
        (
            (
                "            None if mask is None else mask[..., i : i + step],\n",
                "            mask,\n",
            ),
        ),
    ),
    RealBug(
        "longcat_flash-zero-expert-weights",
        "longcat_flash",
        "models/longcat_flash.py",
        "e1e66c0d",
        "regular experts weighted with the unmasked top-k weights "
        "(zero-computation experts' weight leaks into them)",
        (
            (
                "        weighted_outputs = regular_outputs * regular_weights[..., None]\n",
                "        weighted_outputs = regular_outputs * topk_weights[..., None]\n",
            ),
        ),
    ),
    RealBug(
        "jamba-moe-on-every-layer",
        "jamba",
        "models/jamba.py",
        "61669b27",
        "a sparse MoE block on every layer, expert_layer_period/offset ignored",
        (
            (
                "            args.num_experts > 1\n"
                "            and (layer_idx + args.expert_layer_offset) % args.expert_layer_period"
                " == 0\n",
                "            args.num_experts > 1\n",
            ),
        ),
    ),
    RealBug(
        "gpt_oss-layer-types-ignored",
        "gpt_oss",
        "models/gpt_oss.py",
        "6c876ca5",
        "the config's layer_types ignored: sliding and full attention always alternate",
        (("        self.layer_types = args.layer_types or [\n", "        self.layer_types = [\n"),),
    ),
    RealBug(
        "qwen3_5-norm-shift-on-mtp",
        "qwen3_5",
        "models/qwen3_5.py",
        "4eeaf209",
        "sanitize shifts norm weights by +1 whenever MTP weights are present, also on "
        "already-converted checkpoints",
        (
            (
                "        has_unsanitized_conv1d = any(\n",
                '        has_mtp_weights = any("mtp." in k for k in weights)\n'
                "        has_unsanitized_conv1d = any(\n",
            ),
            (
                "            if has_unsanitized_conv1d and any(k.endswith(sfx) for sfx in"
                " norm_keys):\n",
                "            if (has_mtp_weights or has_unsanitized_conv1d) and any(\n"
                "                k.endswith(sfx) for sfx in norm_keys\n"
                "            ):\n",
            ),
        ),
    ),
)
# fmt: on


# --- applying a reversal --------------------------------------------------------------


def installed_mlx_lm() -> Path:
    """The installed mlx_lm package directory, found without importing it."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_real_bugs: mlx_lm is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def bugged_text(
    replacements: tuple[tuple[str, str], ...], original: str
) -> tuple[str | None, list[str]]:
    """The file with the replacements applied in order, or None and what did not match."""
    text, problems = original, []
    for index, (old, new) in enumerate(replacements):
        count = text.count(old)
        if count != 1:
            first = old.strip().splitlines()[0] if old.strip() else repr(old)
            problems.append(
                f"replacement {index + 1} matches {count} times (expected once): {first!r}"
            )
            continue
        text = text.replace(old, new)
    return (None if problems else text), problems


def validate(bugs: list[RealBug], package: Path) -> list[str]:
    """Every problem with the bug list against this mlx_lm: unknown files, replacements
    that do not match exactly once, bugged files that are not Python (unless a crash)."""
    problems = []
    seen = set()
    for bug in bugs:
        if bug.id in seen:
            problems.append(f"{bug.id}: duplicate id")
        seen.add(bug.id)
        for file, replacements in bug.edits():
            path = package / file
            if not path.is_file():
                problems.append(f"{bug.id}: {file} is not in {package}")
                continue
            original = path.read_text()
            text, mismatches = bugged_text(replacements, original)
            problems += [f"{bug.id}: {file}: {m}" for m in mismatches]
            if text is not None and text == original:
                problems.append(f"{bug.id}: the reversal leaves {file} unchanged")
            if text is not None and not bug.crash:
                try:
                    compile(text, str(path), "exec")
                except SyntaxError as e:
                    problems.append(f"{bug.id}: bugged {file} is not Python: {e}")
    return problems


def copy_tree(package: Path, root: Path, bug: RealBug | None) -> Path:
    """root/mlx_lm: a copy of the installed package, with the bug's reversal applied."""
    target = root / "mlx_lm"
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    for file, replacements in bug.edits() if bug is not None else ():
        path = target / file
        text, problems = bugged_text(replacements, path.read_text())
        if text is None:  # validate() ran first; this is only a guard
            raise SystemExit(f"bench_real_bugs: {bug.id}: {'; '.join(problems)}")
        path.write_text(text)
    return root


def import_error(tree: Path, bug: RealBug) -> str | None:
    """None when every bugged module imports from the tree, else the last error line."""
    modules = [f"mlx_lm.{file.removesuffix('.py').replace('/', '.')}" for file, _ in bug.edits()]
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); import mlx_lm; "
        f"assert mlx_lm.__file__.startswith({str(tree)!r}), mlx_lm.__file__; "
        f"import {', '.join(modules)}"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300
    )
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


# --- running one bug ------------------------------------------------------------------


@dataclass
class Outcome:
    id: str
    model_type: str
    commit: str
    description: str
    status: str  # caught | missed | error
    rows: list[dict[str, Any]]  # the new/worse rows: check, variant, part, change, stage
    reason: str  # for error: why; for missed: the rows that failed on both trees
    exit_code: int | None
    seconds: float


def run_bug(
    bug: RealBug, package: Path, base: Path, cache: Path, work: Path, keep: Path | None
) -> Outcome:
    start = time.perf_counter()
    tree = copy_tree(package, work / bug.id, bug)

    def done(status: str, rows: list[dict[str, Any]], reason: str, code: int | None) -> Outcome:
        shutil.rmtree(tree, ignore_errors=True)
        return Outcome(
            bug.id,
            bug.model_type,
            bug.commit,
            bug.description,
            status,
            rows,
            reason,
            code,
            round(time.perf_counter() - start, 1),
        )

    if not bug.crash:
        failed = import_error(tree, bug)
        if failed is not None:
            return done("error", [], f"the bugged tree does not import: {failed}", None)
    results_path = work / f"{bug.id}.json"
    env = {
        **os.environ,
        "MLX_VERIFY_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("MLX_VERIFY_DEBUG", None)
    # The bot's command: every default check and variant, the PR tree against the base.
    command = [
        CLI,
        "check",
        bug.model_type,
        "--mlx-lm",
        str(tree),
        "--base",
        str(base),
        "--json",
        str(results_path),
    ]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return done("error", [], f"timed out after {RUN_TIMEOUT_S} s", None)
    if proc.returncode == 2 or not results_path.is_file():
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return done(
            "error",
            [],
            last[-1] if last else f"exit {proc.returncode}, no results",
            proc.returncode,
        )
    if keep is not None:  # the run's own results JSON, to read a miss in full
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(results_path, keep / f"{bug.id}.json")
    results = json.loads(results_path.read_text())
    rows = results.get("differential") or []
    caught = [
        {
            "check": r["check"],
            "variant": r["variant"],
            "part": r.get("part"),
            "change": r["change"],
            "stage": r.get("first_changed_stage"),
            "basis": r.get("basis"),
        }
        for r in rows
        if r["change"] in CAUGHT_CHANGES
    ]
    expected_code = 1 if caught else 0
    if proc.returncode != expected_code:  # the exit code must agree with the rows
        return done(
            "error",
            caught,
            f"exit {proc.returncode} but {len(caught)} new/worse rows",
            proc.returncode,
        )
    if caught:
        return done("caught", caught, "", proc.returncode)
    failing = sorted(
        {f"{r['check']}/{r['variant']}" for r in rows if r["verdict"] in ("fail", "error")}
    )
    changed = sorted(
        {
            f"{r['check']}/{r['variant']}@{r['first_changed_stage']}"
            for r in rows
            if r.get("first_changed_stage")
        }
    )
    # rows whose outcome moved without a stage comparison (e.g. the PR no longer loads)
    moved = sorted(
        {
            f"{r['check']}/{r['variant']}"
            + (f" ({r['part']})" if r.get("part") else "")
            + f": {r.get('base_verdict')} -> {r['verdict']}, distance "
            f"{r.get('base_distance')} -> {r.get('distance')}"
            for r in rows
            if not r.get("first_changed_stage")
            and (
                r.get("distance") != r.get("base_distance") or r["verdict"] != r.get("base_verdict")
            )
        }
    )
    if changed or moved:
        reason = "no row new or worse; " + "; ".join(
            ([f"MLX(PR) differs from MLX(base) at {', '.join(changed)}"] if changed else [])
            + ([f"moved: {'; '.join(moved)}"] if moved else [])
        )
    else:
        reason = "every row unchanged: MLX(PR) computes what MLX(base) computes"
    if failing:
        reason += f"; failing on both trees: {', '.join(failing)}"
    return done("missed", [], reason, proc.returncode)


# --- report ---------------------------------------------------------------------------


def row_text(row: dict[str, Any]) -> str:
    text = f"{row['check']}/{row['variant']}"
    if row.get("part"):
        text += f" ({row['part']})"
    text += f" {row['change']}"
    if row.get("stage"):
        text += f" @ {row['stage']}"
    return text


def environment() -> str:
    """One line: the versions and the machine the figures were measured with."""
    import importlib.metadata
    import platform

    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("mlx-lm", "mlx", "transformers", "torch")
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions}; "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    )


def markdown(outcomes: list[Outcome], measured: str) -> str:
    lines = [
        f"Measured {measured}.",
        "",
        "| bug | model_type | fix commit | result | rows new/worse (check/variant, "
        "change @ first changed stage) |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.status == "caught":
            checks = sorted({r["check"] for r in o.rows})
            shown = row_text(o.rows[0])
            if len(o.rows) > 1:
                shown += f"; {len(o.rows)} rows in all ({', '.join(checks)})"
        else:
            shown = o.reason.replace("|", "\\|")
        lines.append(f"| {o.id} | {o.model_type} | {o.commit} | {o.status} | {shown} |")
    caught = sum(o.status == "caught" for o in outcomes)
    errors = sum(o.status == "error" for o in outcomes)
    total = len(outcomes)
    share = 100.0 * caught / total if total else 0.0
    lines.append("")
    ran = total - errors
    lines.append(
        f"Caught {caught} of {total} ({share:.0f}%); missed {ran - caught}, error {errors}. "
        f"Of the {ran} that got a verdict: {100.0 * caught / ran if ran else 0.0:.0f}% caught. "
        "Target: at least 95%."
    )
    return "\n".join(lines)


def write_json(
    path: Path, package: Path, bugs: list[RealBug], outcomes: dict[str, Outcome]
) -> None:
    ordered = [asdict(outcomes[b.id]) for b in bugs if b.id in outcomes]
    path.write_text(json.dumps({"mlx_lm": str(package), "outcomes": ordered}, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="ID,ID", help="run only these bugs")
    parser.add_argument(
        "--cache", metavar="DIR", help="checkpoint cache shared by every run (default: a temp dir)"
    )
    parser.add_argument("--json", metavar="FILE", help="write the outcomes as JSON")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the outcomes already in the --json file and run only the other bugs",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="model_types run at once (default 1; the bugs of one model_type run in turn, "
        "so no two runs fill the same checkpoint at once)",
    )
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check every reversal against the installed mlx-lm and exit",
    )
    args = parser.parse_args()

    bugs = list(BUGS)
    if args.only:
        wanted = [b.strip() for b in args.only.split(",") if b.strip()]
        known = {b.id for b in BUGS}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"bench_real_bugs: unknown bug id(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        bugs = [b for b in BUGS if b.id in wanted]
    if args.list:
        for bug in bugs:
            print(f"{bug.id}\t{bug.model_type}\t{bug.commit}\t{bug.file}\t{bug.description}")
        return 0
    package = installed_mlx_lm()
    problems = validate(bugs, package)
    if problems:
        print(
            f"bench_real_bugs: the bug list does not fit the mlx_lm at {package}:", file=sys.stderr
        )
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if args.validate:
        print(f"{len(bugs)} reversals apply to {package}")
        return 0

    previous: dict[str, Outcome] = {}
    if args.resume:
        if not args.json or not Path(args.json).is_file():
            print("bench_real_bugs: --resume needs an existing --json file", file=sys.stderr)
            return 2
        for saved in json.loads(Path(args.json).read_text())["outcomes"]:
            previous[saved["id"]] = Outcome(**saved)
    todo = [bug for bug in bugs if bug.id not in previous]
    groups: dict[str, list[RealBug]] = {}
    for bug in todo:
        groups.setdefault(bug.model_type, []).append(bug)
    outcomes: dict[str, Outcome] = {b.id: previous[b.id] for b in bugs if b.id in previous}
    lock = threading.Lock()
    keep = Path(f"{args.json}.d") if args.json else None
    started = environment()
    with tempfile.TemporaryDirectory(prefix="bench-real-bugs-") as tmp:
        work = Path(tmp)
        cache = Path(args.cache) if args.cache else work / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        base = copy_tree(package, work / "base", None)

        def run_group(group: list[RealBug]) -> None:
            for bug in group:
                outcome = run_bug(bug, package, base, cache, work, keep)
                with lock:
                    outcomes[bug.id] = outcome
                    print(
                        f"[{len(outcomes)}/{len(bugs)}] {bug.id}: {outcome.status} "
                        f"({outcome.seconds} s)"
                        + (f": {outcome.reason}" if outcome.reason else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.json:  # after every bug, so a stopped run keeps its results
                        write_json(Path(args.json), package, bugs, outcomes)

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for future in [pool.submit(run_group, group) for group in groups.values()]:
                future.result()
    ordered = [outcomes[bug.id] for bug in bugs]
    print(markdown(ordered, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
