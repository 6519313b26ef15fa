"""Lazily exported package names: a package's ``__getattr__`` that imports the defining submodule on first use, so
importing a package (or one light submodule of it) does not import its heavy neighbours (Lightning, matplotlib)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``name`` is ``package.<where[name]>.name``, imported when first
    asked for; any other name is an AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
