"""How Linux 7.3 brings up the TDX module, re-implemented in Python for replay tests.

Mirrors arch/x86/virt/vmx/tdx/tdx.c (7.3): ``build_tdx_memlist`` (memblocks minus the first
1 MB), ``fill_out_tdmrs`` (one 1 GB-aligned TDMR per memory region unless already covered),
``tdmr_set_up_pamt`` (per level: pages x entry size rounded up to 4 KB, one contiguous
allocation ordered 4K, 2M, 1G), ``tdmr_populate_rsvd_areas`` (holes, then PAMTs, sorted),
``tdmrs_count_pamt_kb`` (the "N KB allocated for PAMT" line), the TDMR_INFO layout
(``struct tdmr_info``, 512-byte aligned, size depends on MAX_RESERVED_PER_TDMR) and the
SEAMCALL sequence of ``tdx_enable()`` -> ``init_tdx_module()`` with its registers.

Where the kernel's choice depends on runtime state (where alloc_contig_pages() finds room,
where kmalloc puts the TDMR array) the caller passes addresses; the defaults are simple and
documented. The KERNEL engineer reuses ``build_tdmrs`` / ``pamt_kb`` to check real boots.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vtdx.abi import fields as fl
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.abi.status import decode
from vtdx.platform.memory import PhysMemory

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
TDMR_INFO_ALIGNMENT = 512
TDMR_INFO_PA_ARRAY_ALIGNMENT = 512
PS_4K, PS_2M, PS_1G = 0, 1, 2
_SHIFT = (12, 21, 30)


@dataclass(frozen=True)
class SysInfoTdmr:
    """struct tdx_sys_info_tdmr: what the kernel read via TDH.SYS.RD."""

    max_tdmrs: int = 64
    max_reserved_per_tdmr: int = 16
    pamt_entry_size: tuple[int, int, int] = (16, 16, 16)  # 4K, 2M, 1G


@dataclass
class Tdmr:
    """struct tdmr_info as the kernel fills it (PAMT indexed by PS_4K/PS_2M/PS_1G)."""

    base: int
    size: int
    pamt_base: list[int] = field(default_factory=lambda: [0, 0, 0])
    pamt_size: list[int] = field(default_factory=lambda: [0, 0, 0])
    reserved: list[tuple[int, int]] = field(default_factory=list)  # (offset, size)

    @property
    def end(self) -> int:
        return self.base + self.size

    def pamt_range(self) -> tuple[int, int]:
        """tdmr_get_pamt(): the single allocation starts at the 4K PAMT."""
        return self.pamt_base[PS_4K], sum(self.pamt_size)


Memblock = tuple[int, int]  # [start, end) physical addresses, page aligned, ascending
PamtAllocator = Callable[[int, Tdmr], int]  # (bytes, tdmr) -> base PA


class TdmrBuildError(Exception):
    """What the kernel reports as -ENOSPC ("TDMRs exhausted", "reserved areas exhausted")."""


def build_memlist(memblocks: list[Memblock]) -> list[Memblock]:
    """build_tdx_memlist(): skip the first 1 MB, drop empty regions."""
    out = []
    for start, end in memblocks:
        start = max(start, MiB)
        if start < end:
            out.append((start, end))
    return out


def tdmr_get_pamt_sz(tdmr: Tdmr, pgsz: int, entry_size: int) -> int:
    """Entries for the TDMR at ``pgsz`` times the entry size, rounded up to 4 KB."""
    n = tdmr.size >> _SHIFT[pgsz]
    return -(-(n * entry_size) // PAGE) * PAGE


def fill_out_tdmrs(memlist: list[Memblock], max_tdmrs: int) -> list[Tdmr]:
    tdmrs: list[Tdmr] = []
    for start_pa, end_pa in memlist:
        start = start_pa & ~(GiB - 1)
        end = -(-end_pa // GiB) * GiB
        if tdmrs:
            cur = tdmrs[-1]
            if end <= cur.end:
                continue
            if start < cur.end:
                start = cur.end
            if len(tdmrs) >= max_tdmrs:
                raise TdmrBuildError("initialization failed: TDMRs exhausted.")
        tdmrs.append(Tdmr(start, end - start))
    return tdmrs


def top_down_allocator(memlist: list[Memblock]) -> PamtAllocator:
    """Default PAMT placement: first fit from the top of TDX memory, 4 KB aligned.

    (The kernel's alloc_contig_pages() result depends on the page allocator's state; any
    placement inside TDX memory is valid for the module.)
    """
    free = [list(r) for r in memlist]

    def alloc(nbytes: int, _tdmr: Tdmr) -> int:
        for r in reversed(free):
            base = (r[1] - nbytes) & ~(PAGE - 1)
            if base >= r[0]:
                r[1] = base
                return base
        raise TdmrBuildError("no memory for PAMT")

    return alloc


def set_up_pamts(tdmrs: list[Tdmr], sysinfo: SysInfoTdmr, alloc: PamtAllocator) -> None:
    """tdmr_set_up_pamt() for every TDMR."""
    for t in tdmrs:
        sizes = [tdmr_get_pamt_sz(t, ps, sysinfo.pamt_entry_size[ps]) for ps in (0, 1, 2)]
        base = alloc(sum(sizes), t)
        for ps in (PS_4K, PS_2M, PS_1G):
            t.pamt_base[ps] = base
            t.pamt_size[ps] = sizes[ps]
            base += sizes[ps]


def _add_rsvd(t: Tdmr, addr: int, size: int, max_rsvd: int) -> None:
    if len(t.reserved) >= max_rsvd:
        raise TdmrBuildError(
            f"initialization failed: TDMR [{t.base:#x}, {t.end:#x}): reserved areas exhausted.")
    t.reserved.append((addr - t.base, size))


def populate_rsvd_areas(tdmrs: list[Tdmr], memlist: list[Memblock], max_rsvd: int) -> None:
    """tdmr_populate_rsvd_holes() + tdmr_populate_rsvd_pamts() + sort, per TDMR."""
    for t in tdmrs:
        prev_end = t.base
        for start, end in memlist:
            if start >= t.end:
                break
            if end < t.base:
                continue
            if start <= prev_end:
                prev_end = end
                continue
            _add_rsvd(t, prev_end, start - prev_end, max_rsvd)
            prev_end = end
        if prev_end < t.end:
            _add_rsvd(t, prev_end, t.end - prev_end, max_rsvd)
        for other in tdmrs:
            pbase, psize = other.pamt_range()
            pend = pbase + psize
            if pend <= t.base or pbase >= t.end:
                continue
            _add_rsvd(t, max(pbase, t.base), min(pend, t.end) - max(pbase, t.base), max_rsvd)
        t.reserved.sort()


def build_tdmrs(memblocks: list[Memblock], sysinfo: SysInfoTdmr,
                alloc: PamtAllocator | None = None) -> list[Tdmr]:
    """construct_tdmrs() from memblock memory ranges: TDMRs with PAMTs and reserved areas."""
    memlist = build_memlist(memblocks)
    tdmrs = fill_out_tdmrs(memlist, sysinfo.max_tdmrs)
    set_up_pamts(tdmrs, sysinfo, alloc or top_down_allocator(memlist))
    populate_rsvd_areas(tdmrs, memlist, sysinfo.max_reserved_per_tdmr)
    return tdmrs


def pamt_kb(tdmrs: list[Tdmr]) -> int:
    """tdmrs_count_pamt_kb(): the number in "N KB allocated for PAMT"."""
    return sum(t.pamt_range()[1] for t in tdmrs) // 1024


def tdmr_info_size(max_reserved_per_tdmr: int) -> int:
    """tdmr_size_single(): 64-byte header + 16 bytes per reserved area, 512-aligned."""
    raw = 64 + 16 * max_reserved_per_tdmr
    return -(-raw // TDMR_INFO_ALIGNMENT) * TDMR_INFO_ALIGNMENT


def tdmr_info_bytes(t: Tdmr, max_reserved_per_tdmr: int) -> bytes:
    """One struct tdmr_info, zero padded to its slot size."""
    head = struct.pack("<8Q", t.base, t.size, t.pamt_base[PS_1G], t.pamt_size[PS_1G],
                       t.pamt_base[PS_2M], t.pamt_size[PS_2M], t.pamt_base[PS_4K],
                       t.pamt_size[PS_4K])
    rsvd = b"".join(struct.pack("<2Q", o, s) for o, s in t.reserved)
    return (head + rsvd).ljust(tdmr_info_size(max_reserved_per_tdmr), b"\0")


def pa_array_size(count: int) -> int:
    """config_tdx_module(): roundup_pow_of_two(count * 8), at least 512 bytes."""
    n = count * 8
    size = 1 << (n - 1).bit_length() if n > 1 else 1
    return max(size, TDMR_INFO_PA_ARRAY_ALIGNMENT)


def write_tdmr_info(mem: PhysMemory, tdmrs: list[Tdmr], info_pa: int, array_pa: int,
                    max_reserved_per_tdmr: int) -> tuple[int, int]:
    """Lay out the TDMR_INFO array at ``info_pa`` and the PA array at ``array_pa``.

    Returns (RCX, RDX) for TDH.SYS.CONFIG.
    """
    slot = tdmr_info_size(max_reserved_per_tdmr)
    pas = []
    for i, t in enumerate(tdmrs):
        pa = info_pa + i * slot
        mem.write(pa, tdmr_info_bytes(t, max_reserved_per_tdmr))
        pas.append(pa)
    arr = b"".join(struct.pack("<Q", pa) for pa in pas)
    mem.write(array_pa, arr.ljust(pa_array_size(len(tdmrs)), b"\0"))
    return array_pa, len(tdmrs)


# --- the SEAMCALL sequence ------------------------------------------------------------------

class SeamcallFailed(Exception):
    """A SEAMCALL the kernel would treat as an error (seamcall_prerr)."""

    def __init__(self, leaf: int, status: int) -> None:
        super().__init__(f"SEAMCALL {Leaf(leaf).name} failed: {decode(status)} ({status:#018x})")
        self.leaf = leaf
        self.status = status


@dataclass
class Call:
    lp: int
    regs_in: Regs
    regs_out: Regs

    @property
    def leaf(self) -> int:
        return self.regs_in.rax & 0xFFFF

    @property
    def status(self) -> int:
        return self.regs_out.rax


@dataclass
class BootResult:
    """What the replay learned, in the kernel's terms."""

    sysinfo: dict[str, int | list[int]]
    tdmrs: list[Tdmr]
    pamt_kb: int
    global_keyid: int
    calls: list[Call]

    def count(self, leaf: int) -> int:
        return sum(1 for c in self.calls if c.leaf == leaf)


