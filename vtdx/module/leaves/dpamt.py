"""Dynamic PAMT: TDH.PHYMEM.PAMT.ADD (58) and TDH.PHYMEM.PAMT.REMOVE (59).

Source: intel/tdx-module (DPAMT-capable tree, commit 1666adc4)
src/vmm_dispatcher/api_calls/tdh_phymem_pamt_add.c and tdh_phymem_pamt_remove.c, with the
ABI the Linux series use (RCX = 2MB-aligned HPA | level 1; RDX, R8 = the page pair;
REMOVE returns the pair in RDX/R8), see /work/shared/reference/dpamt-demote-abi.md.

PAMT.ADD walks the target range's 2MB PAMT entry EXCLUSIVE (shared 1GB parent), so a
concurrent DEMOTE holding that entry SHARED (for its own DPAMT page, operand R12) makes it
fail with TDX_OPERAND_BUSY | RCX, and vice versa.
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.td_common import (
    EX,
    LVL_2M,
    LVL_4K,
    PT_NDA,
    PT_PAMT,
    SZ_2M,
    DpamtNode,
    TdEnv,
    fail,
    td_leaf,
)


def _check_range(env: TdEnv, rcx: int) -> int:
    """page_size_api_input_t: level must be 2MB, reserved bits 0, no HKID, 2MB aligned."""
    pa = rcx & ~0xFFF
    if (rcx & 0x7) != LVL_2M or rcx & 0xFF8 or rcx >> 52 or env.hkid_of(pa) or pa % SZ_2M:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    return pa


def _check_pair_page(env: TdEnv, hpa: int, operand: int) -> None:
    if env.hkid_of(hpa) or hpa % 4096 or hpa >= env.max_pa:
        raise fail(st.TDX_OPERAND_INVALID, operand)
    if not env.pamt.block_ready(hpa):
        raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, operand)


def pamt_add(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.PHYMEM.PAMT.ADD(RCX = 2MB HPA | 1, RDX = page 0, R8 = page 1)."""
    if not env.dpamt:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    pa = _check_range(env, regs.rcx)
    hpa0, hpa1 = regs.rdx, regs.r8
    _check_pair_page(env, hpa0, st.OPERAND_ID_RDX)
    _check_pair_page(env, hpa1, st.OPERAND_ID_R8)
    w = env.ready_walk(ctx, pa, EX, LVL_2M, st.OPERAND_ID_RCX)
    if w.level != LVL_2M or w.entry.pt != PT_NDA:
        raise fail(st.TDX_HPA_RANGE_NOT_FREE, st.OPERAND_ID_RCX)
    # pair pages inside the range being added are already locked exclusive: not walked again
    env.check_lock_pair_free(ctx, hpa0, st.OPERAND_ID_RDX, hpa1, st.OPERAND_ID_R8, pa)
    ctx.checkpoint("locked")
    env.dp.bitmap.update((hpa0 >> 12, hpa1 >> 12))
    env.memory.zero(hpa0, 4096)
    env.memory.zero(hpa1, 4096)
    env.dp.nodes[pa >> 21] = DpamtNode(hpa0, hpa1, 0)
    env.set_entry(pa, LVL_2M, PT_PAMT)


def pamt_remove(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.PHYMEM.PAMT.REMOVE(RCX = 2MB HPA | 1) -> RDX, R8 = the freed page pair."""
    if not env.dpamt:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    pa = _check_range(env, regs.rcx)
    w = env.ready_walk(ctx, pa, EX, LVL_2M, st.OPERAND_ID_RCX)
    node = env.dp.node(pa)
    if w.level != LVL_2M or w.entry.pt != PT_PAMT or node is None:
        raise fail(st.TDX_NO_PAMT_PAGE_PAIR, st.OPERAND_ID_RCX)
    get = env.pamt.get
    for i in range(512):
        if get(pa + (i << 12), LVL_4K).pt != PT_NDA:
            # the module reports the index of the pair page holding the entry (0 or 1)
            raise fail(st.TDX_PAMT_PAGE_NOT_EMPTY, i // 256)
    ctx.checkpoint("locked")
    del env.dp.nodes[pa >> 21]
    env.dp.bitmap.discard(node.hpa0 >> 12)
    env.dp.bitmap.discard(node.hpa1 >> 12)
    env.set_entry(pa, LVL_2M, PT_NDA)
    regs.rdx, regs.r8 = node.hpa0, node.hpa1


LEAVES = [
    td_leaf(Leaf.TDH_PHYMEM_PAMT_ADD, pamt_add),
    td_leaf(Leaf.TDH_PHYMEM_PAMT_REMOVE, pamt_remove),
]
