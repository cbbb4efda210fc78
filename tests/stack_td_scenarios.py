"""TD scenarios recorded in-process as SEAMCALL scripts (vtdx.testing.seamscript), no tests here.

Each scenario runs against a fresh in-process ``TdxModule`` whose platform matches the
whole-stack VM (smp 2, 2 GiB, Dynamic PAMT and DEMOTE_NOINTERRUPT on): module init as
Linux 7.3 does it (tests/linux_tdmr.py), then the TD leaves as KVM issues them
(vtdx/module/td_host.py). Every page handed to the module, and every buffer the host
writes, is at or above 256 MiB, so replaying the script in the test guest never touches
the guest's image, page tables or stacks (below 8 MiB) or the script (64 MiB).

The race uses the seed's pfns scaled into 1 GiB (pfn & 0x3ffff, i.e. the same address
modulo 1 GiB), which keeps every relation the race depends on: the DEMOTE's DPAMT page A1
(R12, pfn 0x3090c) and the PAMT.ADD target (pfn 0x3090d) sit in the same 2MB range, the
guest's 2MB page (pfn 0x11a00) and the second DPAMT page B1 (R13, pfn 0x19b4f) elsewhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from linux_tdmr import LinuxHost, q35_memblocks

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import TdxModule
from vtdx.platform.memory import GuestRam, PhysMemory, SparseMemory
from vtdx.platform.profile import Profile, Region
from vtdx.testing import td_test_guest as tg
from vtdx.testing.race_loop import lp0_steps, lp1_steps
from vtdx.testing.seamscript import BARRIER, CONCURRENT, REENTER, WAIT_GO, Recorder, Script
from vtdx.testing.td_host import KvmHost, PageAllocator, SharedEpt, Td, Vcpu, td_params

MiB = 1 << 20
GiB = 1 << 30
SMP = 2
MEM = 2 * GiB
INFO_PA = 256 * MiB            # TDMR_INFO array (the kernel's kmalloc'd buffer)
ARRAY_PA = INFO_PA + 1 * MiB   # the TDMR PA array
ALLOC_BASE = 1 * GiB           # host pages for TD structures and guest memory
ALLOC_SIZE = 512 * MiB         # (the PAMT sits just below 2 GiB - 128 KiB)

SCALE_MASK = 0x3FFFF           # pfn modulo 1 GiB
GUEST_2M_HPA = (0x511A00 & SCALE_MASK) << 12
DPAMT_A1 = (0x1B090C & SCALE_MASK) << 12        # R12 of the DEMOTE
DPAMT_B1 = (0x119B4F & SCALE_MASK) << 12        # R13 of the DEMOTE
PAMT_ADD_PA = (0x1B090D & SCALE_MASK) << 12     # LP1 installs a pair for this 2MB range
RACE_GPA = 0x4000_0000
BUSY_RCX = 0x8000020000000001                   # tdh_phymem_pamt_add.c: BUSY | RCX
BUSY_R12 = 0x800002000000000C                   # pamt_manager.c pamt_demote(): BUSY | R12

IMAGES = {0x1000: b"\x90" * 4096, 0x2000: bytes(range(256)) * 16}


class _TracksWrites:
    """Remembers which pages were written (by the module or the host), so the whole-stack
    run's guest RAM can be compared page by page. Mixed in before a memory class."""

    touched: set[int]

    def _touch(self, pa: int, size: int) -> None:
        self.touched.update(range(pa >> 12, ((pa + max(size, 1) - 1) >> 12) + 1))

    def write(self, pa: int, data: bytes) -> None:
        super().write(pa, data)  # type: ignore[misc]
        self._touch(pa, len(data))

    def zero(self, pa: int, size: int) -> None:
        super().zero(pa, size)  # type: ignore[misc]
        self._touch(pa, size)


class TrackedMemory(_TracksWrites, SparseMemory):
    """In-process RAM that remembers which pages were written."""

    def __init__(self, regions: tuple[Region, ...]) -> None:
        super().__init__(regions)
        self.touched = set()


