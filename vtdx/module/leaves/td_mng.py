"""TD management leaves: TDH.MNG.CREATE/KEY.CONFIG/ADDCX/INIT/RD/WR/VPFLUSHDONE/KEY.FREEID.

Check order, locks and status codes follow intel/tdx-module src/vmm_dispatcher/api_calls/
tdh_mng_{create,key_config,add_cx,init,rd_wr,vpflushdone,key_freeid,key_reclaimid}.c.
"""

from __future__ import annotations

import struct
from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module import sept as S
from vtdx.module.state import KOT_ASSIGNED, KOT_FLUSHED, KOT_FREE
from vtdx.module.td_common import (
    EX,
    LVL_4K,
    OP_INITIALIZED,
    OP_UNINITIALIZED,
    PT_NDA,
    PT_TDCX,
    PT_TDR,
    SEPT_ROOT_PAGE_INDEX,
    SH,
    TD_BLOCKED,
    TD_HKID_ASSIGNED,
    TD_KEYS_CONFIGURED,
    TD_TEARDOWN,
    TdEnv,
    TdState,
    TdxFail,
    fail,
    td_leaf,
)

OPERAND_ID_KOT = 186
OPERAND_ID_ATTRIBUTES = 64
OPERAND_ID_XFAM = 65
OPERAND_ID_EXEC_CONTROLS = 66
OPERAND_ID_EPTP_CONTROLS = 67
OPERAND_ID_MAX_VCPUS = 68
OPERAND_ID_CPUID_CONFIG = 69
OPERAND_ID_TSC_FREQUENCY = 70
OPERAND_ID_NUM_L2_VMS = 71

TD_PARAMS_SIZE = 1024
CPUID_CONFIG_OFFSET = 256
# MNG.RD/WR field ids KVM uses (kvm-tdx-without-vmx.md).
FIELD_TSC_OFFSET = 0x110000000000000A
FIELD_TSC_MULTIPLIER = 0x110000000000000B
FIELD_CPUID_BASE = 0x9410000300000000
FIELD_ATTRIBUTES = 0x1110000300000000
FIELD_XFAM = 0x1110000300000001
FIELD_NUM_VCPUS = 0x1110000200000002
FIELD_MAX_VCPUS = 0x1110000200000003


def _tdr(env: TdEnv, ctx: Any, tdr_pa: int, operand: int, exclusive: bool) -> TdState:
    _, td = env.lock_tdr(ctx, tdr_pa, operand, exclusive)
    assert td is not None, "PT_TDR page without TD state"
    return td


