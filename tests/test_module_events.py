"""The module's instrumentation seam (vtdx/module/events.py), its statistics (stats.py), the
one leaf shape's non-error completion (context.py set_status) and lock key names (locks.py)."""

from __future__ import annotations

import pytest
from test_module_init import boot, call, make

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import CallObserved, CheckpointReached, FaultInjected
from vtdx.module.context import CallContext
from vtdx.module.events import LAST
from vtdx.module.locks import KOT_LOCK, SYS_LOCK, LockKey, epoch_key, septe_key
from vtdx.module.pamt import pamt_key


def test_call_observed_carries_inputs_outputs_and_call_id() -> None:
    m = make(2)
    seen: list[CallObserved] = []
    m.events.subscribe(CallObserved, seen.append)
    out = call(m, 1, Leaf.TDH_SYS_INIT)
    call(m, 0, Leaf.TDH_SYS_INIT)  # second SYS.INIT: not pending
    assert [(e.lp, e.leaf, e.out.rax, e.injected) for e in seen] == [
        (1, Leaf.TDH_SYS_INIT, 0, False),
        (0, Leaf.TDH_SYS_INIT, st.TDX_SYS_INIT_NOT_PENDING, False)]
    assert seen[0].out is out and seen[0].inp.rax == Leaf.TDH_SYS_INIT
    assert seen[1].call_id > seen[0].call_id and all(e.seconds >= 0 for e in seen)
    m.events.unsubscribe(CallObserved, seen.append)
    call(m, 0, Leaf.TDH_SYS_LP_INIT)
    assert len(seen) == 2


def test_checkpoints_entry_locked_done_in_order_and_done_only_on_success() -> None:
    """The dispatcher publishes "entry" and "done"; the leaf publishes "locked" after its
    last check (tdh_sys_init.c takes the global lock, then checks its state)."""
    m = make(2)
    points: list[tuple[str, int]] = []
    m.events.subscribe(CheckpointReached, lambda ev: points.append((ev.point, ev.call_id)))
    call(m, 0, Leaf.TDH_SYS_INIT)
    assert [p for p, _ in points] == ["entry", "locked", "done"]
    assert len({c for _, c in points}) == 1
    points.clear()
    call(m, 0, Leaf.TDH_SYS_INIT)  # fails after "locked": no "done"
    assert [p for p, _ in points] == ["entry", "locked"]


def test_no_subscriber_no_events_and_order_puts_blocking_subscribers_last() -> None:
    m = make(2)
    assert not m.events.calls and not m.events.checkpoints and not m.events.faults
    order: list[str] = []
    m.events.subscribe(CheckpointReached, lambda ev: order.append("last"), LAST)
    m.events.subscribe(CheckpointReached, lambda ev: order.append("first"))
    call(m, 0, Leaf.TDH_SYS_LP_SHUTDOWN)
    assert order == ["first", "last", "first", "last"]  # entry, done
    with pytest.raises(TypeError):
        m.events.subscribe(int, print)  # type: ignore[type-var]


def test_idle_controller_is_not_subscribed() -> None:
    m = make(2)
    assert not m.events.checkpoints
    pause = m.control.pause(leaf=Leaf.TDH_SYS_INIT)
    assert m.events.checkpoints
    pause.cancel()
    assert not m.events.checkpoints
    m.control.set_residency(0.001)
    assert m.events.checkpoints
    m.control.set_residency(0)
    assert not m.events.checkpoints


def test_fault_injected_event_and_injected_flag_and_stats() -> None:
    m = make(2)
    faults: list[FaultInjected] = []
    calls: list[CallObserved] = []
    m.events.subscribe(FaultInjected, faults.append)
    m.events.subscribe(CallObserved, calls.append)
    rule = m.faults.add(st.TDX_SYS_BUSY, Leaf.TDH_SYS_INIT, count=1)
    assert call(m, 1, Leaf.TDH_SYS_INIT).rax == st.TDX_SYS_BUSY
    assert call(m, 1, Leaf.TDH_SYS_INIT).rax == 0
    assert [(f.lp, f.leaf, f.status, f.rule_id) for f in faults] == [
        (1, Leaf.TDH_SYS_INIT, st.TDX_SYS_BUSY, rule)]
    assert [c.injected for c in calls] == [True, False]
    assert faults[0].call_id == calls[0].call_id
    s = m.stats.as_dict()
    row = s["per-leaf"]["TDH.SYS.INIT"]  # type: ignore[index]
    assert (s["calls"], s["errors"], row["calls"], row["errors"], row["injected"]) == (
        2, 1, 2, 1, 1)
    assert row["statuses"] == {"TDX_SYS_BUSY": 1, "TDX_SUCCESS": 1}
    assert m.stats.per_leaf() == {Leaf.TDH_SYS_INIT: {1: 2}}
    assert m.stats.count(Leaf.TDH_SYS_INIT, lp=0) == 0


