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
    TD_HANDLE_FLAG,
    check_and_lock_explicit_private_hpa,
    check_blocked_and_tracked,
    lock_gpa_entry,
    septe_error,
)
from vtdx.module.pamt import LEVEL_4K, PT_EPT, PT_NDA, pamt_key

#: NULL_PA (all ones): "no page" in SEPT.ADD's page operands.
NULL_PA = MASK64


def tdh_mem_sept_add(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.SEPT.ADD(RCX = GPA | level, RDX = TDR | ALLOW_EXISTING, R8 = new S-EPT page;
    version 1: R9-R11 = L2 S-EPT pages) -- tdh_mem_sept_add.c of the 1.5 tree, lines 61-127
    (process_l1_page) and 283-470 (the leaf); 2.0.08 takes the same steps."""
    version = ctx.version
    pages = [inp.r8, inp.r9, inp.r10, inp.r11] if version else [inp.r8]
    out.rcx = out.rdx = 0
    if version > 1:  # lines 311-315, no GPR change
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    # Bit 63 of a page PA other than NULL_PA is ignored (lines 317-326).
    pages = [p if p == NULL_PA else p & ~(1 << 63) for p in pages]
    flagged = list(pages)
    try:
        _sept_add(ctx, inp, pages, flagged)
    finally:
        if version:  # EXIT: R8-R11 = the pages, NULL_PA once used, bit 63 = not used
            out.r8, out.r9, out.r10, out.r11 = flagged


def _sept_add(ctx: CallContext, inp: Regs, pages: list[int], flagged: list[int]) -> None:
    td, level, w = lock_gpa_entry(ctx, inp.rcx, inp.rdx, Leaf.TDH_MEM_SEPT_ADD, 1, None, SH,
                                  handle_flags=True)
    allow_existing = bool(inp.rdx & TD_HANDLE_FLAG)
    state = w.entry.state
    if state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_SEPT_ADD]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    new_pa = pages[0]
    if new_pa == NULL_PA:  # process_l1_page lines 71-86
        if ctx.version == 0:
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
        if state != S.NL_MAPPED:
            raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    elif state == S.FREE:
        check_and_lock_explicit_private_hpa(ctx, new_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    elif allow_existing:
        flagged[0] |= 1 << 63  # lines 103-108: the page was not used
    else:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    # process_l2_pages (lines 129-186): the model has no L2 VM, so any L2 page is refused.
    for vm_id, pa in enumerate(pages[1:], start=1):
        if pa != NULL_PA:
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8 + vm_id)
    ctx.checkpoint("locked")
    if flagged[0] & (1 << 63):  # NULL_PA or an existing page: nothing to add
        return
    assert td.sept is not None
    td.sept.add_page(new_pa, level - 1)
    w.entry.state, w.entry.hpa = S.NL_MAPPED, new_pa
    pamt = ctx.gd.pamt
    pamt.set(new_pa, LEVEL_4K, PT_EPT, td.tdr_pa)
    pamt.inc_page_count(new_pa)
    td.chldcnt += 1
    flagged[0] = NULL_PA
    td_engine.sept_changed(td, "ADD", inp.rcx & ~0xFFF, level)


def tdh_mem_sept_remove(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.SEPT.REMOVE(RCX = GPA | level, RDX = TDR) -> RCX = removed page HPA."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    if ctx.version > 1:  # tdh_mem_sept_remove.c 85-89; version 1 only adds L2 aliases
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
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
