"""TDH.MEM.SEPT.ADD (3) and TDH.MEM.SEPT.REMOVE (30): grow and shrink a TD's S-EPT.

Follows intel/tdx-module tdh_mem_sept_add.c / tdh_mem_sept_remove.c (L1 only: the model has
no L2 VMs): TDR shared, OP_STATE shared, S-EPT tree shared (ADD) or exclusive (REMOVE), the
host-side S-EPT entry lock, then the new/removed S-EPT page's PAMT entry exclusive.
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module import sept as S
from vtdx.module.td_common import (
    EX,
    LVL_4K,
    PT_EPT,
    PT_NDA,
    SH,
    TLB_TRACKING_OP_STATES,
    TdEnv,
    TdState,
    fail,
    septe_fail,
    td_leaf,
)

NULL_PA = (1 << 64) - 1


def page_info(rcx: int) -> tuple[int, int, bool]:
    """(gpa, level, reserved-bits-clear) of a page_info_api_input_t (RCX)."""
    level = rcx & 0x7
    gpa = rcx & 0x000FFFFFFFFFF000
    ok = not (rcx & 0xFF8) and not (rcx >> 52)
    return gpa, level, ok


def verify_page_info(rcx: int, min_level: int, max_level: int) -> tuple[int, int]:
    """verify_page_info_input: reserved bits zero, level in range, GPA aligned to level."""
    gpa, level, ok = page_info(rcx)
    if not ok or not (min_level <= level <= max_level) or gpa % S.level_size(level):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    return gpa, level


def td_handle(env: TdEnv, ctx: Any, rdx: int, exclusive: bool) -> TdState:
    """TD handle in RDX: TDR HPA bits 51:12, reserved bits must be 0 (td_handle_and_flags_t)."""
    if rdx & 0xFFF or rdx >> 52:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    _, td = env.lock_tdr(ctx, rdx, st.OPERAND_ID_RDX, exclusive)
    assert td is not None
    return td


def tracking_required(td: TdState, state: int) -> bool:
    return state in S.TLB_TRACKING_REQUIRED and td.op_state in TLB_TRACKING_OP_STATES


def lock_gpa_entry(env: TdEnv, ctx: Any, rcx: int, rdx: int, leaf: int, min_level: int,
                   max_level: int | None, tree_lock: bool) -> tuple[TdState, int, S.WalkResult]:
    """How every leaf acting on one S-EPT entry opens, in the module's order: the TD handle
    in RDX (TDR shared), TDCS with OP_STATE shared, page info in RCX (level in
    ``min_level``..``max_level``; None = the TD's S-EPT root level), the S-EPT tree locked
    ``tree_lock`` and walked to that level, then the host-side lock on the entry.
    Returns (td, level, walk); each leaf then checks the entry state its own way."""
    td = td_handle(env, ctx, rdx, SH)
    env.tdcs(ctx, td, SH, leaf)
    top = td.sept_root_level if max_level is None else max_level
    gpa, level = verify_page_info(rcx, min_level, top)
    w = env.lock_sept_walk(ctx, td, gpa, level, st.OPERAND_ID_RCX, tree_lock)
    env.lock_septe(ctx, td, w, st.OPERAND_ID_RCX)
    return td, level, w


def check_blocked_and_tracked(env: TdEnv, td: TdState, w: S.WalkResult, pa: int,
                              level: int) -> None:
    """Taking a mapped entry away (PAGE.REMOVE, PAGE.DEMOTE, SEPT.REMOVE) while the TD can
    run: the entry must be blocked and the block TLB-tracked, i.e. the BEPOCH stamped in
    the PAMT entry of ``pa`` at ``level`` is older than every epoch a vCPU still runs in."""
    if tracking_required(td, w.entry.state):
        if w.entry.state not in S.ANY_BLOCKED:
            raise septe_fail(st.TDX_GPA_RANGE_NOT_BLOCKED, st.OPERAND_ID_RCX, w)
        if not env.tlb_tracked(td, env.pamt.get(pa, level).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_RCX)


def sept_add(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.SEPT.ADD(RCX = GPA | level, RDX = TDR, R8 = new S-EPT page)."""
    rcx, rdx, new_pa = regs.rcx, regs.rdx, regs.r8
    regs.rcx = regs.rdx = 0
    if new_pa == NULL_PA:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_SEPT_ADD, 1, None, SH)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_SEPT_ADD] or w.entry.state != S.FREE:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    env.check_lock_private(ctx, new_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    ctx.checkpoint("locked")
    assert td.sept is not None
    td.sept.add_page(new_pa, level - 1)
    w.entry.state, w.entry.hpa = S.NL_MAPPED, new_pa
    env.set_entry(new_pa, LVL_4K, PT_EPT, td.tdr_pa)
    env.inc_page_count(new_pa)
    td.chldcnt += 1


def sept_remove(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.SEPT.REMOVE(RCX = GPA | level, RDX = TDR) -> RCX = removed page HPA."""
    rcx, rdx = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_SEPT_REMOVE, 1, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_SEPT_REMOVE]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    removed = w.entry.hpa
    if not ctx.try_lock(("pamt", LVL_4K, removed >> 12), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    check_blocked_and_tracked(env, td, w, removed, LVL_4K)
    assert td.sept is not None
    if td.sept.pages[removed].used():
        raise septe_fail(st.TDX_EPT_PAGE_NOT_FREE, st.OPERAND_ID_RCX, w)
    ctx.checkpoint("locked")
    td.sept.remove_page(removed)
    w.entry.state, w.entry.hpa = S.FREE, 0
    td.chldcnt -= 1
    env.set_entry(removed, LVL_4K, PT_NDA)
    env.dec_page_count(removed)
    regs.rcx = removed


LEAVES = [
    td_leaf(Leaf.TDH_MEM_SEPT_ADD, sept_add),
    td_leaf(Leaf.TDH_MEM_SEPT_REMOVE, sept_remove),
]
