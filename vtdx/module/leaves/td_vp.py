"""vCPU leaves: TDH.VP.CREATE (10), ADDCX (4), INIT (22), RD (26), WR (43), FLUSH (18).

From intel/tdx-module tdh_vp_{create,addcx,init,rd_wr,flush}.c: VP.CREATE locks the TDR
explicitly (RDX); the others reach the TDR implicitly through the TDVPR's PAMT owner
(lock_and_map_implicit_tdr, busy operand = TDR). VP.INIT associates the vCPU with the
calling LP; VP.FLUSH must run on that LP (TDX_VCPU_NOT_ASSOCIATED otherwise).
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.td_common import (
    EX,
    LVL_4K,
    PT_NDA,
    PT_TDCX,
    PT_TDVPR,
    SH,
    TD_KEYS_CONFIGURED,
    TdEnv,
    TdState,
    TdxFail,
    VcpuState,
    fail,
    pamt_key,
    td_leaf,
)

OPERAND_ID_TDR = 128
MAX_TDVPS_PAGES = 15


def _vcpu(env: TdEnv, ctx: Any, tdvpr_pa: int, operand: int, exclusive: bool,
          leaf: int, op_lock: bool | None = SH) -> tuple[VcpuState, TdState]:
    """Check/lock the TDVPR, then the owner TDR implicitly (shared), then TDCS."""
    env.check_lock_private(ctx, tdvpr_pa, operand, exclusive, PT_TDVPR)
    vcpu = env.td.vcpus[tdvpr_pa]
    if not ctx.try_lock(pamt_key(LVL_4K, vcpu.tdr_pa), SH):
        raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_TDR)
    td = env.td.tds[vcpu.tdr_pa]
    if leaf == Leaf.TDH_VP_FLUSH:
        if td.lifecycle != TD_KEYS_CONFIGURED:
            raise TdxFail(st.TDX_TD_KEYS_NOT_CONFIGURED)
    else:
        env.tdcs(ctx, td, op_lock, leaf)
    return vcpu, td


def vp_create(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.CREATE(RCX = TDVPR PA, RDX = TDR PA)."""
    tdvpr_pa, tdr_pa = regs.rcx, regs.rdx
    _, td = env.lock_tdr(ctx, tdr_pa, st.OPERAND_ID_RDX, SH)
    assert td is not None
    env.tdcs(ctx, td, SH, Leaf.TDH_VP_CREATE)
    env.check_lock_private(ctx, tdvpr_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    env.memory.zero(tdvpr_pa, 4096)
    vcpu = VcpuState(tdvpr_pa, tdr_pa)
    env.td.vcpus[tdvpr_pa] = vcpu
    td.vcpus[tdvpr_pa] = vcpu
    td.chldcnt += 1
    env.set_entry(tdvpr_pa, LVL_4K, PT_TDVPR, tdr_pa)
    env.inc_page_count(tdvpr_pa)


def vp_addcx(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.ADDCX(RCX = TDVPX PA, RDX = TDVPR PA)."""
    tdcx_pa, tdvpr_pa = regs.rcx, regs.rdx
    vcpu, td = _vcpu(env, ctx, tdvpr_pa, st.OPERAND_ID_RDX, EX, Leaf.TDH_VP_ADDCX)
    if vcpu.initialized:
        raise TdxFail(st.TDX_VCPU_STATE_INCORRECT)
    if vcpu.num_pages >= max(MAX_TDVPS_PAGES, env.min_tdvps):
        raise TdxFail(st.TDX_TDCX_NUM_INCORRECT)
    env.check_lock_private(ctx, tdcx_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    env.memory.zero(tdcx_pa, 4096)
    vcpu.tdvpx.append(tdcx_pa)
    td.chldcnt += 1
    env.set_entry(tdcx_pa, LVL_4K, PT_TDCX, vcpu.tdr_pa)
    env.inc_page_count(tdcx_pa)


def vp_init(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.INIT(RCX = TDVPR, RDX = initial guest RCX, R8 = x2APIC id for version 1)."""
    tdvpr_pa = regs.rcx
    vcpu, td = _vcpu(env, ctx, tdvpr_pa, st.OPERAND_ID_RCX, EX, Leaf.TDH_VP_INIT)
    if vcpu.num_pages < env.min_tdvps:
        raise TdxFail(st.TDX_TDCX_NUM_INCORRECT)
    if vcpu.initialized:
        raise TdxFail(st.TDX_VCPU_STATE_INCORRECT)
    if td.num_vcpus >= td.max_vcpus:
        raise TdxFail(st.TDX_MAX_VCPUS_EXCEEDED)
    x2apic = regs.r8 & 0xFFFFFFFF if ctx.version >= 1 else td.num_vcpus
    if ctx.version >= 1 and any(v.initialized and v.x2apic_id == x2apic
                                for v in td.vcpus.values()):
        raise TdxFail(st.TDX_X2APIC_ID_NOT_UNIQUE)
    ctx.checkpoint("locked")
    vcpu.vcpu_index = td.num_vcpus
    td.num_vcpus += 1
    vcpu.x2apic_id = x2apic
    vcpu.fields[0] = regs.rdx  # initial RCX
    vcpu.initialized = True
    vcpu.associated_lp = ctx.lp
    env.td.lp_vcpu[ctx.lp] = tdvpr_pa


def vp_rd(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.RD(RCX = TDVPR, RDX = field id) -> R8 = value."""
    vcpu, _ = _vcpu(env, ctx, regs.rcx, st.OPERAND_ID_RCX, SH, Leaf.TDH_VP_RD)
    ctx.checkpoint("locked")
    regs.r8 = vcpu.fields.get(regs.rdx, 0)


def vp_wr(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.WR(RCX = TDVPR, RDX = field id, R8 = value, R9 = mask) -> R8 = old value."""
    vcpu, _ = _vcpu(env, ctx, regs.rcx, st.OPERAND_ID_RCX, SH, Leaf.TDH_VP_WR)
    ctx.checkpoint("locked")
    old = vcpu.fields.get(regs.rdx, 0)
    vcpu.fields[regs.rdx] = (old & ~regs.r9) | (regs.r8 & regs.r9)
    regs.r8 = old


def vp_flush(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.VP.FLUSH(RCX = TDVPR): dissociate the vCPU from this LP."""
    vcpu, td = _vcpu(env, ctx, regs.rcx, st.OPERAND_ID_RCX, EX, Leaf.TDH_VP_FLUSH)
    if vcpu.num_pages < env.min_tdvps:
        raise TdxFail(st.TDX_TDCX_NUM_INCORRECT)
    if vcpu.associated_lp != ctx.lp:
        raise TdxFail(st.TDX_VCPU_NOT_ASSOCIATED)
    ctx.checkpoint("locked")
    vcpu.associated_lp = None
    if env.td.lp_vcpu.get(ctx.lp) == vcpu.tdvpr_pa:
        del env.td.lp_vcpu[ctx.lp]


LEAVES = [
    td_leaf(Leaf.TDH_VP_CREATE, vp_create),
    td_leaf(Leaf.TDH_VP_ADDCX, vp_addcx),
    td_leaf(Leaf.TDH_VP_INIT, vp_init, max_version=1),
    td_leaf(Leaf.TDH_VP_RD, vp_rd),
    td_leaf(Leaf.TDH_VP_WR, vp_wr),
    td_leaf(Leaf.TDH_VP_FLUSH, vp_flush),
]
