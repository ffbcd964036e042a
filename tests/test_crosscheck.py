"""Final logits measured outside the sandbox (workers/crosscheck.py, workers/capture.py):
the runner's own checkpoint, ids and transformers forward against the logits a sandboxed
capture of the real mlx-lm tree writes as data; capture files that are not logits of the
expected shape are refused; transformers and torch are not importable in the capture."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_verify.checks import synth
from mlx_verify.workers import crosscheck, sandbox, verify
from mlx_verify.workers.settings import RunnerSettings
from tests.conftest import installed_mlx_lm, run_cli

SETTINGS = sandbox.SandboxSettings(enabled=True, max_processes=256, disk_mb=512, uid=65534)
SWAPPED = ("swiglu(self.gate_proj(x), self.up_proj(x))",
           "swiglu(self.up_proj(x), self.gate_proj(x))")


def pr_tree(work: Path, edit: tuple[str, str] | None = None) -> Path:
    src = work / "src"
    src.mkdir()
    shutil.copytree(installed_mlx_lm(), src / "mlx_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        llama = src / "mlx_lm" / "models" / "llama.py"
        text = llama.read_text()
        assert edit[0] in text
        llama.write_text(text.replace(*edit))
    return src


def measure(tmp_path: Path, edit: tuple[str, str] | None = None):
    work = tmp_path / "job"
    work.mkdir(parents=True)
    env = verify.scrubbed_env(work)
    return crosscheck.cross_check(
        model_type="llama", claimed="pass", claimed_config=None, src=pr_tree(work, edit),
        work=work, writable=verify.scratch_dir(work), env=env, dtype="float32",
        memory_mb=8192, timeout_s=300, file_size=1 << 29)


def test_released_llama_is_confirmed_and_a_swapped_projection_is_measured(tmp_path):
    clean = measure(tmp_path / "clean")
    assert clean.verdict == "pass" and not clean.contradicts
    assert clean.bound == 1e-5 and clean.rel_l2 is not None and clean.rel_l2 <= 1e-5
    assert clean.tokens == 48 and clean.top1_agreement == 1.0
    bugged = measure(tmp_path / "bugged", SWAPPED)
    assert bugged.verdict == "fail" and bugged.contradicts
    assert bugged.rel_l2 is not None and bugged.rel_l2 > 0.01


def test_each_run_draws_its_own_checkpoint_and_ids(tmp_path):
    # two runs of the same tree: different weights and ids, so different logits; a PR
    # cannot know either in advance
    ids = []
    for name in ("one", "two"):
        measure(tmp_path / name)
        (trusted,) = (tmp_path / name / "job" / "trusted").glob("llama-*/case-0/*/config.json")
        ids.append(np.load(trusted.parent.parent / "ids.npy"))
    assert not np.array_equal(ids[0], ids[1])


def write_npy(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return path


def test_a_capture_file_that_is_not_logits_of_the_expected_shape_is_refused(tmp_path):
    shape = (1, 48, 512)
    good = write_npy(tmp_path / "good.npy", np.ones(shape, dtype=np.float32))
    assert crosscheck.read_capture(good, shape).shape == shape
    zero = tmp_path / "zero.npy"
    os.symlink("/dev/zero", zero)  # an endless read, unless refused
    cases = {
        zero: "capture file refused: a symbolic link",
        Path("/dev/zero"): "capture file refused: not a regular file (mode crw-rw-rw-)",
        write_npy(tmp_path / "shape.npy", np.ones((1, 3), dtype=np.float32)):
            "capture file refused: shape (1, 3), expected (1, 48, 512)",
        write_npy(tmp_path / "dtype.npy", np.ones(shape, dtype=np.float64)):
            "capture file refused: ",  # larger than float32 logits, or the wrong dtype
        write_npy(tmp_path / "half.npy", np.ones(shape, dtype=np.float16)):
            "capture file refused: dtype float16, not float32",
        tmp_path / "empty.npy": "the capture wrote no logits",
    }
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_bytes(b"not an array")
    cases[tmp_path / "text.npy"] = "capture file refused: not a .npy array"
    for path, message in cases.items():
        with pytest.raises(crosscheck.CaptureRefused) as refused:
            crosscheck.read_capture(path, shape)
        assert str(refused.value).startswith(message), (path.name, str(refused.value))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap is Linux only")
def test_transformers_and_torch_cannot_be_imported_in_the_capture_sandbox(tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    env = verify.scrubbed_env(work)
    hidden = sandbox.hidden_packages()
    assert {p.name for p in hidden} >= {"transformers", "torch", "mlx_lm"}
    probe = ("import importlib, sys\n"
             "for name in ('transformers', 'torch', 'mlx_lm'):\n"
             "    try:\n"
             "        module = importlib.import_module(name)\n"
             "        print(name, 'usable' if hasattr(module, '__version__') else 'empty')\n"
             "    except Exception as e:\n"
             "        print(name, 'refused', type(e).__name__)\n"
             "import os\n"
             "try:\n"
             f"    open({str(hidden[0] / 'planted.py')!r}, 'w')\n"
             "    print('writable')\n"
             "except OSError:\n"
             "    print('read-only')\n")
    seen = {}
    for name, hide in (("hidden", hidden), ("visible", ())):
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            done = sandbox.run([sys.executable, "-I", "-c", probe], env=env,
                               writable=verify.scratch_dir(work), readable=[],
                               settings=SETTINGS, memory_mb=8192, file_size=1 << 20,
                               timeout_s=120, stdout=stdout, stderr=stderr, hidden=hide)
        assert done.code == 0, err.read_text()
        seen[name] = out.read_text().split()
    # the same probe sees both packages when they are not hidden: the test can fail
    assert seen["visible"][:6] == ["transformers", "usable", "torch", "usable", "mlx_lm",
                                   "usable"]
    assert seen["hidden"][:6] == ["transformers", "empty", "torch", "empty", "mlx_lm", "empty"]
    assert seen["hidden"][6] == seen["visible"][6] == "read-only"


def test_the_macos_capture_profile_denies_reading_the_hidden_packages(tmp_path):
    hidden = sandbox.hidden_packages()
    lines = sandbox.sandbox_exec_profile(tmp_path, hidden).splitlines()
    denied = [line for line in lines if line.startswith("(deny file-read*")]
    assert denied == [f'(deny file-read* (subpath "{os.path.realpath(p)}"))' for p in hidden]
    assert not [line for line in sandbox.sandbox_exec_profile(tmp_path).splitlines()
                if "file-read" in line]  # the check run's profile reads everything


def test_the_measured_config_is_the_runners_unless_transformers_reads_the_claim_the_same():
    from mlx_verify.checks import variants

    built = crosscheck.runner_variants("llama", None)
    default = built["default"]
    assert crosscheck.variant_config("llama", "default", None, built) == (
        default, "built by the runner")
    # the other RoPE format of the same config (a port reading rope_parameters only):
    # transformers reads it as the same configuration, so the claim's is measured
    other = variants.to_rope_parameters_format(default)
    assert other is not None and other != default
    assert crosscheck.variant_config("llama", "default", other, built) == (
        other, "the check run's, read by transformers as the runner's")
    # a smaller model than the default (one layer, tiny vocabulary) is not measured
    smaller = {**default, "num_hidden_layers": 1, "vocab_size": 16}
    assert crosscheck.variant_config("llama", "default", smaller, built) == (
        default, "built by the runner (the check run's config differs)")
    # a variant the runner does not build is measured on the claim only when there is one
    assert crosscheck.variant_config("llama", "no-such-variant", None, built) == (
        None, "the runner builds no such variant and the check run gave no config")


def test_a_model_transformers_cannot_build_on_the_runner_is_an_error(tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    env = verify.scrubbed_env(work)
    checked = crosscheck.cross_check(
        model_type="no_such_model_type", claimed="pass", claimed_config=None,
        src=pr_tree(work), work=work, writable=verify.scratch_dir(work), env=env,
        dtype="float32", memory_mb=8192, timeout_s=300, file_size=1 << 29)
    assert checked.verdict == "error" and checked.contradicts and checked.rel_l2 is None
    assert checked.reason == ("the runner cannot build the default checkpoint: SynthError: "
                              "transformers has no config for model_type "
                              "'no_such_model_type'")


# a bug only the head-dim variant shows: the default's head_dim is hidden_size / heads
SCALE_FROM_HIDDEN = ("self.scale = head_dim**-0.5",
                     "self.scale = (args.hidden_size // n_heads) ** -0.5")
HUB_CONFIG = Path(__file__).parent / "fixtures" / "configs" / "llama-3.2-1b-instruct.json"


def test_every_claimed_variant_of_a_hub_config_run_is_measured(tmp_path, cache_dir):
    """The runner's cross_check_all on a real check run's results for a Hub config
    (`/verify --hub`): every variant the results claim passes is measured on the variants
    the runner builds from that config, in one sandboxed capture; on a tree whose bug only
    the head-dim variant shows, that variant alone is contradicted."""
    run = run_cli(["check", "llama", "--config", str(HUB_CONFIG), "--checks", "layers"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode in (0, 1), run.stderr[-2000:]
    claimed = {c["variant"] for c in run.report("llama")["checks"] if c["verdict"] == "pass"}
    assert {"default", "head-dim"} <= claimed
    settings = RunnerSettings(redis_url="redis://unused", git_url="file:///unused",
                                     work_dir=str(tmp_path), timeout_s=300, memory_mb=8192)
    measured = {}
    for name, edit in (("clean", None), ("bugged", SCALE_FROM_HIDDEN)):
        work = tmp_path / name
        work.mkdir()
        checked = verify.cross_check_all(
            settings, work, pr_tree(work, edit), [(["llama"], HUB_CONFIG, run.results)],
            {"dtype": "float32"}, verify.scrubbed_env(work))
        assert {c["variant"] for c in checked} == claimed, checked
        assert {c.get("config_origin") for c in checked} == {"built by the runner"}, checked
        measured[name] = {c["variant"]: c for c in checked}
    assert {c["verdict"] for c in measured["clean"].values()} == {"pass"}, measured["clean"]
    contradicted = {v for v, c in measured["bugged"].items() if c["verdict"] != "pass"}
    assert contradicted == {"head-dim"}, measured["bugged"]
    assert measured["bugged"]["head-dim"]["rel_l2"] > 1e-3
    # the default variant measured is the Hub config shrunk, not transformers' default
    source = json.loads(HUB_CONFIG.read_text())
    built = crosscheck.runner_variants("llama", source)
    assert built["default"] == synth.shrink_config(source)
    assert built["default"]["rope_scaling"]["rope_type"] == "llama3"


def test_a_variant_the_results_leave_out_is_measured_too(tmp_path, cache_dir):
    """A forged report that lists only the variants its bug does not reach: the runner
    measures every variant it builds that the report leaves out, and a failure there
    contradicts the run; a run of other checks only (no layers claims) measures none."""
    run = run_cli(["check", "llama", "--config", str(HUB_CONFIG), "--checks", "layers"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode in (0, 1), run.stderr[-2000:]
    forged = json.loads(json.dumps(run.results))
    (report,) = forged["reports"]
    report["variants"] = [v for v in report["variants"] if v["name"] != "head-dim"]
    report["checks"] = [c for c in report["checks"] if c["variant"] != "head-dim"]
    settings = RunnerSettings(redis_url="redis://unused", git_url="file:///unused",
                              work_dir=str(tmp_path), timeout_s=300, memory_mb=8192)
    measured = {}
    for name, request in (("layers", {"dtype": "float32"}),
                          ("rope-only", {"dtype": "float32", "checks": ["rope"]})):
        work = tmp_path / name
        work.mkdir()
        checked = verify.cross_check_all(
            settings, work, pr_tree(work, SCALE_FROM_HIDDEN), [(["llama"], HUB_CONFIG, forged)],
            request, verify.scrubbed_env(work))
        measured[name] = {c["variant"]: crosscheck.CrossCheck.model_validate(c)
                          for c in checked}
    left_out = measured["layers"]["head-dim"]
    assert (left_out.claimed, left_out.verdict, left_out.contradicts) == ("omitted", "fail", True)
    assert left_out.rel_l2 is not None and left_out.rel_l2 > 1e-3
    assert not [c for v, c in measured["layers"].items() if v != "head-dim" and c.contradicts]
    assert "head-dim" not in measured["rope-only"]
    # an omitted variant that passes, or that could not be measured, contradicts nothing
    assert not left_out.model_copy(update={"verdict": "pass"}).contradicts
    assert not left_out.model_copy(update={"verdict": "error"}).contradicts
