"""TDH.VP.ENTER (leaf 0): run a TD vCPU until a TD exit.

The host side follows intel/tdx-module src/td_transitions/tdh_vp_enter.c (1.5.06) and the
helpers it calls (src/common/helpers/helpers.c check_and_associate_vcpu, associate_vcpu,
adjust_tlb_tracking_state); the exit follows src/td_transitions/td_exit.c
(td_vmexit_to_vmm: the epoch refcount is dropped, the vCPU goes back to VCPU_READY, or
VCPU_DISABLED on TDX_NON_RECOVERABLE_VCPU, and LAST_TD_EXIT is recorded).

Checks, in the module's order:
1. RCX (vcpu_and_flags_t): reserved bits 11:0 and 63:54 clear, else
   TDX_OPERAND_INVALID | RCX.
2. The TDVPR (bits 51:12) checked and its PAMT entry locked SHARED as PT_TDVPR
   (check_and_lock_explicit_4k_private_hpa, operand RCX).
3. The owner TDR locked SHARED implicitly (lock_and_map_implicit_tdr: busy operand TDR).
4. TDCS: TD not fatal, keys configured, TDCS allocated, OP_STATE locked SHARED, op_state
   RUNNABLE (TDX_OP_STATE_INCORRECT before TDH.MR.FINALIZE).
5. map_tdvps: all TDVPS pages added, else TDX_TDCX_NUM_INCORRECT.
6. check_and_associate_vcpu: VCPU_READY, else TDX_VCPU_STATE_INCORRECT; associated with
   another LP: TDX_VCPU_ASSOCIATED.
7. HOST_RECOVERABILITY_HINT (bit 52) only after an ASYNC_TRAP exit, RESUME_L1 (bit 53) only
   from L2 (never here: no L2 VMs): TDX_OPERAND_INVALID | RCX.
8. adjust_tlb_tracking_state: the TD epoch lock SHARED (TDX_OPERAND_BUSY | TD_EPOCH), the
   vCPU joins the current epoch's refcount (and flushes its translations when the epoch
   moved since its last entry).
9. The 0-step filter (td_exit_stepping.c td_entry_stepping_filter, called from
   tdh_vp_enter.c handle_stepping_filter): with LAST_EPF_GPA_LIST empty nothing happens.
   Otherwise the S-EPT tree lock is taken EXCLUSIVE (busy: the epoch refcount is given
   back, revert_tlb_tracking_state, and the call fails with TDX_OPERAND_BUSY | SEPT_TREE)
   and each listed GPA is walked: one whose access would still fault (the walk neither
   succeeds nor ends in a #VE-convertible violation: is_epf_expected) releases the lock,
   gives back the refcount and ends the call without entering the guest, with an emulated
   EPT-violation exit on that GPA (emulate_ept_violation_td_exit: RAX = 48, RCX = write
   access, R8 = the page's GPA, RDX/R9 and the other GPRs 0; LAST_TD_EXIT = ASYNC_FAULT).
   With every GPA resolved the lock stays held until just before the guest runs.
Then OP_STATE is released and the guest runs: the TDVPR and TDR locks stay held, as the
module holds them while the LP is in the TD. The module mutex is released while guest code
runs on the calling LP's thread, so other LPs' SEAMCALLs (TDH.MEM.TRACK, S-EPT changes,
another vCPU's entry) proceed; it is re-taken for the exit.

Not modelled: the MSR checks of the LP (IA32_MISC_ENABLE.LIMIT_CPUID_MAXVAL,
IA32_TSC_ADJUST, MONITOR_FSM) and TSC rollback (the model's LPs are consistent), the
interrupt/MTF single-step filter of vmexit_stepping_filter (the engine takes no interrupt,
MTF, SMI, NMI or INIT exits), the #VE of NOTIFY_ENABLES bit 0 on a suspected 0-step attack
(the guest cannot set NOTIFY_ENABLES here: TDG.VM.WR writes no field), L2 VMs. The engine
reports page-aligned GPAs, so two faulting addresses in one page are one list entry where
the module keeps the full GPAs.

0-step tracking on the TD exit (td_exit_stepping.c vmexit_stepping_filter, run for every
exit, and td_exit_epf_stepping_log, run by td_ept_violation.c for an EPT violation on a
private GPA that exits to the host): an exit whose guest RIP differs from the RIP the vCPU
was entered at empties LAST_EPF_GPA_LIST and zeroes POSSIBLY_EPF_STEPPING; then such an
EPT violation counts POSSIBLY_EPF_STEPPING up to STEPPING_EPF_THRESHOLD and, once there,
adds its GPA to the list (if new and the list has room for EPF_GPA_LIST_SIZE).
"""

from __future__ import annotations

