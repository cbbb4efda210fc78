"""Physical memory as the TDX module sees it: read/write/zero by host physical address.

The module model reads TDMR_INFO, TD_PARAMS and page contents through this interface and
writes PAMT-visible results (zeroed pages, MOVDIR64B-style clears) back. Two
implementations: ``SparseMemory`` for in-process tests, and the mmap'd guest RAM used under
QEMU. An address outside RAM raises ``PhysAddrError``; the module turns that into a TDX
status code, never a crash.
"""

from __future__ import annotations

import mmap
import os
from typing import Protocol

from vtdx.errors import VtdxError
from vtdx.platform.profile import Region

PAGE_SIZE = 4096


class PhysAddrError(Exception):
    """An access touched a physical address that is not backed by RAM."""

    def __init__(self, pa: int, size: int) -> None:
        super().__init__(f"physical range {pa:#x}+{size:#x} is not RAM")
        self.pa = pa
        self.size = size


class PhysMemory(Protocol):
    """What the module needs from physical memory."""

    def contains(self, pa: int, size: int = 1) -> bool: ...

    def read(self, pa: int, size: int) -> bytes: ...

    def write(self, pa: int, data: bytes) -> None: ...

    def zero(self, pa: int, size: int) -> None: ...


class _RegionChecked:
    """Bounds checking shared by the implementations."""

    regions: tuple[Region, ...]

    def contains(self, pa: int, size: int = 1) -> bool:
        return size >= 0 and any(r.contains(pa, size) for r in self.regions)

    def _check(self, pa: int, size: int) -> None:
        if pa < 0 or not self.contains(pa, max(size, 1)):
            raise PhysAddrError(pa, size)

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")  # type: ignore[attr-defined]

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, (value & ((1 << 64) - 1)).to_bytes(8, "little"))  # type: ignore[attr-defined]


class SparseMemory(_RegionChecked):
    """In-process RAM for unit tests: pages materialise on first write, read as zero."""

    def __init__(self, regions: tuple[Region, ...]) -> None:
        self.regions = tuple(regions)
        self._pages: dict[int, bytearray] = {}

    def read(self, pa: int, size: int) -> bytes:
        self._check(pa, size)
        out = bytearray()
        while size > 0:
            page, off = divmod(pa, PAGE_SIZE)
            n = min(size, PAGE_SIZE - off)
            buf = self._pages.get(page)
            out += buf[off : off + n] if buf is not None else bytes(n)
            pa += n
            size -= n
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        view = memoryview(data)
        while view:
            page, off = divmod(pa, PAGE_SIZE)
            n = min(len(view), PAGE_SIZE - off)
            buf = self._pages.setdefault(page, bytearray(PAGE_SIZE))
            buf[off : off + n] = view[:n]
            pa += n
            view = view[n:]

    def zero(self, pa: int, size: int) -> None:
        self._check(pa, size)
        end = pa + size
        while pa < end:
            page, off = divmod(pa, PAGE_SIZE)
            n = min(end - pa, PAGE_SIZE - off)
            if n == PAGE_SIZE:
                self._pages.pop(page, None)
            elif page in self._pages:
                self._pages[page][off : off + n] = bytes(n)
            pa += n


class GuestRam(_RegionChecked):
    """QEMU's guest RAM, shared through ``memory-backend-file,share=on`` and mmap'd here.

    QEMU lays the RAM block out contiguously in the file; the machine maps it at
    guest-physical ``regions`` in order (q35: [0, low) then [4 GiB, 4 GiB + high), the PCI
    hole in between), so a guest-physical address becomes a file offset by region.
    """

    def __init__(self, path: str | os.PathLike[str], regions: tuple[Region, ...]) -> None:
        self.regions = tuple(regions)
        self.path = os.fspath(path)
        self.size = sum(r.size for r in self.regions)
        self._offsets: list[tuple[Region, int]] = []
        off = 0
        for r in self.regions:
            self._offsets.append((r, off))
            off += r.size
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise VtdxError(f"cannot open guest RAM {self.path}: {e.strerror}") from None
        try:
            have = os.fstat(fd).st_size
            if have < self.size:
                raise VtdxError(f"{self.path} holds {have} bytes; guest RAM is {self.size}")
            self._mm: mmap.mmap | None = mmap.mmap(fd, self.size, mmap.MAP_SHARED,
                                                   mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def offset(self, pa: int, size: int = 1) -> int:
        """File offset of guest-physical ``pa``; the whole range must be in one region."""
        for r, off in self._offsets:
            if r.contains(pa, max(size, 1)):
                return off + (pa - r.base)
        raise PhysAddrError(pa, size)

    def read(self, pa: int, size: int) -> bytes:
        off = self.offset(pa, size)
        return self._map()[off : off + size]

    def write(self, pa: int, data: bytes) -> None:
        off = self.offset(pa, len(data))
        self._map()[off : off + len(data)] = data

    def zero(self, pa: int, size: int) -> None:
        off = self.offset(pa, size)
        self._map()[off : off + size] = bytes(size)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("guest RAM is unmapped")
        return self._mm

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
