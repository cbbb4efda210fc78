"""vCPU leaves: TDH.VP.CREATE (10), ADDCX (4), INIT (22), RD (26), WR (43), FLUSH (18).

From intel/tdx-module tdh_vp_{create,addcx,init,rd_wr,flush}.c: VP.CREATE locks the TDR
explicitly (RDX); the others reach the TDR implicitly through the TDVPR's PAMT owner
(lock_and_map_implicit_tdr, busy operand = TDR). VP.INIT associates the vCPU with the
calling LP; VP.FLUSH must run on that LP (TDX_VCPU_NOT_ASSOCIATED otherwise).
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import td_engine
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_lock_explicit_private_hpa,
    check_lock_and_map_explicit_tdr,
    check_state_map_tdcs_and_lock,
)
from vtdx.module.pamt import LEVEL_4K, PAGE_4K, PT_NDA, PT_TDCX, PT_TDVPR, pamt_key
from vtdx.module.state import TD_KEYS_CONFIGURED, TdState, VcpuState

MAX_TDVPS_PAGES = 15
#: TD VMCS field of KVM's shared EPTP (VMX_GUEST_SHARED_EPT_POINTER_FULL_ENCODE), which
#: KVM writes with TDH.VP.WR before the vCPU first runs; the engine walks it for shared GPAs.
FIELD_SHARED_EPTP = 0x203C


def _vcpu(ctx: CallContext, tdvpr_pa: int, operand: int, exclusive: bool,
          leaf: int, op_lock: bool | None = SH) -> tuple[VcpuState, TdState]:
    """Check/lock the TDVPR, then the owner TDR implicitly (shared), then TDCS."""
    check_and_lock_explicit_private_hpa(ctx, tdvpr_pa, operand, exclusive, PT_TDVPR)
    gd = ctx.gd
    vcpu = gd.vcpus[tdvpr_pa]
    if not ctx.try_lock(pamt_key(LEVEL_4K, vcpu.tdr_pa), SH):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_TDR)
    td = gd.tds[vcpu.tdr_pa]
    if leaf == Leaf.TDH_VP_FLUSH:
        if td.lifecycle != TD_KEYS_CONFIGURED:
            raise TdxError(st.TDX_TD_KEYS_NOT_CONFIGURED)
    else:
        check_state_map_tdcs_and_lock(ctx, td, op_lock, leaf)
    return vcpu, td


def tdh_vp_create(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.CREATE(RCX = TDVPR PA, RDX = TDR PA)."""
    tdvpr_pa, tdr_pa = inp.rcx, inp.rdx
    td = check_lock_and_map_explicit_tdr(ctx, tdr_pa, st.OPERAND_ID_RDX, SH)
    check_state_map_tdcs_and_lock(ctx, td, SH, Leaf.TDH_VP_CREATE)
    check_and_lock_explicit_private_hpa(ctx, tdvpr_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    ctx.module.memory.zero(tdvpr_pa, PAGE_4K)
    vcpu = VcpuState(tdvpr_pa, tdr_pa)
    gd = ctx.gd
    gd.vcpus[tdvpr_pa] = vcpu
    td.vcpus[tdvpr_pa] = vcpu
    td.chldcnt += 1
    gd.pamt.set(tdvpr_pa, LEVEL_4K, PT_TDVPR, tdr_pa)
    gd.pamt.inc_page_count(tdvpr_pa)


def tdh_vp_addcx(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.ADDCX(RCX = TDVPX PA, RDX = TDVPR PA)."""
    tdcx_pa, tdvpr_pa = inp.rcx, inp.rdx
    vcpu, td = _vcpu(ctx, tdvpr_pa, st.OPERAND_ID_RDX, EX, Leaf.TDH_VP_ADDCX)
    if vcpu.initialized:
        raise TdxError(st.TDX_VCPU_STATE_INCORRECT)
    if vcpu.num_pages >= max(MAX_TDVPS_PAGES, ctx.module.min_tdvps):
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    check_and_lock_explicit_private_hpa(ctx, tdcx_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    ctx.module.memory.zero(tdcx_pa, PAGE_4K)
    vcpu.tdvpx.append(tdcx_pa)
    td.chldcnt += 1
    pamt = ctx.gd.pamt
    pamt.set(tdcx_pa, LEVEL_4K, PT_TDCX, vcpu.tdr_pa)
    pamt.inc_page_count(tdcx_pa)


def tdh_vp_init(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.INIT(RCX = TDVPR, RDX = initial guest RCX, R8 = x2APIC id for version 1)."""
    tdvpr_pa = inp.rcx
    vcpu, td = _vcpu(ctx, tdvpr_pa, st.OPERAND_ID_RCX, EX, Leaf.TDH_VP_INIT)
    if vcpu.num_pages < ctx.module.min_tdvps:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    if vcpu.initialized:
        raise TdxError(st.TDX_VCPU_STATE_INCORRECT)
    if td.num_vcpus >= td.max_vcpus:
        raise TdxError(st.TDX_MAX_VCPUS_EXCEEDED)
    x2apic = inp.r8 & 0xFFFFFFFF if ctx.version >= 1 else td.num_vcpus
    if ctx.version >= 1 and any(v.initialized and v.x2apic_id == x2apic
                                for v in td.vcpus.values()):
        raise TdxError(st.TDX_X2APIC_ID_NOT_UNIQUE)
    ctx.checkpoint("locked")
    vcpu.vcpu_index = td.num_vcpus
    td.num_vcpus += 1
    vcpu.x2apic_id = x2apic
    vcpu.fields[0] = inp.rdx  # initial RCX
    vcpu.initialized = True
    vcpu.associated_lp = ctx.lp
    ctx.gd.lp_vcpu[ctx.lp] = tdvpr_pa
    td_engine.make_engine(ctx.module, td, vcpu, inp.rdx)


def tdh_vp_rd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.RD(RCX = TDVPR, RDX = field id) -> R8 = value."""
    vcpu, _ = _vcpu(ctx, inp.rcx, st.OPERAND_ID_RCX, SH, Leaf.TDH_VP_RD)
    ctx.checkpoint("locked")
    out.r8 = vcpu.fields.get(inp.rdx, 0)


def tdh_vp_wr(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.WR(RCX = TDVPR, RDX = field id, R8 = value, R9 = mask) -> R8 = old value."""
    vcpu, _ = _vcpu(ctx, inp.rcx, st.OPERAND_ID_RCX, SH, Leaf.TDH_VP_WR)
    ctx.checkpoint("locked")
    old = vcpu.fields.get(inp.rdx, 0)
    vcpu.fields[inp.rdx] = (old & ~inp.r9) | (inp.r8 & inp.r9)
    out.r8 = old
    if inp.rdx == FIELD_SHARED_EPTP and vcpu.engine is not None:
        vcpu.engine.shared_eptp = vcpu.fields[inp.rdx]
        vcpu.engine.invalidate_translations()


def tdh_vp_flush(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.FLUSH(RCX = TDVPR): dissociate the vCPU from this LP."""
    vcpu, td = _vcpu(ctx, inp.rcx, st.OPERAND_ID_RCX, EX, Leaf.TDH_VP_FLUSH)
    if vcpu.num_pages < ctx.module.min_tdvps:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    if vcpu.associated_lp != ctx.lp:
        raise TdxError(st.TDX_VCPU_NOT_ASSOCIATED)
    ctx.checkpoint("locked")
    vcpu.associated_lp = None
    lp_vcpu = ctx.gd.lp_vcpu
    if lp_vcpu.get(ctx.lp) == vcpu.tdvpr_pa:
        del lp_vcpu[ctx.lp]


LEAVES = [
    LeafSpec(Leaf.TDH_VP_CREATE, tdh_vp_create),
    LeafSpec(Leaf.TDH_VP_ADDCX, tdh_vp_addcx),
    LeafSpec(Leaf.TDH_VP_INIT, tdh_vp_init, max_version=1),
    LeafSpec(Leaf.TDH_VP_RD, tdh_vp_rd),
    LeafSpec(Leaf.TDH_VP_WR, tdh_vp_wr),
    LeafSpec(Leaf.TDH_VP_FLUSH, tdh_vp_flush),
]
