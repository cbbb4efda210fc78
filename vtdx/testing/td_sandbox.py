"""An in-process TD for engine tests, benchmarks and guest development.

It implements ``TdView`` with a small S-EPT of its own (4 KB and 2 MB leaves, and the
2 MB ranges that have an S-EPT page) and builds KVM-style shared EPT tables in host RAM.
It is not the module: it has no PAMT, no locks and no status codes of host-side leaves.
Its walk follows the module's secure_ept_walk() rule (stop at the requested level, at a
leaf, or at an entry without RWX) so the engine sees what the module would report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from vtdx.abi.status import TDX_METADATA_FIELD_ID_INCORRECT, TDX_SUCCESS
from vtdx.module.engine.hostram import HostRam
from vtdx.module.engine.interfaces import (
    LEVEL_2M,
    LEVEL_4K,
    NUM_RTMRS,
    RTMR_SIZE,
    SEPT_BLOCKED,
    SEPT_FREE,
    SEPT_MAPPED,
    SEPT_NL_MAPPED,
    SEPT_PENDING,
    SeptWalk,
    TdConfig,
    level_size,
    rtmr_extended,
)
from vtdx.module.engine.registry import TdEngines
from vtdx.platform.profile import Region

SIZE_2M = 1 << 21


@contextmanager
def temp_host_ram(size: int = 64 << 20) -> Iterator[HostRam]:
    """A sparse temporary RAM file mapped as one region at HPA 0."""
    fd, path = tempfile.mkstemp(prefix="vtdx-hostram-")
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        ram = HostRam(path, (Region(0, size),))
        try:
            yield ram
        finally:
            ram.close()
    finally:
        os.unlink(path)


class SandboxTd:
    """A TD's private memory map and configuration, host pages taken from ``ram``."""

    def __init__(self, ram: HostRam, config: TdConfig | None = None,
                 first_free_hpa: int = 1 << 20) -> None:
        self.ram = ram
        self.config = config or TdConfig()
        self.engines = TdEngines()
        self._next = first_free_hpa
        self.leaves: dict[tuple[int, int], tuple[int, int]] = {}   # (level, gpa) -> (state, hpa)
        self.pt_pages: set[int] = set()       # 2 MB ranges with a 4 KB-level S-EPT page
        self.metadata: dict[int, int] = {}
        self.writable: set[int] = set()
        self.cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.last_base_leaf = 0x23
        self.last_extended_leaf = 0x8000_0008
        self.vcpus = 1
        self.rtmr = [bytes(RTMR_SIZE)] * NUM_RTMRS

    # -- host pages ------------------------------------------------------------------
    def alloc(self, size: int = 4096) -> int:
        hpa = (self._next + size - 1) & ~(size - 1)
        if hpa + size > self.ram.size:
            raise MemoryError("sandbox host RAM exhausted")
        self._next = hpa + size
        self.ram.zero(hpa, size)
        return hpa

    # -- S-EPT (host side, as TDH.MEM.* would leave it) ------------------------------
    def sept_add(self, gpa: int) -> None:
        """TDH.MEM.SEPT.ADD of the 4 KB-level S-EPT page for the 2 MB range of ``gpa``."""
        self.pt_pages.add(gpa & ~(SIZE_2M - 1))

    def page_add(self, gpa: int, data: bytes = b"") -> int:
        """TDH.MEM.PAGE.ADD: a MAPPED 4 KB page with ``data``."""
        self.sept_add(gpa)
        hpa = self.alloc()
        self.ram.write(hpa, data[:4096])
        self.leaves[(LEVEL_4K, gpa & ~0xFFF)] = (SEPT_MAPPED, hpa)
        self.engines.sept_changed("ADD", gpa, LEVEL_4K)
        return hpa

    def page_aug(self, gpa: int, level: int = LEVEL_4K, fill: int = 0xA5) -> int:
        """TDH.MEM.PAGE.AUG: a PENDING page (filled with garbage the ACCEPT must clear)."""
        size = level_size(level)
        if level == LEVEL_4K:
            self.sept_add(gpa)
        hpa = self.alloc(size)
        self.ram.write(hpa, bytes([fill]) * size)
        self.leaves[(level, gpa & ~(size - 1))] = (SEPT_PENDING, hpa)
        self.engines.sept_changed("AUG", gpa, level)
        return hpa

    def range_block(self, gpa: int, level: int = LEVEL_4K) -> None:
        key = (level, gpa & ~(level_size(level) - 1))
        state, hpa = self.leaves[key]
        self.leaves[key] = (SEPT_BLOCKED if state == SEPT_MAPPED else state, hpa)
        self.engines.sept_changed("BLOCK", gpa, level)

    def page_remove(self, gpa: int, level: int = LEVEL_4K) -> None:
        self.leaves.pop((level, gpa & ~(level_size(level) - 1)))
        self.engines.sept_changed("REMOVE", gpa, level)

    # -- GpaTranslator -----------------------------------------------------------------
    def sept_walk(self, gpa: int, level: int) -> SeptWalk:
        g2 = gpa & ~(SIZE_2M - 1)
        big = self.leaves.get((LEVEL_2M, g2))
        if big is not None:
            return SeptWalk(LEVEL_2M, big[0], True, big[1])
        if g2 not in self.pt_pages:
            return SeptWalk(LEVEL_2M, SEPT_FREE, False)
        if level == LEVEL_2M:
            return SeptWalk(LEVEL_2M, SEPT_NL_MAPPED, False)
        leaf = self.leaves.get((LEVEL_4K, gpa & ~0xFFF))
        if leaf is None:
            return SeptWalk(LEVEL_4K, SEPT_FREE, False)
        return SeptWalk(LEVEL_4K, leaf[0], True, leaf[1])

    def sept_accept(self, gpa: int, level: int) -> bool:
        key = (level, gpa & ~(level_size(level) - 1))
        state, hpa = self.leaves.get(key, (SEPT_FREE, 0))
        if state != SEPT_PENDING:
            return False
        self.leaves[key] = (SEPT_MAPPED, hpa)
        return True

    # -- TdMetadata ----------------------------------------------------------------------
    def guest_read(self, field_id: int) -> tuple[int, int]:
        if field_id not in self.metadata:
            return TDX_METADATA_FIELD_ID_INCORRECT, 0
        return TDX_SUCCESS, self.metadata[field_id]

    def guest_write(self, field_id: int, value: int, mask: int) -> tuple[int, int]:
        if field_id not in self.writable:
            return TDX_METADATA_FIELD_ID_INCORRECT, 0
        old = self.metadata[field_id]
        self.metadata[field_id] = (old & ~mask) | (value & mask)
        return TDX_SUCCESS, old

    # -- CpuidConfig -------------------------------------------------------------------
    def cpuid_lookup(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        return self.cpuid.get((leaf, subleaf), self.cpuid.get((leaf, -1)))

    def num_vcpus(self) -> int:
        return self.vcpus

    def rtmr_extend(self, index: int, data: bytes) -> None:
        self.rtmr[index] = rtmr_extended(self.rtmr[index], data)


class SharedEpt:
    """KVM's shared EPT for one TD as bytes in host RAM: 4 levels, 4 KB leaves, WB."""

    def __init__(self, td: SandboxTd) -> None:
        self.td = td
        self.root = td.alloc()
        #: What KVM writes with TDH.VP.WR 0x203C: root | (levels - 1) << 3 | WB (6).
        self.eptp = self.root | 3 << 3 | 6

    def map(self, gpa: int, hpa: int, rwx: int = 7) -> None:
        ram = self.td.ram
        table = self.root
        for lvl in (3, 2, 1):
            slot = table + ((gpa >> (12 + 9 * lvl)) & 511) * 8
            e = ram.read_u64(slot)
            if not e & 7:
                e = self.td.alloc() | 7
                ram.write_u64(slot, e)
            table = e & 0x000F_FFFF_FFFF_F000
        ram.write_u64(table + ((gpa >> 12) & 511) * 8, hpa | rwx | 6 << 3)

    def unmap(self, gpa: int, suppress_ve: bool = True) -> None:
        """Make the leaf non-present; with ``suppress_ve`` clear the guest gets a #VE."""
        ram = self.td.ram
        table = self.root
        for lvl in (3, 2, 1):
            e = ram.read_u64(table + ((gpa >> (12 + 9 * lvl)) & 511) * 8)
            table = e & 0x000F_FFFF_FFFF_F000
        ram.write_u64(table + ((gpa >> 12) & 511) * 8, (1 << 63) if suppress_ve else 0)
        self.td.engines.sept_changed("BLOCK", gpa)