class LinuxHost:
    """Issues SEAMCALLs to a module the way Linux 7.3 does (``seamcall(lp, regs)`` target)."""

    def __init__(self, seamcall: Callable[[int, Regs], Regs], cpus: list[int],
                 package_of: Callable[[int], int]) -> None:
        self._seamcall = seamcall
        self.cpus = cpus
        self.package_of = package_of
        self.calls: list[Call] = []

    def call(self, lp: int, leaf: int, **regs: int) -> Regs:
        regs_in = Regs(rax=int(leaf), **regs)
        out = self._seamcall(lp, regs_in)
        self.calls.append(Call(lp, regs_in, out))
        if out.rax:
            raise SeamcallFailed(leaf, out.rax)
        return out

    def read_field(self, lp: int, field_id: int) -> int:
        return self.call(lp, Leaf.TDH_SYS_RD, rdx=field_id).r8

    def get_sys_info(self, lp: int) -> dict[str, int | list[int]]:
        """get_tdx_sys_info(): the fields and order of tdx_global_metadata.c (7.3)."""
        info: dict[str, int | list[int]] = {}
        for name in fl.LINUX_BOOT_FIELDS:
            info[name] = self.read_field(lp, fl.GLOBAL_BY_NAME[name].field_id)
        n = int(info["NUM_CPUID_CONFIG"])  # type: ignore[arg-type]
        if n > 128:
            raise SeamcallFailed(Leaf.TDH_SYS_RD, 0)
        leaves_id = fl.GLOBAL_BY_NAME["CPUID_CONFIG_LEAVES"].field_id
        values_id = fl.GLOBAL_BY_NAME["CPUID_CONFIG_VALUES"].field_id
        info["CPUID_CONFIG_LEAVES"] = [self.read_field(lp, leaves_id + i) for i in range(n)]
        info["CPUID_CONFIG_VALUES"] = [
            self.read_field(lp, values_id + i * 2 + j) for i in range(n) for j in range(2)
        ]
        return info

    def tdx_enable(self, memblocks: list[Memblock], mem: PhysMemory, *, tdx_keyid_start: int,
                   info_pa: int, array_pa: int, alloc: PamtAllocator | None = None
                   ) -> BootResult:
        """cpuhp online callback on every CPU, then init_tdx_module() on the first CPU."""
        boot = self.cpus[0]
        for i, cpu in enumerate(self.cpus):  # tdx_online_cpu -> tdx_cpu_enable
            if i == 0:
                self.call(cpu, Leaf.TDH_SYS_INIT, rcx=0)
            self.call(cpu, Leaf.TDH_SYS_LP_INIT)
        sysinfo = self.get_sys_info(boot)
        if not int(sysinfo["TDX_FEATURES0"]) & fl.FEATURES0_NO_RBP_MOD:  # check_features
            raise SeamcallFailed(Leaf.TDH_SYS_RD, 0)
        st = SysInfoTdmr(int(sysinfo["MAX_TDMRS"]), int(sysinfo["MAX_RESERVED_PER_TDMR"]),
                         (int(sysinfo["PAMT_4K_ENTRY_SIZE"]), int(sysinfo["PAMT_2M_ENTRY_SIZE"]),
                          int(sysinfo["PAMT_1G_ENTRY_SIZE"])))
        tdmrs = build_tdmrs(memblocks, st, alloc)
        rcx, rdx = write_tdmr_info(mem, tdmrs, info_pa, array_pa, st.max_reserved_per_tdmr)
        global_keyid = tdx_keyid_start  # tdx_init(): the first TDX keyid
        self.call(boot, Leaf.TDH_SYS_CONFIG, rcx=rcx, rdx=rdx, r8=global_keyid)
        done: set[int] = set()  # config_global_keyid(): one CPU per package, in CPU order
        for cpu in self.cpus:
            pkg = self.package_of(cpu)
            if pkg in done:
                continue
            done.add(pkg)
            self.call(cpu, Leaf.TDH_SYS_KEY_CONFIG)
        for t in tdmrs:  # init_tdmrs() -> init_tdmr()
            while True:
                nxt = self.call(boot, Leaf.TDH_SYS_TDMR_INIT, rcx=t.base).rdx
                if nxt >= t.end:
                    break
        return BootResult(sysinfo, tdmrs, pamt_kb(tdmrs), global_keyid, self.calls)


def q35_memblocks(mem_bytes: int) -> list[Memblock]:
    """memblock.memory of a q35/SeaBIOS guest with ``mem_bytes`` RAM (e820 usable ranges).

    SeaBIOS reports [0, 0x9fc00) and [1 MB, low_end - 128 KB) usable (it keeps its tables in
    the top 128 KB of low RAM: "BIOS-e820: [mem 0x100000-0x7ffdffff] usable" for 2 GiB), plus
    [4 GB, ...) above the PCI hole; memblock trims to pages.
    """
    low = mem_bytes if mem_bytes < 0xB000_0000 else 0x8000_0000
    blocks = [(0, 0x9F000), (MiB, low - 0x20000)]
    if mem_bytes > low:
        blocks.append((4 * GiB, 4 * GiB + mem_bytes - low))
    return blocks
