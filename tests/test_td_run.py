"""TDs run: TDH.VP.ENTER on the module, driven the way KVM drives it.

The host side is ``vtdx.testing.td_host.KvmHost`` issuing Linux arch/x86/kvm/vmx/tdx.c's
SEAMCALL sequences (KVM_TDX_INIT_VM, INIT_VCPU, INIT_MEM_REGION, FINALIZE_VM) and KVM_RUN's
loop (``KvmHost.run``: OTHER_SMI re-entry, EPT violation -> SEPT.ADD + PAGE.AUG or the
BLOCK/TRACK/DEMOTE split, TDVMCALL replies); the guest is the kvm-td payload's own TD guest
(vtdx/guest/tdguest) or the engine's assembled test guest, executed by the module's TD vCPU
engine on host RAM backed by a file as QEMU's is. Each status is checked against the
tdx-module (1.5.06) source file it follows; every test ends with KVM's teardown, after which
the model's invariants hold, no TD is left and every PAMT entry is PT_NDA again.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import threading
from pathlib import Path

import pytest
from test_td_support import World, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.host.payloads import TDGUEST_IMAGE_SIZE, build_tdguest
from vtdx.module.engine.exits import EXIT_OTHER_SMI, EXIT_TDCALL
from vtdx.module.pamt import PT_NDA, PT_RSVD
from vtdx.testing import td_test_guest as tg
from vtdx.testing.invariants import check_invariants
from vtdx.testing.td_host import (
    EEQ_PENDING_EPT_VIOLATION,
    EXIT_EPT_VIOLATION,
    KvmHost,
    SharedEpt,
    Td,
    Vcpu,
    td_params,
)

GiB = 1 << 30
SHARED_BIT = 1 << 47
IMAGE_GPA = (1 << 32) - TDGUEST_IMAGE_SIZE
ATTRIBUTES, XFAM = 1 << 28, 0x3           # SEPT_VE_DISABLE, as KVM requires
CONFIG_MAGIC = 0x4746433154445456
REPORT = struct.Struct("<QII" + "Q" * 14)  # struct tdg_report (guest/tdguest/tdguest.h)
SHARED_GPA = 0x180000
PORT_CONSOLE, PORT_DOORBELL, PORT_DONE, PORT_CONFIG = 0x3F8, 0x510, 0x511, 0x512
DONE_PASS = 0x600D
SECRET, COOKIE = 0x5EC12E7_0000_0001, 0xC00C1E_0000_0042


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tdguest(tmp_path_factory.mktemp("tdguest"))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(dpamt=False, mem=12 * GiB, ram_file=tmp_path / "ram")


@pytest.fixture(params=[False, True], ids=["static-pamt", "dynamic-pamt"])
def any_world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    """With Dynamic PAMT KVM backs every control and guest page with TDH.PHYMEM.PAMT.ADD
    (td_host's tdx_pamt_get/put) and DEMOTE takes the page pair in R12/R13."""
    return make_world(dpamt=request.param, mem=12 * GiB, ram_file=tmp_path / "ram")


def _build_td(w: World, pages: dict[int, bytes], nr_vcpus: int, init_rcx: int,
              max_vcpus: int = 2, finalize: bool = True) -> tuple[Td, list[Vcpu], SharedEpt]:
    """KVM_TDX_INIT_VM, INIT_VCPU per vCPU (vCPU i on LP i), INIT_MEM_REGION of ``pages``,
    FINALIZE_VM, and the shared EPTP each vCPU's MMU load writes."""
    h = w.host
    td = h.init_vm(w.module.profile.tdx_keyid_start + 1,
                   td_params(max_vcpus=max_vcpus, attributes=ATTRIBUTES, xfam=XFAM))
    vcpus = [h.init_vcpu(td, lp, lp, init_rcx) for lp in range(nr_vcpus)]
    for gpa, data in pages.items():
        h.add_page(td, gpa, data, measure=False)
    if finalize:
        h.finalize(td)
    ept = SharedEpt(w.module.memory, h.alloc)
    for v in vcpus:
        h.set_shared_eptp(v, ept.eptp)
    return td, vcpus, ept


def _teardown_clean(w: World, td: Td) -> None:
    w.host.teardown(td)
    problems = check_invariants(w.module, expect_no_locks=True)
    assert not problems, problems
    assert not w.module.gd.tds
    assert not w.module.internal_errors, w.module.internal_errors[-1]
    pamt = w.module.pamt
    left = [(lvl, idx, e.pt) for lvl in (0, 1, 2) for idx, e in pamt.entries(lvl).items()
            if e.pt not in (PT_NDA, PT_RSVD)]
    assert left == [] and not pamt.nodes, left[:5]


class Vmm:
    """kvm-td.c's exit handling for its TD guest, in process: console and config ports,
    the report doorbell on the shared page, MMIO, MapGPA (KVM zaps the private page when
    it becomes shared, the shared EPT entry when it becomes private)."""

    def __init__(self, w: World, td: Td, ept: SharedEpt) -> None:
        self.w, self.td, self.ept = w, td, ept
        self.lock = threading.Lock()
        self.shared: dict[int, int] = {}
        self.console: dict[int, str] = collections.defaultdict(str)
        self.done: dict[int, object] = {}
        self.map_gpa: list[int] = []
        self.report: tuple[int, ...] | None = None
        self.mmio = 0

    def shared_fault(self, v: Vcpu, gpa: int) -> None:
        page = gpa & ~SHARED_BIT & ~0xFFF
        with self.lock:
            if page not in self.shared:
                self.shared[page] = self.w.host.alloc.page()
            self.ept.map(gpa & ~0xFFF, self.shared[page])

    def tdvmcall(self, v: Vcpu, out: Regs) -> Regs | None:
        idx = v.lp
        reply = Regs(r10=0, r11=0)
        fn, port = out.r11, out.r14
        mem = self.w.module.memory
        if fn == 30 and port == PORT_CONSOLE:
            self.console[idx] += chr(out.r15 & 0xFF)
        elif fn == 30 and port == PORT_CONFIG:
            reply.r11 = CONFIG_MAGIC & 0xFFFFFFFF
        elif fn == 30 and port == PORT_DOORBELL:
            hpa = self.shared[SHARED_GPA]
            self.report = REPORT.unpack(mem.read(hpa, REPORT.size))
            mem.write(hpa + REPORT.size - 8, (~COOKIE & (1 << 64) - 1).to_bytes(8, "little"))
        elif fn == 30 and port == PORT_DONE:
            self.done[idx] = out.r15
            if idx == 0:
                return None
            # kvm-td.c keeps entering the others (their guests tell vCPU 0, then spin).
        elif fn == 48:
            if out.r13:
                self.mmio = out.r15
            else:
                reply.r11 = self.mmio
        elif fn == 0x10001:
            gpa, size = out.r12, out.r13
            self.map_gpa.append(gpa)
            h = self.w.host
            for page in range(gpa & ~SHARED_BIT, (gpa & ~SHARED_BIT) + max(size, 4096), 4096):
                with h.mmu_lock:
                    if gpa & SHARED_BIT:
                        if page in self.td.private:
                            h.remove(self.td, page, v.lp)
                    else:
                        self.ept.unmap(page | SHARED_BIT)
                        self.shared.pop(page, None)
        else:
            self.done[idx] = ("fatal", out.r12)
            return None
        return reply


def _config_image(image: bytes, nr_vcpus: int) -> dict[int, bytes]:
    img = bytearray(image)
    blk = struct.pack("<QIIQQIIQQ", CONFIG_MAGIC, nr_vcpus, 2, ATTRIBUTES, XFAM, 48, 0,
                      SECRET, COOKIE)
    img[:len(blk)] = blk
    return {IMAGE_GPA + off: bytes(img[off:off + 4096])
            for off in range(0, TDGUEST_IMAGE_SIZE, 4096)}


def _run_all(w: World, td: Td, vcpus: list[Vcpu], vmm: Vmm) -> list[dict[int, int]]:
    """Each vCPU's KVM_RUN loop on its own thread (its LP), as KVM's vCPU threads do."""
    results: list[dict[int, int]] = [{} for _ in vcpus]
    errors: list[BaseException] = []

    def one(i: int, v: Vcpu) -> None:
        try:
            r = w.host.run(td, v, vmm.tdvmcall, shared_fault=vmm.shared_fault,
                           until=lambda: len(vmm.done) == len(vcpus))
            assert r.stop in ("vmm", "until"), (r.stop, r.out,
                                                list(w.module.internal_errors)[-1:])
            results[i] = r.exits
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, v)) for i, v in enumerate(vcpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("nr_vcpus", [1, 2])
@pytest.mark.parametrize("premap_2m", [False, True], ids=["4k", "2m-split"])
def test_td_guest_runs_to_completion(any_world: World, image: bytes, nr_vcpus: int,
                                     premap_2m: bool) -> None:
    """The kvm-td TD guest from the reset vector to its PASS: TDG.VP.INFO and TDG.VM.RD
    checks, ACCEPT of memory KVM maps on EPT violations, MapGPA to shared and back with the
    report handed over on the shared page. With ``2m-split`` KVM mapped the first 2 MB as
    one PENDING 2 MB page before the run: the guest's 4 KB ACCEPT exits with the ACCEPT
    extended qualification (tdg_mem_page_accept.c; level 0 wanted, level 1 found) and KVM
    splits it with BLOCK, TRACK, DEMOTE (tdh_mem_page_demote.c) before the ACCEPT retries."""
    w = any_world
    td, vcpus, ept = _build_td(w, _config_image(image, nr_vcpus), nr_vcpus, IMAGE_GPA)
    if premap_2m:
        w.host.aug(td, 0, level=1)
    vmm = Vmm(w, td, ept)
    exits = _run_all(w, td, vcpus, vmm)
    assert vmm.done == {i: DONE_PASS for i in range(nr_vcpus)}, dict(vmm.console)
    report = vmm.report
    assert report is not None and report[2] == 0b10111111110 and report[12] == 16
    # Each vCPU's TDG.MR.RTMR.EXTEND reached the module's TDCS (tdg_mr_rtmr_extend.c).
    data = bytes(i * 3 + 1 for i in range(48))
    rtmr2 = bytes(48)
    for _ in range(nr_vcpus):
        rtmr2 = hashlib.sha384(rtmr2 + data).digest()
    assert w.module.gd.tds[td.tdr].rtmr == [bytes(48), bytes(48), rtmr2, bytes(48)]
    assert report[7] == 2 << 32 | nr_vcpus  # TDG.VP.INFO R8: MAX_VCPUS, NUM_VCPUS
    assert vmm.map_gpa == [SHARED_BIT | SHARED_GPA, SHARED_GPA]
    total = collections.Counter[int]()
    for e in exits:
        total.update(e)
    assert total[EXIT_TDCALL] > 0 and total[EXIT_EPT_VIOLATION] > 0
    calls = collections.Counter(r.rax & 0xFFFF for _, r, _ in w.host.log)
    if premap_2m:
        assert calls[Leaf.TDH_MEM_PAGE_DEMOTE] == 1
    if w.module.dynamic_pamt_enabled:
        assert calls[Leaf.TDH_PHYMEM_PAMT_ADD] > 0
    # the vCPUs ran in the module: each engine counted the exits KVM saw
    m = w.module
    for v in vcpus:
        eng = m.gd.vcpus[v.tdvpr].engine
        assert eng is not None and sum(eng.exit_counts.values()) == sum(exits[v.lp].values())
    _teardown_clean(w, td)


def _enter(h: KvmHost, v: Vcpu) -> Regs:
    """TDH.VP.ENTER until an exit other than the time slice's OTHER_SMI (a loaded host may
    end a slice before the guest reaches its first TDCALL; KVM just re-enters)."""
    while True:
        out = h.vp_enter(v)
        if out.rax != EXIT_OTHER_SMI:
            return out


def _test_guest_td(w: World, routine: int, finalize: bool = True) -> tuple[Td, list[Vcpu]]:
    td, vcpus, _ = _build_td(w, tg.guest_pages(SHARED_BIT), 1, routine, max_vcpus=1,
                             finalize=finalize)
    return td, vcpus


def test_vp_enter_on_a_td_not_runnable(world: World) -> None:
    """Before TDH.MR.FINALIZE op_state is INITIALIZED: helpers.c
    check_state_map_tdcs_and_lock -> TDX_OP_STATE_INCORRECT (op_state_lookup.c: VP.ENTER
    only in RUNNABLE)."""
    td, (v,) = _test_guest_td(world, tg.T_BOOT, finalize=False)
    out = world.host.vp_enter(v)
    assert out.rax == st.TDX_OP_STATE_INCORRECT
    world.host.finalize(td)
    _teardown_clean(world, td)


def test_vp_enter_on_an_uninitialised_vcpu(world: World) -> None:
    """A vCPU created (VP.CREATE + ADDCX) but never TDH.VP.INIT'ed: helpers.c
    check_and_associate_vcpu -> TDX_VCPU_STATE_INCORRECT."""
    w = world
    h = w.host
    td, _ = _test_guest_td(w, tg.T_BOOT, finalize=False)
    raw = h.create_vcpu(td, 0)
    h.finalize(td)
    assert h.vp_enter(raw).rax == st.TDX_VCPU_STATE_INCORRECT
    _teardown_clean(w, td)


def test_vp_enter_on_a_vcpu_associated_with_another_lp(world: World) -> None:
    """TDH.VP.INIT associated the vCPU with LP 0; VP.ENTER from LP 1: helpers.c
    associate_vcpu -> TDX_VCPU_ASSOCIATED (no operand id). After TDH.VP.FLUSH on LP 0 the
    vCPU is free and LP 1 may run it."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_BOOT)
    other = Vcpu(v.tdvpr, v.tdvpx, 1)
    assert h.vp_enter(other).rax == st.TDX_VCPU_ASSOCIATED
    h.call(0, Leaf.TDH_VP_FLUSH, rcx=v.tdvpr)
    out = _enter(h, other)
    assert out.rax == EXIT_TDCALL    # T_BOOT's first report (TDG.VP.VMCALL)
    v.lp = 1
    _teardown_clean(w, td)


def test_vp_enter_input_checks(world: World) -> None:
    """tdh_vp_enter.c: reserved bits of vcpu_and_flags_t (11:0, 63:54) and RESUME_L1 without
    L2 -> TDX_OPERAND_INVALID | RCX; HOST_RECOVERABILITY_HINT after an exit that was not
    ASYNC_TRAP -> the same; a page that is not a TDVPR -> TDX_PAGE_METADATA_INCORRECT | RCX
    (check_and_lock_explicit_4k_private_hpa)."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_BOOT)
    invalid_rcx = st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    for rcx in (v.tdvpr | 0x8, v.tdvpr | 1 << 63, v.tdvpr | 1 << 53, v.tdvpr | 1 << 52):
        assert h.call(0, Leaf.TDH_VP_ENTER, rcx=rcx, expect=None).rax == invalid_rcx
    out = h.call(0, Leaf.TDH_VP_ENTER, rcx=td.tdr, expect=None)
    assert out.rax == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    _teardown_clean(w, td)


def test_guest_access_to_a_pending_page(world: World) -> None:
    """The test guest reads a page KVM AUGmented but the guest never accepted. With
    ATTRIBUTES.SEPT_VE_DISABLE the module exits to the host (td_ept_violation.c / helpers.c
    check_walk_and_map_guest_side_gpa: EPT violation, extended qualification type
    PENDING_EPT_VIOLATION 6), which KVM answers by killing the VM."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_PENDING)
    h.aug(td, tg.PENDING_GPA)
    r = h.run(td, v, lambda _v, _out: Regs(), max_exits=1000)
    assert r.stop == "pending_access"
    assert r.out.rax == EXIT_EPT_VIOLATION
    assert r.out.rdx & 0xF == EEQ_PENDING_EPT_VIOLATION
    assert r.out.r8 == tg.PENDING_GPA
    _teardown_clean(w, td)


def test_track_kicks_a_running_vcpu(world: World) -> None:
    """A vCPU spinning in the guest (KVM re-entering it on every OTHER_SMI) joins the TD
    epoch's refcount at each entry (helpers.c adjust_tlb_tracking_state) and leaves it at
    each exit (td_exit.c). TDH.MEM.TRACK from another LP while it runs advances TD_EPOCH
    and kicks it (tdh_mem_track.c; the IPI of KVM's tdx_track), and once every vCPU is out
    the refcounts are zero and the next TRACK succeeds."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_LOOP)
    m = w.module
    stop = threading.Event()
    outs: list[Regs] = []

    def spin() -> None:
        while not stop.is_set():
            outs.append(h.vp_enter(v))

    t = threading.Thread(target=spin)
    t.start()
    for _ in range(5000):
        if m.gd.vcpus[v.tdvpr].state_name == "ACTIVE":
            break
        threading.Event().wait(0.0005)
    state = m.gd.tds[td.tdr]
    epoch = state.td_epoch
    h.track(td, lp=1)
    assert state.td_epoch == epoch + 1
    stop.set()
    t.join(30)
    assert outs and all(o.rax in (EXIT_OTHER_SMI, EXIT_TDCALL) for o in outs)
    assert state.refcount == [0, 0]
    h.call(1, Leaf.TDH_MEM_TRACK, rcx=td.tdr)
    _teardown_clean(w, td)


def test_inspection_and_trace_show_the_td_vcpus(world: World) -> None:
    """query-vtdx-tds shows each vCPU's state, the LP it runs on, its guest RIP at the last
    exit and its exits per reason; the trace names the exit reason of each VP.ENTER."""
    from vtdx.observe.inspect import Inspector
    from vtdx.observe.trace import TraceRecorder

    w = world
    h = w.host
    rec = TraceRecorder()
    insp = Inspector.attach(w.module, rec)
    td, (v,) = _test_guest_td(w, tg.T_BOOT)
    (info,) = insp.tds()
    (vi,) = info["vcpus"]
    assert vi["state"] == "READY" and vi["running-lp"] is None and vi["rip"] is None
    assert vi["exits"] == {}
    out = _enter(h, v)
    assert out.rax == EXIT_TDCALL
    (vi,) = insp.tds()[0]["vcpus"]
    assert vi["exits"]["TDCALL"] == 1 and set(vi["exits"]) <= {"TDCALL", "OTHER_SMI"}
    assert vi["associated-lp"] == 0
    assert vi["rip"] is not None and 0x10000 <= vi["rip"] < 0x20000   # the 64-bit code
    (last,) = rec.last(1, leaf=Leaf.TDH_VP_ENTER)
    assert last["exit-reason"] == "TDCALL" and last["ok"]
    assert last["status-name"].endswith("exit TDCALL")
    _teardown_clean(w, td)


def _paused(w: World, lp: int, leaf: int, regs: Regs) -> tuple[object, threading.Thread]:
    """Run ``leaf`` on ``lp`` and hold it at its "locked" control point (all its TDX locks
    taken, nothing committed)."""
    pause = w.control.pause(lp=lp, leaf=leaf, point="locked")
    t = threading.Thread(target=w.module.seamcall, args=(lp, regs))
    t.start()
    assert pause.wait_paused(5)
    return pause, t


def test_vp_enter_busy_on_contention(world: World) -> None:
    """TDH.MEM.TRACK paused on another LP holds the TD epoch lock exclusive: VP.ENTER fails
    in helpers.c adjust_tlb_tracking_state with TDX_OPERAND_BUSY | TD_EPOCH, and enters once
    TRACK is done."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_BOOT)
    busy = st.TDX_OPERAND_BUSY
    cases = [(1, Leaf.TDH_MEM_TRACK, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=td.tdr),
              busy | st.OPERAND_ID_TD_EPOCH)]
    for lp, leaf, regs, want in cases:
        pause, t = _paused(w, lp, leaf, regs)
        try:
            assert h.vp_enter(v).rax == want
        finally:
            pause.resume()  # type: ignore[attr-defined]
            t.join(5)
    assert _enter(h, v).rax == EXIT_TDCALL
    assert h.vp_enter(v, Regs()).rax in (EXIT_TDCALL, EXIT_OTHER_SMI)
    _teardown_clean(w, td)


def test_console_lists_td_vcpus(world: World) -> None:
    """The console's `tds` table has a row per TD vCPU with its state, LPs, RIP and exits."""
    from vtdx.observe.console.format import fmt_tds
    from vtdx.observe.inspect import Inspector

    w = world
    td, (v,) = _test_guest_td(w, tg.T_BOOT)
    _enter(w.host, v)
    text = fmt_tds(Inspector.attach(w.module).tds())
    assert "TDCALL:1" in text and "READY" in text and "guest RIP" in text, text
    _teardown_clean(w, td)


def test_triple_fault_disables_the_vcpu(world: World) -> None:
    """A guest triple fault is a TD exit with TDX_NON_RECOVERABLE_VCPU and reason 2
    (td_exit.c: the vCPU becomes VCPU_DISABLED). Then VP.ENTER and VP.WR find it not READY
    (helpers.c check_and_associate_vcpu -> TDX_VCPU_STATE_INCORRECT) while VP.RD still reads
    it (tdh_vp_rd_wr.c: association allows a disabled vCPU on read)."""
    w = world
    h = w.host
    td, (v,) = _test_guest_td(w, tg.T_TRIPLE)
    r = h.run(td, v, lambda _v, _out: Regs(r10=0, r11=0), max_exits=1000)
    assert r.stop == "triple_fault"
    assert r.out.rax == st.TDX_NON_RECOVERABLE_VCPU | 2
    assert w.module.gd.vcpus[v.tdvpr].state_name == "DISABLED"
    assert h.vp_enter(v).rax == st.TDX_VCPU_STATE_INCORRECT
    assert h.call(0, Leaf.TDH_VP_RD, rcx=v.tdvpr, rdx=0x2, expect=None).rax == 0
    wr = h.call(0, Leaf.TDH_VP_WR, rcx=v.tdvpr, rdx=0x2, r8=0xF2, r9=0xFFFF, expect=None)
    assert wr.rax == st.TDX_VCPU_STATE_INCORRECT
    assert not w.module.internal_errors
    _teardown_clean(w, td)
