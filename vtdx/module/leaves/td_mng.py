"""TD management leaves: TDH.MNG.CREATE/KEY.CONFIG/ADDCX/INIT/RD/WR/VPFLUSHDONE/KEY.FREEID.

Check order, locks and status codes follow intel/tdx-module src/vmm_dispatcher/api_calls/
tdh_mng_{create,key_config,add_cx,init,rd_wr,vpflushdone,key_freeid,key_reclaimid}.c.
"""

from __future__ import annotations

import struct

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import metadata as md
from vtdx.module import sept as S
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.cpuid import CONFIGURABLE, platform_cpuid, td_cpuid
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_lock_explicit_private_hpa,
    check_lock_and_map_explicit_tdr,
    check_state_map_tdcs_and_lock,
    shared_hpa_check_with_pwr_2_alignment,
)
from vtdx.module.locks import KOT_LOCK, ket_key
from vtdx.module.pamt import LEVEL_4K, PAGE_4K, PT_NDA, PT_TDCX, PT_TDR
from vtdx.module.state import (
    KOT_ASSIGNED,
    KOT_FLUSHED,
    KOT_FREE,
    OP_INITIALIZED,
    OP_UNINITIALIZED,
    SEPT_ROOT_PAGE_INDEX,
    TD_BLOCKED,
    TD_HKID_ASSIGNED,
    TD_KEYS_CONFIGURED,
    TD_TEARDOWN,
    TdState,
)

TD_PARAMS_SIZE = 1024
CPUID_CONFIG_OFFSET = 256


def tdh_mng_create(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.CREATE(RCX = TDR PA, RDX = HKID)."""
    tdr_pa, hkid_info = inp.rcx, inp.rdx
    hkid = hkid_info & 0xFFFF
    prof = ctx.module.profile
    first, last = prof.tdx_keyid_start, prof.tdx_keyid_start + prof.tdx_keyids
    if (hkid_info >> 16) or not (first <= hkid < last):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    check_and_lock_explicit_private_hpa(ctx, tdr_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    if not ctx.try_lock(KOT_LOCK, EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_KOT)
    gd = ctx.gd
    kot = gd.kot
    if kot.get(hkid, KOT_FREE) != KOT_FREE:
        raise TdxError(st.TDX_HKID_NOT_FREE)
    ctx.checkpoint("locked")
    kot[hkid] = KOT_ASSIGNED
    gd.tds[tdr_pa] = TdState(tdr_pa=tdr_pa, hkid=hkid)
    ctx.module.memory.zero(tdr_pa, PAGE_4K)
    gd.pamt.set(tdr_pa, LEVEL_4K, PT_TDR)
    gd.pamt.inc_page_count(tdr_pa)


def tdh_mng_key_config(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.KEY.CONFIG(RCX = TDR PA): program the TD key on this LP's package."""
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, EX)
    if td.fatal:
        raise TdxError(st.TDX_TD_FATAL)
    if td.lifecycle != TD_HKID_ASSIGNED:
        raise TdxError(st.TDX_LIFECYCLE_STATE_INCORRECT)
    prof = ctx.module.profile
    pkg_bit = 1 << prof.package_of(ctx.lp)
    if td.pkg_config_bitmap & pkg_bit:
        raise TdxError(st.TDX_KEY_CONFIGURED)
    if not ctx.try_lock(ket_key(prof.package_of(ctx.lp)), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_KET)
    ctx.checkpoint("locked")
    td.pkg_config_bitmap |= pkg_bit
    if td.pkg_config_bitmap == (1 << prof.num_packages) - 1:
        td.lifecycle = TD_KEYS_CONFIGURED


