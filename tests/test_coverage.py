"""Coverage: one finding does not hide the rest, and architectures that did not run now
give a measured verdict.

- A bug behind a load finding: released gpt2.py does not load the checkpoint names
  transformers saves (`transformer.h.0...`); the checks still run on the base-model
  naming mlx-lm reads, so a bug injected into the port is found behind the finding.
- A multimodal model_type without a causal LM in transformers (llava) runs through
  transformers' image-text model on text only; a bug injected into the text model's
  mlx-lm file (llama.py) is found there.
- A variant config mlx-lm cannot read is a fail on the mlx-lm side; a check that
  raises inside mlx-lm's code is a fail on the mlx-lm side; transformers' default
  config completed with a key real checkpoints carry says where the value came from.
- Defaults mlx-lm could not read (glm_moe_dsa, kimi_linear, mimo_v2_flash,
  bailing_hybrid) are completed from real configs, each value with its source, and
  measured; shrunk defaults transformers could not run (mamba2, muse_spark, qwen2_vl,
  qwen2_5_vl) keep the relations its config requires, and are measured.
- The quantized KV cache (`--kv-bits`): a bug in mlx-lm's quantized attention is found
  by the generation check's kv-quantized part and by nothing else.

Each case runs the unedited tree too: the edited tree's failure is the edit's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Edit, copy_mlx_lm, run_cli

GPT2_EXACT_GELU = Edit("models/gpt2.py", "return self.c_proj(nn.gelu_approx(self.c_fc(x)))",
                       "return self.c_proj(nn.gelu(self.c_fc(x)))")
LLAMA_ROPE_FLIPPED = Edit("models/llama.py", "            args.rope_traditional,\n",
                          "            not args.rope_traditional,\n")


def rows(run: Any, model_type: str, check: str = "layers",
         variant: str = "default") -> list[dict[str, Any]]:
    return [c for c in run.report(model_type)["checks"]
            if c["check"] == check and c["variant"] == variant]


def test_bugs_behind_a_load_finding_and_in_a_multimodal_text_model(cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    args = ["check", "gpt2", "llava", "--checks", "layers,weights", "--variants", "default"]
    clean = run_cli(args, cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 1, clean.stderr  # gpt2's released load finding
    load, behind = rows(clean, "gpt2")
    assert load["verdict"] == "fail" and load["first_divergent_layer"] == "load"
    assert "model.h.0.attn.c_attn.bias" in load["weights"]["missing"]
    assert behind["verdict"] == "pass", behind["summary"]
    assert "'transformer.'" in behind["details"]["loaded_behind_load_finding"]
    weights = rows(clean, "gpt2", "weights")
    assert [w["verdict"] for w in weights] == ["pass"], weights
    [llava] = rows(clean, "llava")
    assert llava["verdict"] == "pass", llava["summary"]
    assert len(llava["layers"]) >= 3  # stages measured, not a skip
    assert clean.report("llava")["variants"][0]["config"]["model_type"] == "llava"

    tree = copy_mlx_lm(tmp_path / "tree", [GPT2_EXACT_GELU, LLAMA_ROPE_FLIPPED])
    buggy = run_cli([*args, "--mlx-lm", str(tree)], cache_dir, tmp_path / "buggy.json")
    assert buggy.returncode == 1, buggy.stderr
    load, behind = rows(buggy, "gpt2")
    assert load["verdict"] == "fail" and load["first_divergent_layer"] == "load"
    assert behind["verdict"] == "fail", behind["summary"]
    assert behind["localization"]["part"] == "mlp", behind["localization"]
    [llava] = rows(buggy, "llava")
    assert llava["verdict"] == "fail" and llava["localization"]["part"] == "attention", llava


def test_unreadable_variant_config_crash_and_completed_default(cache_dir: Path,
                                                              tmp_path: Path) -> None:
    run = run_cli(["check", "helium", "exaone", "dbrx", "--checks", "layers",
                   "--variants", "default,config-format-rope_parameters,head-dim"],
                  cache_dir, tmp_path / "out.json")
    assert run.returncode == 1, run.stderr
    # helium's ModelArgs requires rope_theta: the transformers 5 format has none
    [helium] = rows(run, "helium", variant="config-format-rope_parameters")
    assert helium["verdict"] == "fail" and helium["details"]["side"] == "mlx-lm"
    assert helium["first_divergent_layer"] == "config" and "rope_theta" in helium["summary"]
    assert [c["verdict"] for c in rows(run, "helium")] == ["pass"]
    # released exaone.py ignores head_dim and raises in a reshape: the port's crash
    [exaone] = rows(run, "exaone", variant="head-dim")
    assert exaone["verdict"] == "fail" and exaone["details"]["side"] == "mlx-lm", exaone
    assert "exaone.py:" in exaone["summary"]
    # transformers' dbrx default has clip_qkv None (both sides crash): completed, said where
    [dbrx] = rows(run, "dbrx")
    assert dbrx["verdict"] == "pass", dbrx["summary"]
    variant = next(v for v in run.report("dbrx")["variants"] if v["name"] == "default")
    completed = variant["overrides"]["completed"]["attn_config"]
    assert completed["value"]["clip_qkv"] == 8 and "dbrx-instruct" in completed["source"]
    assert "clip_qkv" in variant["description"]


QUANTIZED_ATTENTION_UNSCALED = Edit(
    "models/base.py",
    "    queries *= scale\n\n    if n_repeats > 1:\n"
    "        queries = mx.reshape(queries, (B, n_kv_heads, n_repeats, L, D))",
    "    if n_repeats > 1:\n"
    "        queries = mx.reshape(queries, (B, n_kv_heads, n_repeats, L, D))")


def kv_quantized(run: Any, model_type: str, variant: str) -> dict[str, Any]:
    [row] = [c for c in rows(run, model_type, "generation", variant)
             if c["details"].get("part") == "kv-quantized"]
    return row


def test_quantized_kv_cache_path_is_exercised(cache_dir: Path, tmp_path: Path) -> None:
    # --kv-bits: the head-dim variant (head_dim 32) is wide enough for MLX's groups of
    # 32; the default's head_dim 16 is not, and says so
    args = ["check", "llama", "--checks", "generation", "--variants", "default,head-dim"]
    clean = run_cli(args, cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr
    row = kv_quantized(clean, "llama", "head-dim")
    assert row["verdict"] == "pass" and 0 < row["metrics"]["max_rel_l2"] < 0.1, row
    assert "QuantizedKVCache" in row["details"]["caches"]
    skipped = kv_quantized(clean, "llama", "default")
    assert skipped["verdict"] == "skip" and "[16]" in skipped["summary"]
    # the scale dropped in mlx-lm's quantized attention (base.py): only this part sees it
    tree = copy_mlx_lm(tmp_path / "tree", [QUANTIZED_ATTENTION_UNSCALED])
    buggy = run_cli([*args, "--mlx-lm", str(tree)], cache_dir, tmp_path / "buggy.json")
    assert buggy.returncode == 1, buggy.stderr
    row = kv_quantized(buggy, "llama", "head-dim")
    assert row["verdict"] == "fail" and row["metrics"]["max_rel_l2"] > 0.1, row
    others = [c for c in buggy.report("llama")["checks"]
              if c["details"].get("part") != "kv-quantized"]
    assert others and all(c["verdict"] == "pass" for c in others), others


def test_config_broken_for_transformers_too_blames_transformers(cache_dir: Path,
                                                                tmp_path: Path) -> None:
    # lfm2_moe without layer_types: transformers' own modeling indexes them (its default
    # config has none), and mlx-lm cannot read the config either: not an mlx-lm finding
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "lfm2_moe", "num_hidden_layers": 2}))
    run = run_cli(["check", "lfm2_moe", "--config", str(config), "--checks", "layers"],
                  cache_dir, tmp_path / "out.json")
    assert run.returncode == 1, run.stderr
    [row] = rows(run, "lfm2_moe")
    assert row["verdict"] == "error" and row["details"]["side"] == "transformers", row
    assert "transformers cannot build its own model" in row["summary"]


def test_a_kv_sharing_bug_is_reached_by_the_feature_switches_variant(cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    """transformers' gemma4_text default has num_kv_shared_layers 0; mlx-lm's ModelArgs
    (and real Gemma 4 checkpoints) share KV across many layers. The feature-switches
    variant turns it on, so a bug in the KV-shared layers (each takes the KV of the first
    earlier layer of its type, not the last) fails there; the default cannot see it."""
    from tests.conftest import run_cli

    bug = Edit("models/gemma4_text.py",
               "                kvs_by_type[self.layers[i].layer_type] = i\n",
               "                kvs_by_type.setdefault(self.layers[i].layer_type, i)\n")
    args = ["check", "gemma4_text", "--checks", "layers",
            "--variants", "default,feature-switches"]
    clean = run_cli(args, cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    variants = {v["name"]: v for v in clean.report("gemma4_text")["variants"]}
    assert variants["feature-switches"]["overrides"]["num_kv_shared_layers"] >= 1
    ran = {c["variant"]: c for c in clean.report("gemma4_text")["checks"]}
    assert ran["feature-switches"]["verdict"] == "pass", ran["feature-switches"]
    tree = copy_mlx_lm(tmp_path / "tree", [bug])
    buggy = run_cli([*args, "--mlx-lm", str(tree)], cache_dir, tmp_path / "buggy.json")
    rows = {c["variant"]: c for c in buggy.report("gemma4_text")["checks"]}
    assert rows["default"]["verdict"] == "pass"
    assert rows["feature-switches"]["verdict"] == "fail", rows["feature-switches"]
    assert rows["feature-switches"]["reach"] == "latent"


def test_defaults_mlx_lm_could_not_read_are_completed_and_measured(cache_dir: Path,
                                                                    tmp_path: Path) -> None:
    """glm_moe_dsa, kimi_linear, mimo_v2_flash and bailing_hybrid read `fail` only because
    mlx-lm's ModelArgs requires keys transformers' default lacks: completed from real
    checkpoints' configs (each value with its source), and transformers' save-time renames
    that no real checkpoint carries are put back, every one now loads on both sides and
    its layers are measured (a pass on each)."""
    types = ["glm_moe_dsa", "kimi_linear", "mimo_v2_flash", "bailing_hybrid"]
    run = run_cli(["check", *types, "--checks", "layers", "--variants", "default"],
                  cache_dir, tmp_path / "out.json")
    assert run.returncode == 0, run.stdout + run.stderr
    for model_type in types:
        [row] = rows(run, model_type)
        assert row["verdict"] == "pass", (model_type, row["summary"])
        assert len(row["layers"]) >= 3, model_type  # stages measured, not a load stop
    expected = {
        "glm_moe_dsa": {"topk_method": "glm-5.json", "scoring_func": "GLM-5",
                        "moe_layer_freq": "GLM-5"},
        "kimi_linear": {"linear_attn_config": "KimiLinearConfig", "rope_theta": "unused",
                        "first_k_dense_replace": "mlp_layer_types"},
        "mimo_v2_flash": {"hybrid_layer_pattern": "mimo-v2-flash.json",
                          "swa_num_key_value_heads": "2 x num_key_value_heads",
                          "sliding_window_size": "sliding_window - 1"},
        "bailing_hybrid": {"architectures": "Ling-3.0-Flash", "head_dim": "linear_head_dim",
                           "moe_shared_expert_intermediate_size": "moe_intermediate_size"},
    }
    for model_type, sources in expected.items():
        [variant] = [v for v in run.report(model_type)["variants"] if v["name"] == "default"]
        completed = variant["overrides"]["completed"]
        for key, source in sources.items():
            assert source in completed[key]["source"], (model_type, key, completed[key])
            assert f"{key} completed:" in variant["description"], (model_type, key)
    mimo = next(v for v in run.report("mimo_v2_flash")["variants"] if v["name"] == "default")
    tiny = mimo["config"]
    # the sliding layers' sizes shrink with the model's, as in the real file
    assert tiny["swa_num_key_value_heads"] == 2 * tiny["num_key_value_heads"]
    assert tiny["hybrid_layer_pattern"][0] == 0 and 1 in tiny["hybrid_layer_pattern"]
    kimi = next(v for v in run.report("kimi_linear")["variants"] if v["name"] == "default")
    linear = kimi["config"]["linear_attn_config"]
    # the checkpoint form shrinks too: tiny sizes, 1-based lists within the tiny layers
    assert linear["num_heads"] == kimi["config"]["linear_num_heads"]
    assert max(linear["kda_layers"] + linear["full_attn_layers"]) == \
        kimi["config"]["num_hidden_layers"]


def test_shrunk_defaults_transformers_could_not_run_are_measured(cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    """mamba2 (hidden_size * expand == num_heads * head_dim), muse_spark (the audio
    encoder's out_hidden_size == text hidden_size), qwen2_vl and qwen2_5_vl (mrope_section
    over the rotated pairs) were `error`: transformers refused or could not run its own
    shrunk model. The tiny config keeps each relation, so transformers runs it and each
    verdict is a measurement of mlx-lm: mamba2's stages, qwen2_vl's load finding and the
    stages behind it, muse_spark's port raising (a Metal-only kernel on this CPU)."""
    types = ["mamba2", "muse_spark", "qwen2_vl", "qwen2_5_vl"]
    run = run_cli(["check", *types, "--checks", "layers", "--variants", "default"],
                  cache_dir, tmp_path / "out.json")
    for model_type in types:
        found = rows(run, model_type)
        assert found and all(r["verdict"] in ("pass", "fail") for r in found), \
            (model_type, [r["summary"] for r in found])
        assert all(r["details"].get("side") != "transformers" for r in found), model_type
    [mamba] = rows(run, "mamba2")
    assert len(mamba["layers"]) >= 3, mamba["summary"]  # stages measured
    [spark] = rows(run, "muse_spark")
    assert spark["details"]["side"] == "mlx-lm" and "mlx-lm raises" in spark["summary"], spark
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        load, behind = rows(run, model_type)
        assert load["first_divergent_layer"] == "load", load
        assert len(behind["layers"]) >= 3, behind["summary"]
    configs = {m: next(v for v in run.report(m)["variants"] if v["name"] == "default")
               for m in types}
    mamba = configs["mamba2"]["config"]
    assert mamba["num_heads"] * mamba["head_dim"] == mamba["hidden_size"] * mamba["expand"]
    assert 1 < mamba["n_groups"] < mamba["num_heads"]  # heads still grouped
    assert "intermediate_size" in configs["mamba2"]["overrides"]["completed"]
    spark = configs["muse_spark"]["config"]
    assert spark["audio_config"]["out_hidden_size"] == spark["text_config"]["hidden_size"]
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        text = configs[model_type]["config"]["text_config"]
        pairs = text["hidden_size"] // text["num_attention_heads"] // 2
        assert sum(text["rope_parameters"]["mrope_section"]) == pairs, text
        completed = configs[model_type]["overrides"]["completed"]
        source = completed["text_config.rope_parameters.mrope_section"]["source"]
        assert "VL-7B-Instruct" in source, source
