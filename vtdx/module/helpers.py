"""The check-and-lock helpers every TD leaf shares (src/common/helpers/helpers.c).

Names follow helpers.c of intel/tdx-module, and so do the order of checks and the operand id
each failure reports (check_lock_and_map_explicit_tdr, non_shared_hpa_metadata_check_and_lock,
check_state_map_tdcs_and_lock, lock_sept_check_and_walk_private_gpa...). A failed check
raises ``TdxError``; the call context then releases every lock the call took, and because all
state changes happen after the last check, a failed call leaves the model unchanged.
"""

from __future__ import annotations

import struct

from vtdx.abi import status as st
from vtdx.module import sept as S
from vtdx.module.context import CallContext
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import opstate_key, sept_key, septe_key
from vtdx.module.pamt import LEVEL_2M, LEVEL_4K, PAGE_2M, PAGE_4K, PT_NDA, PT_TDR, PamtWalk
from vtdx.module.state import (
    OP_ALLOWED,
    TD_KEYS_CONFIGURED,
    TLB_TRACKING_OP_STATES,
    TdState,
    VcpuState,
)

EX, SH = True, False


# --- address checks ---------------------------------------------------------------------------

def hpa_check_with_pwr_2_alignment(ctx: CallContext, pa: int, align: int) -> bool:
    """Aligned, no HKID bits, below MAX_PA."""
    m = ctx.module
    return pa % align == 0 and not (pa & m.hkid_mask) and pa < m.max_pa


def shared_hpa_check_with_pwr_2_alignment(ctx: CallContext, pa: int, size: int,
                                          align: int) -> int:
    """A shared HPA (plus: the page must be RAM to be read); status or TDX_SUCCESS."""
    m = ctx.module
    if not m.shared_hpa_ok(pa, align):
        return st.TDX_OPERAND_INVALID
    if not m.memory.contains(pa & ~m.hkid_mask, size):
        return st.TDX_OPERAND_INVALID
    return st.TDX_SUCCESS


def check_gpa_validity(td: TdState, gpa: int) -> bool:
    """A private GPA within the TD's GPA width."""
    if gpa & td.shared_bit:
        return False
    if gpa >> 52:
        return False
    return td.gpaw or not (gpa >> 48)


# --- PAMT -------------------------------------------------------------------------------------

def non_shared_hpa_metadata_check_and_lock(ctx: CallContext, pa: int, exclusive: bool,
                                           expected_pt: int, target: int,
                                           operand: int) -> PamtWalk:
    """The page's PAMT entry at ``target`` (walk_to_target_size = true), locked and of type
    ``expected_pt``."""
    pamt = ctx.gd.pamt
    w = pamt.ready_walk(ctx, pa, exclusive, target, operand)
    if w.level != target:
        code = st.TDX_PAGE_METADATA_INCORRECT
        if (pamt.dynamic and w.level == LEVEL_2M and w.entry.pt == PT_NDA
                and expected_pt == PT_NDA):
            code = st.TDX_MISSING_PAMT_PAGE_PAIR
        raise fail(code, operand)
    if w.entry.pt != expected_pt:
        raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
    if pamt.dynamic and w.entry.pt == PT_NDA and pamt.bitmap_get(pa):
        raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
    return w


def check_and_lock_explicit_private_hpa(ctx: CallContext, pa: int, operand: int,
                                        exclusive: bool, expected_pt: int,
                                        align: int = PAGE_4K,
                                        target: int = LEVEL_4K) -> PamtWalk:
    """check_and_lock_explicit_private_hpa / check_and_lock_explicit_4k_private_hpa."""
    if not hpa_check_with_pwr_2_alignment(ctx, pa, align):
        raise fail(st.TDX_OPERAND_INVALID, operand)
    return non_shared_hpa_metadata_check_and_lock(ctx, pa, exclusive, expected_pt, target,
                                                  operand)


def check_and_lock_free_range_hpa(ctx: CallContext, pa: int, operand: int,
                                  level: int) -> PamtWalk:
    """A free 4KB page or a whole free 2MB range."""
    align = PAGE_2M if level == LEVEL_2M else PAGE_4K
    w = check_and_lock_explicit_private_hpa(ctx, pa, operand, EX, PT_NDA, align, level)
    if level == LEVEL_2M and not ctx.gd.pamt.range_2m_free(pa):
        raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
    return w


