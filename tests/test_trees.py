"""The engine on an mlx-lm tree other than the installed release.

A PR is made against mlx-lm main, not against the release installed beside the engine.
Here the tree is a real older release, mlx-lm 0.31.3, as its wheel from the package
index unpacked (a directory holding `mlx_lm`, like a checkout), checked with
`--mlx-lm`. Its clean architectures must read exactly as on the installed release,
check by check, including quantize (whose convert path once only fitted 0.32.2's
`load_model`).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CliRun, run_cli

OLDER_MLX_LM = "0.31.3"
MODEL_TYPES = ("llama", "qwen3", "mixtral", "mamba")
CHECKS = "layers,generation,quantize"


@pytest.fixture(scope="module")
def older_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           f"mlx-lm=={OLDER_MLX_LM}", "-d", str(wheels)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip download mlx-lm=={OLDER_MLX_LM}: {proc.stderr[-1500:]}"
    wheel = next(wheels.glob("mlx_lm-*.whl"))
    tree = tmp_path_factory.mktemp("mlx-lm-older")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tree)
    assert (tree / "mlx_lm" / "__init__.py").is_file()
    return tree


def rows(run: CliRun) -> dict[tuple[str, str, str], str]:
    out = {}
    for model_type in MODEL_TYPES:
        for check in run.report(model_type)["checks"]:
            part = check["details"].get("part") or check["metrics"].get("bits") or ""
            out[(model_type, check["check"], str(part))] = check["verdict"]
    return out


def test_an_older_release_reads_like_the_installed_one(older_tree: Path, cache_dir: Path,
                                                       tmp_path: Path) -> None:
    args = ["check", *MODEL_TYPES, "--checks", CHECKS, "--variants", "default"]
    installed = run_cli(args, cache_dir, tmp_path / "installed.json")
    older = run_cli([*args, "--mlx-lm", str(older_tree)], cache_dir, tmp_path / "older.json")
    for run in (installed, older):
        assert run.returncode in (0, 1), run.stderr[-2000:]
        assert "Traceback" not in run.stderr
    assert older.results["environment"]["mlx_lm_version"] == OLDER_MLX_LM
    assert older.results["environment"]["mlx_lm_path"].startswith(str(older_tree))
    assert rows(older) == rows(installed)
    # every generation row is there on both (the loop below only judges rows that exist)
    assert {(m, p) for (m, c, p) in rows(older) if c == "generation"} == {
        (m, p) for m in MODEL_TYPES
        for p in ("greedy", "kv-cache", "batch", "batch-chunked", "kv-quantized")}
    # the clean set is clean on both: parity, decoding and quantization
    for (model_type, check, part), verdict in rows(older).items():
        # kv-quantized needs head_dim >= 32: the default's 16 says it cannot run there;
        # mamba never reads the padding, so neither batch row (one prefill or chunked) runs
        skipped = (model_type == "mamba" and part in ("batch", "batch-chunked")) \
            or part == "kv-quantized"
        expected = "skip" if skipped else "pass"
        assert verdict == expected, (model_type, check, part, verdict)