class TrackedGuestRam(_TracksWrites, GuestRam):
    """``TrackedMemory`` backed by a file as QEMU's RAM is, so the in-process module can
    run TD guest code (its vCPU engine maps the file)."""

    def __init__(self, path: Path, regions: tuple[Region, ...]) -> None:
        with open(path, "wb") as f:
            f.truncate(sum(r.size for r in regions))
        super().__init__(path, regions)
        self.touched = set()


def stack_profile() -> Profile:
    """The platform both the recording and the whole-stack VM use."""
    return Profile.from_vm(SMP, MEM, dynamic_pamt=True, demote_nointerrupt=True)


class ScenarioWorld:
    """A module brought up by Linux's sequence, every SEAMCALL through a Recorder."""

    def __init__(self, ram_file: Path | None = None) -> None:
        """``ram_file``: back RAM with this file (TDs can run guest code), else in memory."""
        p = self.profile = stack_profile()
        self.memory: PhysMemory = (TrackedMemory(p.ram) if ram_file is None
                                   else TrackedGuestRam(ram_file, p.ram))
        self.module = TdxModule(p, self.memory)
        self.rec = Recorder(self.module.seamcall, self.module.memory)

        def linux_call(lp: int, regs: Regs) -> Regs:
            if regs.rax == Leaf.TDH_SYS_CONFIG:  # RFC v5 patch 23: enable Dynamic PAMT
                regs = regs.copy(r8=regs.r8 | (1 << 16))
            return self.rec.seamcall(lp, regs)

        LinuxHost(linux_call, list(range(p.num_lps)), p.package_of).tdx_enable(
            q35_memblocks(MEM), self.rec.memory, tdx_keyid_start=p.tdx_keyid_start,
            info_pa=INFO_PA, array_pa=ARRAY_PA)
        assert self.module.dynamic_pamt_enabled
        self.host = KvmHost(self.rec.seamcall, self.rec.memory,
                            PageAllocator(ALLOC_BASE, ALLOC_SIZE),
                            num_packages=p.num_packages, lps_per_package=p.lps_per_package,
                            dpamt=True, tdcs_pages=p.tdcs_base_size // 4096,
                            tdvps_pages=p.tdvps_base_size // 4096,
                            keyid_shift=p.hkid_start_bit)
        self.hkid = p.tdx_keyid_start + 1


@dataclass
class Lifecycle:
    """A whole TD life; ``mrtd`` is what the in-process module measured."""

    script: Script
    module: TdxModule
    tdr: int
    mrtd: bytes


def record_lifecycle() -> Lifecycle:
    """Create, keys, init, two vCPUs, PAGE.ADD + MR.EXTEND, FINALIZE, AUG 4K/2M, BLOCK/TRACK/
    DEMOTE (Dynamic PAMT), REMOVE, teardown with KEY.FREEID and RECLAIM."""
    w = ScenarioWorld()
    h = w.host
    td = h.init_vm(w.hkid)
    h.init_vcpu(td, 0, 0)
    h.init_vcpu(td, 1, 1)
    for gpa, image in IMAGES.items():
        h.add_page(td, gpa, image)
    h.finalize(td)
    mrtd = w.module.gd.tds[td.tdr].mrtd
    h.aug(td, 0x10_0000, level=0)
    h.aug(td, 0x20_0000, level=1)
    h.aug(td, 0x40_0000, level=1)
    h.block_track(td, 0x20_0000, level=1)
    h.demote(td, 0x20_0000)
    h.remove(td, 0x20_3000)
    h.remove(td, 0x10_0000, lp=1)
    h.remove(td, 0x1000)
    h.teardown(td)
    assert not h.pamt_refcount and not w.module.gd.tds
    return Lifecycle(w.rec.script(), w.module, td.tdr, mrtd)


ORDERS = ("demote-first", "pamt-add-first", "serialised")


