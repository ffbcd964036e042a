"""False alarms of the engine on real configs, each fixed at its root (issue 10, item 4),
and the real disagreements next to them that must still fail.

Configs are real-shaped Hub config.json files (tests/fixtures/configs/README.md); bugs
are edits of a copy of the installed mlx_lm; both libraries run for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlx_verify.checks import config_keys, engine, rope, synth
from tests.conftest import CliRun, Edit, copy_mlx_lm, run_cli

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def checks_of(run: CliRun, model_type: str, check: str,
              variant: str = "default") -> list[dict[str, Any]]:
    return [c for c in run.report(model_type)["checks"]
            if c["check"] == check and c["variant"] == variant]


def far_rows(run: CliRun, model_type: str) -> dict[int, dict[str, Any]]:
    return {c["metrics"]["position"]: c for c in checks_of(run, model_type, "rope")
            if c["metrics"].get("position")}


# --- far-position RoPE: float32 angle rounding is not a finding ----------------------------


def test_correct_port_passes_far_positions_of_a_long_context_config(
        cache_dir: Path, tmp_path: Path) -> None:
    """Qwen3-8B's 40960 positions: a correct port drifts 4e-5 at 20480 and 7.7e-5 at
    40944 (float32 angle rounding), which the flat 1e-5 bound failed."""
    run = run_cli(["check", "qwen3", "--config", str(CONFIGS / "qwen3-8b.json"),
                   "--checks", "rope", "--variants", "default"], cache_dir,
                  tmp_path / "results.json")
    assert run.returncode == 0, run.stderr[-2000:]
    far = far_rows(run, "qwen3")
    assert sorted(far) == [64, 20480, 40944]
    assert far[64]["metrics"]["tolerance_rel_l2"] == 1e-5
    for position in (20480, 40944):
        row = far[position]
        assert row["verdict"] == "pass"
        # the drift is real and above the flat bound: the position-aware bound is needed
        assert row["metrics"]["max_rel_l2"] > 1e-5
        last = position + rope.FAR_TOKENS - 1
        assert row["metrics"]["tolerance_rel_l2"] == pytest.approx(last * 2.0 ** -24)
        # granted because the rotations agree at that position to float32 rounding
        assert row["metrics"]["max_angle_diff"] <= row["metrics"]["angle_rounding_bound"]
        assert "float32 rounds RoPE angles" in row["details"]["tolerance_rule"]


def test_correct_port_passes_at_131k(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2.5-7B at 125000 (not just below a power of two, where both sides happen to
    round p x inv_freq alike): 2.5e-4 of drift, within the bound."""
    monkeypatch.setenv("MLX_VERIFY_CACHE", str(cache_dir))
    subject = engine.load_subject("qwen2", config_file=str(CONFIGS / "qwen2.5-7b-instruct.json"))
    near, far = rope.far_parity(subject, [64, 125000])
    assert near.verdict == "pass"
    assert far.verdict == "pass", far.summary
    assert far.metrics["max_rel_l2"] > 1e-5  # the drift the flat bound failed
    assert far.metrics["max_angle_diff"] <= far.metrics["angle_rounding_bound"]


IGNORED_LLAMA3_SCALING = Edit(
    "models/llama.py",
    "            args.rope_scaling,\n            args.max_position_embeddings,\n",
    "            None,\n            args.max_position_embeddings,\n")


