"""vCPU leaves: TDH.VP.CREATE (10), ADDCX (4), INIT (22), RD (26), WR (43), FLUSH (18).

From intel/tdx-module tdh_vp_{create,addcx,init,rd_wr,flush}.c: VP.CREATE locks the TDR
explicitly (RDX); the others reach the TDR implicitly through the TDVPR's PAMT owner
(lock_and_map_implicit_tdr, busy operand = TDR). VP.INIT associates the vCPU with the
calling LP, and so do VP.RD / VP.WR (check_and_associate_vcpu, helpers.c) when the vCPU is
not associated; VP.FLUSH must run on that LP (TDX_VCPU_NOT_ASSOCIATED otherwise). Field
access goes through ``vtdx.module.metadata`` (metadata_vp.c).
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import metadata as md
from vtdx.module import td_engine
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_associate_vcpu,
    check_and_lock_explicit_private_hpa,
    check_lock_and_map_explicit_tdr,
    check_state_map_tdcs_and_lock,
)
from vtdx.module.pamt import LEVEL_4K, PAGE_4K, PT_NDA, PT_TDCX, PT_TDVPR, pamt_key
from vtdx.module.state import TD_KEYS_CONFIGURED, TdState, VcpuState

MAX_TDVPS_PAGES = 15
#: Canonical id of the guest RCX in TDVPS (class 16, GPR state), set by VP.INIT.
GPR_RCX = 0x1020000300000001


def _vcpu(ctx: CallContext, tdvpr_pa: int, operand: int, exclusive: bool,
          leaf: int, op_lock: bool | None = SH,
          tdr_exclusive: bool = False) -> tuple[VcpuState, TdState]:
    """Check/lock the TDVPR, then the owner TDR implicitly (lock_and_map_implicit_tdr,
    shared unless ``tdr_exclusive``), then TDCS."""
    check_and_lock_explicit_private_hpa(ctx, tdvpr_pa, operand, exclusive, PT_TDVPR)
    gd = ctx.gd
    vcpu = gd.vcpus[tdvpr_pa]
    if not ctx.try_lock(pamt_key(LEVEL_4K, vcpu.tdr_pa), tdr_exclusive):
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
    """TDH.VP.INIT(RCX = TDVPR, RDX = initial guest RCX, R8 = x2APIC id for version 1).

    tdh_vp_init.c of 1.5.06 / 2.0.08: version 1 takes the TDR exclusive and needs R8 to be a
    32-bit x2APIC id unique in the TD (X2APIC_ID_NOT_UNIQUE carries the duplicate id);
    an initialised vCPU gives VCPU_STATE_INCORRECT (2.0.08: | state)."""
    if ctx.version > 1:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    tdvpr_pa = inp.rcx
    vcpu, td = _vcpu(ctx, tdvpr_pa, st.OPERAND_ID_RCX, EX, Leaf.TDH_VP_INIT,
                     tdr_exclusive=ctx.version >= 1)
    if vcpu.num_pages < ctx.module.min_tdvps:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    if vcpu.initialized:
        state = md.vcpu_state(vcpu) if ctx.module.profile.gen.vcpu_state_operand else 0
        raise TdxError(st.TDX_VCPU_STATE_INCORRECT + state)
    if td.num_vcpus >= td.max_vcpus:
        raise TdxError(st.TDX_MAX_VCPUS_EXCEEDED)
    if ctx.version >= 1:
        x2apic = inp.r8
        if x2apic >> 32:
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
        if any(v.initialized and v.x2apic_id == x2apic for v in td.vcpus.values()):
            if ctx.module.profile.gen.x2apic_dup_keeps_vcpu_count:
                td.num_vcpus += 1  # the 1.5 tree's vCPU index stays taken
            raise fail(st.TDX_X2APIC_ID_NOT_UNIQUE, x2apic)
    else:
        x2apic = td.num_vcpus
    ctx.checkpoint("locked")
    vcpu.vcpu_index = td.num_vcpus
    td.num_vcpus += 1
    vcpu.x2apic_id = x2apic
    vcpu.fields[GPR_RCX] = inp.rdx  # the guest's initial RCX
    vcpu.initialized = True
    vcpu.associated_lp = ctx.lp  # associate_vcpu_initial (helpers.c 1038-1055)
    ctx.gd.lp_vcpu[ctx.lp] = tdvpr_pa
    td_engine.make_engine(ctx.module, td, vcpu, inp.rdx)


def _vp_rd_wr(ctx: CallContext, inp: Regs, out: Regs, write: bool) -> None:
    """tdh_vp_rd_wr.c (1.5: lines 42-250; 2.0.08 the same order), step by step."""
    out.r8 = 0
    if not write and ctx.version >= 1:
        out.rdx = md.FIELD_ID_NA
    if ctx.version > 1:  # VP.RD's own check (lines 82-88); VP.WR never gets here
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    leaf = Leaf.TDH_VP_WR if write else Leaf.TDH_VP_RD
    # TDVPR shared (RCX), TDR implicit shared (TDR), TDCS + OP_STATE shared (lines 90-127).
    vcpu, td = _vcpu(ctx, inp.rcx, st.OPERAND_ID_RCX, SH, leaf)
    # map_tdvps (lines 132-140, helpers.c 616-640): the TDVPR and every TDVPX present.
    if vcpu.num_pages < ctx.module.min_tdvps:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    # check_and_associate_vcpu (lines 142-150): binds an unassociated vCPU to this LP; a
    # read is allowed on a DISABLED vCPU (one a triple fault stopped), a write is not.
    check_and_associate_vcpu(ctx, vcpu, td, allow_disabled=not write)
    fid = md.with_context(inp.rdx, md.CTX_VP)
    if not write and ctx.version >= 1 and md.is_null(fid):  # lines 160-171
        out.rdx = md.vp_next(td, fid)
        ctx.set_status(st.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT)
        return
    md.check_single_element(fid)
    m = ctx.module
    md.finish_rd_wr(ctx, out, write, lambda: md.vp_read(td, vcpu, fid),
                    lambda: md.vp_write(td, vcpu, fid, inp.r8, inp.r9, max_pa=m.max_pa,
                                        hkid_of=m.hkid_of,
                                        first_private_hkid=m.profile.tdx_keyid_start),
                    lambda: md.vp_next(td, fid))


def tdh_vp_rd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.RD(RCX = TDVPR, RDX = field id) -> R8 = value (version 1: RDX = next id)."""
    _vp_rd_wr(ctx, inp, out, write=False)


def tdh_vp_wr(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.WR(RCX = TDVPR, RDX = field id, R8 = value, R9 = mask) -> R8 = old value."""
    _vp_rd_wr(ctx, inp, out, write=True)
    if md.field_code(inp.rdx) == md.VMCS_SHARED_EPTP and not (inp.rdx >> 56) & 0x3F:
        # KVM's shared EPTP (TD VMCS class 0): the vCPU's engine walks it for shared GPAs.
        vcpu = ctx.gd.vcpus[inp.rcx]
        if vcpu.engine is not None:
            td = ctx.gd.tds[vcpu.tdr_pa]
            vcpu.engine.shared_eptp = md.vp_read(td, vcpu, md.with_context(inp.rdx,
                                                                           md.CTX_VP))
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
    LeafSpec(Leaf.TDH_VP_INIT, tdh_vp_init),
    LeafSpec(Leaf.TDH_VP_RD, tdh_vp_rd),
    LeafSpec(Leaf.TDH_VP_WR, tdh_vp_wr),
    LeafSpec(Leaf.TDH_VP_FLUSH, tdh_vp_flush),
]
