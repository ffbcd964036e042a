"""Bad inputs: exit 2, one line on stderr naming the problem, no traceback, no results."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CliRun, Edit, copy_mlx_lm, run_cli

EXIT_CANNOT_RUN = 2


def assert_cannot_run(run: CliRun, *fragments: str) -> str:
    """The run refused cleanly; returns its one stderr line."""
    assert run.returncode == EXIT_CANNOT_RUN, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("mlx-verify: error: "), line
    assert "internal error" not in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert run.stdout == ""
    assert run.results is None  # no results file is written
    return line


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_unknown_model_type(cache_dir: Path, tmp_path: Path) -> None:
    run = run_cli(["check", "no_such_model_type"], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, "no_such_model_type")


def test_mlx_lm_path_without_package(cache_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "checkout"
    empty.mkdir()
    run = run_cli(["check", "llama", "--mlx-lm", str(empty)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, str(empty), "no mlx_lm package")


def test_mlx_lm_path_that_does_not_exist(cache_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    run = run_cli(["check", "llama", "--mlx-lm", str(missing)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, str(missing), "no mlx_lm package")


def test_syntax_error_in_model_file_names_the_file(cache_dir: Path, tmp_path: Path) -> None:
    tree = copy_mlx_lm(tmp_path / "tree", [
        Edit("models/llama.py", "class MLP(nn.Module):", "class MLP(nn.Module:"),
    ])
    run = run_cli(["check", "llama", "--mlx-lm", str(tree)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, "SyntaxError", str(tree / "mlx_lm" / "models" / "llama.py"))


def test_config_missing_required_keys_is_an_mlx_finding(cache_dir: Path, tmp_path: Path) -> None:
    # transformers fills hidden_size and num_attention_heads with defaults; mlx-lm's
    # ModelArgs requires them: a measured disagreement on the mlx-lm side, found before
    # any checkpoint is synthesized
    config = write_json(tmp_path / "config.json", {
        "model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 512, "rms_norm_eps": 1e-6,
    })
    run = run_cli(["check", "llama", "--config", str(config), "--checks", "layers,dtype"],
                  cache_dir, tmp_path / "out.json")
    assert run.returncode == 1, run.stderr
    rows = run.report("llama")["checks"]
    load = [c for c in rows if c["check"] == "layers" and c["variant"] == "default"]
    assert len(load) == 1 and load[0]["verdict"] == "fail", load
    assert load[0]["details"]["side"] == "mlx-lm" and load[0]["first_divergent_layer"] == "config"
    assert "hidden_size" in load[0]["summary"] and "num_attention_heads" in load[0]["summary"]
    dtype = [c for c in rows if c["check"] == "dtype"]
    assert [c["verdict"] for c in dtype] == ["skip"]
    assert dtype[0]["summary"] == "not run: mlx-lm cannot read its config"


def test_config_file_that_does_not_exist(cache_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "config.json"
    run = run_cli(["check", "llama", "--config", str(missing)], cache_dir, tmp_path / "out.json")
    line = assert_cannot_run(run, str(missing))
    assert "no such config file" in line or "no config.json" in line, line


def test_config_file_with_malformed_json(cache_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama", "hidden_size": 64,')
    run = run_cli(["check", "llama", "--config", str(config)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, str(config), "not a readable JSON config")


def test_config_without_model_type(cache_dir: Path, tmp_path: Path) -> None:
    config = write_json(tmp_path / "config.json", {"hidden_size": 64})
    run = run_cli(["check", "llama", "--config", str(config)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, str(config), "no model_type")


def test_config_for_another_model_type(cache_dir: Path, tmp_path: Path) -> None:
    config = write_json(tmp_path / "config.json", {"model_type": "qwen2", "hidden_size": 64})
    run = run_cli(["check", "llama", "--config", str(config)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, str(config), "'qwen2'", "'llama'")


def test_unknown_check_name(cache_dir: Path, tmp_path: Path) -> None:
    run = run_cli(["check", "llama", "--checks", "layers,bogus"], cache_dir,
                  tmp_path / "out.json")
    assert_cannot_run(run, "unknown check(s) bogus", "available: ")


def test_list_names_shared_model_types_and_probes(cache_dir: Path) -> None:
    listed = run_cli(["list", "--no-probe"], cache_dir)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows["llama"] == "llama" and rows["mistral"] == "llama"  # MODEL_REMAPPING
    assert len(rows) > 50
    probed = run_cli(["list", "llama", "gpt_oss"], cache_dir)
    assert probed.returncode == 0, probed.stderr
    status = {line.split()[0]: line.split(None, 2)[2] for line in probed.stdout.splitlines()[1:]}
    assert status["llama"] == "yes"
    assert status["gpt_oss"].startswith("no: weights do not load")
    unknown = run_cli(["list", "nosuch"], cache_dir)
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr


def test_port_crashing_while_building_the_model_is_a_finding(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    # released exaone4.py takes len() of sliding_window_pattern, which transformers'
    # default config gives as an int: the port fails on a config transformers runs
    run = run_cli(["check", "exaone4", "--checks", "layers", "--variants", "default"],
                  cache_dir, tmp_path / "results.json")
    assert run.returncode == 1, run.stderr
    check = run.layers_check("exaone4")
    assert check["verdict"] == "fail" and check["first_divergent_layer"] == "load"
    assert check["summary"].startswith("mlx-lm cannot build the model: TypeError")
    assert "exaone4.py:" in check["summary"]


def test_model_file_calling_sys_exit_on_import_is_an_mlx_finding(cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    # released olmo.py calls sys.exit(1) when the ai2-olmo package is missing, a package
    # transformers does not need for olmo: mlx-lm cannot run a model transformers runs
    run = run_cli(["check", "olmo", "--checks", "layers", "--variants", "default"], cache_dir,
                  tmp_path / "out.json")
    assert run.returncode == 1, run.stderr
    check = run.layers_check("olmo")
    assert check["verdict"] == "fail" and check["details"]["side"] == "mlx-lm"
    assert "SystemExit" in check["summary"] and "olmo.py:" in check["summary"]
    assert "Traceback" not in run.stderr


def test_an_output_file_that_cannot_be_written_is_refused_before_the_checks(
        cache_dir: Path, tmp_path: Path) -> None:
    """Said at once, as bad input: not an internal error after minutes of checks."""
    missing = tmp_path / "no-such-dir" / "out.json"
    run = run_cli(["check", "llama"], cache_dir, missing)
    line = assert_cannot_run(run, f"--json {missing}: cannot write: no directory")
    assert str(missing.parent) in line
    html = tmp_path / "gone" / "report.html"
    run = run_cli(["check", "llama", "--html", str(html)], cache_dir, tmp_path / "out.json")
    assert_cannot_run(run, f"--html {html}: cannot write")
    assert not (tmp_path / "out.json").exists()
    run = run_cli(["check", "llama", "--markdown", str(tmp_path)], cache_dir,
                  tmp_path / "out.json")
    assert_cannot_run(run, f"--markdown {tmp_path}: cannot write: a directory")