@dataclass
class Race:
    """The seed's DEMOTE (LP0) vs PAMT.ADD (LP1) race recorded in one order.

    ``demote`` / ``pamt_add`` are the racing records' sequence numbers; ``retry`` the
    follow-up call that succeeds once the other one finished (None when serialised).
    """

    order: str
    script: Script
    module: TdxModule
    tdr: int
    sept_page: int
    add_pair: tuple[int, int]
    demote: int
    pamt_add: int
    retry: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def paused_leaf(self) -> tuple[int, Leaf]:
        """(LP, leaf) the whole-stack run pauses at its "locked" point."""
        if self.order == "pamt-add-first":
            return 1, Leaf.TDH_PHYMEM_PAMT_ADD
        return 0, Leaf.TDH_MEM_PAGE_DEMOTE


def record_race(order: str) -> Race:
    """Set up a runnable TD with a 2MB page AUGed at GUEST_2M_HPA, blocked and tracked, then
    race DEMOTE against PAMT.ADD in ``order`` (in-process, with the module's pause point)."""
    if order not in ORDERS:
        raise ValueError(order)
    w = ScenarioWorld()
    h, m, rec = w.host, w.module, w.rec
    td = h.init_vm(w.hkid)
    h.init_vcpu(td, 0, 0)
    h.finalize(td)
    h.aug(td, RACE_GPA, level=1, hpa=GUEST_2M_HPA)
    h.block_track(td, RACE_GPA, level=1)
    sept_page = h.control_page()
    add_pair = (h.alloc.page(), h.alloc.page())
    demote = Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE, rcx=RACE_GPA | 1, rdx=td.tdr, r8=sept_page,
                  r12=DPAMT_A1, r13=DPAMT_B1)
    pamt_add = Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=(PAMT_ADD_PA & ~0x1FFFFF) | 1,
                    rdx=add_pair[0], r8=add_pair[1])
    first = len(rec)
    retry = None
    if order == "serialised":
        assert rec.call(0, demote).rax == 0
        assert rec.call(1, pamt_add).rax == 0
        seq_demote, seq_add = first, first + 1
    else:
        demote_first = order == "demote-first"
        lp, regs = (0, demote) if demote_first else (1, pamt_add)
        other_lp, other = (1, pamt_add) if demote_first else (0, demote)
        leaf = Leaf.TDH_MEM_PAGE_DEMOTE if demote_first else Leaf.TDH_PHYMEM_PAMT_ADD
        pause = m.control.pause(lp=lp, leaf=leaf, point="locked")
        held: list[Regs] = []
        t = threading.Thread(target=lambda: held.append(rec.call(lp, regs, flags=CONCURRENT)))
        t.start()
        assert pause.wait_paused(5)
        busy = rec.call(other_lp, other, flags=WAIT_GO, go=0)
        assert busy.rax == (BUSY_RCX if demote_first else BUSY_R12)
        assert busy.rax == st.TDX_OPERAND_BUSY + (st.OPERAND_ID_RCX if demote_first
                                                  else st.OPERAND_ID_R12)
        pause.resume()
        t.join(5)
        assert held[0].rax == 0
        # the loser retries once the winner is out of the module, and now succeeds
        assert rec.call(other_lp, other, flags=BARRIER).rax == 0
        seq_demote, seq_add = (first, first + 1) if demote_first else (first + 1, first)
        retry = first + 2
    script = rec.script()
    return Race(order, script, m, td.tdr, sept_page, add_pair, seq_demote, seq_add, retry)


@dataclass
class RaceLoop:
    """The seed's two calls in a loop (vtdx/testing/race_loop.py) after the race's set-up."""

    script: Script
    tdr: int


