"""Bug injection: real mlx-lm model files with one realistic porting bug each.

Each bug is an exact string edit of a file of the installed mlx_lm, copied to a
temporary tree and checked with `--mlx-lm TREE`. The test asserts the engine finds
it (exit 1, verdict fail) and localizes it: the first divergent stage, the kind of
code (part) and the transformers module.

Bugs that edit different files share one tree and one CLI run (the imports dominate
its cost). `test_controls_pass_without_the_edits` runs the non-default variants used
here on the unedited mlx-lm; the default variant of every model here is covered by
tests/test_parity.py, so every failure below is caused by its edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliRun, Edit, copy_mlx_lm, installed_mlx_lm, run_cli
from tests.test_parity import CLEAN_MODEL_TYPES


@dataclass(frozen=True)
class InjectedBug:
    name: str
    model_type: str
    edits: tuple[Edit, ...]
    stage: str  # expected first_divergent_layer
    part: str | None  # expected localization.part (None for a weight-loading failure)
    module: str | None  # expected localization.module (transformers path)
    variant: str = "default"  # the tiny-checkpoint variant that exposes the bug
    missing: tuple[str, ...] = ()  # for stage "load": names expected in weights.missing
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()


def attention(layer: int = 0) -> dict[str, str]:
    return {"stage": f"layers.{layer}", "part": "attention",
            "module": f"model.layers.{layer}.self_attn"}


def mlp(layer: int = 0) -> dict[str, str]:
    return {"stage": f"layers.{layer}", "part": "mlp", "module": f"model.layers.{layer}.mlp"}


def ssm(layer: int = 0) -> dict[str, str]:
    return {"stage": f"layers.{layer}", "part": "ssm",
            "module": f"backbone.layers.{layer}.mixer"}


def norm(module: str, layer: int = 0) -> dict[str, str]:
    return {"stage": f"layers.{layer}", "part": "norm", "module": module}


LOGITS = {"stage": "logits", "part": "lm_head", "module": "lm_head"}
LOAD: dict[str, Any] = {"stage": "load", "part": None, "module": None}

BUGS: tuple[InjectedBug, ...] = (
    InjectedBug(
        "llama-rope-traditional-flipped", "llama",
        (Edit("models/llama.py", "            args.rope_traditional,\n",
              "            not args.rope_traditional,\n"),),
        **attention(),
    ),
    InjectedBug(
        "mistral-silu-replaced-by-gelu", "mistral",  # mistral runs mlx_lm/models/llama.py
        (Edit("models/llama.py",
              "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))",
              "return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))"),),
        **mlp(),
    ),
    InjectedBug(
        "mixtral-rope-theta-hardcoded", "mixtral",
        (Edit("models/mixtral.py", "base=args.rope_theta,", "base=10000.0,"),),
        **attention(),
    ),
    InjectedBug(
        "qwen2-attention-scale-from-hidden-size", "qwen2",
        (Edit("models/qwen2.py", "self.scale = head_dim**-0.5", "self.scale = dim**-0.5"),),
        **attention(),
    ),
    InjectedBug(
        "qwen2-o_proj-renamed", "qwen2",
        (Edit("models/qwen2.py", "self.o_proj = nn.Linear(", "self.out_proj = nn.Linear("),
         Edit("models/qwen2.py", "return self.o_proj(output)", "return self.out_proj(output)")),
        **LOAD,
        missing=("model.layers.0.self_attn.out_proj.weight",
                 "model.layers.1.self_attn.out_proj.weight"),
        unexpected=("model.layers.0.self_attn.o_proj.weight",
                    "model.layers.1.self_attn.o_proj.weight"),
    ),
    InjectedBug(
        "gemma2-query-pre-attn-scalar-ignored", "gemma2",
        (Edit("models/gemma2.py", "self.scale = 1.0 / (args.query_pre_attn_scalar**0.5)",
              "self.scale = 1.0 / (head_dim**0.5)"),),
        **attention(),
    ),
    InjectedBug(
        "gemma2-embedding-scale-dropped", "gemma2",
        (Edit("models/gemma2.py", "        h = h * (self.args.hidden_size**0.5)\n", ""),),
        stage="embeddings", part="embedding", module="model.embed_tokens",
    ),
    InjectedBug(
        "gemma2-final-logit-softcap-dropped", "gemma2",
        (Edit("models/gemma2.py",
              "        out = mx.tanh(out / self.final_logit_softcapping)\n"
              "        out = out * self.final_logit_softcapping\n", ""),),
        **LOGITS,
    ),
    InjectedBug(
        "gemma2-attention-softcap-dropped", "gemma2",
        (Edit("models/gemma2.py",
              "        scores = mx.tanh(scores / self.attn_logit_softcapping)\n"
              "        scores *= self.attn_logit_softcapping\n", ""),),
        **attention(),
    ),
    InjectedBug(
        "gemma3_text-norm-weight-without-one-plus", "gemma3_text",
        (Edit("models/gemma3_text.py", "return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)",
              "return mx.fast.rms_norm(x, self.weight, self.eps)"),),
        **norm("model.layers.0.input_layernorm"),
    ),
    InjectedBug(
        "gemma3_text-sliding-layers-get-global-rope-base", "gemma3_text",
        (Edit("models/gemma3_text.py", "base=args.rope_local_base_freq,",
              "base=args.rope_theta,"),),
        **attention(),
    ),
    InjectedBug(
        "gemma3_text-head-dim-from-config-ignored", "gemma3_text",
        (Edit("models/gemma3_text.py", "self.head_dim = head_dim = args.head_dim",
              "self.head_dim = head_dim = args.hidden_size // n_heads"),),
        **LOAD,
        mismatched=("model.layers.0.self_attn.q_proj.weight: checkpoint (128, 64) "
                    "vs model (64, 64)",),
    ),
    InjectedBug(
        "phi3-fused-gate-up-order-swapped", "phi3",
        (Edit("models/phi3.py", "gate, x = mx.split(x, 2, axis=-1)",
              "x, gate = mx.split(x, 2, axis=-1)"),),
        **mlp(),
    ),
    InjectedBug(
        "qwen3-gate-up-swapped", "qwen3",
        (Edit("models/qwen3.py", "swiglu(self.gate_proj(x), self.up_proj(x))",
              "swiglu(self.up_proj(x), self.gate_proj(x))"),),
        **mlp(),
    ),
    InjectedBug(
        "qwen3-qk-norm-after-rope", "qwen3",
        (Edit("models/qwen3.py",
              "        queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(\n"
              "            0, 2, 1, 3\n"
              "        )\n"
              "        keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(\n"
              "            0, 2, 1, 3\n"
              "        )\n",
              "        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)\n"
              "        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)\n"),
         Edit("models/qwen3.py",
              "            queries = self.rope(queries)\n"
              "            keys = self.rope(keys)\n",
              "            queries = self.q_norm(self.rope(queries))\n"
              "            keys = self.k_norm(self.rope(keys))\n")),
        **attention(),
    ),
    InjectedBug(
        "cohere-logit-scale-dropped", "cohere",
        (Edit("models/cohere.py", "out = out * self.model.args.logit_scale", "out = out"),),
        **LOGITS,
    ),
    InjectedBug(
        "mamba-D-skip-dropped", "mamba",
        (Edit("models/mamba.py", "y = y + D * x", "y = y"),),
        **ssm(),
    ),
    InjectedBug(
        "mamba-dt-softplus-dropped", "mamba",
        (Edit("models/mamba.py", "delta = nn.softplus(self.dt_proj(delta))",
              "delta = self.dt_proj(delta)"),),
        **ssm(),
    ),
    # Hard-coded norm eps: invisible at eps 1e-6 vs 1e-5 (activations dwarf eps); the
    # `eps` variant sets large, distinct epsilons so it shows.
    InjectedBug(
        "phi3-input-norm-eps-hardcoded", "phi3",
        (Edit("models/phi3.py",
              "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)",
              "self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=1e-6)"),),
        **norm("model.layers.0.input_layernorm"), variant="eps",
    ),
    InjectedBug(
        "olmo2-q-norm-eps-hardcoded", "olmo2",
        (Edit("models/olmo2.py",
              "self.q_norm = nn.RMSNorm(n_heads * head_dim, args.rms_norm_eps)",
              "self.q_norm = nn.RMSNorm(n_heads * head_dim, 1e-6)"),),
        **norm("model.layers.0.self_attn.q_norm"), variant="eps",
    ),
    # The `sliding-window` variant makes the window (16) shorter than the prompt (48).
    InjectedBug(
        "gemma3_text-sliding-window-off-by-one", "gemma3_text",
        (Edit("models/gemma3_text.py", "window_size=self.window_size,",
              "window_size=self.window_size + 1,"),),
        **attention(), variant="sliding-window",
    ),
    InjectedBug(
        "gemma3_text-local-global-masks-swapped", "gemma3_text",
        (Edit("models/gemma3_text.py", "mask = global_mask if is_global else sliding_window_mask",
              "mask = sliding_window_mask if is_global else global_mask"),),
        **attention(), variant="sliding-window",
    ),
    # transformers 5 names the MoE block `mlp`, mlx-lm `block_sparse_moe`: paired by
    # call order and shape, so the routing bugs localize to the MoE block
    InjectedBug(
        "mixtral-top-k-off-by-one", "mixtral",
        (Edit("models/mixtral.py", "k = self.num_experts_per_tok\n",
              "k = self.num_experts_per_tok - 1\n"),),
        stage="layers.0", part="moe", module="model.layers.0.mlp",
    ),
    InjectedBug(
        "mixtral-softmax-before-top-k-not-renormalized", "mixtral",
        (Edit("models/mixtral.py",
              "        scores = mx.take_along_axis(gates, inds, axis=-1)\n"
              "        scores = mx.softmax(scores, axis=-1, precise=True)\n",
              "        scores = mx.softmax(gates, axis=-1, precise=True)\n"
              "        scores = mx.take_along_axis(scores, inds, axis=-1)\n"),),
        stage="layers.0", part="moe", module="model.layers.0.mlp",
    ),
    # the MLP fed the attention output: its input already differs, so the blame climbs
    # to the layer's own code
    InjectedBug(
        "cohere-parallel-block-made-sequential", "cohere",
        (Edit("models/cohere.py", "ff_h = self.mlp(h)", "ff_h = self.mlp(h + attn_h)"),),
        stage="layers.0", part="residual", module="model.layers.0",
    ),
)


def plan_batches(bugs: tuple[InjectedBug, ...]) -> list[tuple[InjectedBug, ...]]:
    """Bugs grouped into CLI runs: one variant per run, no two bugs on the same file or
    the same model_type. First fit, in BUGS order."""
    batches: list[list[InjectedBug]] = []
    for bug in bugs:
        files = {e.file for e in bug.edits}
        for batch in batches:
            if (batch[0].variant == bug.variant
                    and all(b.model_type != bug.model_type for b in batch)
                    and not files & {e.file for b in batch for e in b.edits}):
                batch.append(bug)
                break
        else:
            batches.append([bug])
    return [tuple(batch) for batch in batches]


BATCHES = plan_batches(BUGS)


class BatchRunner:
    """Runs each batch once (on first use) and keeps its CliRun."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.runs: dict[int, CliRun] = {}

    def run_for(self, bug: InjectedBug) -> CliRun:
        index = next(i for i, batch in enumerate(BATCHES) if bug in batch)
        if index not in self.runs:
            batch = BATCHES[index]
            tree = copy_mlx_lm(self.root / f"batch{index}",
                               [edit for b in batch for edit in b.edits])
            self.runs[index] = run_cli(
                ["check", *(b.model_type for b in batch), "--mlx-lm", str(tree),
                 "--variants", batch[0].variant, "--checks", "layers"],
                self.cache_dir, tree / "results.json",
            )
        return self.runs[index]


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> BatchRunner:
    return BatchRunner(tmp_path_factory.mktemp("injected"), cache_dir)


