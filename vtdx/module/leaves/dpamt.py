"""Dynamic PAMT: TDH.PHYMEM.PAMT.ADD (58) and TDH.PHYMEM.PAMT.REMOVE (59).

Source: intel/tdx-module (DPAMT-capable tree, commit 1666adc4)
src/vmm_dispatcher/api_calls/tdh_phymem_pamt_add.c and tdh_phymem_pamt_remove.c, with the
ABI the Linux series use (RCX = 2MB-aligned HPA | level 1; RDX, R8 = the page pair;
REMOVE returns the pair in RDX/R8).

PAMT.ADD walks the target range's 2MB PAMT entry EXCLUSIVE (shared 1GB parent), so a
concurrent DEMOTE holding that entry SHARED (for its own DPAMT page, operand R12) makes it
fail with TDX_OPERAND_BUSY | RCX, and vice versa.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import fail
from vtdx.module.helpers import EX, check_and_lock_dpamt_pair
from vtdx.module.pamt import LEVEL_2M, LEVEL_4K, PAGE_2M, PAGE_4K, PT_NDA, PT_PAMT


def _check_range(ctx: CallContext, rcx: int) -> int:
    """page_size_api_input_t: level must be 2MB, reserved bits 0, no HKID, 2MB aligned."""
    pa = rcx & ~0xFFF
    if (rcx & 0x7) != LEVEL_2M or rcx & 0xFF8 or rcx >> 52 or ctx.module.hkid_of(pa) or (
            pa % PAGE_2M):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    return pa


def _check_pair_page(ctx: CallContext, hpa: int, operand: int) -> None:
    m = ctx.module
    if m.hkid_of(hpa) or hpa % PAGE_4K or hpa >= m.max_pa:
        raise fail(st.TDX_OPERAND_INVALID, operand)
    if not ctx.gd.pamt.block_ready(hpa):
        raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, operand)


def tdh_phymem_pamt_add(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.PHYMEM.PAMT.ADD(RCX = 2MB HPA | 1, RDX = page 0, R8 = page 1)."""
    pamt = ctx.gd.pamt
    if not pamt.dynamic:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    pa = _check_range(ctx, inp.rcx)
    hpa0, hpa1 = inp.rdx, inp.r8
    _check_pair_page(ctx, hpa0, st.OPERAND_ID_RDX)
    _check_pair_page(ctx, hpa1, st.OPERAND_ID_R8)
    w = pamt.ready_walk(ctx, pa, EX, LEVEL_2M, st.OPERAND_ID_RCX)
    if w.level != LEVEL_2M or w.entry.pt != PT_NDA:
        raise fail(st.TDX_HPA_RANGE_NOT_FREE, st.OPERAND_ID_RCX)
    # pair pages inside the range being added are already locked exclusive: not walked again
    check_and_lock_dpamt_pair(ctx, hpa0, st.OPERAND_ID_RDX, hpa1, st.OPERAND_ID_R8, pa)
    ctx.checkpoint("locked")
    ctx.module.memory.zero(hpa0, PAGE_4K)
    ctx.module.memory.zero(hpa1, PAGE_4K)
    pamt.add_node(pa, hpa0, hpa1, 0)


def tdh_phymem_pamt_remove(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.PHYMEM.PAMT.REMOVE(RCX = 2MB HPA | 1) -> RDX, R8 = the freed page pair."""
    pamt = ctx.gd.pamt
    if not pamt.dynamic:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    pa = _check_range(ctx, inp.rcx)
    w = pamt.ready_walk(ctx, pa, EX, LEVEL_2M, st.OPERAND_ID_RCX)
    node = pamt.node(pa)
    if w.level != LEVEL_2M or w.entry.pt != PT_PAMT or node is None:
        raise fail(st.TDX_NO_PAMT_PAGE_PAIR, st.OPERAND_ID_RCX)
    for i in range(512):
        if pamt.get(pa + (i << 12), LEVEL_4K).pt != PT_NDA:
            # the module reports the index of the pair page holding the entry (0 or 1)
            raise fail(st.TDX_PAMT_PAGE_NOT_EMPTY, i // 256)
    ctx.checkpoint("locked")
    pamt.remove_node(pa)
    pamt.set(pa, LEVEL_2M, PT_NDA)
    out.rdx, out.r8 = node.hpa0, node.hpa1


LEAVES = [
    LeafSpec(Leaf.TDH_PHYMEM_PAMT_ADD, tdh_phymem_pamt_add),
    LeafSpec(Leaf.TDH_PHYMEM_PAMT_REMOVE, tdh_phymem_pamt_remove),
]
