"""TDH.MEM.SEPT.ADD (3) and TDH.MEM.SEPT.REMOVE (30): grow and shrink a TD's S-EPT.

Follows intel/tdx-module tdh_mem_sept_add.c / tdh_mem_sept_remove.c (L1 only: the model has
no L2 VMs): TDR shared, OP_STATE shared, S-EPT tree shared (ADD) or exclusive (REMOVE), the
host-side S-EPT entry lock, then the new/removed S-EPT page's PAMT entry exclusive.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import MASK64, Regs
from vtdx.module import sept as S
from vtdx.module import td_engine
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_lock_explicit_private_hpa,
    check_blocked_and_tracked,
    lock_gpa_entry,
    septe_error,
)
from vtdx.module.pamt import LEVEL_4K, PT_EPT, PT_NDA, pamt_key

#: The NULL_PA value (all ones) SEPT.ADD rejects as the new page.
NULL_PA = MASK64


def tdh_mem_sept_add(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.SEPT.ADD(RCX = GPA | level, RDX = TDR, R8 = new S-EPT page)."""
    rcx, rdx, new_pa = inp.rcx, inp.rdx, inp.r8
    out.rcx = out.rdx = 0
    if new_pa == NULL_PA:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_SEPT_ADD, 1, None, SH)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_SEPT_ADD] or w.entry.state != S.FREE:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    check_and_lock_explicit_private_hpa(ctx, new_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    ctx.checkpoint("locked")
    assert td.sept is not None
    td.sept.add_page(new_pa, level - 1)
    w.entry.state, w.entry.hpa = S.NL_MAPPED, new_pa
    pamt = ctx.gd.pamt
    pamt.set(new_pa, LEVEL_4K, PT_EPT, td.tdr_pa)
    pamt.inc_page_count(new_pa)
    td.chldcnt += 1
    td_engine.sept_changed(td, "ADD", rcx & ~0xFFF, level)


def tdh_mem_sept_remove(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.SEPT.REMOVE(RCX = GPA | level, RDX = TDR) -> RCX = removed page HPA."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_SEPT_REMOVE, 1, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_SEPT_REMOVE]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    removed = w.entry.hpa
    if not ctx.try_lock(pamt_key(LEVEL_4K, removed), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    check_blocked_and_tracked(ctx, td, w, removed, LEVEL_4K)
    assert td.sept is not None
    if td.sept.pages[removed].used():
        raise septe_error(st.TDX_EPT_PAGE_NOT_FREE, st.OPERAND_ID_RCX, w)
    ctx.checkpoint("locked")
    td.sept.remove_page(removed)
    w.entry.state, w.entry.hpa = S.FREE, 0
    td.chldcnt -= 1
    pamt = ctx.gd.pamt
    pamt.set(removed, LEVEL_4K, PT_NDA)
    pamt.dec_page_count(removed)
    out.rcx = removed
    td_engine.sept_changed(td, "REMOVE", rcx & ~0xFFF, level)


LEAVES = [
    LeafSpec(Leaf.TDH_MEM_SEPT_ADD, tdh_mem_sept_add),
    LeafSpec(Leaf.TDH_MEM_SEPT_REMOVE, tdh_mem_sept_remove),
]
