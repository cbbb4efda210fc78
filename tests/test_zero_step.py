"""The 0-step (EPT-fault stepping) mitigation of TDH.VP.ENTER, in-process with a TD guest.

Followed source: intel/tdx-module 1.5.06 (commit 1e636985), functions
src/td_transitions/td_exit_stepping.c ``td_exit_epf_stepping_log``,
``vmexit_stepping_filter`` (its forward-progress reset), ``td_entry_stepping_filter`` and
``is_epf_expected``; src/td_transitions/tdh_vp_enter.c ``handle_stepping_filter`` and
``emulate_ept_violation_td_exit``; src/td_transitions/td_exit_stepping.h
STEPPING_EPF_THRESHOLD 6; src/common/data_structures/tdx_tdvps.h EPF_GPA_LIST_SIZE 32;
include/auto_gen/tdx_error_codes_defs.h OPERAND_ID_SEPT_TREE 146. Line numbers below are
those of the public tdx_1.5 branch (1.5.01), where these functions read the same:
td_exit_stepping.c 189-194 (reset on RIP change), 316-360 (entry filter: lock EXCLUSIVE at
331, fake exit at 347), 362-406 (the log: threshold at 380, list at 387); tdh_vp_enter.c
350-367 (BUSY | SEPT_TREE after revert_tlb_tracking_state), 126-162 (the emulated exit),
776-787 (the guest is not entered). Linux arch/x86/kvm/vmx/tdx.c documents the same lock:
TDH.VP.ENTER may take the S-EPT tree lock for the 0-step mitigation and fail with
TDX_OPERAND_BUSY for it.

The attack is driven the way a malicious host would: the test guest's T_LOCK_LOOP routine
increments a counter in its SCRATCH page, which the host BLOCKs (and TRACKs) before the
first entry, so every entry faults on the same instruction.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_td_support import World, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.engine.exits import EXIT_OTHER_SMI, EXIT_TDCALL, TdExit
from vtdx.module.leaves.td_vp_enter import (
    EPF_GPA_LIST_SIZE,
    STEPPING_EPF_THRESHOLD,
    exit_stepping_track,
)
from vtdx.module.locks import EXCLUSIVE, sept_key
from vtdx.module.state import VcpuState
from vtdx.testing import td_test_guest as tg
from vtdx.testing.invariants import check_invariants
from vtdx.testing.td_host import EXIT_EPT_VIOLATION, KvmHost, SharedEpt, Td, Vcpu, td_params

GiB = 1 << 30
SHARED_BIT = 1 << 47
ATTRIBUTES, XFAM = 1 << 28, 0x3           # SEPT_VE_DISABLE, as KVM requires
ITERATIONS = 10
BUSY_SEPT_TREE = st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(dpamt=False, mem=12 * GiB, ram_file=tmp_path / "ram")


def _blocked_scratch_td(w: World) -> tuple[Td, Vcpu]:
    """A finalized 1-vCPU TD running T_LOCK_LOOP, its SCRATCH page BLOCKed and TRACKed."""
    h = w.host
    td = h.init_vm(w.module.profile.tdx_keyid_start + 1,
                   td_params(max_vcpus=1, attributes=ATTRIBUTES, xfam=XFAM))
    v = h.init_vcpu(td, 0, 0, tg.T_LOCK_LOOP)
    pages = tg.guest_pages(SHARED_BIT, loop_count=ITERATIONS)
    for gpa, data in pages.items():
        h.add_page(td, gpa, data, measure=False)
    h.finalize(td)
    h.set_shared_eptp(v, SharedEpt(w.module.memory, h.alloc).eptp)
    h.block_track(td, tg.SCRATCH, 0)
    return td, v


def _enter(h: KvmHost, v: Vcpu) -> Regs:
    """TDH.VP.ENTER, re-entered over time-slice exits as KVM does."""
    while True:
        out = h.vp_enter(v)
        if out.rax != EXIT_OTHER_SMI:
            return out


def _teardown_clean(w: World, td: Td) -> None:
    w.host.teardown(td)
    problems = check_invariants(w.module, expect_no_locks=True)
    assert not problems, problems
    assert not w.module.internal_errors, w.module.internal_errors[-1]


def _in_thread(w: World, lp: int, regs: Regs) -> tuple[threading.Thread, list[Regs]]:
    result: list[Regs] = []
    t = threading.Thread(target=lambda: result.append(w.module.seamcall(lp, regs)))
    t.start()
    return t, result


def _reach_zero_step(w: World, td: Td, v: Vcpu) -> VcpuState:
    """STEPPING_EPF_THRESHOLD EPT violations at one RIP only count; the next one logs the
    GPA (td_exit_stepping.c 380-396)."""
    vs = w.module.gd.vcpus[v.tdvpr]
    rips = set()
    for n in range(1, STEPPING_EPF_THRESHOLD + 2):
        out = _enter(w.host, v)
        assert out.rax == EXIT_EPT_VIOLATION and out.r8 == tg.SCRATCH
        assert vs.engine is not None
        rips.add(vs.engine.rip)
        if n <= STEPPING_EPF_THRESHOLD:
            assert (vs.possibly_epf_stepping, vs.last_epf_gpa_list) == (n, [])
    assert len(rips) == 1
    assert vs.possibly_epf_stepping == STEPPING_EPF_THRESHOLD
    assert vs.last_epf_gpa_list == [tg.SCRATCH]
    return vs


def test_zero_step_entry_fakes_the_exit_and_takes_the_sept_lock(world: World) -> None:
    """With a GPA logged, VP.ENTER takes the S-EPT tree lock EXCLUSIVE: a TDH.MEM.PAGE.AUG
    paused on LP1 holding it SHARED makes VP.ENTER fail with TDX_OPERAND_BUSY | SEPT_TREE,
    the epoch refcount given back (tdh_vp_enter.c 357-367). While the logged GPA is still
    blocked the guest is not entered: the module answers with an emulated EPT-violation exit
    (RAX 48, RCX write access, R8 the GPA; tdh_vp_enter.c 126-162, 776-787), entry after
    entry."""
    w = world
    h = w.host
    td, v = _blocked_scratch_td(w)
    vs = _reach_zero_step(w, td, v)
    state = w.module.gd.tds[td.tdr]
    assert vs.engine is not None
    exits_before = dict(vs.engine.exit_counts)

    for _ in range(2):
        out = h.vp_enter(v)
        assert (out.rax, out.rcx, out.rdx, out.r8, out.r9) == \
            (EXIT_EPT_VIOLATION, 2, 0, tg.SCRATCH, 0)
        assert out.rbx == out.rsi == out.rdi == out.r10 == out.r15 == 0
    assert vs.engine.exit_counts == exits_before          # the guest never ran
    assert state.refcount == [0, 0]
    assert vs.last_epf_gpa_list == [tg.SCRATCH]

    aug_gpa = tg.PENDING_GPA
    h.ensure_sept(td, aug_gpa, 0, lp=1)
    hpa = h.alloc.page()
    pause = w.control.pause(lp=1, leaf=Leaf.TDH_MEM_PAGE_AUG, point="locked")
    t, res = _in_thread(w, 1, Regs(rax=Leaf.TDH_MEM_PAGE_AUG, rcx=aug_gpa, rdx=td.tdr,
                                   r8=hpa))
    try:
        assert pause.wait_paused(10)
        assert h.vp_enter(v).rax == BUSY_SEPT_TREE
        assert state.refcount == [0, 0]
    finally:
        pause.resume()
        t.join(10)
    assert res[0].rax == st.TDX_SUCCESS
    td.private[aug_gpa] = (hpa, 0)
    _teardown_clean(w, td)


def test_zero_step_entry_holds_the_lock_and_progress_resets(world: World) -> None:
    """Once the host UNBLOCKs the page the listed GPA no longer faults, and VP.ENTER goes on
    holding the S-EPT tree lock EXCLUSIVE until the guest runs: paused at "locked", a
    TDH.MEM.PAGE.AUG on LP1 fails with TDX_OPERAND_BUSY | SEPT_TREE (the S-EPT tree lock of
    AUG). Resumed, the guest makes progress (its exit is at another RIP), which empties the
    list and zeroes the counter (td_exit_stepping.c 189-194), so the next entry no longer
    takes the lock."""
    w = world
    h = w.host
    td, v = _blocked_scratch_td(w)
    vs = _reach_zero_step(w, td, v)
    h.call(0, Leaf.TDH_MEM_RANGE_UNBLOCK, rcx=tg.SCRATCH, rdx=td.tdr)
    aug_gpa = tg.PENDING_GPA
    h.ensure_sept(td, aug_gpa, 0, lp=1)
    hpa = h.alloc.page()

    pause = w.control.pause(lp=0, leaf=Leaf.TDH_VP_ENTER, point="locked")
    t, res = _in_thread(w, 0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=v.tdvpr))
    try:
        assert pause.wait_paused(10)
        assert w.module.locks.mode_of(sept_key(td.tdr)) == EXCLUSIVE
        out = h.call(1, Leaf.TDH_MEM_PAGE_AUG, rcx=aug_gpa, rdx=td.tdr, r8=hpa, expect=None)
        assert out.rax == BUSY_SEPT_TREE
    finally:
        pause.resume()
        t.join(30)
    assert res[0].rax in (EXIT_TDCALL, EXIT_OTHER_SMI)
    assert (vs.possibly_epf_stepping, vs.last_epf_gpa_list) == (0, [])
    assert w.module.locks.mode_of(sept_key(td.tdr)) == 0
    h.aug(td, aug_gpa, hpa=hpa, lp=1)                     # no longer contended
    _teardown_clean(w, td)


def test_exit_tracking_rules() -> None:
    """td_exit_epf_stepping_log on its own: a RIP change resets before counting; a GPA
    already listed is not listed twice; the list holds at most EPF_GPA_LIST_SIZE GPAs;
    exits that are not private EPT violations only reset."""
    vs = VcpuState(tdvpr_pa=0x1000, tdr_pa=0x2000)
    rip = 0x5000

    def violation(gpa: int, at: int = rip) -> TdExit:
        return TdExit(EXIT_EPT_VIOLATION, gpa=gpa, epf_gpa=gpa, rip=at)

    for _ in range(STEPPING_EPF_THRESHOLD):
        exit_stepping_track(vs, rip, violation(0x30000))
    assert (vs.possibly_epf_stepping, vs.last_epf_gpa_list) == (STEPPING_EPF_THRESHOLD, [])
    exit_stepping_track(vs, rip, violation(0x30000))
    exit_stepping_track(vs, rip, violation(0x30000))
    assert vs.last_epf_gpa_list == [0x30000]
    for i in range(1, EPF_GPA_LIST_SIZE + 5):
        exit_stepping_track(vs, rip, violation(0x30000 + i * 0x1000))
    assert len(vs.last_epf_gpa_list) == EPF_GPA_LIST_SIZE
    exit_stepping_track(vs, rip, TdExit(EXIT_TDCALL, rip=rip))          # no progress
    assert len(vs.last_epf_gpa_list) == EPF_GPA_LIST_SIZE
    exit_stepping_track(vs, rip, violation(0x30000, at=rip + 3))        # progress, then 1
    assert (vs.possibly_epf_stepping, vs.last_epf_gpa_list) == (1, [])
    exit_stepping_track(vs, rip, TdExit(EXIT_EPT_VIOLATION, gpa=0x30000, rip=rip))
    assert vs.possibly_epf_stepping == 1                 # a shared or ACCEPT exit: not logged
