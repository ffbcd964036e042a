"""Differential verdicts (`--base`): a PR's bug is flagged new or worse even where the
architecture already carries a released finding, and the released findings alone read
"unchanged".

Each bug is an exact edit of the installed mlx-lm, copied to a temporary tree (the PR);
the unedited copy is the base. Every architecture here fails some row on released mlx-lm
(starcoder2's default MLP, mixtral's llama3 scaling, cohere's and phi3's rope variants,
granite's rope_parameters reading, cohere2's head-dim crash), and several bugs land on
exactly those rows: a plain run cannot tell them from what was already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Edit, copy_mlx_lm, run_cli

TYPES = ["starcoder2", "mixtral", "cohere", "phi3", "granite", "cohere2"]
VARIANTS = "default,eps,rope-llama3,rope-longrope,config-format-rope_parameters"


@dataclass(frozen=True)
class MaskedBug:
    name: str
    model_type: str
    edit: Edit
    # (variant, change) layers rows the bug must produce: "new" where base passed, "worse"
    # where base already failed the same row
    expect: tuple[tuple[str, str], ...]
    check: str = "layers"


TREE_A = (
    MaskedBug("starcoder2-attention-scale-off-by-one", "starcoder2",
              Edit("models/starcoder2.py", "self.scale = head_dim**-0.5",
                   "self.scale = (head_dim + 1) ** -0.5"),
              # default already fails at layers.0's MLP; on the rope_parameters form the
              # distance even shrinks (0.279 -> 0.276): only the error direction shows it
              (("default", "worse"), ("config-format-rope_parameters", "worse"))),
    MaskedBug("mixtral-router-softmax-before-topk", "mixtral",
              Edit("models/mixtral.py",
                   "scores = mx.take_along_axis(gates, inds, axis=-1)\n"
                   "        scores = mx.softmax(scores, axis=-1, precise=True)",
                   "scores = mx.take_along_axis(mx.softmax(gates, axis=-1, precise=True), "
                   "inds, axis=-1)"),
              (("default", "new"), ("rope-llama3", "worse"))),
    MaskedBug("cohere-logit-scale-dropped", "cohere",
              Edit("models/cohere.py", "out = out * self.model.args.logit_scale", "out = out"),
              (("default", "new"), ("config-format-rope_parameters", "worse"))),
    MaskedBug("phi3-gate-up-halves-swapped", "phi3",
              Edit("models/phi3.py", "gate, x = mx.split(x, 2, axis=-1)",
                   "x, gate = mx.split(x, 2, axis=-1)"),
              (("default", "new"), ("rope-longrope", "worse"))),
    MaskedBug("granite-residual-multiplier-dropped-after-mlp", "granite",
              Edit("models/granite.py", "out = h + r * self.residual_multiplier", "out = h + r"),
              # transformers' default residual_multiplier is 1.0: only the config check's
              # perturbation of it reaches the bug
              (("default", "new"),), check="config"),
)
TREE_B = (
    MaskedBug("starcoder2-final-norm-eps-hardcoded", "starcoder2",
              Edit("models/starcoder2.py",
                   "self.norm = nn.LayerNorm(args.hidden_size, eps=args.norm_epsilon)",
                   "self.norm = nn.LayerNorm(args.hidden_size, eps=1e-5)"),
              (("eps", "worse"),)),  # the eps variant already fails at layers.0's MLP
    MaskedBug("mixtral-final-norm-eps-hardcoded", "mixtral",
              Edit("models/mixtral.py",
                   "self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)",
                   "self.norm = nn.RMSNorm(args.hidden_size, eps=1e-5)"),
              (("eps", "new"),)),
    MaskedBug("cohere2-sliding-pattern-off-by-one", "cohere2",
              Edit("models/cohere2.py",
                   "self.use_sliding_window = (layer_idx + 1) % args.sliding_window_pattern != 0",
                   "self.use_sliding_window = layer_idx % args.sliding_window_pattern != 0"),
              (("default", "new"),)),
)


def layer_rows(results: dict[str, Any], model_type: str,
               check: str = "layers") -> dict[str, dict[str, Any]]:
    return {row["variant"]: row for row in results["differential"]
            if row["model_type"] == model_type and row["check"] == check}


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_mlx_lm(tmp_path_factory.mktemp("base"), [])


def run_tree(tmp_path: Path, base: Path, bugs: tuple[MaskedBug, ...], cache: Path) -> Any:
    tree = copy_mlx_lm(tmp_path / "pr", [bug.edit for bug in bugs])
    return run_cli(["check", *TYPES, "--checks", "layers,config", "--variants", VARIANTS,
                    "--mlx-lm", str(tree), "--base", str(base)], cache, tmp_path / "r.json")


@pytest.mark.parametrize("bugs", [TREE_A, TREE_B], ids=["tree-a", "tree-b"])
def test_bugs_under_released_findings_are_new_or_worse(tmp_path: Path, base_tree: Path,
                                                       cache_dir: Path,
                                                       bugs: tuple[MaskedBug, ...]) -> None:
    run = run_tree(tmp_path, base_tree, bugs, cache_dir)
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.results is not None and run.results["schema_version"] >= 3
    for bug in bugs:
        rows = layer_rows(run.results, bug.model_type, bug.check)
        for variant, change in bug.expect:
            row = rows[variant]
            assert row["change"] == change, (bug.name, variant, row)
            if bug.check == "layers":
                assert row["first_changed_stage"] is not None, (bug.name, row)
    # The released findings alone read "unchanged": the architectures this tree leaves
    # alone carry findings on both trees, and compute bit for bit what base computes.
    untouched = [row for row in run.results["differential"]
                 if row["model_type"] not in {bug.model_type for bug in bugs}]
    assert [row for row in untouched if row["verdict"] == "fail"], "no released finding here"
    for row in untouched:
        assert row["change"] == "unchanged", row
        assert row["first_changed_stage"] is None, row
        assert all(stage["changed_rel_l2"] == 0.0 for stage in row["stages"]), row


def test_base_as_a_git_ref(tmp_path: Path, cache_dir: Path) -> None:
    """--base REF inside an mlx-lm checkout: the ref's mlx_lm is the base tree."""
    import subprocess

    repo = copy_mlx_lm(tmp_path / "repo", [])
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "base"], check=True)
    llama = repo / "mlx_lm" / "models" / "llama.py"
    llama.write_text(llama.read_text().replace("self.scale = head_dim**-0.5",
                                               "self.scale = head_dim**-0.5 * 1.01"))
    run = run_cli(["check", "llama", "--checks", "layers", "--variants", "default",
                   "--mlx-lm", str(repo), "--base", "main"], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "base tree: mlx_lm at main" in run.stderr
    assert layer_rows(run.results, "llama")["default"]["change"] == "new"
    bad = run_cli(["check", "llama", "--checks", "layers", "--mlx-lm", str(repo),
                   "--base", "no-such-ref"], cache_dir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("mlx-verify: error: --base no-such-ref")


def test_a_fix_under_a_released_finding_reads_fixed_and_better(tmp_path: Path,
                                                               cache_dir: Path) -> None:
    """The reverse of a bug: the base has it, the PR removes it. Where a larger released
    finding covers the same stage (llama's rope_parameters variant), MLX(PR) leaves base's
    error direction as much as an added bug would; the row the PR fixes outright tells
    which it is."""
    bug = Edit("models/llama.py", "self.scale = head_dim**-0.5",
               "self.scale = head_dim**-0.5 * 1.01")
    base = copy_mlx_lm(tmp_path / "base", [bug])
    pr = copy_mlx_lm(tmp_path / "pr", [])
    run = run_cli(["check", "llama", "--checks", "layers",
                   "--variants", "default,config-format-rope_parameters",
                   "--mlx-lm", str(pr), "--base", str(base)], cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = layer_rows(run.results, "llama")
    assert rows["default"]["change"] == "fixed"
    masked = rows["config-format-rope_parameters"]
    assert masked["verdict"] == masked["base_verdict"] == "fail"
    assert masked["change"] == "better", masked
    assert any("read as the fix of layers / default" in fact for fact in masked["facts"])


def test_a_real_config_exits_on_its_own_findings_not_on_latent_ones(tmp_path: Path,
                                                                    cache_dir: Path) -> None:
    """On a real config, a latent finding (the rope_parameters form of the same config,
    which released llama.py does not read) is listed with its reach and exits 0;
    --fail-on any makes it count."""
    config = Path(__file__).parent / "fixtures" / "configs" / "llama-3.1-8b-instruct.json"
    args = ["check", "llama", "--config", str(config), "--checks", "layers",
            "--variants", "default,config-format-rope_parameters"]
    run = run_cli(args, cache_dir, tmp_path / "r.json")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {c["variant"]: c for c in run.report("llama")["checks"]}
    assert rows["default"]["verdict"] == "pass" and rows["default"]["reach"] == "config"
    latent = rows["config-format-rope_parameters"]
    assert latent["verdict"] == "fail" and latent["reach"] == "latent"
    plain = run_cli(args, cache_dir)
    assert "your config: 0 finding(s); latent (variants and keys this config does not use): 1" \
        in plain.stdout, plain.stdout
    strict = run_cli([*args, "--fail-on", "any"], cache_dir)
    assert strict.returncode == 1


def test_one_cause_across_architectures_is_reported_once(tmp_path: Path,
                                                         cache_dir: Path) -> None:
    """transformers 5's rope_parameters, unread by four released ports: one systemic
    cause with its list, not four latent findings; each type's own finding stays."""
    run = run_cli(["check", "llama", "mistral", "qwen2", "starcoder2", "--checks", "layers",
                   "--variants", "default,config-format-rope_parameters"], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1
    for model_type in ("llama", "mistral", "qwen2", "starcoder2"):
        rows = {c["variant"]: c for c in run.report(model_type)["checks"]}
        assert rows["config-format-rope_parameters"]["reach"] == "systemic"
        assert rows["config-format-rope_parameters"]["details"]["systemic_with"] == [
            "llama", "mistral", "qwen2", "starcoder2"]
    assert run.report("starcoder2")["checks"][0]["reach"] == "config"  # its GELU finding
    plain = run_cli(["report", str(tmp_path / "r.json")], cache_dir)
    lines = plain.stdout.splitlines()
    assert ("systemic: layers on variant config-format-rope_parameters fails in 4 "
            "model_types: llama, mistral, qwen2, starcoder2") in lines
    assert not [line for line in lines if "[systemic]" in line]  # not once per type
    assert [line for line in lines if line.startswith("✗ starcoder2 layers  default config")]


def test_bugs_behind_a_load_finding_and_behind_a_crash(tmp_path: Path, base_tree: Path,
                                                       cache_dir: Path) -> None:
    """gpt2's released load finding (transformers' checkpoint names) and gemma2's batch
    generation crash stay unchanged; the bugs behind them are new: gpt2's MLP measured on
    the checkpoint mlx-lm does load, gemma2's dropped final softcap in the generation
    rows that still run beside the crash."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/gpt2.py", "return self.c_proj(nn.gelu_approx(self.c_fc(x)))",
             "return self.c_proj(nn.gelu(self.c_fc(x)))"),
        Edit("models/gemma2.py",
             "        out = mx.tanh(out / self.final_logit_softcapping)\n"
             "        out = out * self.final_logit_softcapping\n", ""),
    ])
    run = run_cli(["check", "gpt2", "gemma2", "--checks", "layers,generation",
                   "--variants", "default", "--mlx-lm", str(tree), "--base", str(base_tree)],
                  cache_dir, tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    rows = [r for r in run.results["differential"] if r["model_type"] == "gpt2"
            and r["check"] == "layers"]
    load = [r for r in rows if r["verdict"] == "fail" and not r["stages"]]
    behind = [r for r in rows if r["stages"]]
    assert load and all(r["change"] == "unchanged" for r in load), rows
    assert behind and behind[0]["change"] == "new", rows
    assert behind[0]["first_changed_stage"] == "layers.0"
    gen = {r["part"]: r for r in run.results["differential"]
           if r["model_type"] == "gemma2" and r["check"] == "generation"}
    assert gen["batch"]["verdict"] == gen["batch"]["base_verdict"] == "fail"
    assert gen["batch"]["change"] == "unchanged", gen["batch"]
    assert gen["kv-cache"]["change"] == "new", gen["kv-cache"]


def test_a_precision_loss_within_tolerance_is_worse(tmp_path: Path, base_tree: Path,
                                                    cache_dir: Path) -> None:
    """The float32 cast dropped from the gated delta net's decay (qwen3_next's linear
    attention) costs a quarter of the float16 budget and still passes: alone, nothing
    fails; against base the float16 row reads worse."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/gated_delta.py",
             "return mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))",
             "return mx.exp(-mx.exp(A_log) * nn.softplus(a + dt_bias))")])
    run = run_cli(["check", "qwen3_next", "--checks", "dtype", "--variants", "default",
                   "--mlx-lm", str(tree), "--base", str(base_tree)], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    rows = {r["part"]: r for r in run.results["differential"] if r["check"] == "dtype"}
    half = rows["float16"]
    assert half["change"] in ("worse", "new"), half
    assert half["distance"] > half["base_distance"]
    # Since the synthesis recipe of 2026-12-04 (SYNTH_VERSION 2) the loss can cross the
    # float16 bound on this checkpoint; the within-tolerance rule is judged where both pass.
    if half["verdict"] == half["base_verdict"] == "pass":
        assert half["change"] == "worse" and half["basis"] == "distance within tolerance"


def test_a_forward_that_now_raises_under_a_released_finding_is_worse(
        tmp_path: Path, base_tree: Path, cache_dir: Path) -> None:
    """starcoder2's default row already fails on base (exact vs tanh GELU, measured at
    layers.0's MLP). A PR whose MLP raises NameError fails the same row as a crash, with
    no distance to compare: the measurement base had is lost, so the row reads worse."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/starcoder2.py", "return self.c_proj(nn.gelu(self.c_fc(x)))",
             "return self.c_proj(nn.gelu(self.c_fc(x)) * mlp_output_scale)")])
    run = run_cli(["check", "starcoder2", "--checks", "layers", "--variants", "default",
                   "--mlx-lm", str(tree), "--base", str(base_tree)], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    row = layer_rows(run.results, "starcoder2")["default"]
    assert row["verdict"] == row["base_verdict"] == "fail", row
    assert row["base_distance"] is None and row["distance"] is None, row  # no common metric
    assert row["change"] == "worse" and row["basis"] == "measurement", row
    assert any("NameError" in fact and "max_rel_l2" in fact for fact in row["facts"]), row
    [base_row] = [c for c in run.results["base_reports"][0]["checks"]
                  if c["check"] == "layers"]
    assert base_row["metrics"]["max_rel_l2"] > base_row["metrics"]["tolerance_rel_l2"]
    assert "NameError" in run.layers_check("starcoder2")["summary"]


def test_a_router_bias_dropped_from_expert_selection_is_flagged(
        tmp_path: Path, base_tree: Path, cache_dir: Path) -> None:
    """deepseek_v3's router adds e_score_correction_bias, a buffer transformers initialises
    to zeros, to the scores it selects experts by. Synthesized checkpoints give zero
    persistent buffers seeded noise (synth.zero_persistent_buffers, SYNTH_VERSION 3), so a
    port that drops it selects other experts; at zero the two functions were the same."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/deepseek_v3.py", "    scores = scores + e_score_correction_bias\n", "")])
    run = run_cli(["check", "deepseek_v3", "--checks", "layers", "--variants", "default",
                   "--mlx-lm", str(tree), "--base", str(base_tree)], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    row = layer_rows(run.results, "deepseek_v3")["default"]
    assert row["change"] in ("new", "worse"), row
    assert row["first_changed_stage"] is not None, row
    # base's row: the released port reads the bias (whatever else it already fails)
    [base_row] = [c for c in run.results["base_reports"][0]["checks"] if c["check"] == "layers"]
    assert row["distance"] > base_row["metrics"]["max_rel_l2"], (row, base_row["summary"])


def test_a_fused_qkv_split_sized_by_the_query_heads_shows_on_the_kv_heads_variant(
        tmp_path: Path, base_tree: Path, cache_dir: Path) -> None:
    """transformers' phi3 default has as many KV heads as query heads, where a qkv split
    sized with num_attention_heads for k and v computes the same function: the default row
    cannot see it. The kv-heads variant (num_key_value_heads 2 of 4 heads) can; released
    phi3 passes it."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/phi3.py",
             "qkv, [query_pos, query_pos + self.n_kv_heads * self.head_dim], axis=-1",
             "qkv, [query_pos, query_pos + self.n_heads * self.head_dim], axis=-1")])
    run = run_cli(["check", "phi3", "--checks", "layers", "--variants", "default,kv-heads",
                   "--mlx-lm", str(tree), "--base", str(base_tree)], cache_dir,
                  tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    rows = layer_rows(run.results, "phi3")
    assert rows["kv-heads"]["base_verdict"] == "pass", rows["kv-heads"]
    assert rows["kv-heads"]["change"] in ("new", "worse"), rows["kv-heads"]
    assert rows["default"]["change"] == "unchanged", rows["default"]
    [variant] = [v for v in run.report("phi3")["variants"] if v["name"] == "kv-heads"]
    assert variant["config"]["num_key_value_heads"] == 2
    assert variant["config"]["num_attention_heads"] == 4


HALF_CRASH = Edit("models/llama.py", "        out = self.model(inputs, cache, input_embeddings)\n",
                  "        out = self.model(inputs, cache, input_embeddings)\n"
                  "        if out.dtype == mx.float16:\n"
                  "            raise TypeError('float16 is not supported')\n")
LOGITS_UPCAST = Edit("models/llama.py", "            out = self.lm_head(out)\n",
                     "            out = self.lm_head(out.astype(mx.float32))\n")
HEAD_BIAS = Edit("models/llama.py",
                 "self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)",
                 "self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)")


def test_a_check_given_whole_on_one_tree_and_in_parts_on_the_other(tmp_path: Path,
                                                                     cache_dir: Path) -> None:
    """The dtype check gives a row per half precision; when it raises (llama raising in
    float16) it gives one row with no part. The trees are compared across that: a crash
    reads new against base's passing parts (none of them "gone"), a fixed crash reads
    fixed, a fixed crash that leaves a released disagreement (the float32 head) is no new
    finding, and a PR whose model no longer loads does not fix that disagreement."""
    trees = {name: copy_mlx_lm(tmp_path / name, edits) for name, edits in {
        "clean": [], "crash": [HALF_CRASH], "upcast": [LOGITS_UPCAST],
        "crash-upcast": [HALF_CRASH, LOGITS_UPCAST],
        "upcast-unloadable": [LOGITS_UPCAST, HEAD_BIAS]}.items()}

    def dtype_rows(pr: str, base: str) -> list[dict[str, Any]]:
        run = run_cli(["check", "llama", "--checks", "dtype", "--variants", "default",
                       "--mlx-lm", str(trees[pr]), "--base", str(trees[base])], cache_dir,
                      tmp_path / f"{pr}-{base}.json")
        assert run.returncode in (0, 1) and run.results is not None, run.stderr[-2000:]
        return [r for r in run.results["differential"] if r["check"] == "dtype"]

    (crashed,) = dtype_rows("crash", "clean")
    assert (crashed["part"], crashed["verdict"], crashed["change"]) == (None, "fail", "new")
    assert crashed["facts"][0].startswith("base gave this check as 2 rows (bfloat16 pass, "
                                          "float16 pass), the PR as one"), crashed
    fixed = dtype_rows("clean", "crash")
    assert {(r["part"], r["change"]) for r in fixed} == {("bfloat16", "fixed"),
                                                          ("float16", "fixed")}, fixed
    assert all(r["facts"][0].startswith("base gave this check as one row (fail:")
               for r in fixed), fixed
    still = dtype_rows("upcast", "crash-upcast")
    assert {(r["part"], r["verdict"], r["change"]) for r in still} == {
        ("bfloat16", "fail", "unchanged"), ("float16", "fail", "unchanged")}, still
    (hidden,) = dtype_rows("upcast-unloadable", "upcast")
    assert (hidden["verdict"], hidden["base_verdict"], hidden["change"], hidden["basis"]) \
        == ("skip", "fail", "worse", "measurement"), hidden