def mng_create(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.CREATE(RCX = TDR PA, RDX = HKID)."""
    tdr_pa, hkid_info = regs.rcx, regs.rdx
    hkid = hkid_info & 0xFFFF
    prof = env.module.profile
    first, last = prof.tdx_keyid_start, prof.tdx_keyid_start + prof.tdx_keyids
    if (hkid_info >> 16) or not (first <= hkid < last):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    env.lock_tdr(ctx, tdr_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    if not ctx.try_lock(("kot",), EX):
        raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_KOT)
    kot = env.module.kot
    if kot.get(hkid, KOT_FREE) != KOT_FREE:
        raise TdxFail(st.TDX_HKID_NOT_FREE)
    ctx.checkpoint("locked")
    kot[hkid] = KOT_ASSIGNED
    env.td.tds[tdr_pa] = TdState(tdr_pa=tdr_pa, hkid=hkid)
    env.memory.zero(tdr_pa, 4096)
    env.set_entry(tdr_pa, LVL_4K, PT_TDR)
    env.inc_page_count(tdr_pa)


def mng_key_config(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.KEY.CONFIG(RCX = TDR PA): program the TD key on this LP's package."""
    td = _tdr(env, ctx, regs.rcx, st.OPERAND_ID_RCX, EX)
    if td.fatal:
        raise TdxFail(st.TDX_TD_FATAL)
    if td.lifecycle != TD_HKID_ASSIGNED:
        raise TdxFail(st.TDX_LIFECYCLE_STATE_INCORRECT)
    prof = env.module.profile
    pkg_bit = 1 << prof.package_of(ctx.lp)
    if td.pkg_config_bitmap & pkg_bit:
        raise TdxFail(st.TDX_KEY_CONFIGURED)
    if not ctx.try_lock(("ket", prof.package_of(ctx.lp)), EX):
        raise fail(st.TDX_OPERAND_BUSY, 187)
    ctx.checkpoint("locked")
    td.pkg_config_bitmap |= pkg_bit
    if td.pkg_config_bitmap == (1 << prof.num_packages) - 1:
        td.lifecycle = TD_KEYS_CONFIGURED


def mng_addcx(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.ADDCX(RCX = TDCX PA, RDX = TDR PA)."""
    tdcx_pa, tdr_pa = regs.rcx, regs.rdx
    td = _tdr(env, ctx, tdr_pa, st.OPERAND_ID_RDX, EX)
    if td.fatal:
        raise TdxFail(st.TDX_TD_FATAL)
    if td.lifecycle != TD_KEYS_CONFIGURED:
        raise TdxFail(st.TDX_TD_KEYS_NOT_CONFIGURED)
    if len(td.tdcx) >= env.min_tdcs:
        raise TdxFail(st.TDX_TDCX_NUM_INCORRECT)  # no L2 VMs in this model
    env.check_lock_private(ctx, tdcx_pa, st.OPERAND_ID_RCX, EX, PT_NDA)
    ctx.checkpoint("locked")
    env.memory.zero(tdcx_pa, 4096)
    td.tdcx.append(tdcx_pa)
    td.chldcnt += 1
    env.set_entry(tdcx_pa, LVL_4K, PT_TDCX, tdr_pa)
    env.inc_page_count(tdcx_pa)


def _cpuid_configs(env: TdEnv) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(leaf, subleaf, configurable-bit masks) the module enumerates (CPUID_CONFIG_*)."""
    return [(leaf, sub, masks) for (leaf, sub), masks in env.module.profile.cpuid_config]


def mng_init(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.INIT(RCX = TDR PA, RDX = TD_PARAMS PA): validate TD_PARAMS and configure."""
    tdr_pa, params_pa = regs.rcx, regs.rdx
    td = _tdr(env, ctx, tdr_pa, st.OPERAND_ID_RCX, EX)
    env.tdcs(ctx, td, None, 21)
    code = env.shared_hpa_check(params_pa, TD_PARAMS_SIZE, TD_PARAMS_SIZE)
    if code:
        raise fail(code, st.OPERAND_ID_RDX)
    p = env.memory.read(params_pa, TD_PARAMS_SIZE)
    attributes, xfam, max_vcpus, num_l2_vms, msr_ctls = struct.unpack_from("<QQHBB", p, 0)
    eptp_controls, config_flags, tsc_frequency = struct.unpack_from("<QQH", p, 24)
    prof = env.module.profile
    if (attributes & ~prof.attributes_fixed0
            or attributes & prof.attributes_fixed1 != prof.attributes_fixed1):
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_ATTRIBUTES)
    if xfam & ~prof.xfam_fixed0 or xfam & prof.xfam_fixed1 != prof.xfam_fixed1:
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_XFAM)
    if max_vcpus == 0:
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_MAX_VCPUS)
    if num_l2_vms != 0:
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_NUM_L2_VMS)
    if any(p[20:24]):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    if config_flags & ~prof.config_flags_fixed0:
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_EXEC_CONTROLS)
    gpaw = bool(config_flags & 1)
    pwl = (eptp_controls >> 3) & 7
    # eptp_controls: memory type WB (6) in bits 2:0, PWL 3 (4-level) or 4 (5-level) in 5:3,
    # nothing else; 4-level requires GPAW = 0 (verify_and_set_td_eptp_controls).
    if eptp_controls & ~0x3F or (eptp_controls & 7) != 6 or pwl not in (3, 4) or (
            pwl == 3 and gpaw):
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_EPTP_CONTROLS)
    if not (4 <= tsc_frequency <= 400):  # VIRT_TSC_FREQUENCY_MIN/MAX: 100 MHz .. 10 GHz
        raise fail(st.TDX_OPERAND_INVALID, OPERAND_ID_TSC_FREQUENCY)
    if any(p[42:80]) or (msr_ctls & 0xFE) or any(p[232:256]):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    configs = _cpuid_configs(env)
    cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for i, (leaf, sub, allowed) in enumerate(configs):
        vals = struct.unpack_from("<IIII", p, CPUID_CONFIG_OFFSET + 16 * i)
        if any(v & ~a for v, a in zip(vals, allowed, strict=True)):
            # the module also reports the offending leaf/subleaf in RCX
            raise TdxFail(st.TDX_OPERAND_INVALID + OPERAND_ID_CPUID_CONFIG,
                          rcx=leaf | (sub << 32))
        cpuid[(leaf, sub)] = vals
    end = CPUID_CONFIG_OFFSET + 16 * len(configs)
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


def mng_vpflushdone(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.VPFLUSHDONE(RCX = TDR PA): no vCPU associated any more -> TD_BLOCKED."""
    td = _tdr(env, ctx, regs.rcx, st.OPERAND_ID_RCX, EX)
    if not ctx.try_lock(("kot",), EX):
        raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_KOT)
    if td.lifecycle not in (TD_KEYS_CONFIGURED, TD_HKID_ASSIGNED):
        raise TdxFail(st.TDX_LIFECYCLE_STATE_INCORRECT)
    if len(td.tdcx) >= env.min_tdcs and td.op_state != OP_UNINITIALIZED and any(
            v.associated_lp is not None for v in td.vcpus.values()):
        raise TdxFail(st.TDX_FLUSHVP_NOT_DONE)
    ctx.checkpoint("locked")
    prof = env.module.profile
    env.module.kot_wbinvd[td.hkid] = set(range(prof.num_packages))
    env.module.kot[td.hkid] = KOT_FLUSHED
    td.lifecycle = TD_BLOCKED


def mng_key_freeid(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.KEY.FREEID(RCX = TDR PA): after CACHE.WB on every package, free the HKID."""
    td = _tdr(env, ctx, regs.rcx, st.OPERAND_ID_RCX, EX)
    if td.lifecycle != TD_BLOCKED:
        raise TdxFail(st.TDX_LIFECYCLE_STATE_INCORRECT)
    if not ctx.try_lock(("kot",), EX):
        raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_KOT)
    if env.module.kot_wbinvd.get(td.hkid):
        raise TdxFail(st.TDX_WBCACHE_NOT_COMPLETE)
    ctx.checkpoint("locked")
    env.module.kot.pop(td.hkid, None)
    env.module.kot_wbinvd.pop(td.hkid, None)
    td.lifecycle = TD_TEARDOWN


def mng_key_reclaimid(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.KEY.RECLAIMID: a no-op that succeeds in TDX 1.5 (kept for old hosts)."""


def _td_field(td: TdState, field_id: int) -> int | None:
    if field_id == FIELD_TSC_OFFSET:
        return td.tsc_offset
    if field_id == FIELD_TSC_MULTIPLIER:
        return td.tsc_multiplier
    if field_id == FIELD_ATTRIBUTES:
        return td.attributes
    if field_id == FIELD_XFAM:
        return td.xfam
    if field_id == FIELD_NUM_VCPUS:
        return td.num_vcpus
    if field_id == FIELD_MAX_VCPUS:
        return td.max_vcpus
    if field_id & ~0x1FFFF == FIELD_CPUID_BASE:
        # KVM's tdx_read_cpuid(): bit 16 = extended leaf range, bits 15:9 = leaf[6:0],
        # bits 8:1 = subleaf (0xFF: no subleaf), bit 0 = second half (ECX/EDX).
        leaf = (0x80000000 if field_id & (1 << 16) else 0) | ((field_id >> 9) & 0x7F)
        sub = (field_id >> 1) & 0xFF
        vals = td.cpuid.get((leaf, 0xFFFFFFFF if sub == 0xFF else sub))
        if vals is None:
            return None
        return vals[2] | (vals[3] << 32) if field_id & 1 else vals[0] | (vals[1] << 32)
    return td.fields.get(field_id)


def _locked_field(env: TdEnv, ctx: Any, regs: Any, leaf: int) -> tuple[TdState, int]:
    """TDH.MNG.RD and TDH.MNG.WR open alike: TDR (RCX) shared, TDCS with OP_STATE shared,
    then the field id in RDX must name a field. Returns the TD and the field's value."""
    td = _tdr(env, ctx, regs.rcx, st.OPERAND_ID_RCX, SH)
    env.tdcs(ctx, td, SH, leaf)
    value = _td_field(td, regs.rdx)
    if value is None:
        raise fail(st.TDX_METADATA_FIELD_ID_INCORRECT, st.OPERAND_ID_RDX)
    return td, value


def mng_rd(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.RD(RCX = TDR PA, RDX = field id) -> R8 = value."""
    _, value = _locked_field(env, ctx, regs, Leaf.TDH_MNG_RD)
    ctx.checkpoint("locked")
    regs.rdx = regs.rdx
    regs.r8 = value


def mng_wr(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MNG.WR(RCX = TDR PA, RDX = field id, R8 = value, R9 = mask) -> R8 = old value."""
    td, old = _locked_field(env, ctx, regs, Leaf.TDH_MNG_WR)
    if regs.rdx in (FIELD_ATTRIBUTES, FIELD_XFAM, FIELD_NUM_VCPUS, FIELD_MAX_VCPUS,
                    FIELD_TSC_MULTIPLIER):
        raise fail(st.TDX_METADATA_FIELD_NOT_WRITABLE, st.OPERAND_ID_RDX)
    ctx.checkpoint("locked")
    new = (old & ~regs.r9) | (regs.r8 & regs.r9)
    if regs.rdx == FIELD_TSC_OFFSET:
        td.tsc_offset = new
    else:
        td.fields[regs.rdx] = new
    regs.r8 = old


LEAVES = [
    td_leaf(Leaf.TDH_MNG_CREATE, mng_create),
    td_leaf(Leaf.TDH_MNG_KEY_CONFIG, mng_key_config),
    td_leaf(Leaf.TDH_MNG_ADDCX, mng_addcx),
    td_leaf(Leaf.TDH_MNG_INIT, mng_init),
    td_leaf(Leaf.TDH_MNG_RD, mng_rd),
    td_leaf(Leaf.TDH_MNG_WR, mng_wr),
    td_leaf(Leaf.TDH_MNG_VPFLUSHDONE, mng_vpflushdone),
    td_leaf(Leaf.TDH_MNG_KEY_FREEID, mng_key_freeid),
    td_leaf(Leaf.TDH_MNG_KEY_RECLAIMID, mng_key_reclaimid),
]
