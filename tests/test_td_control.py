"""Control points: the pause/resume API and the residency time (vtdx/module/control.py)."""

from __future__ import annotations

import threading
import time

import pytest
from test_dpamt_demote_race import BUSY_RCX, Scenario

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.errors import VtdxError


def test_pause_matches_lp_leaf_and_point_only() -> None:
    sc = Scenario()
    m, ctl = sc.w.module, sc.w.control
    assert m.control is ctl and m.controller is ctl
    pause = ctl.pause(lp=1, leaf=Leaf.TDH_MEM_TRACK, point="locked")
    # other LP, other leaf: not paused
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=sc.td.tdr)).rax == 0
    assert m.seamcall(1, Regs(rax=Leaf.TDH_MNG_RD, rcx=sc.td.tdr,
                              rdx=0x110000000000000A)).rax == 0
    assert pause.hits == 0
    t = threading.Thread(target=m.seamcall, args=(1, Regs(rax=Leaf.TDH_MEM_TRACK,
                                                           rcx=sc.td.tdr)))
    t.start()
    assert pause.wait_paused(5) and pause.paused_lp == 1
    assert len(m.locks) > 0  # the paused TRACK holds TDR, OP_STATE and epoch locks
    pause.resume()
    t.join(5)
    assert not t.is_alive() and pause.hits == 1 and len(m.locks) == 0
    # one-shot: disarmed after the first hit
    assert m.seamcall(1, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=sc.td.tdr)).rax == 0


def test_wait_paused_times_out_and_cancel_disarms() -> None:
    sc = Scenario()
    pause = sc.w.control.pause(lp=3, leaf=Leaf.TDH_MEM_PAGE_DEMOTE)
    assert not pause.wait_paused(0.05)
    pause.cancel()
    assert not sc.w.control.active
    with pytest.raises(VtdxError):
        sc.w.control.pause(point="")
    with pytest.raises(VtdxError):
        sc.w.control.set_residency(-1)


def test_residency_time_gives_real_overlap() -> None:
    """With residency, no pause is armed: overlap comes from time spent inside the module."""
    sc = Scenario()
    sc.w.control.set_residency(0.3)
    res: list[Regs] = []
    t = threading.Thread(target=lambda: res.append(sc.w.module.seamcall(0, sc.demote_regs())))
    t0 = time.monotonic()
    t.start()
    while not len(sc.w.module.locks) and time.monotonic() - t0 < 5:
        time.sleep(0.001)  # DEMOTE is inside the module, resident with its locks
    out = sc.w.module.seamcall(1, sc.pamt_add_regs())
    assert out.rax == BUSY_RCX
    t.join(5)
    assert res[0].rax == 0 and time.monotonic() - t0 >= 0.3
    sc.w.control.set_residency(0)
    sc.assert_demoted()
    sc.w.check()


def test_entry_point_orders_two_calls_before_their_locks() -> None:
    """Pause DEMOTE at "entry" (no locks yet): PAMT.ADD from LP1 runs through untouched and
    the resumed DEMOTE still succeeds -- the race needs both calls inside their locks."""
    sc = Scenario()
    pause = sc.w.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE, point="entry")
    res: list[Regs] = []
    t = threading.Thread(target=lambda: res.append(sc.w.module.seamcall(0, sc.demote_regs())))
    t.start()
    assert pause.wait_paused(5) and len(sc.w.module.locks) == 0
    assert sc.w.module.seamcall(1, sc.pamt_add_regs()).rax == 0
    pause.resume()
    t.join(5)
    assert res[0].rax == 0
    sc.assert_demoted()
    sc.w.check()