def record_race_loop() -> RaceLoop:
    """The set-up of ``record_race`` recorded; then LOOP records: LP0 DEMOTE/BLOCK/TRACK/
    PROMOTE/BLOCK/TRACK of the 2MB page, LP1 PAMT.ADD/PAMT.REMOVE of A1's 2MB range."""
    w = ScenarioWorld()
    h, rec = w.host, w.rec
    td = h.init_vm(w.hkid)
    h.init_vcpu(td, 0, 0)
    h.finalize(td)
    h.aug(td, RACE_GPA, level=1, hpa=GUEST_2M_HPA)
    h.block_track(td, RACE_GPA, level=1)
    sept_page = h.control_page()
    add_pair = (h.alloc.page(), h.alloc.page())
    for regs in lp0_steps(td.tdr, RACE_GPA, sept_page, (DPAMT_A1, DPAMT_B1)):
        rec.add_loop(0, regs)
    for regs in lp1_steps(PAMT_ADD_PA, add_pair):
        rec.add_loop(1, regs)
    return RaceLoop(rec.script(), td.tdr)


#: TD statuses from intel/tdx-module (tdx_error_codes_defs.h), spelled out so a renamed or
#: renumbered constant in vtdx.abi cannot make the tests agree with themselves.
OP_STATE_INCORRECT = 0xC000060800000000      # check_state_map_tdcs_and_lock
VCPU_STATE_INCORRECT = 0xC000070000000000    # check_and_associate_vcpu, 1.5: no operand
VCPU_ASSOCIATED = 0x8000070100000000         # associate_vcpu: no operand
#: The EPT-violation TD exit of a read of a PENDING page under SEPT_VE_DISABLE
#: (td_ept_violation.c -> td_other_exits.c tdx_ept_violation_exit_to_vmm): RAX = TDX_SUCCESS
#: | basic reason 48, RCX = the exit qualification with bits 12:7 cleared (a data read of a
#: not-present entry: bit 0 only), RDX = extended qualification type 6
#: (VMX_EEQ_PENDING_EPT_VIOLATION), R8 = the GPA with bits 11:0 cleared, R9 and the other
#: GPRs 0 (td_exit.c async_tdexit_internal).
PENDING_EXIT = {"rax": 48, "rcx": 0x1, "rdx": 6, "r8": tg.PENDING_GPA, "r9": 0}
SHARED_BIT = 1 << 47                          # GPAW 48 (4-level EPT in td_params)


@dataclass
class VpEnterNegatives:
    """TDH.VP.ENTER's refusals and a pending-page TD exit, each a record's sequence number.

    ``not_runnable``: before TDH.MR.FINALIZE; ``uninitialised``: a vCPU created and given
    its TDVPX pages but never TDH.VP.INIT'ed; ``pending``: the vCPU runs the test guest's
    T_PENDING routine (read of an AUGed, never accepted page) on LP0; ``associated``: that
    vCPU entered from LP1 without TDH.VP.FLUSH; ``after_flush``: from LP1 after LP0 flushed
    it, the guest's read faults the same way again.
    """

    script: Script
    module: TdxModule
    tdr: int
    tdvpr: int
    raw_tdvpr: int
    not_runnable: int
    uninitialised: int
    pending: int
    associated: int
    after_flush: int


def record_vp_enter_negatives(ram_file: Path) -> VpEnterNegatives:
    """One TD (SEPT_VE_DISABLE) with the engine's test guest added by TDH.MEM.PAGE.ADD
    (reset vector page, page tables, 64-bit code), two vCPUs (one never initialised), and
    the TDH.VP.ENTER cases in the order above, then KVM's teardown."""
    w = ScenarioWorld(ram_file)
    h, rec = w.host, w.rec
    td = h.init_vm(w.hkid, td_params(max_vcpus=2))
    v = h.init_vcpu(td, 0, 0, tg.T_PENDING)
    raw = h.create_vcpu(td, 0)
    for gpa, data in tg.guest_pages(SHARED_BIT).items():
        h.add_page(td, gpa, data, measure=False)
    h.set_shared_eptp(v, SharedEpt(rec.memory, h.alloc).eptp)

    def enter(lp: int, vcpu: Vcpu, flags: int = 0) -> int:
        seq = len(rec)
        rec.call(lp, Regs(rax=Leaf.TDH_VP_ENTER, rcx=vcpu.tdvpr), flags=flags)
        return seq

    not_runnable = enter(0, v)
    h.finalize(td)
    uninitialised = enter(0, raw)
    h.aug(td, tg.PENDING_GPA)
    pending = enter(0, v, REENTER)
    associated = enter(1, v)
    h.call(0, Leaf.TDH_VP_FLUSH, rcx=v.tdvpr)
    after_flush = enter(1, v, REENTER)
    v.lp = 1
    h.teardown(td)
    assert not h.pamt_refcount and not w.module.gd.tds
    return VpEnterNegatives(rec.script(), w.module, td.tdr, v.tdvpr, raw.tdvpr, not_runnable,
                            uninitialised, pending, associated, after_flush)


