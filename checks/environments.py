"""Validated environments beside this one, for model_types only a newer transformers knows.

New architectures reach transformers first; their mlx-lm ports follow days later. A
runner can hold several validated environments (each a venv installed from a lock in
constraints/), named in MLX_VERIFY_ENVIRONMENTS as their Python interpreters, separated
by the path separator. When this environment's transformers has no config for a
requested model_type, `mlx-verify check` runs in the first environment whose
transformers has one, or stops with a message naming the release that has it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

# Set in a re-run so that it never looks for environments again.
CHOSEN_FLAG = "MLX_VERIFY_ENVIRONMENT_CHOSEN"

# model_types that transformers releases added after the lowest supported one (5.23.0):
# the difference of CONFIG_MAPPING_NAMES between the environments of constraints/lowest.txt
# and constraints/lock.txt (docs/deploy.md, "Moving the lock forward", regenerates it).
ADDED_IN = {
    "5.24.0": ("apertus1p5", "apertus1p5_text", "apertus1p5_vision_tokenizer", "dory", "exaone",
               "hy_v4_vl", "hy_v4_vl_text", "hy_v4_vl_vision", "inkling2_loop",
               "inkling2_loop_text", "lara_mini", "omniasr", "omniasr_audio", "omniasr_ctc",
               "sarvam_mla", "sarvam_moe", "wavtokenizer", "wavtokenizer_encoder"),
}

QUERY = ("import json, transformers\n"
         "from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES\n"
         "print(json.dumps({'transformers': transformers.__version__,"
         " 'model_types': sorted(CONFIG_MAPPING_NAMES)}))")


@dataclass
class Environment:
    python: str
    transformers: str
    model_types: set[str]


def configured() -> list[str]:
    value = os.environ.get("MLX_VERIFY_ENVIRONMENTS", "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def describe(python: str) -> Environment | str:
    """The environment's transformers release and model_types, or why it cannot be read."""
    try:
        out = subprocess.run([python, "-c", QUERY], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return f"{python}: {lines[-1] if lines else f'exit {out.returncode}'}"
    data = json.loads(out.stdout)
    return Environment(python, data["transformers"], set(data["model_types"]))


def release_with(model_type: str) -> str | None:
    return next((version for version, types in ADDED_IN.items() if model_type in types), None)


def choose(unknown: list[str], here: str) -> tuple[Environment | None, str]:
    """(an environment that knows every model_type in `unknown`, or None; one line saying
    what was found), `here` being this environment's transformers version."""
    names = ", ".join(unknown)
    releases = sorted({r for r in map(release_with, unknown) if r})
    arrived = (f"; it arrived in transformers {', '.join(releases)}" if releases
               else "; no transformers release known to this mlx-verify has it")
    tried = []
    for python in configured():
        env = describe(python)
        if isinstance(env, str):
            tried.append(env)
            continue
        if all(t in env.model_types for t in unknown):
            return env, (f"transformers {here} here has no model_type {names}: running in "
                         f"the environment of {env.python} (transformers {env.transformers})")
        tried.append(f"{env.python}: transformers {env.transformers} lacks it too")
    where = ("; environments tried: " + "; ".join(tried) if tried else
             "; set MLX_VERIFY_ENVIRONMENTS to an environment installed from a lock that has "
             "it (docs/deploy.md)")
    return None, f"transformers {here} has no model_type {names}{arrived}{where}"
