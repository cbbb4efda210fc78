"""TDH.MEM.RANGE.BLOCK (7), TDH.MEM.RANGE.UNBLOCK (39), TDH.MEM.TRACK (38).

TLB-epoch rules from intel/tdx-module tdh_mem_range_block.c (BLOCK stamps the page's PAMT
BEPOCH with TD_EPOCH), tdh_mem_track.c (epoch lock exclusive, TDX_PREVIOUS_TLB_EPOCH_BUSY
while a vCPU still runs in the previous epoch, then TD_EPOCH++) and helpers.h
is_tlb_tracked(). Blocking needs the S-EPT tree lock exclusive.
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module import sept as S
from vtdx.module.leaves.mem_sept import lock_gpa_entry, tracking_required
from vtdx.module.td_common import (
    EX,
    LVL_4K,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    SH,
    TdEnv,
    TdxFail,
    fail,
    septe_fail,
    td_leaf,
)


def _stamp_page(entry: S.SeptEntry, level: int) -> tuple[int, int]:
    """(pa, PAMT level) whose BEPOCH a block of ``entry`` stamps."""
    return (entry.hpa, level) if entry.is_leaf else (entry.hpa, LVL_4K)


def range_block(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.RANGE.BLOCK(RCX = GPA | level, RDX = TDR)."""
    rcx, rdx = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_RANGE_BLOCK, 0, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_RANGE_BLOCK]:
        code = (st.TDX_GPA_RANGE_ALREADY_BLOCKED if w.entry.state in S.ANY_BLOCKED
                else st.TDX_EPT_ENTRY_STATE_INCORRECT)
        raise septe_fail(code, st.OPERAND_ID_RCX, w)
    ctx.checkpoint("locked")
    w.entry.state = S.block(w.entry.state)
    pa, plevel = _stamp_page(w.entry, level)
    e = env.pamt.get(pa, plevel)
    env.set_entry(pa, plevel, e.pt, e.owner, td.td_epoch)


def range_unblock(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.RANGE.UNBLOCK(RCX = GPA | level, RDX = TDR)."""
    rcx, rdx = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_RANGE_UNBLOCK, 0, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_RANGE_UNBLOCK]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    if tracking_required(td, w.entry.state):
        pa, plevel = _stamp_page(w.entry, level)
        if not env.tlb_tracked(td, env.pamt.get(pa, plevel).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, OPERAND_ID_SEPT_TREE)
    ctx.checkpoint("locked")
    w.entry.state = S.unblock(w.entry.state)


def mem_track(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.TRACK(RCX = TDR): advance the TD's TLB epoch."""
    _, td = env.lock_tdr(ctx, regs.rcx, st.OPERAND_ID_RCX, SH)
    assert td is not None
    env.tdcs(ctx, td, SH, Leaf.TDH_MEM_TRACK)
    if not ctx.try_lock(("epoch", td.tdr_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_TD_EPOCH)
    if td.refcount[1 - (td.td_epoch & 1)]:
        raise TdxFail(st.TDX_PREVIOUS_TLB_EPOCH_BUSY)
    ctx.checkpoint("locked")
    td.td_epoch += 1


LEAVES = [
    td_leaf(Leaf.TDH_MEM_RANGE_BLOCK, range_block),
    td_leaf(Leaf.TDH_MEM_RANGE_UNBLOCK, range_unblock),
    td_leaf(Leaf.TDH_MEM_TRACK, mem_track),
]