@dataclass
class SlicedEntry:
    """One TDH.VP.ENTER (REENTER) of a vCPU computing for many time slices: ``enter`` is its
    sequence number, ``slices`` how many time-slice exits the recording re-entered."""

    script: Script
    module: TdxModule
    enter: int
    slices: int


def _runnable_test_guest_td(w: ScenarioWorld, routine: int,
                            loop_count: int) -> tuple[Td, Vcpu]:
    """A finalized 1-vCPU TD whose vCPU runs the test guest's ``routine`` (its pages added
    with TDH.MEM.PAGE.ADD, ``loop_count`` in SAVE), KVM's shared EPT pointer set."""
    h = w.host
    td = h.init_vm(w.hkid, td_params(max_vcpus=1))
    v = h.init_vcpu(td, 0, 0, routine)
    for gpa, data in tg.guest_pages(SHARED_BIT, loop_count=loop_count).items():
        h.add_page(td, gpa, data, measure=False)
    h.set_shared_eptp(v, SharedEpt(w.rec.memory, h.alloc).eptp)
    h.finalize(td)
    return td, v


def record_sliced_entry(ram_file: Path, iterations: int) -> SlicedEntry:
    """The test guest's T_COMPUTE routine (``iterations`` rounds of six instructions, then
    a TDG.VP.VMCALL report of its result in R12) on a runnable TD, entered once with
    REENTER, then KVM's teardown."""
    w = ScenarioWorld(ram_file)
    h, rec = w.host, w.rec
    td, v = _runnable_test_guest_td(w, tg.T_COMPUTE, iterations)
    seq = len(rec)
    rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=v.tdvpr), flags=REENTER)
    slices = sum(n for (_, leaf, rax), n in w.module.stats.counts.items()
                 if leaf == Leaf.TDH_VP_ENTER and rax == 6)
    h.teardown(td)
    assert not w.module.gd.tds
    return SlicedEntry(rec.script(), w.module, seq, slices)


#: The 0-step mitigation's emulated exit (tdh_vp_enter.c emulate_ept_violation_td_exit,
#: td_exit_stepping.c td_entry_stepping_filter): TDX_SUCCESS | EPT_VIOLATION (48), RCX =
#: the exit qualification of a data write (bit 1), R8 = the listed GPA, every other GPR 0.
ZERO_STEP_EXIT = {"rax": 48, "rcx": 0x2, "rdx": 0, "r8": tg.SCRATCH, "r9": 0}
ZERO_STEP_ITERATIONS = 10
#: tdh_vp_enter.c (after revert_tlb_tracking_state): TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE
#: (146, tdx_error_codes_defs.h) when the S-EPT tree lock cannot be taken EXCLUSIVE.
BUSY_SEPT_TREE = 0x8000020000000092