import traceback

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.engine.errors import EngineUnsupported
from vtdx.module.engine.exits import (
    EXIT_EPT_VIOLATION,
    EXIT_TRIPLE_FAULT,
    LAST_EXIT_ASYNC_FAULT,
    LAST_EXIT_ASYNC_TRAP,
    TdExit,
    vp_enter_outputs,
)
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_associate_vcpu,
    check_and_lock_explicit_private_hpa,
    check_state_map_tdcs_and_lock,
)
from vtdx.module.locks import epoch_key, opstate_key, sept_key
from vtdx.module.pamt import LEVEL_4K, PT_TDVPR, pamt_key
from vtdx.module.state import TdState, VcpuState

#: vcpu_and_flags_t (tdx_api_defs.h): reserved bits 11:0 and 63:54.
VCPU_AND_FLAGS_RESERVED = 0xFFF | (0x3FF << 54)
TDVPR_MASK = 0x000F_FFFF_FFFF_F000
HOST_RECOVERABILITY_HINT = 1 << 52
RESUME_L1 = 1 << 53
#: td_exit_stepping.h: EPT violations at one RIP before their GPAs are logged.
STEPPING_EPF_THRESHOLD = 6
#: tdx_tdvps.h: capacity of TDVPS.LAST_EPF_GPA_LIST.
EPF_GPA_LIST_SIZE = 32
#: emulate_ept_violation_td_exit: the exit qualification of the emulated exit (data write).
EMULATED_EPF_QUALIFICATION = 1 << 1


def tdh_vp_enter(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.VP.ENTER(RCX = TDVPR | flags; other GPRs = KVM's TDVMCALL replies) -> RAX =
    status | exit reason, RCX/RDX/R8/R9 exit information or the TDVMCALL's GPRs."""
    rcx = inp.rcx
    if rcx & VCPU_AND_FLAGS_RESERVED:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    tdvpr_pa = rcx & TDVPR_MASK
    check_and_lock_explicit_private_hpa(ctx, tdvpr_pa, st.OPERAND_ID_RCX, SH, PT_TDVPR)
    gd = ctx.gd
    vcpu = gd.vcpus[tdvpr_pa]
    if not ctx.try_lock(pamt_key(LEVEL_4K, vcpu.tdr_pa), SH):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_TDR)
    td = gd.tds[vcpu.tdr_pa]
    check_state_map_tdcs_and_lock(ctx, td, SH, Leaf.TDH_VP_ENTER)
    if vcpu.num_pages < ctx.module.min_tdvps:
        raise TdxError(st.TDX_TDCX_NUM_INCORRECT)
    check_and_associate_vcpu(ctx, vcpu, td)
    if rcx & HOST_RECOVERABILITY_HINT and vcpu.last_td_exit != LAST_EXIT_ASYNC_TRAP:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    if rcx & RESUME_L1:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)   # curr_vm is always 0
    adjust_tlb_tracking_state(ctx, td, vcpu)
    epf_gpa = td_entry_stepping_filter(ctx, td, vcpu)
    if epf_gpa is not None:
        _emulate_ept_violation_exit(ctx, vcpu, epf_gpa, out)
        return
    ctx.checkpoint("locked")
    ctx.unlock(sept_key(td.tdr_pa))       # held only in 0-step mode; a no-op otherwise
    ctx.unlock(opstate_key(td.tdr_pa))
    vcpu.running_lp = ctx.lp
    entry_rip = vcpu.engine.rip if vcpu.engine is not None else None
    try:
        ex, regs = _run_guest(ctx, vcpu, inp)
    finally:
        # td_exit.c: leave the epoch, back to VCPU_READY.
        td.refcount[vcpu.vcpu_epoch & 1] -= 1
        vcpu.running_lp = None
    if entry_rip is not None:
        exit_stepping_track(vcpu, entry_rip, ex)
    vcpu.last_td_exit = ex.last_exit
    if ex.vcpu_disabled:
        vcpu.disabled = True
    for name in ("rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15"):
        setattr(out, name, getattr(regs, name))
    ctx.set_status(regs.rax)


def adjust_tlb_tracking_state(ctx: CallContext, td: TdState, vcpu: VcpuState) -> None:
    """helpers.c adjust_tlb_tracking_state: under the TD epoch lock (shared; TDH.MEM.TRACK
    takes it exclusive) sample TD_EPOCH and join its refcount; a vCPU whose last epoch is
    older flushes its cached translations."""
    key = epoch_key(td.tdr_pa)
    if not ctx.try_lock(key, SH):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_TD_EPOCH)
    epoch = td.td_epoch
    td.refcount[epoch & 1] += 1
    ctx.unlock(key)
    if epoch != vcpu.vcpu_epoch:
        vcpu.vcpu_epoch = epoch
        if vcpu.engine is not None:
            vcpu.engine.invalidate_translations()


