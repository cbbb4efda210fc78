"""Host physical memory as the engine maps it: the RAM file QEMU shares, mmap'd once.

Unicorn needs a host pointer per RAM region (uc_mem_map_ptr), which the module's
``PhysMemory`` interface does not expose. The engine therefore maps the same file itself
(MAP_SHARED, so QEMU, the module's ``GuestRam`` and every engine see one copy of every
byte) and lays the regions out at their host-physical bases: unicorn's "physical" address
space is HPA. Page-table and shared-EPT walks read 8-byte entries straight from the map.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import Protocol

from vtdx.errors import VtdxError
from vtdx.platform.profile import Region


class _FileBackedRam(Protocol):
    """The public face of the module's GuestRam this class needs."""

    path: str
    regions: tuple[Region, ...]


class HostRam:
    """Every RAM region of the host, contiguous in one file in region order (q35 layout)."""

    def __init__(self, path: str | os.PathLike[str], regions: Sequence[Region]) -> None:
        self.path = os.fspath(path)
        self.regions = tuple(regions)
        self.size = sum(r.size for r in self.regions)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise VtdxError(f"cannot open host RAM {self.path}: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size < self.size:
                raise VtdxError(f"{self.path} is smaller than host RAM ({self.size} bytes)")
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self.mm)   # keeps the buffer exported
        self.base = ctypes.addressof(self._anchor)
        #: (hpa base, hpa end, file offset) per region, for HPA -> map offset.
        self.spans: tuple[tuple[int, int, int], ...] = ()
        off = 0
        spans = []
        for r in self.regions:
            spans.append((r.base, r.end, off))
            off += r.size
        self.spans = tuple(spans)
        # Fast path: the low region starts at HPA 0 and is where almost everything lives.
        self._low_end = spans[0][1] if spans and spans[0][0] == 0 else 0

    @classmethod
    def for_guest_ram(cls, ram: _FileBackedRam) -> HostRam:
        """Map the file behind the module's GuestRam (its public ``path`` and ``regions``)."""
        return cls(ram.path, ram.regions)

    def offset(self, hpa: int) -> int:
        """Map offset of ``hpa``; raises ``KeyError`` outside RAM."""
        if hpa < self._low_end:
            return hpa
        for lo, hi, off in self.spans:
            if lo <= hpa < hi:
                return off + hpa - lo
        raise KeyError(hpa)

    def contains(self, hpa: int) -> bool:
        try:
            self.offset(hpa)
        except KeyError:
            return False
        return True

    def read_u64(self, hpa: int) -> int:
        o = self.offset(hpa)
        return int.from_bytes(self.mm[o:o + 8], "little")

    def write_u64(self, hpa: int, value: int) -> None:
        o = self.offset(hpa)
        self.mm[o:o + 8] = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")

    def read(self, hpa: int, size: int) -> bytes:
        o = self.offset(hpa)
        return self.mm[o:o + size]

    def write(self, hpa: int, data: bytes) -> None:
        o = self.offset(hpa)
        self.mm[o:o + len(data)] = data

    def zero(self, hpa: int, size: int) -> None:
        o = self.offset(hpa)
        self.mm[o:o + size] = bytes(size)

    def close(self) -> None:
        """Unmap. Engines using this map must be closed first."""
        del self._anchor
        self.mm.close()