def tdh_mng_addcx(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.ADDCX(RCX = TDCX PA, RDX = TDR PA)."""
    tdcx_pa, tdr_pa = inp.rcx, inp.rdx
    td = check_lock_and_map_explicit_tdr(ctx, tdr_pa, st.OPERAND_ID_RDX, EX)
    if td.fatal:
        raise TdxError(st.TDX_TD_FATAL)
    if td.lifecycle != TD_KEYS_CONFIGURED:
        raise TdxError(st.TDX_TD_KEYS_NOT_CONFIGURED)
    if len(td.tdcx) >= ctx.module.min_tdcs:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)  # no L2 VMs in this model
    check_and_lock_explicit_private_hpa(ctx, tdcx_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    ctx.module.memory.zero(tdcx_pa, PAGE_4K)
    td.tdcx.append(tdcx_pa)
    td.chldcnt += 1
    pamt = ctx.gd.pamt
    pamt.set(tdcx_pa, LEVEL_4K, PT_TDCX, tdr_pa)
    pamt.inc_page_count(tdcx_pa)


def tdh_mng_init(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.INIT(RCX = TDR PA, RDX = TD_PARAMS PA): validate TD_PARAMS and configure."""
    tdr_pa, params_pa = inp.rcx, inp.rdx
    td = check_lock_and_map_explicit_tdr(ctx, tdr_pa, st.OPERAND_ID_RCX, EX)
    check_state_map_tdcs_and_lock(ctx, td, None, Leaf.TDH_MNG_INIT)
    code = shared_hpa_check_with_pwr_2_alignment(ctx, params_pa, TD_PARAMS_SIZE,
                                                 TD_PARAMS_SIZE)
    if code:
        raise fail(code, st.OPERAND_ID_RDX)
    p = ctx.module.memory.read(params_pa, TD_PARAMS_SIZE)
    attributes, xfam, max_vcpus, num_l2_vms, msr_ctls = struct.unpack_from("<QQHBB", p, 0)
    eptp_controls, config_flags, tsc_frequency = struct.unpack_from("<QQH", p, 24)
    prof = ctx.module.profile
    if (attributes & ~prof.attributes_fixed0
            or attributes & prof.attributes_fixed1 != prof.attributes_fixed1):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_ATTRIBUTES)
    if xfam & ~prof.xfam_fixed0 or xfam & prof.xfam_fixed1 != prof.xfam_fixed1:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_XFAM)
    if max_vcpus == 0:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_MAX_VCPUS)
    if num_l2_vms != 0:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_NUM_L2_VMS)
    if any(p[20:24]):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    if config_flags & ~prof.config_flags_fixed0:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_EXEC_CONTROLS)
    gpaw = bool(config_flags & 1)
    pwl = (eptp_controls >> 3) & 7
    # eptp_controls: memory type WB (6) in bits 2:0, PWL 3 (4-level) or 4 (5-level) in 5:3,
    # nothing else; 4-level requires GPAW = 0 (verify_and_set_td_eptp_controls).
    if eptp_controls & ~0x3F or (eptp_controls & 7) != 6 or pwl not in (3, 4) or (
            pwl == 3 and gpaw):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_EPTP_CONTROLS)
    if not (4 <= tsc_frequency <= 400):  # VIRT_TSC_FREQUENCY_MIN/MAX: 100 MHz .. 10 GHz
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_TSC_FREQUENCY)
    if any(p[42:80]) or (msr_ctls & 0xFE) or any(p[232:256]):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    # read_and_set_cpuid_configurations (tdh_mng_init.c of 1.5.06): TD_PARAMS.CPUID_CONFIG
    # by configurable index; a refused entry names its leaf/subleaf in RCX.
    configs = [struct.unpack_from("<IIII", p, CPUID_CONFIG_OFFSET + 16 * i)
               for i in range(len(CONFIGURABLE))]
    cpuid = td_cpuid(platform_cpuid(prof), attributes=attributes, xfam=xfam, gpaw=gpaw,
                     tsc_frequency=tsc_frequency, configs=configs)
    end = CPUID_CONFIG_OFFSET + 16 * len(CONFIGURABLE)
    if any(p[end:TD_PARAMS_SIZE]):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    ctx.checkpoint("locked")
    td.attributes, td.xfam, td.max_vcpus = attributes, xfam, max_vcpus
    td.eptp_controls, td.config_flags, td.gpaw = eptp_controls, config_flags, gpaw
    td.tsc_frequency = tsc_frequency
    td.mr_config_id, td.mr_owner, td.mr_owner_config = p[80:128], p[128:176], p[176:224]
    td.cpuid = cpuid
    td.tsc_multiplier = 1 << 48
    td.sept = S.SeptTree(td.tdcx[SEPT_ROOT_PAGE_INDEX], pwl)
    td.op_state = OP_INITIALIZED


