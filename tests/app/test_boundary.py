"""The folders follow the trust boundary: what runs on runners (workers/) imports nothing
of app/ and no GitHub client, so a runner process never loads the code that holds the
App key. Checked in a fresh interpreter that imports every runner module and the engine
modules the runner itself uses.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mlx_verify.workers

REPO = Path(__file__).resolve().parent.parent.parent


def test_runner_modules_import_no_app_code_and_no_github_client() -> None:
    modules = sorted(f"mlx_verify.workers.{m.name}"
                     for m in pkgutil.iter_modules(mlx_verify.workers.__path__))
    assert {f"mlx_verify.workers.{name}" for name in (
        "verify", "sandbox", "planning", "settings", "worker", "jobs")} <= set(modules)
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout)
    forbidden = [m for m in loaded if m.startswith("mlx_verify.app")
                 or m.split(".")[0] in ("app", "githubkit", "fastapi")]
    assert forbidden == []