def td_entry_stepping_filter(ctx: CallContext, td: TdState, vcpu: VcpuState) -> int | None:
    """td_entry_stepping_filter and handle_stepping_filter: in 0-step mode (a GPA logged)
    the S-EPT tree lock EXCLUSIVE, so no S-EPT change runs while the listed GPAs are
    checked. Returns a listed GPA that would fault again (the lock released), else None
    (the lock, if taken, stays held until the guest runs)."""
    if not vcpu.last_epf_gpa_list:
        return None
    key = sept_key(td.tdr_pa)
    if not ctx.try_lock(key, EX):
        td.refcount[vcpu.vcpu_epoch & 1] -= 1            # revert_tlb_tracking_state
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_SEPT_TREE)
    for gpa in vcpu.last_epf_gpa_list:
        if epf_expected(td, gpa):
            ctx.unlock(key)
            return gpa
    return None


def epf_expected(td: TdState, gpa: int) -> bool:
    """is_epf_expected: a full-access walk of ``gpa`` would end in an EPT violation the CPU
    does not convert to #VE. Mapped leaves allow every access to the TD (no L2 VMs); only
    PENDING entries have suppress-#VE clear."""
    if td.sept is None:
        return True
    w = td.sept.walk(gpa & ~0xFFF, LEVEL_4K)
    e = w.entry
    return not (e.is_leaf and e.state in (S.MAPPED, S.PENDING))


def _emulate_ept_violation_exit(ctx: CallContext, vcpu: VcpuState, gpa: int,
                                out: Regs) -> None:
    """FILTER_FAIL_TDENTER_EPFS: the guest is not entered, so a 0-step attacker gains no
    step; the host sees the EPT-violation exit again (emulate_ept_violation_td_exit), with
    the epoch refcount given back. The list stays: every entry fails until the GPA is
    mapped."""
    td = ctx.gd.tds[vcpu.tdr_pa]
    td.refcount[vcpu.vcpu_epoch & 1] -= 1                # revert_tlb_tracking_state
    vcpu.last_td_exit = LAST_EXIT_ASYNC_FAULT
    for name in ("rbx", "rsi", "rdi", "rdx", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(out, name, 0)
    out.rcx = EMULATED_EPF_QUALIFICATION
    out.r8 = gpa & ~0xFFF
    ctx.set_status(EXIT_EPT_VIOLATION)


def exit_stepping_track(vcpu: VcpuState, entry_rip: int, ex: TdExit) -> None:
    """vmexit_stepping_filter's reset and td_exit_epf_stepping_log: forward progress (a RIP
    other than the entry RIP) ends tracking; EPT violations on private GPAs at one RIP count
    up to STEPPING_EPF_THRESHOLD, and past it their GPAs are logged."""
    if ex.rip != entry_rip:
        vcpu.last_epf_gpa_list.clear()
        vcpu.possibly_epf_stepping = 0
    gpa = ex.epf_gpa
    if gpa is None:
        return
    if vcpu.possibly_epf_stepping < STEPPING_EPF_THRESHOLD:
        vcpu.possibly_epf_stepping += 1
    elif len(vcpu.last_epf_gpa_list) < EPF_GPA_LIST_SIZE \
            and gpa not in vcpu.last_epf_gpa_list:
        vcpu.last_epf_gpa_list.append(gpa)


def _run_guest(ctx: CallContext, vcpu: VcpuState, inp: Regs) -> tuple[TdExit, Regs]:
    """Guest code on this LP's thread with the module mutex released. Guest behaviour the
    engine cannot model (``EngineUnsupported``), or a vCPU without an engine (host RAM not
    mappable), ends in the module's answer for a vCPU it cannot continue: a triple-fault
    exit with TDX_NON_RECOVERABLE_VCPU; the reason is kept in ``internal_errors``."""
    engine = vcpu.engine
    module = ctx.module
    if engine is None:
        module.internal_errors.append("TDH.VP.ENTER: no TD vCPU engine (host RAM is not a "
                                      "file-backed GuestRam)")
        ex = TdExit(EXIT_TRIPLE_FAULT, status=st.TDX_NON_RECOVERABLE_VCPU)
        return ex, vp_enter_outputs(ex)
    cond = module.cond
    cond.release()
    try:
        return engine.enter(inp)
    except EngineUnsupported:
        module.internal_errors.append(traceback.format_exc())
        ex = TdExit(EXIT_TRIPLE_FAULT, status=st.TDX_NON_RECOVERABLE_VCPU, rip=engine.rip)
        engine.disabled = True
        engine.last_exit = ex
        return ex, vp_enter_outputs(ex)
    finally:
        cond.acquire()


LEAVES = [
    LeafSpec(Leaf.TDH_VP_ENTER, tdh_vp_enter),
]
