"""TDH.PHYMEM.PAGE.RECLAIM (28) and TDH.PHYMEM.PAGE.WBINVD (41) for TD-owned pages.

From intel/tdx-module tdh_phymem_page_reclaim.c: walk the page's PAMT exclusive (to any
leaf level); PT_NDA/PT_RSVD -> TDX_PAGE_METADATA_INCORRECT|RCX; outputs RCX = page type,
RDX = owner, R8 = level; a non-TDR page needs its TD in TEARDOWN (implicit TDR lock shared),
a TDR needs TEARDOWN and CHLDCNT == 0.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_lock_explicit_private_hpa,
    hpa_check_with_pwr_2_alignment,
)
from vtdx.module.pamt import (
    LEVEL_4K,
    PAGE_4K,
    PT_EPT,
    PT_NDA,
    PT_PAMT,
    PT_REG,
    PT_RSVD,
    PT_TDCX,
    PT_TDR,
    PT_TDVPR,
    pamt_key,
)
from vtdx.module.state import TD_TEARDOWN


def tdh_phymem_page_reclaim(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.PHYMEM.PAGE.RECLAIM(RCX = page HPA) -> RCX type, RDX owner, R8 size."""
    pa = inp.rcx
    out.rcx = out.rdx = 0
    if not hpa_check_with_pwr_2_alignment(ctx, pa, PAGE_4K):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    gd = ctx.gd
    pamt = gd.pamt
    w = pamt.ready_walk(ctx, pa, EX, LEVEL_4K, st.OPERAND_ID_RCX)
    pt, owner, level = w.entry.pt, w.entry.owner, w.level
    if pt in (PT_NDA, PT_RSVD, PT_PAMT):
        raise fail(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX)
    out.rcx, out.rdx, out.r8 = pt, owner, level
    if level > LEVEL_4K and pa % (PAGE_4K << (9 * level)):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    tds = gd.tds
    if pt != PT_TDR:
        if not ctx.try_lock(pamt_key(LEVEL_4K, owner), SH):
            raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_TDR)
        td = tds[owner]
        if td.lifecycle != TD_TEARDOWN:
            raise TdxError(st.TDX_LIFECYCLE_STATE_INCORRECT)
    else:
        td = tds[pa]
        if td.lifecycle != TD_TEARDOWN:
            raise TdxError(st.TDX_LIFECYCLE_STATE_INCORRECT)
        if td.chldcnt:
            raise TdxError(st.TDX_TD_ASSOCIATED_PAGES_EXIST)
    ctx.checkpoint("locked")
    pamt.set(pa, level, PT_NDA)
    if level == LEVEL_4K:
        pamt.dec_page_count(pa)
    if pt == PT_TDR:
        del tds[pa]
        return
    td.chldcnt -= 1 << (9 * level)
    if pt == PT_TDVPR:
        gd.vcpus.pop(pa, None)
        td.vcpus.pop(pa, None)
    elif pt == PT_TDCX:
        for v in td.vcpus.values():
            if pa in v.tdvpx:
                v.tdvpx.remove(pa)
        if pa in td.tdcx:
            td.tdcx[td.tdcx.index(pa)] = 0
    elif pt == PT_EPT and td.sept is not None:
        td.sept.pages.pop(pa, None)
    elif pt == PT_REG and td.sept is not None:
        pass  # data page; its S-EPT entry went with the S-EPT teardown


def tdh_phymem_page_wbinvd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.PHYMEM.PAGE.WBINVD(RCX = page HPA, HKID bits allowed): write back a page that
    was just removed from a TD (its PAMT entry must already be PT_NDA)."""
    pa = inp.rcx & ~ctx.module.hkid_mask
    check_and_lock_explicit_private_hpa(ctx, pa, st.OPERAND_ID_RCX, SH, PT_NDA)
    ctx.checkpoint("locked")


LEAVES = [
    LeafSpec(Leaf.TDH_PHYMEM_PAGE_RECLAIM, tdh_phymem_page_reclaim),
    LeafSpec(Leaf.TDH_PHYMEM_PAGE_WBINVD, tdh_phymem_page_wbinvd),
]
