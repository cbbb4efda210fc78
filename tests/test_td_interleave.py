"""Hypothesis: random TD/DPAMT leaves from 2-4 LPs, some paused inside the module at a random
control point ("entry", "locked" or "done") while other LPs run. Whatever the interleaving:
no exception inside the model, only statuses the module defines, the invariants hold after
every step, and when all calls are done no TDX lock is left held.
"""

from __future__ import annotations

import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from test_td_support import make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.testing.invariants import check_invariants

SZ_2M = 2 << 20
WINDOW = 0x4000_0000  # GPA window with S-EPT tables ready down to the PD level
NUM_2M = 4


class Fixture:
    def __init__(self, num_lps: int) -> None:
        self.w = make_world(dpamt=True, smp=4)
        h = self.w.host
        self.num_lps = num_lps
        self.td = h.init_vm(self.w.module.profile.tdx_keyid_start + 1)
        for lp in range(num_lps):
            h.init_vcpu(self.td, lp, lp)
        h.finalize(self.td)
        for i in range(NUM_2M):  # first half: 4KB page tables; second half: 2MB leaves
            h.ensure_sept(self.td, WINDOW + i * SZ_2M, 0 if i < NUM_2M // 2 else 1)
        # pages the random calls draw from: some in ranges with a DPAMT pair, some without
        self.pages = [h.control_page() for _ in range(6)] + [h.alloc.page() for _ in range(6)]
        self.huge = [h.alloc.huge() for _ in range(3)]
        self.ranges = sorted({p & ~(SZ_2M - 1) for p in self.pages} | set(self.huge))


def _op(fx: Fixture, draw: hs.DrawFn) -> Regs:
    """One random SEAMCALL aimed at the TD's window (valid or not)."""
    tdr = fx.td.tdr
    page = draw(hs.sampled_from(fx.pages))
    gpa2m = WINDOW + draw(hs.integers(NUM_2M // 2 - 1, NUM_2M - 1)) * SZ_2M
    gpa4k = (WINDOW + draw(hs.integers(0, NUM_2M // 2)) * SZ_2M
             + draw(hs.integers(0, 3)) * 0x1000)
    level = draw(hs.integers(0, 1))
    gpa = gpa2m if level else gpa4k
    kind = draw(hs.sampled_from([
        "aug4k", "aug2m", "block", "unblock", "track", "demote", "promote", "remove",
        "pamt_add", "pamt_remove", "sept_add", "sept_remove", "mng_rd", "vp_rd", "wbinvd",
        "reclaim"]))
    if kind == "aug4k":
        return Regs(rax=Leaf.TDH_MEM_PAGE_AUG, rcx=gpa4k, rdx=tdr, r8=page)
    if kind == "aug2m":
        return Regs(rax=Leaf.TDH_MEM_PAGE_AUG, rcx=gpa2m | 1, rdx=tdr,
                    r8=draw(hs.sampled_from(fx.huge)))
    if kind == "block":
        return Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | level, rdx=tdr)
    if kind == "unblock":
        return Regs(rax=Leaf.TDH_MEM_RANGE_UNBLOCK, rcx=gpa | level, rdx=tdr)
    if kind == "track":
        return Regs(rax=Leaf.TDH_MEM_TRACK, rcx=tdr)
    if kind == "demote":
        a, b = draw(hs.sampled_from(fx.pages)), draw(hs.sampled_from(fx.pages))
        return Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE, rcx=gpa2m | 1, rdx=tdr, r8=page, r12=a,
                    r13=b)
    if kind == "promote":
        return Regs(rax=Leaf.TDH_MEM_PAGE_PROMOTE, rcx=gpa2m | 1, rdx=tdr)
    if kind == "remove":
        return Regs(rax=Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa | level, rdx=tdr)
    if kind == "pamt_add":
        return Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=draw(hs.sampled_from(fx.ranges)) | 1,
                    rdx=page, r8=draw(hs.sampled_from(fx.pages)))
    if kind == "pamt_remove":
        return Regs(rax=Leaf.TDH_PHYMEM_PAMT_REMOVE, rcx=draw(hs.sampled_from(fx.ranges)) | 1)
    if kind == "sept_add":
        return Regs(rax=Leaf.TDH_MEM_SEPT_ADD, rcx=gpa2m | 1, rdx=tdr, r8=page)
    if kind == "sept_remove":
        return Regs(rax=Leaf.TDH_MEM_SEPT_REMOVE, rcx=gpa2m | 1, rdx=tdr)
    if kind == "mng_rd":
        return Regs(rax=Leaf.TDH_MNG_RD, rcx=tdr, rdx=0x110000000000000A)
    if kind == "vp_rd":
        return Regs(rax=Leaf.TDH_VP_RD, rcx=fx.td.vcpus[0].tdvpr, rdx=2)
    if kind == "wbinvd":
        return Regs(rax=Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=page)
    return Regs(rax=Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)


class Runner:
    """Issues steps; a paused step leaves its LP busy until resumed."""

    def __init__(self, fx: Fixture) -> None:
        self.fx = fx
        self.m = fx.w.module
        self.inflight: dict[int, tuple[object, threading.Thread, list[Regs]]] = {}

    def check(self) -> None:
        problems = check_invariants(self.m)
        assert not problems, problems
        assert not self.m.internal_errors, self.m.internal_errors[-1]

    def step(self, lp: int, regs: Regs, pause: str | None) -> None:
        if lp in self.inflight:
            self.resume(lp)
        if not pause:
            out = self.m.seamcall(lp, regs)
            assert st.is_known(out.rax), hex(out.rax)  # only statuses the module defines
            self.check()
            return
        handle = self.fx.w.control.pause(lp=lp, leaf=regs.rax & 0xFFFF, point=pause)
        res: list[Regs] = []
        t = threading.Thread(target=lambda: res.append(self.m.seamcall(lp, regs)))
        t.start()
        deadline = time.monotonic() + 5
        while not handle.paused and t.is_alive() and time.monotonic() < deadline:
            handle.wait_paused(0.005)
        if handle.paused:
            self.inflight[lp] = (handle, t, res)
        else:
            handle.cancel()  # failed before taking all its locks
            t.join(5)
            assert res, "call neither paused nor returned"
        self.check()

    def resume(self, lp: int) -> None:
        handle, t, res = self.inflight.pop(lp)
        handle.resume()  # type: ignore[attr-defined]
        t.join(5)
        assert not t.is_alive() and res
        assert st.is_known(res[0].rax), hex(res[0].rax)
        self.check()

    def finish(self) -> None:
        for lp in list(self.inflight):
            self.resume(lp)
        assert len(self.m.locks) == 0, self.m.locks.snapshot()
        assert not check_invariants(self.m, expect_no_locks=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.data())
def test_random_interleavings_keep_invariants(data: hs.DataObject) -> None:
    num_lps = data.draw(hs.integers(2, 4), label="lps")
    fx = Fixture(num_lps)
    r = Runner(fx)
    try:
        for _ in range(data.draw(hs.integers(4, 24), label="steps")):
            lp = data.draw(hs.integers(0, num_lps - 1))
            regs = data.draw(hs.composite(lambda draw: _op(fx, draw))())
            pause = data.draw(hs.sampled_from([None, None, "entry", "locked", "locked", "done"]))
            if len(r.inflight) >= num_lps - 1:
                pause = None
            r.step(lp, regs, pause)
            if r.inflight and data.draw(hs.integers(0, 3)) == 0:
                r.resume(data.draw(hs.sampled_from(sorted(r.inflight))))
        r.finish()
    finally:
        # Hypothesis may stop an example at any draw: never leave a call paused behind.
        fx.w.control.clear()
        for _, t, _ in r.inflight.values():
            t.join(5)


def test_two_pamt_adds_cannot_take_one_page() -> None:
    """tdh_phymem_pamt_add.c: after the shared PAMT walks, each pair page's PAMT_PAGE_BITMAP
    bit is atomically tested and set before the commit. Two PAMT.ADDs naming one free page
    both pass the shared walks; while the first is held at ``locked``, the second finds the
    bit taken: TDX_PAGE_NOT_FREE with operand RDX, and the page backs one range only
    (found by the random interleavings above: the model used to set the bits at commit)."""
    fx = Fixture(2)
    m = fx.w.module
    r = Runner(fx)
    a, b = fx.huge[0], fx.huge[1]
    p0, p1, p2 = fx.pages[6], fx.pages[7], fx.pages[8]
    r.step(0, Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=a | 1, rdx=p0, r8=p1), "locked")
    assert 0 in r.inflight                             # held with the bits taken
    out = m.seamcall(1, Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=b | 1, rdx=p0, r8=p2))
    assert out.rax == st.with_operand(st.TDX_PAGE_NOT_FREE, st.OPERAND_ID_RDX)
    r.check()                                          # p2's bit was not kept either
    assert (p2 >> 12) not in m.gd.pamt.bitmap
    r.resume(0)
    assert m.gd.pamt.node(a) is not None and m.gd.pamt.node(b) is None
    r.finish()
    # The same page for both halves of one pair: the second bit fails, the first is given
    # back (operand R8).
    out = m.seamcall(1, Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=b | 1, rdx=p2, r8=p2))
    assert out.rax == st.with_operand(st.TDX_PAGE_NOT_FREE, st.OPERAND_ID_R8)
    assert (p2 >> 12) not in m.gd.pamt.bitmap
    r.check()
