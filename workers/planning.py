"""Which model_types a PR affects, from its changed files and the PR's own tree.

Runs on the runner, on the checked-out PR tree, without importing any of it: imports
and MODEL_REMAPPING are read with `ast`. A changed `mlx_lm/models/<x>.py` plans `x`
when it is a model file (it defines `class Model`), every model file that imports it
directly or not, and every model_type that MODEL_REMAPPING maps onto those files.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

MODELS_PREFIX = "mlx_lm/models/"


def touches_models(changed_files: list[str]) -> bool:
    """Cheap test on file names alone: can this PR affect any model?"""
    return any(f.startswith(MODELS_PREFIX) and f.endswith(".py") for f in changed_files)


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(errors="replace"), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None


def _local_imports(tree: ast.Module, module_names: set[str]) -> set[str]:
    """Sibling modules of mlx_lm/models imported by this file (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.startswith("mlx_lm.models"):
                package = base if node.level == 1 else base.removeprefix("mlx_lm.models")
                package = package.lstrip(".")
                if package:
                    found.add(package.split(".")[0])
                else:  # `from . import x`
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_lm.models."):
                    found.add(alias.name.split(".")[2])
    return found & module_names


def _defines_model(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ClassDef) and n.name == "Model" for n in tree.body)


def model_remapping(mlx_lm_dir: Path) -> dict[str, str]:
    """MODEL_REMAPPING from mlx_lm/utils.py, read as a literal ({} when absent)."""
    tree = _parse(mlx_lm_dir / "utils.py")
    if tree is None:
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MODEL_REMAPPING" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def transformers_model_types() -> set[str] | None:
    """model_types transformers knows, read from its auto_mappings.py without importing
    transformers (that import costs seconds). None when the file has another shape."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    tree = _parse(Path(spec.origin).parent / "models" / "auto" / "auto_mappings.py")
    if tree is None:
        return None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "CONFIG_MAPPING_NAMES" for t in targets):
            value = node.value
            if isinstance(value, ast.Call) and value.args:  # OrderedDict([...])
                value = value.args[0]
            try:
                pairs = ast.literal_eval(value)
            except ValueError:
                return None
            return set(dict(pairs)) if pairs else None
    return None


def plan(mlx_lm_dir: Path, changed_files: list[str]) -> list[str]:
    """model_types to verify, sorted; mlx_lm_dir is the PR tree's `mlx_lm` package."""
    models_dir = mlx_lm_dir / "models"
    trees = {p.stem: _parse(p) for p in models_dir.glob("*.py") if p.stem != "__init__"}
    names = set(trees)
    imports = {name: _local_imports(tree, names) if tree else set()
               for name, tree in trees.items()}
    model_files = {name for name, tree in trees.items() if tree and _defines_model(tree)}

    changed = {f[len(MODELS_PREFIX):-3] for f in changed_files
               if f.startswith(MODELS_PREFIX) and f.endswith(".py") and "/" not in
               f[len(MODELS_PREFIX):]}
    affected = changed & names
    # Everything importing an affected module is affected: walk until nothing new.
    grew = True
    while grew:
        grew = False
        for name, imported in imports.items():
            if name not in affected and imported & affected:
                affected.add(name)
                grew = True
    files = affected & model_files
    model_types = set(files)
    model_types.update(k for k, v in model_remapping(mlx_lm_dir).items() if v in files)
    return sorted(model_types)


def verifiable(model_types: list[str]) -> tuple[list[str], list[str]]:
    """(model_types transformers knows, those it does not); all known if it can't tell."""
    known = transformers_model_types()
    if known is None:
        return list(model_types), []
    return ([t for t in model_types if t in known], [t for t in model_types if t not in known])
