"""Shared helpers: run the `mlx-verify` CLI in a subprocess, and copy the installed mlx_lm
package into a temporary tree where one model file can be edited (bug injection).

Every test drives the real command line: exit codes, stderr and the results JSON are
the contract under test. Checkpoints go to one session-wide cache directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MLX_VERIFY = Path(sys.executable).with_name("mlx-verify")
CLI_TIMEOUT_S = 600


def installed_mlx_lm() -> Path:
    """The installed mlx_lm package directory, found without importing it."""
    spec = importlib.util.find_spec("mlx_lm")
    assert spec is not None and spec.submodule_search_locations, "mlx_lm is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class CliRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    results: dict[str, Any] | None  # the --json file, when one was written

    def report(self, model_type: str) -> dict[str, Any]:
        assert self.results is not None, f"no results JSON; stderr: {self.stderr[-2000:]}"
        found = [r for r in self.results["reports"] if r["model_type"] == model_type]
        assert len(found) == 1, f"{model_type}: {len(found)} reports in the results"
        return found[0]

    def layers_check(self, model_type: str) -> dict[str, Any]:
        checks = [c for c in self.report(model_type)["checks"] if c["check"] == "layers"]
        assert len(checks) == 1, f"{model_type}: {len(checks)} layers checks"
        return checks[0]


def run_cli(args: list[str], cache_dir: Path, json_path: Path | None = None) -> CliRun:
    """`mlx-verify ARGS [--json json_path]` offline, with the shared checkpoint cache."""
    env = {
        **os.environ,
        "MLX_VERIFY_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("MLX_VERIFY_DEBUG", None)
    full = [str(MLX_VERIFY), *args]
    if json_path is not None:
        full += ["--json", str(json_path)]
    proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S)
    results = None
    if json_path is not None and json_path.is_file():
        results = json.loads(json_path.read_text())
        log_verdicts(results)
    return CliRun(full, proc.returncode, proc.stdout, proc.stderr, results)


def log_verdicts(results: dict[str, Any]) -> None:
    """Append every check row's verdict to MLX_VERIFY_VERDICT_LOG, keyed by the test that
    ran it: scripts/compare_verdicts.py compares two environments' logs row by row."""
    log = os.environ.get("MLX_VERIFY_VERDICT_LOG")
    if not log:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    lines = []
    for report in results.get("reports", []):
        counts: dict[str, int] = {}
        for check in report["checks"]:
            part = check["metrics"].get("check_part") or check["details"].get("part") \
                or check["metrics"].get("bits") or ""
            key = f"{test} {report['model_type']} {check['check']} {check['variant']} {part}"
            counts[key] = counts.get(key, 0) + 1
            localization = check.get("localization") or {}
            lines.append(json.dumps({
                "key": f"{key} #{counts[key]}",
                "transformers": results["environment"]["transformers"],
                "verdict": check["verdict"],
                "first_divergent_layer": check.get("first_divergent_layer"),
                "part": localization.get("part"), "module": localization.get("module")}))
    with open(log, "a") as out:
        out.write("".join(line + "\n" for line in lines))


@dataclass(frozen=True)
class Edit:
    """Replace `old` by `new` in mlx_lm/<file>; `old` must occur exactly once."""

    file: str  # relative to the mlx_lm package, e.g. "models/llama.py"
    old: str
    new: str


def copy_mlx_lm(root: Path, edits: list[Edit]) -> Path:
    """A copy of the installed mlx_lm under root/mlx_lm with the edits applied; returns root.

    Fails loudly when an edit's original snippet is missing, so a change in mlx-lm
    shows up as a broken test instead of a silently clean tree.
    """
    target = root / "mlx_lm"
    shutil.copytree(installed_mlx_lm(), target, ignore=shutil.ignore_patterns("__pycache__"))
    for edit in edits:
        path = target / edit.file
        text = path.read_text()
        count = text.count(edit.old)
        assert count == 1, f"{edit.file}: expected the snippet once, found {count}:\n{edit.old}"
        path.write_text(text.replace(edit.old, edit.new))
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint cache for the whole session: each tiny checkpoint is built once."""
    return tmp_path_factory.mktemp("mlx-verify-cache")


# Debian's Chromium, headless, with nothing that reaches the network on its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """One Chromium for the session: Playwright's sync API runs one driver loop per
    thread, so the dashboard and report tests share it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                              headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