def check_and_lock_dpamt_pair(ctx: CallContext, hpa0: int, op0: int, hpa1: int, op1: int,
                              locked_2m: int | None = None) -> None:
    """A Dynamic PAMT page pair about to become a range's 4KB PAMT level must be free:
    each page PAMT-walked shared to 4KB (the lock that makes PAMT.ADD and DEMOTE collide)
    and PT_NDA, then each page's PAMT_PAGE_BITMAP bit atomically tested and set (the first
    given back if the second is taken; the same page twice fails on the second). TDH.PHYMEM.
    PAMT.ADD and DEMOTE's pamt_demote check the pair the same way; PAMT.ADD passes the
    2MB range it holds exclusive as ``locked_2m`` and its pages are not walked again.

    The bits are taken here, before the call's commit, as the module takes them: the shared
    walks do not keep a second call from checking the same free page, the bit does (two
    PAMT.ADDs sharing a page, one held at ``locked``: the other gets PAGE_NOT_FREE). Both
    callers commit right after, with no error path left to give the bits back."""
    pamt = ctx.gd.pamt
    for hpa, operand in ((hpa0, op0), (hpa1, op1)):
        if locked_2m is not None and hpa >> 21 == locked_2m >> 21:
            continue
        if pamt.walk(ctx, hpa, SH, operand, LEVEL_4K).entry.pt != PT_NDA:
            raise fail(st.TDX_PAGE_NOT_FREE, operand)
    if not pamt.bitmap_test_and_set(hpa0):
        raise fail(st.TDX_PAGE_NOT_FREE, op0)
    if not pamt.bitmap_test_and_set(hpa1):
        pamt.bitmap_clear(hpa0)
        raise fail(st.TDX_PAGE_NOT_FREE, op1)


# --- TDR / TDCS -------------------------------------------------------------------------------

def check_lock_and_map_explicit_tdr(ctx: CallContext, tdr_pa: int, operand: int,
                                    exclusive: bool) -> TdState:
    """The TDR's PAMT entry (PT_TDR) is the TDR lock; returns the TD."""
    check_and_lock_explicit_private_hpa(ctx, tdr_pa, operand, exclusive, PT_TDR)
    return ctx.gd.tds[tdr_pa]


def check_state_map_tdcs_and_lock(ctx: CallContext, td: TdState, op_lock: bool | None,
                                  leaf: int) -> None:
    """Build state, then the OP_STATE lock (``op_lock``: EX, SH or None for none) and the
    op_state the leaf needs."""
    if td.fatal:
        raise TdxError(st.TDX_TD_FATAL)
    if td.lifecycle != TD_KEYS_CONFIGURED:
        raise TdxError(st.TDX_TD_KEYS_NOT_CONFIGURED)
    if len(td.tdcx) < ctx.module.min_tdcs:
        raise TdxError(st.TDX_TDCS_NOT_ALLOCATED)
    if op_lock is not None and not ctx.try_lock(opstate_key(td.tdr_pa), op_lock):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_OP_STATE)
    if td.op_state not in OP_ALLOWED.get(leaf, frozenset()):
        raise TdxError(st.TDX_OP_STATE_INCORRECT)


# --- vCPU association -----------------------------------------------------------------------

#: vCPU states of TDVPS.MANAGEMENT.STATE (tdx_tdvps.h).
VCPU_UNINITIALIZED, VCPU_READY, VCPU_ACTIVE, VCPU_DISABLED = 0x0, 0x2, 0x4, 0x8


def vcpu_state(vcpu: VcpuState) -> int:
    """TDVPS.MANAGEMENT.STATE of ``vcpu``: ACTIVE while it runs guest code on some LP."""
    if not vcpu.initialized:
        return VCPU_UNINITIALIZED
    if vcpu.disabled:
        return VCPU_DISABLED
    return VCPU_ACTIVE if vcpu.running_lp is not None else VCPU_READY


