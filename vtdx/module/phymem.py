"""TDH.PHYMEM.CACHE.WB (tdh_phymem_cache_wb.c) and TDH.PHYMEM.PAGE.RDMD
(tdh_phymem_page_rdmd.c).

CACHE.WB writes back caches for keyids in the KOT state FLUSHED on this LP's package; the
model has no cache, so it completes in one call (never TDX_INTERRUPTED_RESUMABLE) and a
RESUME command therefore always finds no saved interruption point.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.core import KOT_FLUSHED, CallContext, LeafSpec
from vtdx.module.pamt import PT_EPT, PT_REG

CACHEWB_START = 0
CACHEWB_RESUME = 1


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
    pa = ctx.regs.rcx
    if pa & 0xFFF or not m.pa_ok(pa):
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    if not m.pamt.block_ready(pa):
        return st.TDX_OPERAND_ADDR_RANGE_ERROR + st.OPERAND_ID_RCX
    level, entry = m.pamt.walk(ctx, pa, False, st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    out.rcx = entry.pt
    out.rdx = entry.owner
    out.r8 = level
    if entry.pt in (PT_REG, PT_EPT):
        out.r9 = entry.bepoch
    return st.TDX_SUCCESS


LEAVES = [
    LeafSpec(Leaf.TDH_PHYMEM_CACHE_WB, tdh_phymem_cache_wb),
    LeafSpec(Leaf.TDH_PHYMEM_PAGE_RDMD, tdh_phymem_page_rdmd),
]

