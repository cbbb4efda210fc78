"""Overlap by default, the serial switch and seeded contention exploration, in-process.

Two threads play two LPs running the seed's calls in a loop (vtdx/testing/race_loop.py:
DEMOTE/BLOCK/TRACK/PROMOTE on LP0, PAMT.ADD/PAMT.REMOVE of the same 2MB range on LP1), no
pause armed. DEMOTE takes R12's 2MB PAMT entry shared (intel/tdx-module pamt_manager.c
pamt_demote(), BUSY | R12), PAMT.ADD/REMOVE take it exclusive (tdh_phymem_pamt_add.c,
tdh_phymem_pamt_remove.c, BUSY | RCX). Whether they meet depends on the timing model alone.
"""

from __future__ import annotations

from test_dpamt_demote_race import BUSY_RCX, DPAMT_A1, DPAMT_B1, GPA, PAMT_ADD_PFN, Scenario

from vtdx.abi.leaves import Leaf
from vtdx.module.contention import ContentionLog
from vtdx.module.pamt import pamt_key
from vtdx.module.timing import SERIAL, Explore, Overlap, make_timing, native_ns, requested
from vtdx.testing.race_loop import LoopResult, lp0_steps, lp1_steps, run_threads

ITERATIONS = 40


def _loop(timing: object, iterations: int = ITERATIONS) -> tuple[LoopResult, ContentionLog]:
    sc = Scenario()
    m = sc.w.module
    if timing is not None:
        m.control.set_timing(timing)  # type: ignore[arg-type]
    log = ContentionLog().attach(m)
    steps = {0: lp0_steps(sc.td.tdr, GPA, sc.sept_page, (DPAMT_A1, DPAMT_B1)),
             1: lp1_steps(PAMT_ADD_PFN, sc.add_pair)}
    res = run_threads(m.seamcall, steps, iterations)
    assert res.errors == []
    sc.w.check()
    assert len(m.locks) == 0
    return res, log


def test_an_in_process_module_is_serial_until_told() -> None:
    sc = Scenario()
    assert sc.w.control.timing is None and not sc.w.control.active
    assert sc.w.control.describe() == {"mode": "serial", "chosen": False}


def test_serial_switch_gives_no_busy() -> None:
    res, log = _loop(SERIAL)
    assert res.calls_total == ITERATIONS * 8 and res.busy_total == 0 and log.records == []


def test_overlap_gives_busy_by_chance_and_the_log_explains_each() -> None:
    res, log = _loop(Overlap())
    assert res.busy_total > 0
    assert len(log.records) + log.dropped == res.busy_total  # each BUSY from a held lock
    kinds = {r.key() for r in log.records}
    for lp, leaf, status, lock, holder_lp, holder_leaf in kinds:
        assert lock == str(pamt_key(1, PAMT_ADD_PFN))
        if leaf == "TDH.MEM.PAGE.DEMOTE":
            assert (lp, status, holder_lp) == (0, "TDX_OPERAND_BUSY(R12)", 1)
            assert holder_leaf in ("TDH.PHYMEM.PAMT.ADD", "TDH.PHYMEM.PAMT.REMOVE")
        else:
            assert (lp, status, holder_lp, holder_leaf) == (
                1, "TDX_OPERAND_BUSY(RCX)", 0, "TDH.MEM.PAGE.DEMOTE")
    demote_busy = [r for r in log.records if r.leaf == Leaf.TDH_MEM_PAGE_DEMOTE]
    assert all(r.operand_value() == DPAMT_A1 for r in demote_busy)
    # the loop retries on BUSY: every record but possibly the last says so
    assert all(r.next is not None and r.next["action"] == "retried"
               for r in log.records if r.next is not None)


