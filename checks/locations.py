"""Source locations of modules: where the code that diverges sits, in MLX and transformers.

A module's code is its class's `__call__` (MLX) or `forward` (torch), found on the class
with inspect; the call of a sub-module is the line of its parent's method that contains
`self.<name>(`. Paths are relative to the directory holding the top package
("mlx_lm/models/llama.py"), which is also their path in that package's repository when
the package sits at its root, as mlx_lm does.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from .schema import SourceLocation

METHOD = {"mlx": "__call__", "torch": "forward"}


def _method(cls: type, name: str) -> tuple[type, Any] | None:
    """The class in the MRO that defines `name`, and the function, unwrapped."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            func = klass.__dict__[name]
            func = getattr(func, "__func__", func)
            try:
                return klass, inspect.unwrap(func)
            except ValueError:
                return klass, func
    return None


def _relative(file: str, module_name: str) -> str:
    """The file's path from the directory that holds its top package."""
    top = sys.modules.get(module_name.split(".")[0])
    roots = list(getattr(top, "__path__", None) or [])
    for root in roots:
        parent = Path(root).resolve().parent
        try:
            return Path(file).resolve().relative_to(parent).as_posix()
        except ValueError:
            continue
    return Path(file).name


def _source(cls: type, name: str) -> tuple[type, Any, list[str], int, str] | None:
    found = _method(cls, name)
    if found is None:
        return None
    klass, func = found
    try:
        lines, start = inspect.getsourcelines(func)
        file = inspect.getsourcefile(func)
    except (OSError, TypeError):
        return None
    if file is None:
        return None
    return klass, func, lines, start, file


def method_location(cls: type | None, kind: str) -> SourceLocation | None:
    """The `def` line of the class's __call__ (kind "mlx") or forward (kind "torch")."""
    if cls is None:
        return None
    found = _source(cls, METHOD[kind])
    if found is None:
        return None
    klass, func, lines, start, file = found
    # getsourcelines starts at the first decorator: point at the def itself
    offset = next((i for i, line in enumerate(lines)
                   if line.lstrip().startswith(("def ", "async def "))), 0)
    return SourceLocation(path=_relative(file, func.__module__), line=start + offset,
                          function=f"{klass.__name__}.{METHOD[kind]}")


def _find(lines: list[str], child: str, attribute: bool = True) -> int | None:
    """Index of the first line that calls `self.<child>(` (or indexes or names it); with
    attribute False, that calls `<anything>.<child>(`."""
    name = re.escape(child)
    patterns = (rf"\bself\.{name}\s*\(", rf"\bself\.{name}\s*\[", rf"\bself\.{name}\b") \
        if attribute else (rf"\.{name}\s*\(",)
    for pattern in patterns:
        for i, line in enumerate(lines):
            if re.search(pattern, line.split("#", 1)[0]):
                return i
    return None


def call_location(cls: type | None, child: str, kind: str,
                  attribute: bool = True) -> SourceLocation | None:
    """The line that calls `self.<child>(`: in the class's __call__/forward, else in
    another method of the class (a helper that __call__ runs), named after it."""
    if cls is None or not child:
        return None
    found = _source(cls, METHOD[kind])
    if found is None:
        return None
    klass, func, lines, start, file = found
    index = _find(lines, child, attribute)
    if index is not None:
        return SourceLocation(path=_relative(file, func.__module__), line=start + index,
                              function=f"{klass.__name__}.{METHOD[kind]}")
    try:
        class_lines, class_start = inspect.getsourcelines(klass)
    except (OSError, TypeError):
        return None
    index = _find(class_lines, child, attribute)
    if index is None:
        return None
    method = next((m.group(1) for line in reversed(class_lines[:index + 1])
                   if (m := re.match(r"\s*(?:async\s+)?def\s+(\w+)", line))), "?")
    return SourceLocation(path=_relative(file, func.__module__), line=class_start + index,
                          function=f"{klass.__name__}.{method}")


def library_of(cls: type | None) -> str | None:
    """"mlx" for an MLX module class, "torch" for a torch one, None otherwise."""
    if cls is None:
        return None
    for klass in cls.__mro__:
        top = klass.__module__.split(".")[0]
        if klass.__name__ == "Module" and top == "mlx":
            return "mlx"
        if klass.__name__ == "Module" and top == "torch":
            return "torch"
    return None


def is_transformers(cls: type | None) -> bool:
    return cls is not None and cls.__module__.split(".")[0] == "transformers"


def field_location(args_class: type | None, field: str) -> SourceLocation | None:
    """The line that declares `field` in a ModelArgs class (`field: type = ...`), or the
    class's own line when it declares no such field (from_dict then drops the key)."""
    if args_class is None:
        return None
    try:
        lines, start = inspect.getsourcelines(args_class)
        file = inspect.getsourcefile(args_class)
    except (OSError, TypeError):
        return None
    if file is None:
        return None
    path = _relative(file, args_class.__module__)
    pattern = re.compile(rf"^\s+{re.escape(field)}\s*:")
    index = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
    if index is None:
        offset = next((i for i, line in enumerate(lines) if line.lstrip().startswith("class ")),
                      0)
        return SourceLocation(path=path, line=start + offset, function=args_class.__name__)
    return SourceLocation(path=path, line=start + index,
                          function=f"{args_class.__name__}.{field}")