def layers_check(run: CliRun, model_type: str, variant: str) -> dict[str, Any]:
    checks = [c for c in run.report(model_type)["checks"]
              if c["check"] == "layers" and c["variant"] == variant]
    assert len(checks) == 1, f"{model_type}/{variant}: {len(checks)} layers checks"
    return checks[0]


def test_bug_set_is_broad() -> None:
    assert len(BUGS) >= 10
    assert len({b.model_type for b in BUGS}) >= 6
    assert len({b.name for b in BUGS}) == len(BUGS)
    # the default variant of each model is shown clean by tests/test_parity.py
    assert {b.model_type for b in BUGS} <= set(CLEAN_MODEL_TYPES)


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_injected_bug_is_found_and_localized(batches: BatchRunner, bug: InjectedBug) -> None:
    run = batches.run_for(bug)
    assert run.returncode == 1, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
    check = layers_check(run, bug.model_type, bug.variant)
    assert check["verdict"] == "fail", check["summary"]
    assert run.report(bug.model_type)["verdict"] == "fail"
    assert check["first_divergent_layer"] == bug.stage, check["summary"]
    if bug.stage == "load":
        weights = check["weights"]
        assert set(bug.missing) <= set(weights["missing"]), weights
        assert set(bug.unexpected) <= set(weights["unexpected"]), weights
        assert set(bug.mismatched) <= set(weights["mismatched"]), weights
        return
    localization = check["localization"]
    assert localization["stage"] == bug.stage
    assert localization["part"] == bug.part, check["summary"]
    assert localization["module"] == bug.module, check["summary"]
    # the source lines: the MLX line calling the diverging code is in the edited file
    assert localization["mlx_call"]["path"] == "mlx_lm/" + bug.edits[0].file, localization
    assert localization["mlx_source"]["path"].startswith(("mlx_lm/", "mlx/")), localization
    assert localization["hf_source"]["path"].startswith("transformers/models/"), localization
    rows = check["layers"]
    divergent = next(r for r in rows if r["name"] == bug.stage)
    assert not divergent["ok"]
    assert all(r["ok"] for r in rows[: rows.index(divergent)])


NON_DEFAULT_VARIANTS = sorted({b.variant for b in BUGS} - {"default"})


@pytest.mark.parametrize("variant", NON_DEFAULT_VARIANTS)
def test_controls_pass_without_the_edits(cache_dir: Path, tmp_path: Path, variant: str) -> None:
    model_types = sorted({b.model_type for b in BUGS if b.variant == variant})
    run = run_cli(["check", *model_types, "--variants", variant, "--checks", "layers"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode == 0, run.stderr[-2000:]
    for model_type in model_types:
        assert layers_check(run, model_type, variant)["verdict"] == "pass"


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_edit_snippets_exist_in_installed_mlx_lm(bug: InjectedBug) -> None:
    # copy_mlx_lm asserts this too; here it fails fast and names the bug
    for edit in bug.edits:
        text = (installed_mlx_lm() / edit.file).read_text()
        assert text.count(edit.old) == 1, f"{edit.file} changed: {edit.old!r}"