def test_stats_survive_reset_and_merge() -> None:
    m = make(2)
    boot(m)
    n = m.stats.count(Leaf.TDH_SYS_TDMR_INIT)
    assert n > 0
    m.reset()  # model state goes, the record of what was called stays
    assert m.state.name == "SYSINIT_PENDING" and m.stats.count(Leaf.TDH_SYS_TDMR_INIT) == n
    merged = type(m.stats).merged([m.stats, m.stats])
    assert merged.count(Leaf.TDH_SYS_TDMR_INIT) == 2 * n
    assert merged.errors_by_leaf() == {k: 2 * v for k, v in m.stats.errors_by_leaf().items()}


def test_reset_replaces_the_whole_state() -> None:
    m = make(2)
    boot(m)
    old = m.gd
    assert old.pamt.tdmrs and old.global_keyid is not None
    m.reset()
    assert m.gd is not old and not m.gd.pamt.tdmrs and m.gd.global_keyid is None
    assert m.pamt is m.gd.pamt and m.lps is m.gd.lps


def test_set_status_is_for_non_errors_only() -> None:
    """TDH.PHYMEM.CACHE.WB with nothing to write back completes with a warning (bit 63
    clear, tdh_phymem_cache_wb.c); an error status must be raised instead."""
    m = make(2)
    boot(m)
    out = call(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, rcx=0)
    assert out.rax == st.TDX_NO_HKID_READY_TO_WBCACHE and not st.is_error(out.rax)
    ctx = CallContext(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, 0, 1)
    with pytest.raises(ValueError):
        ctx.set_status(st.TDX_SYS_BUSY)


def test_lock_keys_read_well_and_equal_their_constructor() -> None:
    assert str(pamt_key(1, 0x1B0 << 21)) == "pamt 2M 0x1b0"
    assert str(pamt_key(0, 0x1B090C << 12)) == "pamt 4K 0x1b090c"
    assert pamt_key(1, 0x1B0 << 21) == LockKey("pamt", 1, 0x1B0)
    assert str(SYS_LOCK) == "sys" and str(KOT_LOCK) == "kot"
    assert str(epoch_key(0x7F000)) == "epoch tdr=0x7f000"
    assert str(septe_key(0x5000, 3)) == "septe page=0x5000 [3]"


@pytest.mark.parametrize("dpamt", [False, True], ids=["static-pamt", "dynamic-pamt"])
def test_no_leaf_writes_its_input_registers(dpamt: bool) -> None:
    """``inp`` is read only for every handler: a TD's whole life as KVM drives it, then
    random calls of every leaf on a runnable TD, leave every input register file as it was."""
    import random

    from test_td_support import make_world

    w = make_world(dpamt=dpamt)
    m, h = w.module, w.host
    inner = h._seamcall
    calls: list[int] = []

    def checking(lp: int, regs: Regs) -> Regs:
        before = regs.as_tuple()
        out = inner(lp, regs)
        assert regs.as_tuple() == before, f"leaf {regs.rax & 0xFFFF} wrote its inputs"
        calls.append(out.rax)
        return out

    h._seamcall = checking
    td = h.init_vm(m.profile.tdx_keyid_start + 1)
    h.init_vcpu(td, 0, 0)
    h.add_page(td, 0x1000, b"\x90" * 4096)
    h.finalize(td)
    h.aug(td, 0x20_0000, level=1)
    h.block_track(td, 0x20_0000, level=1)
    h.demote(td, 0x20_0000)
    h.remove(td, 0x20_3000)
    assert len(calls) > 20 and not any(st.is_error(s) for s in calls)
    pool = [0, td.tdr, 0x20_0000 | 1, 0x20_4000, 0x1000, 0x110000000000000A, (1 << 64) - 1]
    pool += [h.alloc.page() for _ in range(8)]
    leaves = sorted(set(m.leaves) - {Leaf.TDH_SYS_SHUTDOWN, Leaf.TDH_SYS_DISABLE})
    rng = random.Random(11)
    for _ in range(1500):
        checking(rng.randrange(4), Regs(rax=rng.choice(leaves), **{
            r: rng.choice(pool) for r in ("rcx", "rdx", "r8", "r9", "r12", "r13")}))
    assert not m.internal_errors
