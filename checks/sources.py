"""Where a check's configuration comes from: transformers' default config, a config file,
a local checkpoint, or a Hugging Face Hub repository (through huggingface_hub, so the
local cache and HF_HUB_OFFLINE are honoured).

Several sources of one architecture (base, instruct, DPO, ...) can be checked at once:
their configs are diffed, and each distinct config becomes its own tiny checkpoint, so
a setting only one variant carries (a NoPE layer list, a different base) is checked in
seconds without downloading weights. With full weights, the real checkpoint is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SourceError(Exception):
    """The source cannot be read (exit 2)."""


@dataclass
class Source:
    name: str  # shown in the report: "transformers default config", "hub org/repo@rev", ...
    config: dict[str, Any]
    checkpoint: Path | None = None  # a directory with the real weights, when there is one
    from_file: bool = True  # keeps its own config format (False: transformers' default)


def _read_config(path: Path, label: str) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise SourceError(f"{label}: no config.json at {file}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{label}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise SourceError(f"{label}: config has no model_type")
    return config


def from_config_file(path: str) -> Source:
    return Source(name=f"config file {path}", config=_read_config(Path(path), path))


def from_checkpoint(path: str) -> Source:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise SourceError(f"{path}: not a directory")
    config = _read_config(directory, path)
    has_weights = any(directory.glob("*.safetensors"))
    return Source(name=f"checkpoint {path}", config=config,
                  checkpoint=directory if has_weights else None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def from_hub(spec: str, full_weights: bool = False) -> Source:
    """`REPO_ID[@REVISION]`: config.json (and the safetensors with full weights)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    if not repo_id or repo_id.count("/") != 1:
        raise SourceError(f"{spec}: expected REPO_ID[@REVISION], e.g. org/name@main")
    patterns = ["config.json", "generation_config.json"]
    if full_weights:
        patterns += ["*.safetensors", "*.safetensors.index.json"]
    try:
        directory = Path(snapshot_download(
            repo_id, revision=revision or None, allow_patterns=patterns,
            local_files_only=offline(),
        ))
    except LocalEntryNotFoundError as e:
        where = "offline (HF_HUB_OFFLINE is set) and " if offline() else ""
        raise SourceError(f"{spec}: {where}not in the local Hugging Face cache") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SourceError(f"{spec}: cannot fetch from the Hub: {str(e).splitlines()[0]}") from e
    config = _read_config(directory, spec)
    if full_weights and not any(directory.glob("*.safetensors")):
        raise SourceError(f"{spec}: no safetensors weights in the repository")
    return Source(name=f"hub {spec}", config=config,
                  checkpoint=directory if full_weights else None)


def config_diff(sources: list[Source]) -> dict[str, dict[str, Any]]:
    """Keys whose values differ between the sources: key -> {source name: value}."""
    if len(sources) < 2:
        return {}
    keys = sorted(set().union(*(s.config for s in sources)))
    diff = {}
    for key in keys:
        values = [s.config.get(key, "(absent)") for s in sources]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True)
               for v in values):
            diff[key] = {s.name: v for s, v in zip(sources, values, strict=True)}
    return diff
