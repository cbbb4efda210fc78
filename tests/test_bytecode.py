"""vtdx setup byte-compiles the package (vtdx/host/bytecode.py): a later start imports the
run machinery without compiling any vtdx source, even with PYTHONDONTWRITEBYTECODE=1."""

from __future__ import annotations

import os
import subprocess
import sys

from vtdx.host.bytecode import compile_package

PROBE = r"""
import builtins, sys
compiled = []
real = builtins.compile
def counting(source, filename, *args, **kwargs):
    if str(filename).endswith(".py"):
        compiled.append(str(filename))
    return real(source, filename, *args, **kwargs)
builtins.compile = counting
import vtdx.session.run, vtdx.cli.main  # what `vtdx run` imports before QEMU starts
print("\n".join(compiled))
"""


def _compiled_on_import() -> list[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True)
    return [ln for ln in r.stdout.splitlines() if ln.strip()]


def test_setup_bytecode_spares_every_start_the_compile() -> None:
    lines: list[str] = []
    assert compile_package(lines.append), lines
    assert lines == []
    assert _compiled_on_import() == []

