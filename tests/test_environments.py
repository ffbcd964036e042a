"""A model_type only a newer transformers knows: `exaone` is in transformers 5.24 and not
in 5.23. Under the lowest supported environment (constraints/lowest.txt, the venv
scripts/test.sh makes as .venv-lowest) the check names the release that has it; with
this test's own environment (constraints/lock.txt) listed in MLX_VERIFY_ENVIRONMENTS it
runs there instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOWEST = Path(os.environ.get("MLX_VERIFY_LOWEST_PYTHON", REPO / ".venv-lowest/bin/python"))
ARGS = ["-m", "mlx_verify.checks.cli", "check", "exaone", "--checks", "layers",
        "--variants", "default"]


def lowest_python() -> Path:
    if not LOWEST.is_file():
        pytest.fail(f"no lowest-transformers environment at {LOWEST}: scripts/test.sh makes it "
                    "(or set MLX_VERIFY_LOWEST_PYTHON)")
    version = subprocess.run([str(LOWEST), "-c", "import transformers; "
                              "print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "5.23.0", f"{LOWEST} has transformers {version}"
    return LOWEST


def run(python: Path, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *ARGS, "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**env, "MLX_VERIFY_CACHE": str(tmp_path / "cache"),
                               "HF_HUB_OFFLINE": "1"})


def test_a_model_type_of_a_newer_release_names_that_release(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLX_VERIFY_ENVIRONMENTS"}
    proc = run(lowest_python(), env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "transformers 5.23.0 has no model_type exaone" in lines[0]
    assert "it arrived in transformers 5.24.0" in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_a_model_type_of_a_newer_release_runs_in_an_environment_that_has_it(
        tmp_path: Path) -> None:
    import json

    import transformers

    env = {**os.environ, "MLX_VERIFY_ENVIRONMENTS": f"/nonexistent/bin/python{os.pathsep}"
                                                    f"{sys.executable}"}
    proc = run(lowest_python(), env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running in the environment of " + sys.executable in proc.stderr
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["environment"]["transformers"] == transformers.__version__
    (report,) = results["reports"]
    assert report["model_type"] == "exaone" and report["verdict"] == "pass"
