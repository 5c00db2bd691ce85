"""A package's names imported on first use (PEP 562), so that its torch-free modules load without torch: `krona plan`
and `krona inspect` import `kron.factors` or `formats.description` alone."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, tuple[str, ...]]) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for `package`, whose names `where` gives by submodule. A name must not be a
    submodule's own name: once that submodule is imported, Python's attribute for it would shadow the name."""
    module_of = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module_of[name]}", package), name)

    return __getattr__, sorted(module_of)
