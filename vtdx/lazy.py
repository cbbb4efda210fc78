"""Package exports that load on first use (PEP 562 module ``__getattr__``).

A package whose ``__init__`` re-exports its parts makes every import of any one part load
them all. ``exports`` lets such a package name its exports without importing them: the
TDX module model (``vtdx.module``) is then loaded by `vtdx run` after QEMU has started,
not before (vtdx/session/machine.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, namespace: dict[str, Any],
            sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``sources`` maps each exported name to the
    submodule that defines it; a name is imported on first use and kept in ``namespace``
    (the package's globals), so later lookups never come here again."""

    def __getattr__(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{source}"), name)
        namespace[name] = value
        return value

    return __getattr__