def check_and_associate_vcpu(ctx: CallContext, vcpu: VcpuState, td: TdState,
                             allow_disabled: bool = False) -> None:
    """check_and_associate_vcpu + associate_vcpu (helpers.c 960-1036 of the 1.5 tree).

    The vCPU must be READY (initialised by TDH.VP.INIT, not running guest code on some LP
    -- ACTIVE --, not DISABLED unless ``allow_disabled``): otherwise
    TDX_VCPU_STATE_INCORRECT, bare in 1.5.x and carrying the state as operand id in 2.0.08
    (the profile's generation decides). Then the vCPU is bound to the calling LP:
    associated with another LP -> TDX_VCPU_ASSOCIATED (bare); not associated -> associated
    with this LP from now on (TDCS.NUM_ASSOC_VCPUS counts it), and the binding stays after
    the leaf returns, whatever the leaf's later checks say; already associated with this
    LP -> nothing changes but the LP's current vCPU."""
    state = vcpu_state(vcpu)
    if not (state == VCPU_READY or (state == VCPU_DISABLED and allow_disabled)):
        gen = ctx.module.profile.gen
        raise TdxError(st.TDX_VCPU_STATE_INCORRECT + (state if gen.vcpu_state_operand else 0))
    if vcpu.associated_lp is not None and vcpu.associated_lp != ctx.lp:
        raise TdxError(st.TDX_VCPU_ASSOCIATED)
    vcpu.associated_lp = ctx.lp
    ctx.gd.lp_vcpu[ctx.lp] = vcpu.tdvpr_pa


# --- S-EPT ------------------------------------------------------------------------------------

def septe_error(code: int, operand: int, w: S.WalkResult) -> TdxError:
    """A S-EPT entry failure with the architectural entry in RCX/RDX (extended info)."""
    return TdxError(code + operand, w.entry.arch_rcx(w.level), w.entry.arch_rdx(w.level))


def lock_sept_check_and_walk_private_gpa(ctx: CallContext, td: TdState, gpa: int, level: int,
                                         operand: int, lock: bool | None = SH
                                         ) -> S.WalkResult:
    """The S-EPT tree locked ``lock`` (None: not at all) and walked to ``level``."""
    if not check_gpa_validity(td, gpa):
        raise fail(st.TDX_OPERAND_INVALID, operand)
    if lock is not None and not ctx.try_lock(sept_key(td.tdr_pa), lock):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_SEPT_TREE)
    assert td.sept is not None
    w = td.sept.walk(gpa, level)
    if w.level != level:
        raise septe_error(st.TDX_EPT_WALK_FAILED, operand, w)
    return w


def sept_lock_acquire_host(ctx: CallContext, w: S.WalkResult, operand: int) -> None:
    """The host-side lock on the walked S-EPT entry."""
    if not ctx.try_lock(septe_key(w.page.hpa, w.idx), EX):
        raise septe_error(st.TDX_OPERAND_BUSY, operand, w)


def is_tlb_tracked(td: TdState, bepoch: int) -> bool:
    """The block epoch is older than the previous TD epoch and no vCPU still runs in it
    (refcount of that epoch is zero)."""
    if bepoch >= td.td_epoch:
        return False
    if bepoch == td.td_epoch - 1 and td.refcount[bepoch & 1]:
        return False
    return True


# --- How the S-EPT leaves open --------------------------------------------------------------

def page_info(rcx: int) -> tuple[int, int, bool]:
    """(gpa, level, reserved-bits-clear) of a page_info_api_input_t (RCX)."""
    level = rcx & 0x7
    gpa = rcx & 0x000FFFFFFFFFF000
    ok = not (rcx & 0xFF8) and not (rcx >> 52)
    return gpa, level, ok


def verify_page_info_input(rcx: int, min_level: int, max_level: int) -> tuple[int, int]:
    """Reserved bits zero, level in range, GPA aligned to level; (gpa, level)."""
    gpa, level, ok = page_info(rcx)
    if not ok or not (min_level <= level <= max_level) or gpa % S.level_size(level):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    return gpa, level