def tdh_mng_vpflushdone(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.VPFLUSHDONE(RCX = TDR PA): no vCPU associated any more -> TD_BLOCKED."""
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, EX)
    if not ctx.try_lock(KOT_LOCK, EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_KOT)
    if td.lifecycle not in (TD_KEYS_CONFIGURED, TD_HKID_ASSIGNED):
        raise TdxError(st.TDX_LIFECYCLE_STATE_INCORRECT)
    if len(td.tdcx) >= ctx.module.min_tdcs and td.op_state != OP_UNINITIALIZED and any(
            v.associated_lp is not None for v in td.vcpus.values()):
        raise TdxError(st.TDX_FLUSHVP_NOT_DONE)
    ctx.checkpoint("locked")
    gd = ctx.gd
    gd.kot_wbinvd[td.hkid] = set(range(ctx.module.profile.num_packages))
    gd.kot[td.hkid] = KOT_FLUSHED
    td.lifecycle = TD_BLOCKED


def tdh_mng_key_freeid(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.KEY.FREEID(RCX = TDR PA): after CACHE.WB on every package, free the HKID."""
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, EX)
    if td.lifecycle != TD_BLOCKED:
        raise TdxError(st.TDX_LIFECYCLE_STATE_INCORRECT)
    if not ctx.try_lock(KOT_LOCK, EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_KOT)
    gd = ctx.gd
    if gd.kot_wbinvd.get(td.hkid):
        raise TdxError(st.TDX_WBCACHE_NOT_COMPLETE)
    ctx.checkpoint("locked")
    gd.kot.pop(td.hkid, None)
    gd.kot_wbinvd.pop(td.hkid, None)
    td.lifecycle = TD_TEARDOWN


def tdh_mng_key_reclaimid(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.KEY.RECLAIMID: a no-op that succeeds in TDX 1.5 (kept for old hosts)."""


def _mng_rd_wr(ctx: CallContext, inp: Regs, out: Regs, write: bool) -> None:
    """tdh_mng_rd_wr.c (1.5: lines 41-190; 2.0.08 the same steps): R8 = 0 (and for RD
    version 1, RDX = -1) at entry; TDR (RCX) shared, TDCS with OP_STATE shared; the context
    code forced to TD; RD version 1 with the null id -> the first readable TD field id and
    TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT; then the single-element check and the element
    read or write (``vtdx.module.metadata``, metadata_td.c), whose statuses are bare."""
    out.r8 = 0
    if not write and ctx.version >= 1:
        out.rdx = md.FIELD_ID_NA
    if ctx.version > 1:  # MNG.RD's own check (lines 72-78)
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    leaf = Leaf.TDH_MNG_WR if write else Leaf.TDH_MNG_RD
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, SH)
    check_state_map_tdcs_and_lock(ctx, td, SH, leaf)
    fid = md.with_context(inp.rdx, md.CTX_TD)
    if not write and ctx.version >= 1 and md.is_null(fid):  # lines 113-124
        out.rdx = md.td_next(td, fid)
        ctx.set_status(st.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT)
        return
    md.check_single_element(fid)
    md.finish_rd_wr(ctx, out, write, lambda: md.td_read(td, fid),
                    lambda: md.td_write(td, fid, inp.r8, inp.r9), lambda: md.td_next(td, fid))


def tdh_mng_rd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.RD(RCX = TDR PA, RDX = field id) -> R8 = value (version 1: RDX = next id)."""
    _mng_rd_wr(ctx, inp, out, write=False)


def tdh_mng_wr(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MNG.WR(RCX = TDR PA, RDX = field id, R8 = value, R9 = mask) -> R8 = old value."""
    _mng_rd_wr(ctx, inp, out, write=True)


LEAVES = [
    LeafSpec(Leaf.TDH_MNG_CREATE, tdh_mng_create),
    LeafSpec(Leaf.TDH_MNG_KEY_CONFIG, tdh_mng_key_config),
    LeafSpec(Leaf.TDH_MNG_ADDCX, tdh_mng_addcx),
    LeafSpec(Leaf.TDH_MNG_INIT, tdh_mng_init),
    LeafSpec(Leaf.TDH_MNG_RD, tdh_mng_rd),
    LeafSpec(Leaf.TDH_MNG_WR, tdh_mng_wr),
    LeafSpec(Leaf.TDH_MNG_VPFLUSHDONE, tdh_mng_vpflushdone),
    LeafSpec(Leaf.TDH_MNG_KEY_FREEID, tdh_mng_key_freeid),
    LeafSpec(Leaf.TDH_MNG_KEY_RECLAIMID, tdh_mng_key_reclaimid),
]
