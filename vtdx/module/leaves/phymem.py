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
from vtdx.module.context import CallContext, LeafSpec
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
from vtdx.module.td_common import env_of

CACHEWB_START = 0
CACHEWB_RESUME = 1
#: phymem_page_rdmd_pt_ret_t: page type in bits 3:0, bit 63 set for a non-leaf (PT_PAMT) entry.
RDMD_NON_LEAF = 1 << 63


def tdh_phymem_cache_wb(ctx: CallContext) -> int:
    m = ctx.module
    cmd = ctx.regs.rcx
    if cmd > CACHEWB_RESUME:
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    pkg = ctx.lp_state.package
    ctx.lock(("wbt", pkg), True, st.TDX_OPERAND_BUSY + st.OPERAND_ID_WBCACHE)
    ctx.lock(("kot",), False, st.TDX_OPERAND_BUSY + st.OPERAND_ID_KOT)
    ctx.checkpoint("locked")
    if cmd == CACHEWB_START:
        m.cachewb_intr[pkg] = 0
        flushed = [h for h, s in m.kot.items() if s == KOT_FLUSHED]
        if not flushed:
            return st.TDX_NO_HKID_READY_TO_WBCACHE
    else:
        if not m.cachewb_intr.get(pkg):
            return st.TDX_WBCACHE_RESUME_ERROR
        flushed = [h for h, s in m.kot.items() if s == KOT_FLUSHED]
    for h in flushed:
        m.kot_wbinvd.setdefault(h, set()).discard(pkg)
    m.cachewb_intr[pkg] = 0
    return st.TDX_SUCCESS


def tdh_phymem_page_rdmd(ctx: CallContext) -> int:
    m, out = ctx.module, ctx.out
    out.rcx = out.rdx = out.r8 = out.r9 = out.r10 = out.r11 = 0
    rcx = ctx.regs.rcx
    level = rcx & 0x7
    pa = rcx & ~0xFFF  # bits 63:52 (reserved) fail the MAX_PA check below
    dpamt = m.dynamic_pamt_enabled
    if rcx & 0xFF8 or level > LEVEL_1G or (not dpamt and level > LEVEL_4K):
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    if pa & (PAGE_SIZE[level] - 1) or not m.pa_ok(pa):
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    if not m.pamt.block_ready(pa):
        return st.TDX_OPERAND_ADDR_RANGE_ERROR + st.OPERAND_ID_RCX
    reached, entry = m.pamt.walk(ctx, pa, False, st.OPERAND_ID_RCX, level)
    ctx.checkpoint("locked")
    pt, flags = entry.pt, 0
    out.r8 = reached
    if dpamt:
        env = env_of(m)
        # Under DPAMT the module keeps no PT_RSVD 4K entries (pair pages start zeroed); the
        # model's default PT_RSVD 4K entry stands for PT_NDA with the reserved page's bit set.
        if level == LEVEL_4K and pt in (PT_NDA, PT_RSVD) and env.bitmap_get(pa):
            pt, out.r8 = PT_PAMT, LEVEL_4K
        elif pt == PT_PAMT:
            flags = RDMD_NON_LEAF
            node = env.dp.node(pa)
            if node is not None:
                out.r10, out.r11 = node.hpa0, node.hpa1
    out.rcx = pt | flags
    if pt != PT_PAMT:
        out.rdx = entry.owner
    if entry.pt in (PT_REG, PT_EPT):
        out.r9 = entry.bepoch
    return st.TDX_SUCCESS


LEAVES = [
    LeafSpec(Leaf.TDH_PHYMEM_CACHE_WB, tdh_phymem_cache_wb),
    LeafSpec(Leaf.TDH_PHYMEM_PAGE_RDMD, tdh_phymem_page_rdmd),
]