def td_handle(ctx: CallContext, rdx: int, exclusive: bool) -> TdState:
    """TD handle in RDX: TDR HPA bits 51:12, reserved bits must be 0 (td_handle_and_flags_t);
    then the TDR locked ``exclusive``."""
    if rdx & 0xFFF or rdx >> 52:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    return check_lock_and_map_explicit_tdr(ctx, rdx, st.OPERAND_ID_RDX, exclusive)


#: td_handle_and_flags_t (tdx_api_defs.h 1208-1229): bit 0 the flag, 11:1 and 63:52 reserved.
TD_HANDLE_FLAG = 1
TD_HANDLE_RESERVED = 0xFFE | (0xFFF << 52)


def td_handle_and_flags(ctx: CallContext, rdx: int, exclusive: bool) -> tuple[TdState, bool]:
    """The RDX of TDH.MEM.SEPT.ADD and TDH.MEM.PAGE.DEMOTE: reserved bits 11:1 and 63:52
    must be 0 (OPERAND_INVALID | RDX, before the TDR is touched: tdh_mem_sept_add.c 331-336,
    tdh_mem_page_demote.c 119-124); bit 0 is the leaf's flag (ALLOW_EXISTING /
    L2_SEPT_ADD_MODE); the TDR is bits 51:12. Returns (td, flag)."""
    if rdx & TD_HANDLE_RESERVED:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    td = check_lock_and_map_explicit_tdr(ctx, rdx & ~TD_HANDLE_FLAG, st.OPERAND_ID_RDX,
                                         exclusive)
    return td, bool(rdx & TD_HANDLE_FLAG)


def tlb_tracking_required(td: TdState, state: int) -> bool:
    """Taking ``state`` away needs BLOCK + TRACK first (only once the TD can run)."""
    return state in S.TLB_TRACKING_REQUIRED and td.op_state in TLB_TRACKING_OP_STATES


def lock_gpa_entry(ctx: CallContext, rcx: int, rdx: int, leaf: int, min_level: int,
                   max_level: int | None, tree_lock: bool,
                   handle_flags: bool = False) -> tuple[TdState, int, S.WalkResult]:
    """How every leaf acting on one S-EPT entry opens, in the module's order: the TD handle
    in RDX (TDR shared), TDCS with OP_STATE shared, page info in RCX (level in
    ``min_level``..``max_level``; None = the TD's S-EPT root level), the S-EPT tree locked
    ``tree_lock`` and walked to that level, then the host-side lock on the entry.
    Returns (td, level, walk); each leaf then checks the entry state its own way.
    ``handle_flags``: RDX is a td_handle_and_flags_t (SEPT.ADD, DEMOTE)."""
    td = td_handle_and_flags(ctx, rdx, SH)[0] if handle_flags else td_handle(ctx, rdx, SH)
    check_state_map_tdcs_and_lock(ctx, td, SH, leaf)
    top = td.sept_root_level if max_level is None else max_level
    gpa, level = verify_page_info_input(rcx, min_level, top)
    w = lock_sept_check_and_walk_private_gpa(ctx, td, gpa, level, st.OPERAND_ID_RCX, tree_lock)
    sept_lock_acquire_host(ctx, w, st.OPERAND_ID_RCX)
    return td, level, w


def check_blocked_and_tracked(ctx: CallContext, td: TdState, w: S.WalkResult, pa: int,
                              level: int) -> None:
    """Taking a mapped entry away (PAGE.REMOVE, PAGE.DEMOTE, SEPT.REMOVE) while the TD can
    run: the entry must be blocked and the block TLB-tracked, i.e. the BEPOCH stamped in
    the PAMT entry of ``pa`` at ``level`` is older than every epoch a vCPU still runs in."""
    if tlb_tracking_required(td, w.entry.state):
        if w.entry.state not in S.ANY_BLOCKED:
            raise septe_error(st.TDX_GPA_RANGE_NOT_BLOCKED, st.OPERAND_ID_RCX, w)
        if not is_tlb_tracked(td, ctx.gd.pamt.get(pa, level).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_RCX)


# --- Measurement ------------------------------------------------------------------------------

def sha_block(name: bytes, gpa: int) -> bytes:
    """sha384_128B_block_t: API name (16 bytes, zero padded), GPA, zeros to 128 bytes."""
    return name.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)
