"""Byte-compile the vtdx package where it is installed.

Every `vtdx run`, daemon and pytest worker imports about a hundred vtdx modules. Python only
reuses compiled modules from ``__pycache__``, and an environment with
``PYTHONDONTWRITEBYTECODE=1`` (common in containers and CI images) never writes them: each
start then compiles ~0.7 MB of source again, 0.14 s of the 0.37 s it took to import the
run machinery here. ``compileall`` writes the cache regardless of that variable; Python
reads it whatever the variable says, and falls back to the source for any file edited since.
A wheel install has compiled files already (pip compiles at install).
"""

from __future__ import annotations

import compileall
import io
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import vtdx


def compile_package(log: Callable[[str], None]) -> bool:
    """Compile what is stale under the installed package; False (and one line) if the
    install is read-only, which costs start-up time only."""
    root = Path(vtdx.__file__).resolve().parent
    with redirect_stdout(io.StringIO()) as out:  # compileall prints per-file errors
        ok = compileall.compile_dir(str(root), quiet=1, workers=1,
                                    optimize=sys.flags.optimize)
    if not ok:
        first = next((ln for ln in out.getvalue().splitlines() if ln.strip()), "")
        log(f"bytecode: could not compile all of {root} ({first.strip() or 'read-only?'}); "
            "vtdx still runs, each start compiling its modules again")
    return bool(ok)
