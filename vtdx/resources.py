"""Files vtdx ships inside its package: guest sources (kernel fragment, initramfs, payloads,
test guest) and the TCG plugin's C sources.

They are package data, found through ``importlib.resources`` so that vtdx works the same from a
checkout, an editable install or a wheel. Builds read them in place; the package is never
written to (outputs go to the cache).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from vtdx.errors import VtdxError


def asset(*parts: str) -> Path:
    """Path of a shipped file or directory, e.g. ``asset("guest", "kernel", "tdx-host.config")``."""
    node = files("vtdx").joinpath(*parts)
    path = Path(str(node))
    if not path.exists():
        raise VtdxError(f"vtdx installation is incomplete: {'/'.join(parts)} is missing")
    return path