def test_ignored_llama3_scaling_still_fails_at_131k(cache_dir: Path, tmp_path: Path) -> None:
    """Llama-3.1's llama3 scaling dropped: the rotation differs at every far position, so
    the rounding allowance is not granted and the 131k row fails on the flat bound."""
    root = copy_mlx_lm(tmp_path / "tree", [IGNORED_LLAMA3_SCALING])
    run = run_cli(["check", "llama", "--config", str(CONFIGS / "llama-3.1-8b-instruct.json"),
                   "--mlx-lm", str(root), "--checks", "rope", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode == 1, run.stderr[-2000:]
    far = far_rows(run, "llama")
    assert max(far) == 131056
    row = far[131056]
    assert row["verdict"] == "fail"
    assert row["metrics"]["tolerance_rel_l2"] == 1e-5
    assert row["metrics"]["max_angle_diff"] > 10 * row["metrics"]["angle_rounding_bound"]
    assert "RoPE angles at 131071 differ by up to" in row["summary"]


# --- per-pair RoPE lists shrink with the rotary dims ---------------------------------------


def test_longrope_factor_lists_follow_the_rotary_dims() -> None:
    source = json.loads((CONFIGS / "phi-4-mini-instruct.json").read_text())
    assert len(source["rope_scaling"]["long_factor"]) == 48  # 0.75 x 128 / 2
    tiny = synth.shrink_config(source)
    pairs = int(tiny["hidden_size"] // tiny["num_attention_heads"]
                * tiny["partial_rotary_factor"]) // 2
    for key in ("long_factor", "short_factor"):
        values = tiny["rope_scaling"][key]
        assert len(values) == pairs == 6
        # the ramp keeps its ends
        assert values[0] == source["rope_scaling"][key][0]
        assert values[-1] == source["rope_scaling"][key][-1]


def test_phi4_mini_longrope_config_runs(cache_dir: Path, tmp_path: Path) -> None:
    """Exited 2 with "transformers rejects the config: StrictDataclass" before. Measured,
    it is the listed longrope finding: MLX rotates with the long factors where
    transformers uses the short ones (all 1.0 in the published file), so the prompt and
    position 64 fail, and from 65536 on, where both use the long factors, rows pass."""
    run = run_cli(["check", "phi3", "--config", str(CONFIGS / "phi-4-mini-instruct.json"),
                   "--checks", "layers,rope", "--variants", "default"], cache_dir,
                  tmp_path / "results.json")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "StrictDataclass" not in run.stderr
    assert checks_of(run, "phi3", "layers")[0]["verdict"] == "fail"
    far = far_rows(run, "phi3")
    assert far[64]["verdict"] == "fail"
    assert sorted(p for p, row in far.items() if row["verdict"] == "pass") == [
        65536, 131056, 262144]


# --- config perturbations a checkpoint could have ------------------------------------------


def test_layer_pattern_perturbed_within_the_layer_count() -> None:
    source = json.loads((CONFIGS / "gemma-3-4b-it-text.json").read_text())
    tiny = synth.shrink_config(source)
    n_layers = tiny["num_hidden_layers"]
    perturbed = dict(config_keys.candidates(tiny))
    pattern = perturbed["sliding_window_pattern"]["sliding_window_pattern"]
    assert 1 <= pattern <= n_layers and pattern != tiny["sliding_window_pattern"]
    # a per-layer list fixes the pattern: no different period next to the same list
    with_types = {**tiny, "layer_types": ["sliding_attention"] * (n_layers - 1)
                  + ["full_attention"]}
    assert "sliding_window_pattern" not in dict(config_keys.candidates(with_types))
    # offsets stay below the layer count
    assert config_keys.layer_layout_value("first_k_dense_replace", 1,
                                          {"num_hidden_layers": 2}) == 0


def test_shrinking_keeps_a_whole_layer_period() -> None:
    """A period longer than 8 used to leave more pattern than layers (the config under
    test itself impossible); mrope sections follow the rotary pairs too."""
    source = json.loads((CONFIGS / "gemma-3-4b-it-text.json").read_text())
    tiny = synth.shrink_config({**source, "sliding_window_pattern": 12})
    assert tiny["num_hidden_layers"] == 12
    vl = synth.shrink_config({"model_type": "qwen2_5_vl", "hidden_size": 3584,
                              "num_attention_heads": 28, "num_hidden_layers": 28,
                              "rope_scaling": {"type": "default", "mrope_section": [16, 24, 24]}})
    assert vl["rope_scaling"]["mrope_section"] == [2, 3, 3]  # 64 pairs -> 8, same shares


def test_gemma3_real_config_check_measures_the_pattern(cache_dir: Path, tmp_path: Path) -> None:
    """sliding_window_pattern was set to 16 over 6 tiny layers: IndexError inside mlx-lm,
    reported as `error` on a real config."""
    run = run_cli(["check", "gemma3_text", "--config", str(CONFIGS / "gemma-3-4b-it-text.json"),
                   "--checks", "config", "--variants", "default"], cache_dir,
                  tmp_path / "results.json")
    config = checks_of(run, "gemma3_text", "config")[0]
    assert config["verdict"] != "error", config["summary"]
    row = next(r for r in config["details"]["keys"] if r["key"] == "sliding_window_pattern")
    assert row["status"] == "honoured" and row["new_value"] == 5


# a port that only builds Gemma-3's own 5:1 layout (a pattern transformers runs in any value)
PATTERN_HARD_CODED = Edit(
    "models/gemma3_text.py",
    "        self.sliding_window_pattern = args.sliding_window_pattern\n",
    "        self.sliding_window_pattern = args.sliding_window_pattern\n"
    "        if args.sliding_window_pattern != 6:\n"
    "            raise ValueError('only the 5:1 local:global layout')\n")


def test_mlx_raising_on_a_config_transformers_runs_is_a_finding(
        cache_dir: Path, tmp_path: Path) -> None:
    root = copy_mlx_lm(tmp_path / "tree", [PATTERN_HARD_CODED])
    run = run_cli(["check", "gemma3_text", "--config", str(CONFIGS / "gemma-3-4b-it-text.json"),
                   "--mlx-lm", str(root), "--checks", "config", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    config = checks_of(run, "gemma3_text", "config")[0]
    assert config["verdict"] == "fail", config["summary"]
    row = next(r for r in config["details"]["keys"] if r["key"] == "sliding_window_pattern")
    assert row["status"] == "fails in MLX" and row["reach"] == "latent"
    assert "transformers runs sliding_window_pattern=5, MLX raises" in row["fact"]
    assert "only the 5:1 local:global layout" in row["fact"]


# --- findings of a real config graded by reach ---------------------------------------------

HARD_CODED_EPS = Edit(
    "models/qwen3.py",
    "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)",
    "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=1e-6)")


def test_hard_coded_eps_equal_to_the_config_is_latent(cache_dir: Path, tmp_path: Path) -> None:
    """Qwen3-8B's rms_norm_eps is 1e-6: a port that hard-codes 1e-6 computes this
    checkpoint right. The perturbed eps still shows the key is ignored, graded latent."""
    root = copy_mlx_lm(tmp_path / "tree", [HARD_CODED_EPS])
    run = run_cli(["check", "qwen3", "--config", str(CONFIGS / "qwen3-8b.json"),
                   "--mlx-lm", str(root), "--checks", "layers,config", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    assert checks_of(run, "qwen3", "layers")[0]["verdict"] == "pass"
    config = checks_of(run, "qwen3", "config")
    assert len(config) == 1 and config[0]["details"]["reach"] == "latent"
    assert config[0]["details"]["config_under_test_agrees"] is True
    eps = next(r for r in config[0]["details"]["keys"] if r["key"] == "rms_norm_eps")
    # the other norms still read it: MLX moves, to another place
    assert eps["status"] == "read differently" and eps["reach"] == "latent"
    assert "rms_norm_eps" in config[0]["summary"] and config[0]["verdict"] == "fail"
    assert all(r["reach"] == "latent" for r in config[0]["details"]["keys"])


# --- transformers' reading of the file vs its literal values -------------------------------


@pytest.fixture(scope="module")
def olmo3(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """Olmo-3-7B's config with rope_theta 20000: transformers 5 gives the legacy top-level
    rope_theta to full_attention layers only, sliding layers keep the class default."""
    tmp = tmp_path_factory.mktemp("olmo3")
    config = json.loads((CONFIGS / "olmo-3-7b.json").read_text())
    config["rope_theta"] = 20000
    (tmp / "config.json").write_text(json.dumps(config))
    return run_cli(["check", "olmo3", "--config", str(tmp / "config.json"),
                    "--checks", "layers,rope", "--variants", "default"], cache_dir,
                   tmp / "results.json")


def test_transformers_reading_is_said_and_is_the_side(olmo3: CliRun) -> None:
    layers = checks_of(olmo3, "olmo3", "layers")[0]
    # MLX stays judged against transformers' reading
    assert layers["verdict"] == "fail"
    reading = layers["details"]["reference_reading"]
    assert ("transformers reads rope_theta 20000 for full_attention layers only; "
            "sliding_attention layers: 500000") in reading
    assert layers["details"]["side"] == "transformers' reading"
    assert layers["details"]["mlx_vs_literal_reading_rel_l2"] <= 1e-5
    assert "read literally (rope_theta applied to every layer type), transformers agrees " \
           "with MLX" in layers["summary"]
    rotation = next(c for c in checks_of(olmo3, "olmo3", "rope")
                    if c["metrics"].get("check_part") == "rotation")
    assert rotation["verdict"] == "fail"
    assert rotation["details"]["side"] == "transformers' reading"
    assert "only sliding_attention layers differ" in rotation["summary"]


def test_real_olmo3_config_reads_as_written(cache_dir: Path, tmp_path: Path) -> None:
    """The published rope_theta equals the class default: the reading differs only in the
    yarn scaling, which transformers and MLX both give to full_attention layers."""
    run = run_cli(["check", "olmo3", "--config", str(CONFIGS / "olmo-3-7b.json"),
                   "--checks", "layers,rope", "--variants", "default"], cache_dir,
                  tmp_path / "results.json")
    assert run.returncode == 0, run.stderr[-2000:]
    rotation = next(c for c in checks_of(run, "olmo3", "rope")
                    if c["metrics"].get("check_part") == "rotation")
    assert rotation["details"]["reference_reading"] == [
        "transformers applies rope_scaling (yarn) to full_attention layers only; "
        "sliding_attention layers: default"]


# --- every real config: the rows of the config under test pass, or are a listed finding ---

KNOWN_FINDINGS = Path(__file__).parents[1] / "docs" / "known-findings.md"

# file -> (model_type, the config-reach rows of layers/rope/weights that fail, and the
# heading of docs/known-findings.md that lists the disagreement; "rope@P" is the far
# row at position P, "rope" the rotation facts). Measured by hand as well (the doc says how).
REAL_CONFIGS: dict[str, tuple[str, set[str], str | None]] = {
    "llama-3.2-1b-instruct.json": ("llama", set(), None),
    "gemma-2-2b-it.json": ("gemma2", set(), None),
    "gemma-3-1b-it.json": ("gemma3_text", set(), None),
    "phi-3.5-mini-instruct.json": (
        "phi3", {"layers", "rope", "rope@64"},
        "phi3 longrope: the long factors below original_max_position_embeddings"),
    "phi-4-mini-instruct.json": (
        "phi3", {"layers", "rope", "rope@64"},
        "phi3 longrope: the long factors below original_max_position_embeddings"),
    "deepseek-v2-lite.json": ("deepseek_v2", set(), None),
    "starcoder2-7b.json": (
        "starcoder2", {"layers", "rope@64"},
        "starcoder2: exact GELU where the config says gelu_pytorch_tanh"),
    "smollm2-360m.json": ("llama", set(), None),
    "qwen1.5-moe-a2.7b.json": ("qwen2_moe", set(), None),
    "aya-23-8b.json": ("cohere", set(), None),
    "qwen2.5-3b-instruct.json": ("qwen2", set(), None),
    "ministral-3-3b-reasoning-2512.json": ("mistral3", set(), None),
    "mixtral-8x7b-v0.1.json": ("mixtral", set(), None),
    # the far rows too since SYNTH_VERSION 3 (router biases not zero): the clamp's error
    # reaches 9.8e-2 at layers.3; with time_step_min 1e-30 every row passes (5.5e-7)
    "nemotron-3-nano-30b-a3b.json": (
        "nemotron_h", {"layers", "rope@64", "rope@131072", "rope@262128"},
        "nemotron_h: dt clamped at 0 instead of time_step_min"),
    "gemma-4-26b-a4b.json": ("gemma4", set(), None),
    "qwen3.5-27b.json": ("qwen3_5", set(), None),
    "stablelm-2-zephyr-1.6b.json": ("stablelm", set(), None),
    "olmo-2-1124-7b.json": ("olmo2", set(), None),
    "redpajama-incite-3b-v1.json": (
        "gpt_neox", {"layers", "rope@64", "rope@1024", "rope@2032"},
        "gpt_neox: tanh-approximate GELU where the config says exact gelu"),
    "qwen3-0.6b.json": ("qwen3", set(), None),
    "deepseek-v3.2.json": ("deepseek_v32", set(), None),
    "glm-5.json": ("glm_moe_dsa", set(), None),
    # loaded only since the per-layer-kind sizes shrink (swa_num_key_value_heads)
    "mimo-v2-flash.json": ("mimo_v2_flash", set(), None),
    "minimax-m2.7.json": ("minimax_m2", set(), None),
    "mixtral-8x22b-v0.1.json": ("mixtral", set(), None),
    # exited 2 ("Padding_idx must be within num_embeddings") before token ids left to
    # transformers' class defaults were moved into the tiny vocabulary
    "smollm3-3b-partial.json": ("smollm3", set(), None),
    # loaded only since head_dim follows transformers' class default (attention_head_dim)
    "nemotron-h-56b-base-8k.json": (
        "nemotron_h", {"layers", "rope@64", "rope@4096"},
        "nemotron_h: dt clamped at 0 instead of time_step_min"),
}


def failing_config_rows(report: Any) -> set[str]:
    rows = set()
    for result in report.checks:
        if result.reach != "config" or result.verdict not in ("fail", "error"):
            continue
        position = result.metrics.get("position")
        rows.add(f"{result.check}@{position}" if position else result.check)
    return rows


@pytest.mark.parametrize("file", sorted(REAL_CONFIGS))
def test_real_config_rows_pass_or_are_listed_findings(
        file: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity, RoPE and weights rows of each real config (the checks a false alarm on
    a real config came from: far-position rounding, shrunk per-pair lists, reach): a
    config-reach fail or error is a disagreement listed in docs/known-findings.md, and a
    listed one still fails (a fix shows here too)."""
    monkeypatch.setenv("MLX_VERIFY_CACHE", str(cache_dir))
    model_type, expected, finding = REAL_CONFIGS[file]
    report = engine.verify(model_type, config_file=str(CONFIGS / file),
                           checks=("layers", "rope", "weights"), variant_names=("default",))
    ran = [r for r in report.checks if r.reach == "config" and r.verdict != "skip"]
    assert ran, f"{file}: nothing measured on the config under test"
    failing = failing_config_rows(report)
    assert failing == expected, "\n".join(
        f"{r.check} {r.verdict}: {r.summary}" for r in report.checks if r.reach == "config")
    if finding is not None:
        assert f"### {finding}" in KNOWN_FINDINGS.read_text()


def test_load_finding_of_a_quantized_config_is_latent(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """gpt-oss-20b's checkpoint is MXFP4 (quantization_config), which mlx-lm loads; the
    tiny checkpoint is written unquantized, the layout mlx-lm's gpt_oss.py does not load
    (the listed gpt_oss finding). Reported as the real config's own failure before; now
    latent, with the fact. The same config without quantization_config (a bf16 copy as
    transformers saves one) keeps the finding on the config under test."""
    monkeypatch.setenv("MLX_VERIFY_CACHE", str(cache_dir))
    quantized = engine.verify("gpt_oss", config_file=str(CONFIGS / "gpt-oss-20b.json"),
                              checks=("layers", "rope"), variant_names=("default",))
    load = next(r for r in quantized.checks if r.check == "layers")
    assert load.verdict == "fail" and load.first_divergent_layer == "load"
    assert load.reach == "latent"
    assert "quantization_config quant_method 'mxfp4'" in load.summary
    assert all(r.verdict == "skip" for r in quantized.checks if r.reach == "config")
    unquantized = json.loads((CONFIGS / "gpt-oss-20b.json").read_text())
    del unquantized["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(unquantized))
    plain = engine.verify("gpt_oss", config_file=str(tmp_path / "config.json"),
                          checks=("layers",), variant_names=("default",))
    load = next(r for r in plain.checks if r.check == "layers")
    assert load.verdict == "fail" and load.reach == "config"
    assert "quantization_config" not in load.summary


def test_quantized_config_keeps_a_load_finding_of_unquantized_modules(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only tensors the quantization stores in another layout make a load finding latent:
    with the experts in modules_to_not_convert (kept unquantized in the real checkpoint),
    the unquantized-experts finding is the config's own."""
    monkeypatch.setenv("MLX_VERIFY_CACHE", str(cache_dir))
    config = json.loads((CONFIGS / "gpt-oss-20b.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.*.mlp.experts")
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = engine.verify("gpt_oss", config_file=str(tmp_path / "config.json"),
                           checks=("layers",), variant_names=("default",))
    load = next(r for r in report.checks if r.check == "layers")
    assert load.verdict == "fail" and load.reach == "config"


# --- sizes of real configs the tiny checkpoint keeps consistent ----------------------------


def test_head_dim_left_to_transformers_class_default_shrinks() -> None:
    """Nemotron-H-56B carries attention_head_dim (read by neither side) and no head_dim:
    transformers takes its class default 128 (= 8192 / 64 there), mlx-lm hidden / heads.
    Shrunk without head_dim, transformers kept 128 over hidden 64: k_proj (256, 64) vs
    MLX (32, 64), a load failure of the config under test."""
    source = json.loads((CONFIGS / "nemotron-h-56b-base-8k.json").read_text())
    assert "head_dim" not in source
    tiny = synth.shrink_config(source)
    assert tiny["head_dim"] == tiny["hidden_size"] // tiny["num_attention_heads"]
    # a head_dim the file carries, different from hidden / heads, keeps differing
    nano = synth.shrink_config(json.loads((CONFIGS / "nemotron-3-nano-30b-a3b.json").read_text()))
    assert nano["head_dim"] != nano["hidden_size"] // nano["num_attention_heads"]


def test_layer_kind_sizes_shrink_with_the_model_wide_ones() -> None:
    """MiMo-V2-Flash's sliding layers: swa_num_attention_heads 64 stayed 64 over a 64-wide
    hidden state, and transformers hard-codes their KV heads as 2 x num_key_value_heads
    (8 = 2 x 4 in the file), so swa_num_key_value_heads keeps that multiple."""
    source = json.loads((CONFIGS / "mimo-v2-flash.json").read_text())
    tiny = synth.shrink_config(source)
    assert tiny["swa_num_attention_heads"] == tiny["num_attention_heads"]
    assert tiny["swa_num_key_value_heads"] == 2 * tiny["num_key_value_heads"]
    assert tiny["swa_head_dim"] == tiny["head_dim"]
    assert tiny["swa_v_head_dim"] == tiny["v_head_dim"]


def test_topk_group_perturbed_within_n_group() -> None:
    """GLM-5 routes over n_group 1: topk_group went to 2, which transformers' torch.topk
    cannot run ("selected index k out of range"), an `error` row on a real config."""
    glm = synth.shrink_config(json.loads((CONFIGS / "glm-5.json").read_text()))
    assert glm["n_group"] == 1
    assert "topk_group" not in dict(config_keys.candidates(glm))
    ds = synth.shrink_config(json.loads((CONFIGS / "deepseek-v3.json").read_text()))
    perturbed = dict(config_keys.candidates(ds))["topk_group"]["topk_group"]
    assert 1 <= perturbed <= ds["n_group"] and perturbed != ds["topk_group"]


def test_no_legacy_variant_for_a_port_that_reads_rope_parameters_only() -> None:
    """GLM-5's port (glm_moe_dsa.py) requires rope_parameters and declares no legacy RoPE
    key: every checkpoint it was written for is in transformers 5's format, so the legacy
    form of the config is no checkpoint's (it read `fail`: ModelArgs missing
    rope_parameters). A port reading both forms keeps the variant (deepseek-v3.2)."""
    glm = json.loads((CONFIGS / "glm-5.json").read_text())
    names = [v.name for v in engine.all_variants("glm_moe_dsa", glm, True)]
    assert "config-format-legacy" not in names and "default" in names
    ds = json.loads((CONFIGS / "deepseek-v3.2.json").read_text())
    assert "config-format-rope_parameters" in [
        v.name for v in engine.all_variants("deepseek_v32", ds, True)]


def test_token_ids_left_to_class_defaults_stay_in_the_tiny_vocabulary() -> None:
    """SmolLM3's file (as copied) has no pad_token_id: transformers' SmolLM3Config default
    128004 is a row of the real vocabulary, past the tiny one, and transformers refused
    to build the model ("Padding_idx must be within num_embeddings")."""
    tiny = synth.shrink_config(json.loads((CONFIGS / "smollm3-3b-partial.json").read_text()))
    assert all(0 <= tiny[key] < tiny["vocab_size"] for key in synth.TOKEN_ID_KEYS)
    # a file's own token ids inside the vocabulary, and absent ones with no default past
    # it, are left as they are
    qwen = synth.shrink_config(json.loads((CONFIGS / "qwen3-0.6b.json").read_text()))
    assert "pad_token_id" not in qwen
