"""Branches the default tiny checkpoint never takes, reached (issue 10): two real mlx-lm
bugs (bench/bench_real_bugs.py ids) put back into a copy of the installed mlx_lm.

- deepseek_v32-indexer-rope-interleaved (fix 2ed22318): the sparse-attention indexer acts
  only when the keys exceed index_topk (2048, kept by the shrink); the `index-topk`
  variant (checks/variants.py) sets 16, below the 48-token prompt.
- qwen3_5-norm-shift-on-mtp (fix 4eeaf209): real Qwen3.5 checkpoints carry `mtp.*`
  tensors that transformers' model has none of; the weights check adds them
  (checks/weights.py `mtp_tensors`), also to a converted checkpoint that kept them.

Each bug: the clean copy passes the row, the bugged copy fails it; with the clean copy as
`--base` the row reads `new`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Edit, copy_mlx_lm, run_cli

INDEXER_INTERLEAVED = Edit("models/deepseek_v32.py",
                           "            traditional=args.indexer_rope_interleave,\n",
                           "            traditional=True,\n")
MTP_NORM_SHIFT = (
    Edit("models/qwen3_5.py", "        has_unsanitized_conv1d = any(\n",
         '        has_mtp_weights = any("mtp." in k for k in weights)\n'
         "        has_unsanitized_conv1d = any(\n"),
    Edit("models/qwen3_5.py",
         "            if has_unsanitized_conv1d and any(k.endswith(sfx) for sfx in norm_keys):\n",
         "            if (has_mtp_weights or has_unsanitized_conv1d) and any(\n"
         "                k.endswith(sfx) for sfx in norm_keys\n"
         "            ):\n"),
)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_mlx_lm(tmp_path_factory.mktemp("clean"), [])


def rows(run, check: str) -> dict[tuple[str, str], dict]:
    assert run.results is not None, run.stderr[-2000:]
    return {(report["model_type"], row["variant"]): row for report in run.results["reports"]
            for row in report["checks"] if row["check"] == check}


def test_indexer_selection_is_reached(tmp_path: Path, clean_tree: Path, cache_dir: Path) -> None:
    args = ["check", "deepseek_v32", "glm_moe_dsa", "--checks", "layers",
            "--variants", "default,index-topk"]
    clean = run_cli([*args, "--mlx-lm", str(clean_tree)], cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    for (model_type, variant), row in rows(clean, "layers").items():
        assert row["verdict"] == "pass", (model_type, variant, row["summary"])
        assert row["reach"] == "config", (model_type, variant)
    variant = next(v for v in clean.report("deepseek_v32")["variants"] if v["name"] == "index-topk")
    assert variant["config"]["index_topk"] == 16 and variant["config"]["index_n_heads"] == 8

    tree = copy_mlx_lm(tmp_path / "pr", [INDEXER_INTERLEAVED])
    bugged = run_cli([*args, "--mlx-lm", str(tree), "--base", str(clean_tree)], cache_dir,
                     tmp_path / "bugged.json")
    assert bugged.returncode == 1, bugged.stderr[-2000:]
    found = rows(bugged, "layers")
    # the default checkpoint never selects: the bug computes what the fix computes there
    assert found[("deepseek_v32", "default")]["verdict"] == "pass"
    row = found[("deepseek_v32", "index-topk")]
    assert row["verdict"] == "fail" and row["reach"] == "config", row["summary"]
    assert row["first_divergent_layer"] == "layers.0"
    assert row["localization"]["module"] == "model.layers.0.self_attn"
    # glm_moe_dsa's indexer is interleaved in transformers too (its ModelArgs default True)
    assert found[("glm_moe_dsa", "index-topk")]["verdict"] == "pass"
    changes = {(d["model_type"], d["variant"]): d["change"]
               for d in bugged.results["differential"] if d["check"] == "layers"}
    assert changes[("deepseek_v32", "index-topk")] == "new"
    assert changes[("deepseek_v32", "default")] == "unchanged"


def test_mtp_tensors_of_real_checkpoints_are_loaded_as_released(tmp_path: Path, clean_tree: Path,
                                                                cache_dir: Path) -> None:
    args = ["check", "qwen3_5", "--checks", "weights", "--variants", "default"]
    clean = run_cli([*args, "--mlx-lm", str(clean_tree)], cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    row = rows(clean, "weights")[("qwen3_5", "default")]
    assert row["verdict"] == "pass", row["summary"]
    assert row["metrics"]["mtp_sanitize_ok"] is True
    assert "mtp.fc.weight" in row["details"]["mtp"]

    tree = copy_mlx_lm(tmp_path / "pr", list(MTP_NORM_SHIFT))
    bugged = run_cli([*args, "--mlx-lm", str(tree), "--base", str(clean_tree)], cache_dir,
                     tmp_path / "bugged.json")
    assert bugged.returncode == 1, bugged.stderr[-2000:]
    row = rows(bugged, "weights")[("qwen3_5", "default")]
    assert row["verdict"] == "fail" and row["reach"] == "config", row["summary"]
    problems = row["details"]["problems"]
    # as released the shift is right (the HF conv1d layout says so); converted, it is twice
    assert not [p for p in problems if "of a released checkpoint" in p], problems
    assert any("kept in a converted checkpoint" in p and "input_layernorm.weight: values change"
               in p for p in problems), problems
    changes = {(d["model_type"], d["check"], d["variant"]): d["change"]
               for d in bugged.results["differential"]}
    assert changes[("qwen3_5", "weights", "default")] == "new"


def test_mtp_tensors_follow_the_config() -> None:
    """Names and shapes of the added tensors: the real checkpoints' names, the tiny sizes."""
    import mlx.core as mx

    from mlx_verify.checks.weights import mtp_tensors

    hidden, vocab = 64, 512
    layer = {"model.layers.0.self_attn.q_proj.weight": mx.zeros((hidden, hidden)),
             "model.layers.1.self_attn.q_proj.weight": mx.zeros((hidden, hidden))}
    qwen = {"model_type": "qwen3_5", "text_config": {
        "hidden_size": hidden, "vocab_size": vocab, "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"]}}
    extra, _ = mtp_tensors(qwen, layer, seed=0)
    assert {k: tuple(v.shape) for k, v in extra.items()} == {
        "mtp.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "mtp.fc.weight": (hidden, 2 * hidden), "mtp.norm.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,), "mtp.pre_fc_norm_embedding.weight": (hidden,)}
    deepseek = {"model_type": "deepseek_v32", "hidden_size": hidden, "vocab_size": vocab,
                "num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    extra, _ = mtp_tensors(deepseek, layer, seed=0)
    assert {k: tuple(v.shape) for k, v in extra.items()} == {
        "model.layers.2.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.2.enorm.weight": (hidden,), "model.layers.2.hnorm.weight": (hidden,),
        "model.layers.2.eh_proj.weight": (hidden, 2 * hidden),
        "model.layers.2.embed_tokens.weight": (vocab, hidden),
        "model.layers.2.shared_head.norm.weight": (hidden,),
        "model.layers.2.shared_head.head.weight": (vocab, hidden)}
    # the config's own layer count: two MTP layers, two copies
    extra, _ = mtp_tensors({**deepseek, "num_nextn_predict_layers": 2}, layer, seed=0)
    assert {k.split(".")[2] for k in extra} == {"2", "3"}
    extra, _ = mtp_tensors({**qwen, "text_config": {**qwen["text_config"],
                                                    "mtp_num_hidden_layers": 2}}, layer, seed=0)
    assert {k for k in extra if k.startswith("mtp.layers.")} == {
        "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.1.self_attn.q_proj.weight"}
    assert mtp_tensors({**deepseek, "num_nextn_predict_layers": 0}, layer, seed=0)[0] == {}
    assert mtp_tensors({**deepseek, "model_type": "llama"}, layer, seed=0)[0] == {}


def test_sanitize_raising_on_mtp_tensors_is_a_row_naming_mlx_lm(tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    """A sanitize that raises on the added tensors is mlx-lm's failure on a real
    checkpoint: the weights row fails and says so, never a pass or a skip."""
    raising = Edit("models/qwen3_5.py",
                   '        weights = {k: v for k, v in weights.items() if "mtp." not in k}\n',
                   '        weights = {k: v for k, v in weights.items()\n'
                   '                   if "mtp." not in k or weights["mtp.fc.bias"]}\n')
    tree = copy_mlx_lm(tmp_path / "pr", [raising])
    run = run_cli(["check", "qwen3_5", "--checks", "weights", "--variants", "default",
                   "--mlx-lm", str(tree)], cache_dir, tmp_path / "r.json")
    assert run.returncode == 1, run.stderr[-2000:]
    row = rows(run, "weights")[("qwen3_5", "default")]
    assert row["verdict"] == "fail" and row["details"]["side"] == "mlx-lm", row["summary"]
    assert "sanitize raises KeyError" in row["summary"], row["summary"]


def test_a_port_without_sanitize_is_held_to_the_mtp_tensors_too(tmp_path: Path) -> None:
    """No sanitize: the MTP tensors reach the strict load as they are, a problem the row
    names (never the pass summary's "sanitize gives the same weights")."""
    tree = copy_mlx_lm(tmp_path / "pr", [
        Edit("models/qwen3_5.py", "    def sanitize(self, weights):\n        sanitized = {}\n",
             "    def unused(self, weights):\n        sanitized = {}\n"),
        Edit("models/qwen3_5.py", "    def sanitize(self, weights):\n        has_unsanitized",
             "    def unused(self, weights):\n        has_unsanitized")])
    script = f"""
from mlx_verify.checks import engine, mlx_side, synth, weights
mlx_side.use_mlx_lm({str(tree)!r})
config = engine.make_variants(synth.default_config("qwen3_5"), from_file=False)[0].config
from pathlib import Path
checkpoint = synth.write_checkpoint(config, 0, root=Path({str(tmp_path)!r}))
problems, facts = weights.mtp_problems(config, weights._checkpoint_tensors(checkpoint), 0)
assert not hasattr(weights._fresh_model(config), "sanitize")
print(repr(problems))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    problems = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert ("with the MTP tensors of a released checkpoint: mtp.fc.weight kept, and the "
            "model has no such parameter: the strict load fails") in problems, problems


CONV1D_SANITIZE_AGAIN = Edit(  # recurrent_gemma before 620c8dbf: converted weights moved again
    "models/recurrent_gemma.py",
    '            if "conv_1d.weight" in k and v.shape[-1] != 1:\n',
    '            if "conv_1d.weight" in k and v.ndim == 3:\n')


def test_a_variant_that_loads_stands_in_for_a_default_that_does_not(
        tmp_path: Path, clean_tree: Path, cache_dir: Path) -> None:
    """recurrent_gemma hard-codes one KV head; transformers' default has as many as query
    heads, so the default checkpoint does not load and its checks measured nothing. The
    multi-query variant (one KV head, as RecurrentGemma's checkpoints) loads and runs the
    default's checks too, saying so: sanitize's idempotence is measured again, and a PR
    that breaks it reads new there."""
    args = ["check", "recurrent_gemma", "--checks", "layers,weights"]
    clean = run_cli([*args, "--mlx-lm", str(clean_tree)], cache_dir, tmp_path / "clean.json")
    assert clean.returncode == 1, clean.stderr[-2000:]  # the released load finding
    found = rows(clean, "layers")
    assert found[("recurrent_gemma", "default")]["verdict"] == "fail"
    assert found[("recurrent_gemma", "multi-query")]["verdict"] == "pass"
    variant = next(v for v in clean.report("recurrent_gemma")["variants"]
                   if v["name"] == "multi-query")
    assert variant["config"]["num_key_value_heads"] == 1
    weights = rows(clean, "weights")
    assert weights[("recurrent_gemma", "default")]["verdict"] == "skip"
    stand_in = weights[("recurrent_gemma", "multi-query")]
    assert stand_in["verdict"] == "pass" and stand_in["details"]["stands_in_for"] == "default"
    assert stand_in["summary"].startswith("on multi-query, standing in for the default "
                                          "variant (mlx-lm does not load its weights strictly)")
    assert stand_in["reach"] == "latent"

    tree = copy_mlx_lm(tmp_path / "pr", [CONV1D_SANITIZE_AGAIN])
    bugged = run_cli([*args, "--mlx-lm", str(tree), "--base", str(clean_tree)], cache_dir,
                     tmp_path / "bugged.json")
    assert bugged.returncode == 1, bugged.stderr[-2000:]
    row = rows(bugged, "weights")[("recurrent_gemma", "multi-query")]
    assert row["verdict"] == "fail" and "sanitize is not idempotent" in row["summary"], row
    changes = {(d["check"], d["variant"]): d["change"] for d in bugged.results["differential"]}
    assert changes[("weights", "multi-query")] == "new"
    assert changes[("layers", "default")] == "unchanged"
