"""Sizes as QEMU reads them, shared by every command-line and harness option.

QEMU's ``-m`` takes a number with an optional K/M/G/T suffix and reads a bare number as MiB
(softmmu/vl.c, parse_memory_options: a value ending in a digit is shifted left by 20), so
``2048`` and ``2G`` are the same machine everywhere in vtdx.
"""

from __future__ import annotations

import re

from vtdx.errors import VtdxError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE = re.compile(r"(\d+)\s*(?:([KMGT])(?:i?B)?|(B))?", re.I)
_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "B": 1}


def parse_size(text: str) -> int:
    """Bytes from ``2G``, ``6144M``, ``512MiB``, ``4096B`` or ``2048`` (a bare number is MiB)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise VtdxError(f"invalid memory size {text!r} (use e.g. 2G or 6144M)")
    return int(m[1]) * _UNITS[(m[2] or m[3] or "M").upper()]


def format_size(n: int) -> str:
    """The shortest exact QEMU spelling of ``n`` bytes (``2G``, ``1536M``, ``4K``)."""
    for unit, div in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n}B"
