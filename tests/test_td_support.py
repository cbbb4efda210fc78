"""Shared set-up for the TD / DPAMT tests (no tests here): a booted module plus a KVM-like host.

The module is brought up exactly as Linux does it (tests/linux_tdmr.py LinuxHost.tdx_enable),
with TDH.SYS.CONFIG R8 bit 16 set when Dynamic PAMT is wanted (RFC v5 patch 23).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from linux_tdmr import LinuxHost, q35_memblocks

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import TdxModule
from vtdx.module import control as ctl
from vtdx.platform.memory import GuestRam, PhysMemory, SparseMemory
from vtdx.platform.profile import Profile
from vtdx.testing.invariants import check_invariants
from vtdx.testing.td_host import KvmHost, PageAllocator

GiB = 1 << 30
MiB = 1 << 20
INFO_PA = 0x100_0000
ARRAY_PA = 0x110_0000
#: Host pages for TD control structures and guest memory come from here (far from the
#: seed's fixed pfns 0x1b090c, 0x119b4f, 0x511a00 and from the PAMT at the top of RAM).
ALLOC_BASE = 8 * GiB
ALLOC_SIZE = 1 * GiB


@dataclass
class World:
    module: TdxModule
    host: KvmHost
    control: ctl.Controller

    def check(self) -> None:
        problems = check_invariants(self.module)
        assert not problems, "\n".join(problems)


def make_world(*, dpamt: bool = True, smp: int = 4, mem: int = 24 * GiB,
               generation: str = "1.5", ram_file: Path | None = None) -> World:
    """``ram_file``: back the host RAM with this (sparse) file as QEMU's memory backend
    does, so TDs can run (the TD vCPU engine maps it); otherwise in-memory pages."""
    p = Profile.from_vm(smp, mem, dynamic_pamt=dpamt, demote_nointerrupt=True,
                        generation=generation)
    memory: PhysMemory
    if ram_file is not None:
        with open(ram_file, "wb") as f:
            f.truncate(sum(r.size for r in p.ram))
        memory = GuestRam(ram_file, p.ram)
    else:
        memory = SparseMemory(p.ram)
    m = TdxModule(p, memory)

    def seamcall(lp: int, regs: Regs) -> Regs:
        if dpamt and regs.rax == Leaf.TDH_SYS_CONFIG:
            regs = regs.copy(r8=regs.r8 | (1 << 16))
        return m.seamcall(lp, regs)

    linux = LinuxHost(seamcall, list(range(p.num_lps)), p.package_of)
    linux.tdx_enable(q35_memblocks(mem), m.memory, tdx_keyid_start=p.tdx_keyid_start,
                     info_pa=INFO_PA, array_pa=ARRAY_PA)
    assert m.dynamic_pamt_enabled == dpamt
    host = KvmHost(m.seamcall, m.memory, PageAllocator(ALLOC_BASE, ALLOC_SIZE),
                   num_packages=p.num_packages, lps_per_package=p.lps_per_package,
                   dpamt=dpamt, tdcs_pages=p.tdcs_base_size // 4096,
                   tdvps_pages=p.tdvps_base_size // 4096, keyid_shift=p.hkid_start_bit)
    return World(m, host, m.control)


def expected_mrtd(images: dict[int, bytes]) -> bytes:
    """MRTD after PAGE.ADD + 16 MR.EXTENDs of each 4 KB image, computed independently of the
    model: one 128-byte block per operation (name, GPA, zeros), then each 256-byte chunk
    (tdh_mem_page_add.c, tdh_mr_extend.c)."""

    def block(name: bytes, gpa: int) -> bytes:
        return name.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)

    h = hashlib.sha384()
    for gpa, image in images.items():
        h.update(block(b"MEM.PAGE.ADD", gpa))
        for off in range(0, 4096, 256):
            h.update(block(b"MR.EXTEND", gpa + off))
            h.update(image[off:off + 256])
    return h.digest()
