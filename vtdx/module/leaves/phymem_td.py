"""TDH.PHYMEM.PAGE.RECLAIM (28) and TDH.PHYMEM.PAGE.WBINVD (41) for TD-owned pages.

From intel/tdx-module tdh_phymem_page_reclaim.c: walk the page's PAMT exclusive (to any
leaf level); PT_NDA/PT_RSVD -> TDX_PAGE_METADATA_INCORRECT|RCX; outputs RCX = page type,
RDX = owner, R8 = level; a non-TDR page needs its TD in TEARDOWN (implicit TDR lock shared),
a TDR needs TEARDOWN and CHLDCNT == 0. Registered after MODULE's "phymem" family.
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.td_common import (
    EX,
    LVL_4K,
    PT_EPT,
    PT_NDA,
    PT_PAMT,
    PT_REG,
    PT_RSVD,
    PT_TDCX,
    PT_TDR,
    PT_TDVPR,
    SH,
    TD_TEARDOWN,
    TdEnv,
    TdxFail,
    fail,
    pamt_key,
    td_leaf,
)

OPERAND_ID_TDR = 128


def page_reclaim(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.PHYMEM.PAGE.RECLAIM(RCX = page HPA) -> RCX type, RDX owner, R8 size."""
    pa = regs.rcx
    regs.rcx = regs.rdx = 0
    if not env.hpa_check(pa, 4096):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    w = env.ready_walk(ctx, pa, EX, LVL_4K, st.OPERAND_ID_RCX)
    pt, owner, level = w.entry.pt, w.entry.owner, w.level
    if pt in (PT_NDA, PT_RSVD, PT_PAMT):
        raise fail(st.TDX_PAGE_METADATA_INCORRECT, st.OPERAND_ID_RCX)
    regs.rcx, regs.rdx, regs.r8 = pt, owner, level
    if level > LVL_4K and pa % (4096 << (9 * level)):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    tds = env.td.tds
    if pt != PT_TDR:
        if not ctx.try_lock(pamt_key(LVL_4K, owner), SH):
            raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_TDR)
        td = tds[owner]
        if td.lifecycle != TD_TEARDOWN:
            raise TdxFail(st.TDX_LIFECYCLE_STATE_INCORRECT)
    else:
        td = tds[pa]
        if td.lifecycle != TD_TEARDOWN:
            raise TdxFail(st.TDX_LIFECYCLE_STATE_INCORRECT)
        if td.chldcnt:
            raise TdxFail(st.TDX_TD_ASSOCIATED_PAGES_EXIST)
    ctx.checkpoint("locked")
    env.set_entry(pa, level, PT_NDA)
    if level == LVL_4K:
        env.dec_page_count(pa)
    if pt == PT_TDR:
        del tds[pa]
        return
    td.chldcnt -= 1 << (9 * level)
    if pt == PT_TDVPR:
        env.td.vcpus.pop(pa, None)
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


def page_wbinvd(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.PHYMEM.PAGE.WBINVD(RCX = page HPA, HKID bits allowed): write back a page that
    was just removed from a TD (its PAMT entry must already be PT_NDA)."""
    pa = regs.rcx & ~env.hkid_mask
    env.check_lock_private(ctx, pa, st.OPERAND_ID_RCX, SH, PT_NDA)
    ctx.checkpoint("locked")


LEAVES = [
    td_leaf(Leaf.TDH_PHYMEM_PAGE_RECLAIM, page_reclaim),
    td_leaf(Leaf.TDH_PHYMEM_PAGE_WBINVD, page_wbinvd),
]
