"""Build the patched unicorn library the TD vCPU engine runs on (vtdx/unicorn/README.md).

The source is the PyPI source distribution of the wheel's own version, fetched with the
venv's pip (so from whatever index pip is configured with), patched with vtdx's patch and
built for x86 only with CMake and Ninja. The result is cached by the patch's hash
(``vtdx.resources.patched_unicorn_dir``); building again is a no-op.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host.qemu import Log, run_step
from vtdx.resources import (
    UNICORN_LIB,
    UNICORN_VERSION,
    cache_root,
    patched_unicorn_dir,
    unicorn_patch,
)


def build_unicorn(cache: Path | None, log: Log) -> Path:
    """The patched ``libunicorn.so.2`` (built now unless cached); its directory is what
    LIBUNICORN_PATH names."""
    out_dir = patched_unicorn_dir(cache)
    lib = out_dir / UNICORN_LIB
    if lib.is_file():
        log(f"patched unicorn up to date: {lib}")
        return lib
    for tool in ("cmake", "ninja", "patch", "gcc"):
        if shutil.which(tool) is None:
            raise VtdxError(f"building the patched unicorn needs {tool} "
                            "(scripts/bootstrap installs it)")
    t0 = time.monotonic()
    log(f"building unicorn {UNICORN_VERSION} with vtdx's patch -> {lib}")
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unicorn-build-", dir=root) as d:
        work = Path(d)
        run_step([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                  ":all:", f"unicorn=={UNICORN_VERSION}", "-d", str(work)],
                 f"downloading the unicorn {UNICORN_VERSION} source distribution", timeout=600)
        sdist = work / f"unicorn-{UNICORN_VERSION}.tar.gz"
        if not sdist.is_file():
            raise VtdxError(f"pip downloaded no unicorn-{UNICORN_VERSION}.tar.gz")
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
        src = work / f"unicorn-{UNICORN_VERSION}" / "src"
        run_step(["patch", "-p1", "--batch", "-i", str(unicorn_patch())],
                 "applying vtdx's unicorn patch", cwd=src, timeout=60)
        run_step(["cmake", "-B", "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                  "-DUNICORN_BUILD_TESTS=off", "-DUNICORN_ARCH=x86"],
                 "configuring unicorn", cwd=src, timeout=600)
        run_step(["cmake", "--build", "build", "-j", str(os.cpu_count() or 1)],
                 "building unicorn", cwd=src, timeout=1800)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{UNICORN_LIB}.{os.getpid()}"
        shutil.copyfile(src / "build" / UNICORN_LIB, tmp)
        tmp.replace(lib)
    log(f"      done in {time.monotonic() - t0:.1f} s")
    return lib