def test_timing_model_follows_the_work_of_each_leaf() -> None:
    o = Overlap(slowdown=50)
    assert native_ns(Leaf.TDH_MEM_PAGE_DEMOTE) > native_ns(Leaf.TDH_PHYMEM_PAMT_ADD) > \
        native_ns(Leaf.TDH_MEM_PAGE_AUG) > native_ns(Leaf.TDH_SYS_RD)
    assert abs(o.hold(0, Leaf.TDH_MEM_PAGE_DEMOTE, 0)
               - native_ns(Leaf.TDH_MEM_PAGE_DEMOTE) * 50e-9) < 1e-12
    assert Overlap(slowdown=0).holds is False


def test_exploration_schedule_is_a_function_of_the_seed() -> None:
    a, b, c = Explore(seed=11), Explore(seed=11), Explore(seed=12)
    keys = [(lp, leaf, n) for lp in (0, 1) for leaf in (15, 58, 38) for n in range(200)]
    sched_a = [a.draw(*k) for k in keys]
    assert sched_a == [b.draw(*k) for k in reversed(keys)][::-1]  # order of asking is moot
    assert sched_a != [c.draw(*k) for k in keys]
    assert any(h for _, h in sched_a) and any(d for d, _ in sched_a)
    assert make_timing("explore", seed=11) == a


def _pairs(log: ContentionLog) -> set[tuple[str, str, str]]:
    """Who met whom, by leaf family: the part of a report two free-running runs share (the
    threads' own timing, like a guest's under TCG, is not replayed by the seed)."""
    def fam(name: str) -> str:
        return "PAMT.ADD/REMOVE" if name.startswith("TDH.PHYMEM.PAMT") else name
    out = set()
    for _lp, leaf, status, _lock, _hlp, hleaf in (r.key() for r in log.records):
        out.add((fam(str(leaf)), str(status), fam(str(hleaf))))
    return out


def test_exploration_finds_busy_and_the_same_seed_gives_the_same_report_set() -> None:
    first, log1 = _loop(Explore(seed=5), 80)
    second, log2 = _loop(Explore(seed=5), 80)
    assert first.busy_total > 0 and second.busy_total > 0
    assert _pairs(log1) == _pairs(log2) == {
        ("TDH.MEM.PAGE.DEMOTE", "TDX_OPERAND_BUSY(R12)", "PAMT.ADD/REMOVE"),
        ("PAMT.ADD/REMOVE", "TDX_OPERAND_BUSY(RCX)", "TDH.MEM.PAGE.DEMOTE")}


def test_requested_timing_of_a_runs_options() -> None:
    """--serial, --contend SEED (and the marker's serial=/contend=) pick the timing; nothing
    leaves the daemon's overlap default."""
    assert requested(True, None) is SERIAL
    explore = requested(False, 7)
    assert isinstance(explore, Explore) and explore.seed == 7
    assert requested(False, None) is None


def test_a_caller_retrying_into_the_held_lock_links_each_busy_to_the_next() -> None:
    """A kernel that retries while the lock is still held gets BUSY again: each BUSY's
    ``next`` is the retry that followed it (also BUSY), the last one's the retry that got
    through (KVM re-entering a vCPU while TDH.MEM.TRACK holds the epoch does just this)."""
    sc = Scenario()
    module = sc.w.module
    log = ContentionLog().attach(module)
    pause = module.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE)
    demote, out = sc.in_thread(0, sc.demote_regs())
    try:
        assert pause.wait_paused(10)
        for _ in range(3):
            assert module.seamcall(1, sc.pamt_add_regs()).rax == BUSY_RCX
        pause.resume()
        demote.join(10)
        assert out[0].rax == 0
        assert module.seamcall(1, sc.pamt_add_regs()).rax == 0
    finally:
        module.control.clear()
        demote.join(10)
        log.detach()
    nexts = [r.next for r in log.records]
    assert len(nexts) == 3 and all(n is not None for n in nexts)
    assert [(n["action"], n["same-operands"], n["ok"]) for n in nexts if n] == [
        ("retried", True, False), ("retried", True, False), ("retried", True, True)]
    assert [n["call"] for n in nexts if n][:2] == [r.call for r in log.records[1:]]
