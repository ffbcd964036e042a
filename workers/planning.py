"""Which model_types a PR affects, from its changed files and the PR's own tree.

Runs on the runner, on the checked-out PR tree, without importing any of it: imports
and MODEL_REMAPPING are read with `ast`. A changed `mlx_lm/models/<x>.py` plans `x`
when it is a model file (it defines `class Model`), every model file that imports it
directly or not, and every model_type that MODEL_REMAPPING maps onto those files.

Code every model goes through (loading and sanitize plumbing in utils.py, convert.py, the
quantization code, generate.py and the caches and mask/attention helpers of
models/cache.py and models/base.py) plans one model_type per family instead
(REPRESENTATIVE), and the plan says which changed file put it there. Docs and tests
plan nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_PREFIX = "mlx_lm/"
MODELS_PREFIX = "mlx_lm/models/"
# Shared by every model; models/base.py and models/cache.py are imported by nearly every
# model file, so the import walk would plan the whole zoo and the runner's limit would
# cut it alphabetically: they plan the representative set instead.
PLUMBING_FILES = ("mlx_lm/utils.py", "mlx_lm/convert.py", "mlx_lm/generate.py",
                  "mlx_lm/models/base.py", "mlx_lm/models/cache.py")
PLUMBING_DIRS = ("mlx_lm/quant/",)
# quantize, _quantize, quantize_model, maybe_quantize_kv_cache; not dequantize, is_quantized
QUANTIZE_FUNCTION = re.compile(r"(?:^|_)quantize(?:$|_)")
# One model_type per family, each reaching a verdict in `mlx-verify sweep` on released
# mlx-lm (checked with `mlx-verify check TYPE --checks layers`); family order is run order.
REPRESENTATIVE = {
    "dense": "llama",
    "MoE": "qwen3_moe",
    "MLA": "deepseek_v3",
    "sliding-window": "gemma3_text",
    "SSM": "mamba",
    "hybrid": "falcon_h1",
    "multimodal text": "gemma3",
}


@dataclass
class Plan:
    model_types: list[str]  # the representative set first (in family order), then sorted
    reasons: dict[str, str] = field(default_factory=dict)  # model_type -> why it is planned
    plumbing: list[str] = field(default_factory=list)  # changed files that plan REPRESENTATIVE

    def to_dict(self) -> dict[str, object]:
        return {"reasons": self.reasons, "plumbing": self.plumbing,
                "representative": dict(REPRESENTATIVE) if self.plumbing else {}}


def touches_models(changed_files: list[str]) -> bool:
    """Cheap test on file names alone: can this PR affect any model? Any Python file of
    the mlx_lm package can (the runner's plan decides); docs and tests cannot."""
    return any(f.startswith(PACKAGE_PREFIX) and f.endswith(".py") for f in changed_files)


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


def _defines_quantize(tree: ast.Module | None) -> bool:
    return tree is not None and any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and QUANTIZE_FUNCTION.search(n.name)
        for n in ast.walk(tree))


def plumbing_files(mlx_lm_dir: Path, changed_files: list[str]) -> list[str]:
    """Changed files every model goes through: PLUMBING_FILES, PLUMBING_DIRS, and any
    other package file outside models/ that defines a quantize function (read with ast
    from the tree; a removed file counts by its name only)."""
    found = []
    for name in changed_files:
        if not (name.startswith(PACKAGE_PREFIX) and name.endswith(".py")):
            continue
        if name in PLUMBING_FILES or name.startswith(PLUMBING_DIRS):
            found.append(name)
        elif not name.startswith(MODELS_PREFIX) and _defines_quantize(
                _parse(mlx_lm_dir.parent / name)):
            found.append(name)
    return sorted(set(found))


def plan(mlx_lm_dir: Path, changed_files: list[str]) -> list[str]:
    """model_types to verify; mlx_lm_dir is the PR tree's `mlx_lm` package."""
    return make_plan(mlx_lm_dir, changed_files).model_types


def make_plan(mlx_lm_dir: Path, changed_files: list[str]) -> Plan:
    """The model_types to verify and why each is there."""
    models_dir = mlx_lm_dir / "models"
    trees = {p.stem: _parse(p) for p in models_dir.glob("*.py") if p.stem != "__init__"}
    names = set(trees)
    imports = {name: _local_imports(tree, names) if tree else set()
               for name, tree in trees.items()}
    model_files = {name for name, tree in trees.items() if tree and _defines_model(tree)}

    changed = {f[len(MODELS_PREFIX):-3] for f in changed_files
               if f.startswith(MODELS_PREFIX) and f.endswith(".py") and "/" not in
               f[len(MODELS_PREFIX):] and f not in PLUMBING_FILES}
    affected = changed & names
    reasons = {name: f"{MODELS_PREFIX}{name}.py changed" for name in affected}
    root = {name: name for name in affected}  # the changed file each one depends on
    # Everything importing an affected module is affected: walk until nothing new.
    grew = True
    while grew:
        grew = False
        for name, imported in imports.items():
            if name not in affected and imported & affected:
                affected.add(name)
                via = sorted(imported & affected)[0]
                root[name] = root[via]
                reasons[name] = f"imports {MODELS_PREFIX}{root[via]}.py (changed)" \
                    if via == root[via] else \
                    f"imports {MODELS_PREFIX}{via}.py, which uses {MODELS_PREFIX}" \
                    f"{root[via]}.py (changed)"
                grew = True
    files = affected & model_files
    found = {name: reasons[name] for name in files}
    for model_type, target in model_remapping(mlx_lm_dir).items():
        if target in files and model_type not in found:
            found[model_type] = f"MODEL_REMAPPING maps it onto {MODELS_PREFIX}{target}.py" \
                                f" ({reasons[target]})"
    plumbing = plumbing_files(mlx_lm_dir, changed_files)
    first: list[str] = []
    if plumbing:
        changed_text = ", ".join(plumbing)
        for family, model_type in REPRESENTATIVE.items():
            why = f"representative set ({family}): {changed_text} changed"
            found[model_type] = f"{found[model_type]}; {why}" if model_type in found else why
            first.append(model_type)
    rest = sorted(t for t in found if t not in first)
    return Plan(first + rest, {t: found[t] for t in first + rest}, plumbing)


def verifiable(model_types: list[str]) -> tuple[list[str], list[str]]:
    """(model_types transformers knows, those it does not); all known if it can't tell."""
    known = transformers_model_types()
    if known is None:
        return list(model_types), []
    return ([t for t in model_types if t in known], [t for t in model_types if t not in known])
