"""Which libunicorn the engine runs on: vtdx's patched build when setup made it.

The wheel's binding loads its library once, at ``import unicorn``, from the directory in
LIBUNICORN_PATH if that is set. So this module, imported by the package before anything
imports unicorn, points LIBUNICORN_PATH at the build ``vtdx setup`` caches
(``vtdx.resources.patched_unicorn_dir``) unless the variable is set already or unicorn was
imported first. The variable is process-wide and inherited by children, which then load the
same build. Without the build the stock library runs, with the faults the patch fixes
(vtdx/unicorn/README.md): ``patched()`` says which one is loaded.
"""

from __future__ import annotations

import os
import sys

from vtdx.resources import UNICORN_LIB, patched_unicorn_dir


def _select() -> None:
    if "unicorn" in sys.modules or os.environ.get("LIBUNICORN_PATH"):
        return
    build = patched_unicorn_dir()
    if (build / UNICORN_LIB).is_file():
        os.environ["LIBUNICORN_PATH"] = str(build)


_select()


def patched() -> bool:
    """Is the loaded library vtdx's patched build (it exports uc_vtdx_patch_level)?"""
    from unicorn.unicorn_py3.unicorn import uclib  # noqa: PLC0415 (after _select)

    return hasattr(uclib, "uc_vtdx_patch_level")


def library() -> str:
    """The loaded library's file name."""
    from unicorn.unicorn_py3.unicorn import uclib  # noqa: PLC0415 (after _select)

    return str(uclib._name)


__all__ = ["library", "patched"]
