"""DEMOTE then PROMOTE under Dynamic PAMT: PROMOTE merges the 512 leaves back, frees the
S-EPT page (RCX) and returns the DPAMT pair (RDX, R8) -- pamt_promote() in the DPAMT-capable
intel/tdx-module pamt_manager.c (commit 1666adc4) clears the pair's bitmap bits."""

from __future__ import annotations

from test_dpamt_demote_race import DPAMT_A1, DPAMT_B1, GPA, GUEST_2M_HPA, Scenario

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module.pamt import PT_REG


def test_promote_returns_sept_page_and_dpamt_pair() -> None:
    sc = Scenario()
    m = sc.w.module
    assert m.seamcall(0, sc.demote_regs()).rax == 0
    tdr = sc.td.tdr
    promote = Regs(rax=Leaf.TDH_MEM_PAGE_PROMOTE, rcx=GPA | 1, rdx=tdr)
    # the non-leaf entry must be blocked and tracked first (tdh_mem_page_promote.c)
    out = m.seamcall(0, promote)
    assert out.rax == st.TDX_GPA_RANGE_NOT_BLOCKED + st.OPERAND_ID_RCX
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=GPA | 1, rdx=tdr)).rax == 0
    assert m.seamcall(0, promote).rax == st.TDX_TLB_TRACKING_NOT_DONE + st.OPERAND_ID_RCX
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=tdr)).rax == 0
    out = m.seamcall(0, promote)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (0, sc.sept_page, DPAMT_A1, DPAMT_B1)
    gd = m.gd
    w = gd.tds[tdr].sept.walk(GPA, 1)
    assert (w.level, w.entry.state, w.entry.hpa) == (1, S.PENDING, GUEST_2M_HPA)
    assert m.pamt.get(GUEST_2M_HPA, 1).pt == PT_REG
    assert gd.pamt.node(GUEST_2M_HPA) is None
    assert DPAMT_A1 >> 12 not in gd.pamt.bitmap and DPAMT_B1 >> 12 not in gd.pamt.bitmap
    sc.w.host.alloc.put(sc.sept_page)
    # the freed S-EPT page is PT_NDA again
    assert m.pamt.get(sc.sept_page, 0).pt == 0
    sc.w.check()
