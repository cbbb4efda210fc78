"""A host-side driver that issues TD SEAMCALLs the way Linux KVM's TDX code does.

Used by tests and by anyone who wants to drive the model without a kernel: builds TD_PARAMS
in physical memory, runs the per-ioctl SEAMCALL sequences of
Linux arch/x86/kvm/vmx/tdx.c (KVM_TDX_INIT_VM, INIT_VCPU, INIT_MEM_REGION,
FINALIZE_VM, fault-in with SEPT.ADD + PAGE.AUG, zap with BLOCK/TRACK/REMOVE, teardown, and
KVM_RUN: TDH.VP.ENTER with KVM's exit handling, ``KvmHost.run``) and,
with Dynamic PAMT, the kernel's tdx_pamt_get()/tdx_pamt_put() refcounting around every page
it hands to the module (RFC v5 patches 14-16). Every call goes through
``TdxModule.seamcall(lp, regs)``; nothing touches model internals.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs

PAGE = 4096
SZ_2M = 2 << 20
NULL_PA = (1 << 64) - 1

Seamcall = Callable[[int, Regs], Regs]


class SeamcallError(Exception):
    """A SEAMCALL returned an error the caller did not expect."""

    def __init__(self, leaf: int, status: int, out: Regs) -> None:
        super().__init__(f"{Leaf(leaf).name}: {st.decode(status)} ({status:#018x})")
        self.leaf = leaf
        self.status = status
        self.out = out


class PageAllocator:
    """4 KB / 2 MB page allocator over one physical range (the host's page allocator)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.end = base + size
        self._next4k = base
        self._next2m = self.end
        self.free4k: list[int] = []

    def page(self) -> int:
        if self.free4k:
            return self.free4k.pop()
        pa = self._next4k
        self._next4k += PAGE
        if self._next4k > self._next2m:
            raise MemoryError("page allocator exhausted")
        return pa

    def huge(self) -> int:
        self._next2m = (self._next2m - SZ_2M) & ~(SZ_2M - 1)
        if self._next2m < self._next4k:
            raise MemoryError("page allocator exhausted")
        return self._next2m

    def put(self, pa: int) -> None:
        self.free4k.append(pa)


def td_params(*, attributes: int = 1 << 28, xfam: int = 0x3, max_vcpus: int = 4,
              eptp_controls: int = 0x1E, config_flags: int = 1 << 2,
              tsc_frequency: int = 0x78,
              cpuid_values: list[tuple[int, int, int, int]] | None = None) -> bytes:
    """A 1024-byte TD_PARAMS as KVM's setup_tdparams() builds it (tdx_api_defs.h layout)."""
    buf = bytearray(1024)
    struct.pack_into("<QQHBB", buf, 0, attributes, xfam, max_vcpus, 0, 0)
    struct.pack_into("<QQH", buf, 24, eptp_controls, config_flags, tsc_frequency)
    for i, vals in enumerate(cpuid_values or []):
        struct.pack_into("<IIII", buf, 256 + 16 * i, *vals)
    return bytes(buf)


@dataclass
class Vcpu:
    tdvpr: int
    tdvpx: list[int]
    lp: int


@dataclass
class Td:
    """What KVM remembers about one TD (struct kvm_tdx)."""

    tdr: int
    hkid: int
    tdcx: list[int] = field(default_factory=list)
    vcpus: list[Vcpu] = field(default_factory=list)
    #: S-EPT pages by (level of the entry that points to them, GPA base)
    sept: dict[tuple[int, int], int] = field(default_factory=dict)
    #: private pages by GPA: (HPA, level)
    private: dict[int, tuple[int, int]] = field(default_factory=dict)


# TD exit reasons KVM handles (Linux arch/x86/kvm/vmx/tdx.c __tdx_handle_exit).
EXIT_TRIPLE_FAULT = 2
EXIT_OTHER_SMI = 6
EXIT_EPT_VIOLATION = 48
EXIT_TDCALL = 77
# Extended exit qualification types (tdx-module vmcs_defs.h vmx_eeq_type_t).
EEQ_ACCEPT = 1
EEQ_PENDING_EPT_VIOLATION = 6
#: Statuses after which KVM retries: the fault is taken again on re-entry.
_BUSY_CLASSES = frozenset({st.TDX_OPERAND_BUSY, st.TDX_PREVIOUS_TLB_EPOCH_BUSY,
                           st.TDX_OPERAND_BUSY_HOST_PRIORITY})


def is_busy(status: int) -> bool:
    return status & 0xFFFF_FFFF_0000_0000 in _BUSY_CLASSES


@dataclass
class RunResult:
    """How ``KvmHost.run`` ended: the last VP.ENTER output and the exits seen per reason."""

    out: Regs
    exits: dict[int, int] = field(default_factory=dict)
    stop: str = ""


#: The VMM's TDVMCALL handler: (vcpu, exit registers) -> reply registers, or None to stop.
TdvmcallHandler = Callable[["Vcpu", Regs], "Regs | None"]
#: The VMM's shared-GPA EPT violation handler: (vcpu, GPA with the shared bit).
SharedFaultHandler = Callable[["Vcpu", int], None]


class KvmHost:
    """KVM-like caller: one instance per host, any number of TDs."""

    def __init__(self, seamcall: Seamcall, memory: object, alloc: PageAllocator, *,
                 num_packages: int = 1, lps_per_package: int = 1, dpamt: bool = False,
                 tdcs_pages: int = 4, tdvps_pages: int = 6, keyid_shift: int = 41) -> None:
        self._seamcall = seamcall
        self.mem = memory
        self.alloc = alloc
        self.num_packages = num_packages
        self.lps_per_package = lps_per_package
        self.dpamt = dpamt
        self.tdcs_pages = tdcs_pages
        self.tdvps_pages = tdvps_pages
        self.keyid_shift = keyid_shift
        #: Linux's per-2MB DPAMT refcounts (tdx_pamt_get/put) and the pair it installed.
        self.pamt_refcount: dict[int, int] = {}
        self.pamt_pairs: dict[int, tuple[int, int]] = {}
        self.log: list[tuple[int, Regs, Regs]] = []
        #: KVM's mmu_lock around S-EPT changes made by the run loops of several vCPUs.
        self.mmu_lock = threading.RLock()
        #: Per vCPU (TDVPR): in the guest now, and how many entries returned so far; the
        #: KVM_REQ_OUTSIDE_GUEST_MODE wait after TDH.MEM.TRACK uses them.
        self._guest = threading.Condition()
        self._in_guest: dict[int, bool] = {}
        self._entries: dict[int, int] = {}

    # -- raw calls ---------------------------------------------------------------------------
    def call(self, lp: int, leaf: int, version: int = 0, *, expect: int | None = 0,
             **regs: int) -> Regs:
        regs_in = Regs(rax=int(leaf) | (version << 16), **regs)
        out = self._seamcall(lp, regs_in)
        self.log.append((lp, regs_in, out))
        if expect is not None and out.rax != expect:
            raise SeamcallError(leaf, out.rax, out)
        return out

    # -- Dynamic PAMT (arch/x86/virt/vmx/tdx/tdx.c, tdx_pamt_get/put) ---------------------
    def pamt_get(self, pa: int, lp: int = 0) -> None:
        if not self.dpamt:
            return
        rng = pa & ~(SZ_2M - 1)
        n = self.pamt_refcount.get(rng, 0)
        if n == 0:
            pair = (self.alloc.page(), self.alloc.page())
            self.call(lp, Leaf.TDH_PHYMEM_PAMT_ADD, rcx=rng | 1, rdx=pair[0], r8=pair[1])
            self.pamt_pairs[rng] = pair
        self.pamt_refcount[rng] = n + 1

    def pamt_put(self, pa: int, lp: int = 0) -> None:
        if not self.dpamt:
            return
        rng = pa & ~(SZ_2M - 1)
        n = self.pamt_refcount[rng] - 1
        if n == 0:
            out = self.call(lp, Leaf.TDH_PHYMEM_PAMT_REMOVE, rcx=rng | 1)
            del self.pamt_refcount[rng]
            pair = self.pamt_pairs.pop(rng)
            assert (out.rdx, out.r8) == pair, "PAMT.REMOVE returned another pair"
            self.alloc.put(pair[0])
            self.alloc.put(pair[1])
        else:
            self.pamt_refcount[rng] = n

    def control_page(self, lp: int = 0) -> int:
        """tdx_alloc_control_page(): a page plus its DPAMT backing."""
        pa = self.alloc.page()
        self.pamt_get(pa, lp)
        return pa

    # -- KVM_TDX_INIT_VM ----------------------------------------------------------------------
    def init_vm(self, hkid: int, params: bytes | None = None, lp: int = 0) -> Td:
        td = Td(self.control_page(lp), hkid)
        self.call(lp, Leaf.TDH_MNG_CREATE, rcx=td.tdr, rdx=hkid)
        for pkg in range(self.num_packages):
            self.call(pkg * self.lps_per_package, Leaf.TDH_MNG_KEY_CONFIG, rcx=td.tdr)
        for _ in range(self.tdcs_pages):
            pa = self.control_page(lp)
            self.call(lp, Leaf.TDH_MNG_ADDCX, rcx=pa, rdx=td.tdr)
            td.tdcx.append(pa)
        params_pa = self.alloc.page()
        self.mem.write(params_pa, params if params is not None else td_params())  # type: ignore[attr-defined]
        self.call(lp, Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=params_pa)
        self.alloc.put(params_pa)
        self.call(lp, Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=0x110000000000000A)
        self.call(lp, Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=0x110000000000000B)
        return td

    # -- KVM_TDX_INIT_VCPU ----------------------------------------------------------------------
    def create_vcpu(self, td: Td, lp: int) -> Vcpu:
        """TDH.VP.CREATE and the TDH.VP.ADDCXs of one vCPU (tdx_td_vcpu_init before its
        TDH.VP.INIT): a vCPU that exists but was never initialised."""
        v = Vcpu(self.control_page(lp), [], lp)
        self.call(lp, Leaf.TDH_VP_CREATE, rcx=v.tdvpr, rdx=td.tdr)
        for _ in range(self.tdvps_pages - 1):
            pa = self.control_page(lp)
            self.call(lp, Leaf.TDH_VP_ADDCX, rcx=pa, rdx=v.tdvpr)
            v.tdvpx.append(pa)
        td.vcpus.append(v)
        return v

    def init_vcpu(self, td: Td, lp: int, x2apic_id: int, init_rcx: int = 0) -> Vcpu:
        v = self.create_vcpu(td, lp)
        self.call(lp, Leaf.TDH_VP_INIT, 1, rcx=v.tdvpr, rdx=init_rcx, r8=x2apic_id)
        self.call(lp, Leaf.TDH_VP_WR, rcx=v.tdvpr, rdx=0x2, r8=0xF2, r9=(1 << 64) - 1)
        return v

    def set_shared_eptp(self, v: Vcpu, eptp: int) -> None:
        """tdx_load_mmu_pgd(): TDH.VP.WR of the TD VMCS shared EPTP (field 0x203C)."""
        self.call(v.lp, Leaf.TDH_VP_WR, rcx=v.tdvpr, rdx=0x203C, r8=eptp, r9=(1 << 64) - 1)

    # -- S-EPT population (tdx_sept_link_private_spt) --------------------------------------
    def ensure_sept(self, td: Td, gpa: int, level: int, lp: int = 0) -> None:
        """SEPT.ADD for every missing table above a mapping at ``level``."""
        for lvl in (3, 2, 1):
            if lvl <= level:
                break
            base = gpa & ~((1 << (12 + 9 * lvl)) - 1)
            if (lvl, base) in td.sept:
                continue
            pa = self.control_page(lp)
            self.call(lp, Leaf.TDH_MEM_SEPT_ADD, rcx=base | lvl, rdx=td.tdr, r8=pa)
            td.sept[(lvl, base)] = pa

    # -- KVM_TDX_INIT_MEM_REGION -------------------------------------------------------------
    def add_page(self, td: Td, gpa: int, source: bytes, measure: bool = True,
                 lp: int = 0) -> int:
        self.ensure_sept(td, gpa, 0, lp)
        src = self.alloc.page()
        self.mem.write(src, source.ljust(PAGE, b"\0"))  # type: ignore[attr-defined]
        page = self.alloc.page()
        self.pamt_get(page, lp)
        self.call(lp, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa, rdx=td.tdr, r8=page, r9=src)
        if measure:
            for off in range(0, PAGE, 256):
                self.call(lp, Leaf.TDH_MR_EXTEND, rcx=gpa + off, rdx=td.tdr)
        self.alloc.put(src)
        td.private[gpa] = (page, 0)
        return page

    def finalize(self, td: Td, lp: int = 0) -> None:
        self.call(lp, Leaf.TDH_MR_FINALIZE, rcx=td.tdr)

    # -- EPT violation: SEPT.ADD + PAGE.AUG -------------------------------------------------
    def aug(self, td: Td, gpa: int, level: int = 0, hpa: int | None = None,
            lp: int = 0) -> int:
        self.ensure_sept(td, gpa, level, lp)
        if hpa is None:
            hpa = self.alloc.page() if level == 0 else self.alloc.huge()
        if level == 0:
            self.pamt_get(hpa, lp)
        self.call(lp, Leaf.TDH_MEM_PAGE_AUG, rcx=gpa | level, rdx=td.tdr, r8=hpa)
        td.private[gpa] = (hpa, level)
        return hpa

    # -- split: BLOCK, TRACK, DEMOTE ------------------------------------------------------
    def block_track(self, td: Td, gpa: int, level: int, lp: int = 0) -> None:
        self.call(lp, Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | level, rdx=td.tdr)
        self.track(td, lp)

    def track(self, td: Td, lp: int = 0) -> None:
        """tdx_track(): TDH.MEM.TRACK, then kvm_make_all_cpus_request(OUTSIDE_GUEST_MODE):
        every vCPU in the guest at this point leaves it once before the caller goes on."""
        self.call(lp, Leaf.TDH_MEM_TRACK, rcx=td.tdr)
        with self._guest:
            waiting = {v.tdvpr: self._entries.get(v.tdvpr, 0) for v in td.vcpus
                       if self._in_guest.get(v.tdvpr)}
            self._guest.wait_for(lambda: all(self._entries.get(k, 0) != n
                                             for k, n in waiting.items()), timeout=30)

    def demote_regs(self, td: Td, gpa: int, sept_page: int, pair: tuple[int, int] | None,
                    level: int = 1) -> dict[str, int]:
        regs = {"rcx": gpa | level, "rdx": td.tdr, "r8": sept_page}
        if pair is not None:
            regs["r12"], regs["r13"] = pair
        return regs

    def demote(self, td: Td, gpa: int, lp: int = 0, pair: tuple[int, int] | None = None,
               sept_page: int | None = None, expect: int | None = 0) -> Regs:
        """tdh_mem_page_demote() with Yan Zhao's fix: refcount 0 -> 512 on success."""
        hpa, level = td.private[gpa]
        if sept_page is None:
            sept_page = self.control_page(lp)
        if self.dpamt and pair is None:
            pair = (self.alloc.page(), self.alloc.page())
        out = self.call(lp, Leaf.TDH_MEM_PAGE_DEMOTE, expect=expect,
                        **self.demote_regs(td, gpa, sept_page, pair if self.dpamt else None,
                                           level))
        if out.rax == 0:
            self.commit_demote(td, gpa, sept_page, pair)
        return out

    def commit_demote(self, td: Td, gpa: int, sept_page: int,
                      pair: tuple[int, int] | None) -> None:
        hpa, level = td.private.pop(gpa)
        td.sept[(level, gpa)] = sept_page
        size = 1 << (12 + 9 * (level - 1))
        for i in range(512):
            td.private[gpa + i * size] = (hpa + i * size, level - 1)
        if self.dpamt and level == 1 and pair is not None:
            rng = hpa & ~(SZ_2M - 1)
            assert self.pamt_refcount.get(rng, 0) == 0
            self.pamt_refcount[rng] = 512
            self.pamt_pairs[rng] = pair

    # -- zap: BLOCK, TRACK, REMOVE, WBINVD ------------------------------------------------
    def remove(self, td: Td, gpa: int, lp: int = 0) -> None:
        hpa, level = td.private.pop(gpa)
        self.call(lp, Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | level, rdx=td.tdr)
        self.track(td, lp)
        out = self.call(lp, Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa | level, rdx=td.tdr)
        assert out.rcx == hpa
        self.call(lp, Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=hpa | (td.hkid << self.keyid_shift))
        if level == 0:
            self.pamt_put(hpa, lp)

    # -- KVM_RUN: TDH.VP.ENTER and the exits KVM handles ---------------------------------
    def vp_enter(self, v: Vcpu, replies: Regs | None = None, *,
                 expect: int | None = None) -> Regs:
        """One TDH.VP.ENTER of ``v`` on its LP (tdx_vcpu_enter_exit: RCX = TDVPR, the other
        GPRs carry KVM's TDVMCALL replies)."""
        r = replies.to_dict() if replies is not None else {}
        r.pop("rax", None)
        r["rcx"] = v.tdvpr
        with self._guest:
            self._in_guest[v.tdvpr] = True
        try:
            return self.call(v.lp, Leaf.TDH_VP_ENTER, expect=expect, **r)
        finally:
            with self._guest:
                self._in_guest[v.tdvpr] = False
                self._entries[v.tdvpr] = self._entries.get(v.tdvpr, 0) + 1
                self._guest.notify_all()

    def run(self, td: Td, v: Vcpu, tdvmcall: TdvmcallHandler, *,
            shared_fault: SharedFaultHandler | None = None, shared_bit: int = 1 << 47,
            max_exits: int = 100_000, until: Callable[[], bool] | None = None) -> RunResult:
        """KVM_RUN's loop over TDH.VP.ENTER (tdx_vcpu_run + __tdx_handle_exit):
        - OTHER_SMI: re-enter (nothing to do, tdx.c returns 1 for it), unless ``until()``
          says the VMM is done with this vCPU (stop "until": a guest that only spins);
        - EPT violation on a private GPA: SEPT.ADD + PAGE.AUG at the guest's ACCEPT level (4 KB
          otherwise); an ACCEPT level below an existing mapping splits it (BLOCK, TRACK,
          DEMOTE); a PENDING-page access (EEQ type 6) stops the run as KVM kills the VM
          ("Guest access before accepting"); a BUSY status is retried by re-entering;
        - EPT violation on a shared GPA: ``shared_fault``;
        - TDCALL with R10 = 0: ``tdvmcall`` builds the reply (None stops the run);
        - triple fault or any error status: the run stops.
        """
        res = RunResult(Regs())
        replies: Regs | None = None
        for _ in range(max_exits):
            out = self.vp_enter(v, replies)
            res.out = out
            replies = None
            status = out.rax
            if status >> 32 and not status & (1 << 62):
                res.stop = "error" if not is_busy(status) else "busy"
                if is_busy(status):
                    continue
                return res
            reason = status & 0xFFFF
            res.exits[reason] = res.exits.get(reason, 0) + 1
            if reason == EXIT_OTHER_SMI:
                if until is not None and until():
                    res.stop = "until"
                    return res
                continue
            if reason == EXIT_TRIPLE_FAULT:
                res.stop = "triple_fault"
                return res
            if reason == EXIT_EPT_VIOLATION:
                gpa = out.r8
                if gpa & shared_bit:
                    if shared_fault is None:
                        res.stop = "shared_fault"
                        return res
                    shared_fault(v, gpa)
                    continue
                if out.rdx & 0xF == EEQ_PENDING_EPT_VIOLATION:
                    res.stop = "pending_access"
                    return res
                self.fault_in(td, gpa, out.rdx, v.lp)
                continue
            if reason == EXIT_TDCALL:
                reply = tdvmcall(v, out)
                if reply is None:
                    res.stop = "vmm"
                    return res
                replies = reply
                continue
            res.stop = f"exit {reason}"
            return res
        res.stop = "max_exits"
        return res

    def fault_in(self, td: Td, gpa: int, eeq: int, lp: int) -> None:
        """tdx_handle_ept_violation -> kvm_mmu_page_fault for a private GPA, under mmu_lock.
        An ACCEPT exit carries the level the guest wants (EEQ bits 34:32) and the level of
        the entry the module met (37:35): a mapping above the wanted level is split."""
        want = (eeq >> 32) & 7 if eeq & 0xF == EEQ_ACCEPT else 0
        with self.mmu_lock:
            base = gpa & ~((1 << (12 + 9 * want)) - 1)
            try:
                for g, (_, level) in list(td.private.items()):
                    if level > want and g <= gpa < g + (1 << (12 + 9 * level)):
                        self.block_track(td, g, level, lp)
                        self.demote(td, g, lp)
                        return
                if base not in td.private:
                    self.aug(td, base, level=want, lp=lp)
            except SeamcallError as e:
                if not is_busy(e.status):
                    raise

    # -- teardown (tdx_mmu_release_hkid, tdx_vm_free) -------------------------------------
    def teardown(self, td: Td) -> None:
        for v in td.vcpus:
            # tdx_flush_vp(): only a vCPU loaded on some CPU is flushed; one that never got
            # TDH.VP.INIT is associated with no LP.
            out = self.call(v.lp, Leaf.TDH_VP_FLUSH, rcx=v.tdvpr, expect=None)
            if out.rax not in (0, st.TDX_VCPU_NOT_ASSOCIATED):
                raise SeamcallError(Leaf.TDH_VP_FLUSH, out.rax, out)
        self.call(0, Leaf.TDH_MNG_VPFLUSHDONE, rcx=td.tdr)
        for pkg in range(self.num_packages):
            self.call(pkg * self.lps_per_package, Leaf.TDH_PHYMEM_CACHE_WB, rcx=0,
                      expect=None)
        self.call(0, Leaf.TDH_MNG_KEY_FREEID, rcx=td.tdr)
        for hpa, level in sorted(td.private.values()):
            self.reclaim(hpa, level)
        td.private.clear()
        for pa in td.sept.values():
            self.reclaim(pa)
        td.sept.clear()
        for v in td.vcpus:
            for pa in [*v.tdvpx, v.tdvpr]:
                self.reclaim(pa)
        for pa in td.tdcx:
            self.reclaim(pa)
        self.reclaim(td.tdr)

    def reclaim(self, pa: int, level: int = 0) -> Regs:
        out = self.call(0, Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=pa)
        assert out.r8 == level, f"reclaimed {pa:#x} at level {out.r8}, expected {level}"
        if level == 0:
            self.pamt_put(pa)
        return out


class SharedEpt:
    """KVM's shared EPT of one TD as bytes in host memory (4 levels, 4 KB leaves, WB),
    the tables the engine walks for GPAs with the shared bit; non-present leaves carry
    suppress-#VE as KVM's do (shadow_nonpresent_value / SHADOW_NONPRESENT_VALUE)."""

    def __init__(self, mem: object, alloc: PageAllocator) -> None:
        self.mem = mem
        self.alloc = alloc
        self.root = self._table()
        #: What KVM writes with TDH.VP.WR 0x203C: the bare root HPA (tdx_load_mmu_pgd); the
        #: module walks it with the TD's own EPT levels.
        self.eptp = self.root

    def _table(self) -> int:
        pa = self.alloc.page()
        self.mem.write(pa, b"\0" * 7 + b"\x80" * 1 + (b"\0" * 7 + b"\x80") * 511)  # type: ignore[attr-defined]
        return pa

    def _u64(self, pa: int) -> int:
        return int.from_bytes(self.mem.read(pa, 8), "little")  # type: ignore[attr-defined]

    def _put(self, pa: int, value: int) -> None:
        self.mem.write(pa, value.to_bytes(8, "little"))  # type: ignore[attr-defined]

    def _leaf_slot(self, gpa: int, create: bool) -> int | None:
        table = self.root
        for lvl in (3, 2, 1):
            slot = table + ((gpa >> (12 + 9 * lvl)) & 511) * 8
            e = self._u64(slot)
            if not e & 7:
                if not create:
                    return None
                e = self._table() | 7
                self._put(slot, e)
            table = e & 0x000F_FFFF_FFFF_F000
        return table + ((gpa >> 12) & 511) * 8

    def map(self, gpa: int, hpa: int) -> None:
        slot = self._leaf_slot(gpa, True)
        assert slot is not None
        self._put(slot, hpa | 7 | 6 << 3)

    def unmap(self, gpa: int) -> None:
        slot = self._leaf_slot(gpa, False)
        if slot is not None:
            self._put(slot, 1 << 63)
