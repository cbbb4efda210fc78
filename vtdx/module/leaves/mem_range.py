"""TDH.MEM.RANGE.BLOCK (7), TDH.MEM.RANGE.UNBLOCK (39), TDH.MEM.TRACK (38).

TLB-epoch rules from intel/tdx-module tdh_mem_range_block.c (BLOCK stamps the page's PAMT
BEPOCH with TD_EPOCH), tdh_mem_track.c (epoch lock exclusive, TDX_PREVIOUS_TLB_EPOCH_BUSY
while a vCPU still runs in the previous epoch, then TD_EPOCH++) and helpers.h
is_tlb_tracked(). Blocking needs the S-EPT tree lock exclusive.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module import td_engine
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_lock_and_map_explicit_tdr,
    check_state_map_tdcs_and_lock,
    is_tlb_tracked,
    lock_gpa_entry,
    septe_error,
    tlb_tracking_required,
)
from vtdx.module.locks import epoch_key
from vtdx.module.pamt import LEVEL_4K


def _stamp_page(entry: S.SeptEntry, level: int) -> tuple[int, int]:
    """(pa, PAMT level) whose BEPOCH a block of ``entry`` stamps."""
    return (entry.hpa, level) if entry.is_leaf else (entry.hpa, LEVEL_4K)


def tdh_mem_range_block(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.RANGE.BLOCK(RCX = GPA | level, RDX = TDR)."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_RANGE_BLOCK, 0, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_RANGE_BLOCK]:
        code = (st.TDX_GPA_RANGE_ALREADY_BLOCKED if w.entry.state in S.ANY_BLOCKED
                else st.TDX_EPT_ENTRY_STATE_INCORRECT)
        raise septe_error(code, st.OPERAND_ID_RCX, w)
    ctx.checkpoint("locked")
    w.entry.state = S.block(w.entry.state)
    pa, plevel = _stamp_page(w.entry, level)
    pamt = ctx.gd.pamt
    e = pamt.get(pa, plevel)
    pamt.set(pa, plevel, e.pt, e.owner, td.td_epoch)
    td_engine.sept_changed(td, "BLOCK", rcx & ~0xFFF, level)


def tdh_mem_range_unblock(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.RANGE.UNBLOCK(RCX = GPA | level, RDX = TDR)."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_RANGE_UNBLOCK, 0, None, EX)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_RANGE_UNBLOCK]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    if tlb_tracking_required(td, w.entry.state):
        pa, plevel = _stamp_page(w.entry, level)
        if not is_tlb_tracked(td, ctx.gd.pamt.get(pa, plevel).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_SEPT_TREE)
    ctx.checkpoint("locked")
    w.entry.state = S.unblock(w.entry.state)
    td_engine.sept_changed(td, "UNBLOCK", rcx & ~0xFFF, level)


def tdh_mem_track(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.TRACK(RCX = TDR): advance the TD's TLB epoch."""
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, SH)
    check_state_map_tdcs_and_lock(ctx, td, SH, Leaf.TDH_MEM_TRACK)
    if not ctx.try_lock(epoch_key(td.tdr_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_TD_EPOCH)
    if td.refcount[1 - (td.td_epoch & 1)]:
        raise TdxError(st.TDX_PREVIOUS_TLB_EPOCH_BUSY)
    ctx.checkpoint("locked")
    td.td_epoch += 1
    # The IPIs KVM sends after TDH.MEM.TRACK (tdx_track) take every LP running the TD out
    # of it; here the engines' slices end now, so the previous epoch drains promptly.
    td_engine.kick(td)


LEAVES = [
    LeafSpec(Leaf.TDH_MEM_RANGE_BLOCK, tdh_mem_range_block),
    LeafSpec(Leaf.TDH_MEM_RANGE_UNBLOCK, tdh_mem_range_unblock),
    LeafSpec(Leaf.TDH_MEM_TRACK, tdh_mem_track),
]
