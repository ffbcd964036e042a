"""The tied-embeddings variant's inputs. Where transformers' default is untied, the tied
variant is the only place a tied head runs, so:
- the weights check runs there too: a tied checkpoint that also stores lm_head.weight
  (other exporters write one) must load strictly and give transformers' logits;
- the scales at the two ends of the tied matrix that sit at 1.0 in transformers' default
  (embedding_multiplier, lm_head_multiplier, logits_scaling) get distinct other values,
  so a tied head that drops one, or their ratio, computes other logits.

Each real bug (mlx-lm's fix history) is injected into a copy of the installed mlx-lm: the
clean tree passes the row and the bugged tree fails it, on the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import CliRun, Edit, copy_mlx_lm, run_cli

# granite before d39cfec1: no sanitize, so a tied checkpoint with lm_head.weight fails
GRANITE_TIED_LM_HEAD_KEPT = Edit(
    "models/granite.py",
    "    def sanitize(self, weights):\n"
    "        if self.args.tie_word_embeddings:\n"
    '            weights.pop("lm_head.weight", None)\n'
    "        return weights\n",
    "",
)
# falcon_h1 before c27c94a0: the tied head without the muP lm_head / embedding ratio
FALCON_H1_TIED_SCALE_DROPPED = Edit(
    "models/falcon_h1.py",
    "            return out * (self.args.lm_head_multiplier / self.args.embedding_multiplier)\n",
    "            return out\n",
)


def row(run: CliRun, model_type: str, check: str, variant: str) -> dict[str, Any]:
    found = [c for c in run.report(model_type)["checks"]
             if c["check"] == check and c["variant"] == variant]
    assert len(found) == 1, f"{model_type}: {len(found)} {check} rows on {variant}; " \
                            f"stderr: {run.stderr[-1500:]}"
    return found[0]


def check_tied(model_type: str, checks: str, cache_dir: Path, out: Path,
               tree: Path | None = None) -> CliRun:
    args = ["check", model_type, "--checks", checks, "--variants", "default,tied-embeddings"]
    if tree is not None:
        args += ["--mlx-lm", str(tree)]
    return run_cli(args, cache_dir, out)


@pytest.mark.parametrize("model_type, scales", [
    ("falcon_h1", {"lm_head_multiplier", "embedding_multiplier"}),
    ("granite", {"embedding_multiplier", "logits_scaling"}),
])
def test_tied_variant_sets_the_head_scales_apart(model_type: str, scales: set[str]) -> None:
    from mlx_verify.checks import engine, synth

    found = {v.name: v for v in engine.all_variants(model_type, synth.default_config(model_type),
                                                    from_file=False)}
    default, tied = found["default"].config, found["tied-embeddings"].config
    assert default["tie_word_embeddings"] is False and tied["tie_word_embeddings"] is True
    assert all(default[key] == 1.0 for key in scales)
    values = [tied[key] for key in sorted(scales)]
    assert 1.0 not in values and len(set(values)) == len(values)
    # only the head and embedding scales: the ones inside the layers stay the default's
    assert {k for k in tied if tied[k] != default.get(k)} == scales | {"tie_word_embeddings"}


@pytest.fixture(scope="module")
def granite_runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[CliRun, CliRun]:
    work = tmp_path_factory.mktemp("granite-tied")
    clean = check_tied("granite", "weights", cache_dir, work / "clean.json")
    tree = copy_mlx_lm(work / "bugged", [GRANITE_TIED_LM_HEAD_KEPT])
    return clean, check_tied("granite", "weights", cache_dir, work / "bugged.json", tree)


def test_clean_granite_loads_a_tied_checkpoint_with_lm_head(granite_runs: tuple[CliRun, CliRun]
                                                            ) -> None:
    clean, _ = granite_runs
    assert clean.returncode == 0, clean.stderr[-2000:]
    tied = row(clean, "granite", "weights", "tied-embeddings")
    assert tied["verdict"] == "pass", tied["summary"]
    assert tied["metrics"]["tied_with_lm_head_present_rel_l2"] <= 1e-5
    # the checkpoint measured did carry lm_head.weight, a copy of the input embedding
    assert tied["details"]["tying_lm_head_from"] == "model.embed_tokens.weight", tied


def test_granite_without_sanitize_fails_on_the_tied_variant_only(
        granite_runs: tuple[CliRun, CliRun]) -> None:
    _, bugged = granite_runs
    assert bugged.returncode == 1, bugged.stderr[-2000:]
    # granite's default is untied: the default variant's weights row cannot see it
    assert row(bugged, "granite", "weights", "default")["verdict"] == "pass"
    tied = row(bugged, "granite", "weights", "tied-embeddings")
    assert tied["verdict"] == "fail", tied["summary"]
    assert tied["reach"] == "latent" and tied["details"]["side"] == "mlx-lm"
    assert "lm_head.weight" in tied["summary"] and "transformers loads it" in tied["summary"]


@pytest.fixture(scope="module")
def falcon_runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[CliRun, CliRun]:
    work = tmp_path_factory.mktemp("falcon-tied")
    clean = check_tied("falcon_h1", "layers,weights", cache_dir, work / "clean.json")
    tree = copy_mlx_lm(work / "bugged", [FALCON_H1_TIED_SCALE_DROPPED])
    return clean, check_tied("falcon_h1", "layers", cache_dir, work / "bugged.json", tree)


def test_clean_falcon_h1_tied_head_matches_with_scales_apart(
        falcon_runs: tuple[CliRun, CliRun]) -> None:
    clean, _ = falcon_runs
    tied = row(clean, "falcon_h1", "layers", "tied-embeddings")
    assert tied["verdict"] == "pass", tied["summary"]
    assert tied["metrics"]["max_rel_l2"] <= 1e-5
    # measured with the two ends' scales apart, where a dropped ratio shows
    config = next(v["config"] for v in clean.report("falcon_h1")["variants"]
                  if v["name"] == "tied-embeddings")
    assert config["lm_head_multiplier"] != config["embedding_multiplier"], config


def test_released_falcon_h1_refuses_a_tied_checkpoint_with_lm_head(
        falcon_runs: tuple[CliRun, CliRun]) -> None:
    """A finding of the installed mlx-lm (docs/known-findings.md): falcon_h1's sanitize
    keeps lm_head.weight where the model is tied, and transformers loads that file."""
    clean, _ = falcon_runs
    assert clean.returncode == 1, clean.stderr[-2000:]
    tied = row(clean, "falcon_h1", "weights", "tied-embeddings")
    assert tied["verdict"] == "fail" and tied["details"]["side"] == "mlx-lm"
    assert "lm_head.weight" in tied["summary"] and tied["reach"] == "latent"


def test_falcon_h1_tied_head_without_the_scale_ratio_fails_at_the_logits(
        falcon_runs: tuple[CliRun, CliRun]) -> None:
    _, bugged = falcon_runs
    assert row(bugged, "falcon_h1", "layers", "default")["verdict"] == "pass"
    tied = row(bugged, "falcon_h1", "layers", "tied-embeddings")
    assert tied["verdict"] == "fail", tied["summary"]
    assert tied["reach"] == "latent" and tied["first_divergent_layer"] == "logits"
    # the dropped ratio lm_head_multiplier / embedding_multiplier is 4: logits off by 3/4
    assert tied["metrics"]["logits_rel_l2"] == pytest.approx(0.75, abs=1e-3)


def test_the_tied_head_copy_is_the_input_embedding_not_gemma4s_per_layer_one(
        cache_dir: Path, tmp_path: Path) -> None:
    """gemma4_text's per-layer embedding has as many rows as the vocabulary and another
    width: copied into lm_head.weight, transformers refuses the checkpoint (an error that
    measures nothing). The copy is the tensor of the head's shape, so the released
    finding is measured again: mlx-lm's strict load refuses lm_head.weight."""
    run = run_cli(["check", "gemma4_text", "--checks", "weights", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode == 1, run.stderr[-2000:]
    weights = row(run, "gemma4_text", "weights", "default")
    assert weights["verdict"] == "fail", weights["summary"]
    assert weights["summary"].endswith("MLX does not load strictly: lm_head.weight")
    assert weights["details"]["side"] == "mlx-lm"