@dataclass
class ZeroStep:
    """A vCPU entered again and again while its guest faults at one RIP on a blocked page.

    ``faulting``: the entries that ran the guest into the EPT violation (the first
    ``threshold`` only count, the last one logs the GPA); ``emulated``: the entries after
    it, answered without running the guest; ``unblock``: TDH.MEM.RANGE.UNBLOCK of the page;
    ``resumed``: the entry after it, which runs the guest to its report (that progress
    resets the tracking). With contention, ``aug`` is a TDH.MEM.PAGE.AUG on LP1 held at
    its "locked" point (the S-EPT tree lock SHARED) while ``busy``, an entry on LP0, fails
    to take that lock EXCLUSIVE; the last ``emulated`` entry follows once the AUG is done.
    ``vcpu_log`` is, per entry of
    ``faulting + emulated + [resumed]``, the in-process module's (POSSIBLY_EPF_STEPPING,
    LAST_EPF_GPA_LIST, guest exits the engine counted) right after it returned.
    """

    script: Script
    module: TdxModule
    tdvpr: int
    faulting: list[int]
    emulated: list[int]
    unblock: int
    resumed: int
    vcpu_log: list[tuple[int, list[int], int]]
    aug: int | None = None
    busy: int | None = None


def record_zero_step(ram_file: Path, threshold: int, emulated: int = 2,
                     contend: bool = False) -> ZeroStep:
    """The test guest's T_LOCK_LOOP (``lock incl`` on SCRATCH, ZERO_STEP_ITERATIONS times,
    then a TDG.VP.VMCALL report) on a 1-vCPU TD whose SCRATCH page the host BLOCKs and
    TRACKs before the first entry: ``threshold + 1`` entries fault on it, ``emulated`` more
    are answered by the 0-step filter, then UNBLOCK and an entry that runs to the report,
    then KVM's teardown. Every entry is a REENTER record. ``contend``: after those, the
    AUG on LP1 (CONCURRENT, paused in-process) against an entry on LP0 (WAIT_GO go 0), and
    one more entry (BARRIER: after the AUG completed)."""
    w = ScenarioWorld(ram_file)
    h, rec = w.host, w.rec
    td, v = _runnable_test_guest_td(w, tg.T_LOCK_LOOP, ZERO_STEP_ITERATIONS)
    h.block_track(td, tg.SCRATCH, 0)
    vs = w.module.gd.vcpus[v.tdvpr]
    log: list[tuple[int, list[int], int]] = []

    def enter(flags: int = 0) -> int:
        seq = len(rec)
        rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=v.tdvpr), flags=REENTER | flags)
        ran = sum(vs.engine.exit_counts.values()) if vs.engine is not None else -1
        log.append((vs.possibly_epf_stepping, list(vs.last_epf_gpa_list), ran))
        return seq

    faulting = [enter() for _ in range(threshold + 1)]
    fake = [enter() for _ in range(emulated)]
    aug = busy = None
    if contend:
        h.ensure_sept(td, tg.PENDING_GPA, 0, lp=1)
        hpa = h.alloc.page()
        h.pamt_get(hpa, 1)
        aug_regs = Regs(rax=Leaf.TDH_MEM_PAGE_AUG, rcx=tg.PENDING_GPA, rdx=td.tdr, r8=hpa)
        pause = w.module.control.pause(lp=1, leaf=Leaf.TDH_MEM_PAGE_AUG, point="locked")
        held: list[Regs] = []
        aug = len(rec)
        t = threading.Thread(target=lambda: held.append(rec.call(1, aug_regs,
                                                                 flags=CONCURRENT)))
        t.start()
        try:
            assert pause.wait_paused(10)
            busy = len(rec)
            out = rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=v.tdvpr), flags=WAIT_GO, go=0)
            assert out.rax == BUSY_SEPT_TREE, hex(out.rax)
        finally:
            pause.resume()
            t.join(10)
        assert held[0].rax == 0, hex(held[0].rax)
        td.private[tg.PENDING_GPA] = (hpa, 0)
        fake.append(enter(BARRIER))
    unblock = len(rec)
    h.call(0, Leaf.TDH_MEM_RANGE_UNBLOCK, rcx=tg.SCRATCH, rdx=td.tdr)
    resumed = enter()
    h.teardown(td)
    assert not h.pamt_refcount and not w.module.gd.tds
    return ZeroStep(rec.script(), w.module, v.tdvpr, faulting, fake, unblock, resumed, log,
                    aug, busy)
