"""TDH.PHYMEM.CACHE.WB (tdh_phymem_cache_wb.c) and TDH.PHYMEM.PAGE.RDMD
(tdh_phymem_page_rdmd.c).

CACHE.WB writes back caches for keyids in the KOT state FLUSHED on this LP's package; the
model has no cache, so it completes in one call (never TDX_INTERRUPTED_RESUMABLE) and a
RESUME command therefore always finds no saved interruption point.

RDMD follows the Dynamic-PAMT-capable tree (intel/tdx-module commit 1666adc4): RCX is
page_size_api_input_t (level in bits 2:0; 2M and 1G only with Dynamic PAMT), and the walk is
the shared, locked pamt_walk to that level (all entries SHARED, busy -> OPERAND_BUSY | RCX).
With Dynamic PAMT a 4K request in a 2M range without a page pair stops at the 2M entry and
reports it (level 1, normally PT_NDA), unless the page's PAMT_PAGE_BITMAP bit is set (a PAMT
page, or a TDMR reserved page), which reports PT_PAMT at level 4K with no owner. A PT_PAMT
node reports RCX bit 63 (non-leaf) and the page pair in R10/R11.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import KOT_LOCK, wbt_key
from vtdx.module.pamt import (
    LEVEL_1G,
    LEVEL_4K,
    PAGE_SIZE,
    PT_EPT,
    PT_NDA,
    PT_PAMT,
    PT_REG,
    PT_RSVD,
)
from vtdx.module.state import KOT_FLUSHED

CACHEWB_START = 0
CACHEWB_RESUME = 1
#: phymem_page_rdmd_pt_ret_t: page type in bits 3:0, bit 63 set for a non-leaf (PT_PAMT) entry.
RDMD_NON_LEAF = 1 << 63


def tdh_phymem_cache_wb(ctx: CallContext, inp: Regs, out: Regs) -> None:
    gd = ctx.gd
    cmd = inp.rcx
    if cmd > CACHEWB_RESUME:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    pkg = ctx.lp_state.package
    ctx.lock(wbt_key(pkg), True, st.TDX_OPERAND_BUSY + st.OPERAND_ID_WBCACHE)
    ctx.lock(KOT_LOCK, False, st.TDX_OPERAND_BUSY + st.OPERAND_ID_KOT)
    ctx.checkpoint("locked")
    if cmd == CACHEWB_START:
        gd.cachewb_intr[pkg] = 0
        flushed = [h for h, s in gd.kot.items() if s == KOT_FLUSHED]
        if not flushed:
            ctx.set_status(st.TDX_NO_HKID_READY_TO_WBCACHE)
            return
    else:
        if not gd.cachewb_intr.get(pkg):
            raise TdxError(st.TDX_WBCACHE_RESUME_ERROR)
        flushed = [h for h, s in gd.kot.items() if s == KOT_FLUSHED]
    for h in flushed:
        gd.kot_wbinvd.setdefault(h, set()).discard(pkg)
    gd.cachewb_intr[pkg] = 0


def tdh_phymem_page_rdmd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    out.rcx = out.rdx = out.r8 = out.r9 = out.r10 = out.r11 = 0
    rcx = inp.rcx
    level = rcx & 0x7
    pa = rcx & ~0xFFF  # bits 63:52 (reserved) fail the MAX_PA check below
    pamt = ctx.gd.pamt
    dpamt = pamt.dynamic
    if rcx & 0xFF8 or level > LEVEL_1G or (not dpamt and level > LEVEL_4K):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    if pa & (PAGE_SIZE[level] - 1) or not ctx.module.pa_ok(pa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    w = pamt.ready_walk(ctx, pa, False, level, st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    entry = w.entry
    pt, flags = entry.pt, 0
    out.r8 = w.level
    if dpamt:
        # Under DPAMT the module keeps no PT_RSVD 4K entries (pair pages start zeroed); the
        # model's default PT_RSVD 4K entry stands for PT_NDA with the reserved page's bit set.
        if level == LEVEL_4K and pt in (PT_NDA, PT_RSVD) and pamt.bitmap_get(pa):
            pt, out.r8 = PT_PAMT, LEVEL_4K
        elif pt == PT_PAMT:
            flags = RDMD_NON_LEAF
            node = pamt.node(pa)
            if node is not None:
                out.r10, out.r11 = node.hpa0, node.hpa1
    out.rcx = pt | flags
    if pt != PT_PAMT:
        out.rdx = entry.owner
    if entry.pt in (PT_REG, PT_EPT):
        out.r9 = entry.bepoch


LEAVES = [
    LeafSpec(Leaf.TDH_PHYMEM_CACHE_WB, tdh_phymem_cache_wb),
    LeafSpec(Leaf.TDH_PHYMEM_PAGE_RDMD, tdh_phymem_page_rdmd),
]
