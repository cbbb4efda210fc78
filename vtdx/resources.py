"""Files vtdx ships inside its package: guest sources (kernel fragment, initramfs, payloads,
test guest) and the TCG plugin's C sources.

They are package data, found through ``importlib.resources`` so that vtdx works the same from a
checkout, an editable install or a wheel. Builds read them in place; the package is never
written to (outputs go to the cache).
"""

from __future__ import annotations

import hashlib
import os
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


def cache_root(cache: Path | None = None) -> Path:
    """The vtdx cache: ``cache`` if given, else $VTDX_CACHE, else ~/.cache/vtdx."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("VTDX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vtdx"


#: The unicorn release the engine runs on: the wheel's version, and the source distribution
#: setup patches and builds (vtdx/unicorn/README.md).
UNICORN_VERSION = "2.1.4"
UNICORN_LIB = "libunicorn.so.2"


def unicorn_patch() -> Path:
    """vtdx's patch to the unicorn source distribution."""
    return asset("unicorn", f"unicorn-{UNICORN_VERSION}-vtdx.patch")


def patched_unicorn_dir(cache: Path | None = None) -> Path:
    """Where setup builds the patched ``libunicorn.so.2``: keyed by the patch's contents, so
    a changed patch builds again and the engine never loads a stale build."""
    key = hashlib.sha256(unicorn_patch().read_bytes()).hexdigest()[:16]
    return cache_root(cache) / "unicorn" / f"{UNICORN_VERSION}-{key}"
