"""The guest-side interface (TDCALL, TDG.* leaves) the module answers inside the TD.

Each leaf follows its intel/tdx-module (TDX 1.5) handler; the dispatcher checks follow
src/td_dispatcher/tdx_td_dispatcher.c ``td_call``: RAX bits 63:24 must be zero
(TDX_OPERAND_INVALID, operand RAX), a non-zero version only for TDG.VM.RD, an unknown leaf
is TDX_OPERAND_INVALID with operand RAX. The completion status goes to the guest's RAX.

A handler returns ``CONTINUE`` (the TD goes on at the next instruction) or a ``TdExit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from unicorn import x86_const as X

from vtdx.abi.status import (
    TDX_NO_VALID_VE_INFO,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_SUCCESS,
    with_operand,
)
from vtdx.module.engine.errors import EngineUnsupported
from vtdx.module.engine.exits import (
    EEQ_ACCEPT,
    EXIT_EPT_VIOLATION,
    EXIT_TDCALL,
    LAST_EXIT_TDVMCALL,
    QUAL_READ,
    QUAL_WRITE,
    VMCALL_GPRS,
    TdExit,
    accept_eeq,
)
from vtdx.module.engine.interfaces import (
    LEVEL_2M,
    LEVEL_4K,
    NUM_RTMRS,
    RTMR_SIZE,
    SEPT_FREE,
    SEPT_MAPPED,
    SEPT_PENDING,
    level_size,
)

if TYPE_CHECKING:
    from vtdx.module.engine.engine import TdVcpuEngine

OPERAND_RAX, OPERAND_RCX, OPERAND_RDX = 0, 1, 2
#: TDG.MR.RTMR.EXTEND's data (one SHA-384 digest) is 64-byte aligned.
RTMR_DATA_ALIGN = 64
MD_FIELD_ID_NA: Final = (1 << 64) - 1     # metadata_generic.h

TDG_VP_VMCALL = 0
TDG_VP_INFO = 1
TDG_MR_RTMR_EXTEND = 2
TDG_VP_VEINFO_GET = 3
TDG_VP_CPUIDVE_SET = 5
TDG_MEM_PAGE_ACCEPT = 6
TDG_VM_RD = 7
TDG_VM_WR = 8
#: Leaves the module's TD dispatcher knows (include/tdx_api_defs.h tdcall_leaf_opcode_t).
KNOWN_LEAVES = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 20, 22, 23, 24, 25,
                          26, 27})


class _Continue:
    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE: Final = _Continue()

_R = {"rax": X.UC_X86_REG_RAX, "rcx": X.UC_X86_REG_RCX, "rdx": X.UC_X86_REG_RDX,
      "rbx": X.UC_X86_REG_RBX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
      "r8": X.UC_X86_REG_R8, "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10,
      "r11": X.UC_X86_REG_R11, "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13,
      "r14": X.UC_X86_REG_R14, "r15": X.UC_X86_REG_R15}


def dispatch(eng: TdVcpuEngine) -> _Continue | TdExit:
    """One TDCALL at the current RIP (the caller checked the bytes and 64-bit mode)."""
    rax = eng.rd(X.UC_X86_REG_RAX)
    leaf, version = rax & 0xFFFF, (rax >> 16) & 0xFF
    if rax >> 24:
        return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RAX))
    if version and leaf != TDG_VM_RD:
        return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RAX))
    if leaf == TDG_VP_VMCALL:
        return vp_vmcall(eng)
    if leaf == TDG_VP_INFO:
        return _status(eng, vp_info(eng))
    if leaf == TDG_MEM_PAGE_ACCEPT:
        return mem_page_accept(eng)
    if leaf == TDG_MR_RTMR_EXTEND:
        return _status(eng, mr_rtmr_extend(eng))
    if leaf == TDG_VP_VEINFO_GET:
        return _status(eng, vp_veinfo_get(eng))
    if leaf == TDG_VP_CPUIDVE_SET:
        return _status(eng, vp_cpuidve_set(eng))
    if leaf in (TDG_VM_RD, TDG_VM_WR):
        return _status(eng, vm_rd_wr(eng, leaf == TDG_VM_WR, version))
    extra = eng.extra_leaves.get(leaf)
    if extra is not None:
        return _status(eng, extra(eng))
    if leaf in KNOWN_LEAVES:
        raise EngineUnsupported(f"TDCALL leaf {leaf} is not modelled by the engine")
    return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RAX))


def _status(eng: TdVcpuEngine, status: int) -> _Continue:
    eng.wr(X.UC_X86_REG_RAX, status)
    return CONTINUE


def vp_vmcall(eng: TdVcpuEngine) -> _Continue | TdExit:
    """tdg_vp_vmcall.c: RCX bits 0, 1, 4 (and 5 under NO_RBP_MOD) of GPR_SELECT and bits
    63:32 must be clear (TDX_OPERAND_INVALID, operand RCX; the TD goes on). Otherwise a
    trap-like TD exit with reason TDCALL and the selected GPRs."""
    control = eng.rd(X.UC_X86_REG_RCX)
    check = 0b10011 | (0b100000 if eng.cfg.no_rbp_mod else 0)
    if control & check or control >> 32:
        return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RCX))
    sel = control & 0xFFFF
    now = eng.read_gprs()
    gprs = {name: now[name] for idx, name in VMCALL_GPRS if sel >> idx & 1}
    return TdExit(EXIT_TDCALL, control=control, gprs=gprs, last_exit=LAST_EXIT_TDVMCALL)


def vp_info(eng: TdVcpuEngine) -> int:
    """tdg_vp_info.c: RCX = GPA width, RDX = ATTRIBUTES, R8 = NUM_VCPUS | MAX_VCPUS << 32,
    R9 = VCPU_INDEX, R10 = commands available (bit 0 TDG.SYS.RD), R11 = 0."""
    cfg = eng.cfg
    eng.write_gprs({"rax": TDX_SUCCESS, "rcx": cfg.max_pa_for_gpa, "rdx": cfg.attributes,
                    "r8": (eng.td.num_vcpus() & 0xFFFF_FFFF) | cfg.max_vcpus << 32,
                    "r9": eng.vcpu_index, "r10": 1, "r11": 0})
    return TDX_SUCCESS


def vp_veinfo_get(eng: TdVcpuEngine) -> int:
    """tdg_vp_veinfo_get.c: outputs default to 0; TDX_NO_VALID_VE_INFO unless VE_INFO is
    valid, then RCX = exit reason, RDX = qualification, R8 = GLA, R9 = GPA, R10 =
    instruction length | info << 32, and VE_INFO becomes free."""
    for r in ("rcx", "rdx", "r8", "r9", "r10"):
        eng.wr(_R[r], 0)
    ve = eng.ve_info
    if not ve.get("valid"):
        return TDX_NO_VALID_VE_INFO
    eng.wr(X.UC_X86_REG_RCX, ve["exit_reason"])
    eng.wr(X.UC_X86_REG_RDX, ve["exit_qualification"])
    eng.wr(X.UC_X86_REG_R8, ve["gla"])
    eng.wr(X.UC_X86_REG_R9, ve["gpa"])
    eng.wr(X.UC_X86_REG_R10, (ve["length"] & 0xFFFF_FFFF) | (ve["info"] & 0xFFFF_FFFF) << 32)
    eng.ve_info = {"valid": 0}
    return TDX_SUCCESS


def vp_cpuidve_set(eng: TdVcpuEngine) -> int:
    """tdg_vp_cpuidve_set.c: RCX bit 0 supervisor, bit 1 user, bits 63:2 reserved."""
    control = eng.rd(X.UC_X86_REG_RCX)
    if control >> 2:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RCX)
    eng.cpuid_supervisor_ve = bool(control & 1)
    eng.cpuid_user_ve = bool(control & 2)
    return TDX_SUCCESS


def vm_rd_wr(eng: TdVcpuEngine, write: bool, version: int) -> int:
    """tdg_vm_rd_wr.c: RDX = field id, RCX = VM index (must be 0); WR: R8 value, R9 mask.
    Output R8 = the value (RD) or the old value (WR); RD version 1 also returns the next
    field id in RDX, which this model does not enumerate (it reports MD_FIELD_ID_NA)."""
    field_id = eng.rd(X.UC_X86_REG_RDX)
    vm_id = eng.rd(X.UC_X86_REG_RCX)
    wr_value, wr_mask = eng.rd(X.UC_X86_REG_R8), eng.rd(X.UC_X86_REG_R9)
    if not write and version > 0:
        eng.wr(X.UC_X86_REG_RDX, MD_FIELD_ID_NA)
    eng.wr(X.UC_X86_REG_R8, 0)
    if not write and version > 1:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RAX)
    if vm_id != 0:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RCX)
    if write:
        status, value = eng.td.guest_write(field_id, wr_value, wr_mask)
    else:
        status, value = eng.td.guest_read(field_id)
    if status != TDX_SUCCESS:
        return status
    eng.wr(X.UC_X86_REG_R8, value)
    return TDX_SUCCESS


def mr_rtmr_extend(eng: TdVcpuEngine) -> int:
    """tdg_mr_rtmr_extend.c: RCX = GPA of 48 bytes of extension data, RDX = RTMR index.
    In the handler's order:
    - a GPA not 64-byte aligned: TDX_OPERAND_INVALID, operand RCX;
    - check_walk_and_map_guest_side_gpa (read, private only): a GPA outside the TD's width
      or with the shared bit is TDX_OPERAND_INVALID, operand RCX; the S-EPT walk of a
      private GPA may end the TDCALL in an EPT-violation TD exit or a #VE, as a guest read
      would (the engine's translation raises them; the TDCALL is executed again);
    - an index >= NUM_RTMRS: TDX_OPERAND_INVALID, operand RDX;
    - RTMR[index] = SHA-384(RTMR[index] || data)."""
    gpa, index = eng.rd(X.UC_X86_REG_RCX), eng.rd(X.UC_X86_REG_RDX)
    if gpa % RTMR_DATA_ALIGN:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RCX)
    cfg = eng.cfg
    if gpa >> cfg.max_pa_for_gpa or gpa & cfg.shared_bit:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RCX)
    data = eng.ram.read(eng.leaf_gpa_to_hpa(gpa, QUAL_READ), RTMR_SIZE)
    if index >= NUM_RTMRS:
        return with_operand(TDX_OPERAND_INVALID, OPERAND_RDX)
    eng.td.rtmr_extend(index, data)
    return TDX_SUCCESS


def mem_page_accept(eng: TdVcpuEngine) -> _Continue | TdExit:
    """tdg_mem_page_accept.c. RCX = GPA | level (page_info_api_input_t: level 2:0,
    reserved 11:3 and 63:52). Outcomes:
    - bad input or a non-private GPA: TDX_OPERAND_INVALID, operand RCX;
    - walk ended above the requested level on a guest-accessible leaf (e.g. 4 KB ACCEPT of a
      page mapped MAPPED at 2 MB): TDX_PAGE_ALREADY_ACCEPTED, operand = that level;
    - walk ended above it on anything else (missing S-EPT page, PENDING 2 MB leaf for a 4 KB
      request): EPT-violation TD exit, EEQ type ACCEPT with the requested level (this is
      what makes KVM split a 2 MB mapping);
    - a non-FREE non-leaf entry at the requested level (2 MB ACCEPT of 4 KB-mapped memory):
      TDX_PAGE_SIZE_MISMATCH, operand = level; a MAPPED leaf: TDX_PAGE_ALREADY_ACCEPTED;
      anything but PENDING: EPT-violation exit as above;
    - PENDING: the page (all 512 pages for 2 MB) is zeroed and becomes MAPPED."""
    rcx = eng.rd(X.UC_X86_REG_RCX)
    level = rcx & 7
    gpa = rcx & (((1 << 40) - 1) << 12)
    if (rcx >> 3) & 0x1FF or rcx >> 52 or level > LEVEL_2M or gpa & (level_size(level) - 1):
        return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RCX))
    cfg = eng.cfg
    if gpa & cfg.shared_bit or (not cfg.gpaw and gpa & (0xF << 48)):
        return _status(eng, with_operand(TDX_OPERAND_INVALID, OPERAND_RCX))
    w = eng.td.sept_walk(gpa, level)
    if w.level > level:
        if w.is_leaf and w.state == SEPT_MAPPED:
            return _status(eng, with_operand(TDX_PAGE_ALREADY_ACCEPTED, w.level))
        return _accept_violation(gpa, level, w.level, w.state, w.is_leaf, w.rwx)
    if w.state != SEPT_FREE and not w.is_leaf:
        return _status(eng, with_operand(TDX_PAGE_SIZE_MISMATCH, w.level))
    if w.is_leaf and w.state == SEPT_MAPPED:
        return _status(eng, with_operand(TDX_PAGE_ALREADY_ACCEPTED, w.level))
    if not (w.is_leaf and w.state == SEPT_PENDING):
        return _accept_violation(gpa, level, w.level, w.state, w.is_leaf, w.rwx)
    size = level_size(level)
    hpa = w.hpa & ~(size - 1)
    # init_sept_4k_page(): zero through unicorn so translated code of the old contents of
    # these host pages is invalidated too.
    zero = bytes(min(size, 1 << 16))
    for off in range(0, size, len(zero)):
        eng.uc.mem_write(hpa + off, zero)
    if not eng.td.sept_accept(gpa, level):
        return _status(eng, with_operand(TDX_OPERAND_BUSY, OPERAND_RCX))
    return _status(eng, TDX_SUCCESS)


def _accept_violation(gpa: int, req_level: int, level: int, state: int, is_leaf: bool,
                      rwx: int) -> TdExit:
    """async_tdexit_ept_violation(): a write access, the entry's RWX in qualification bits
    5:3, the ACCEPT extended qualification, the level-aligned GPA; fault-like (the TDCALL
    re-executes on the next entry)."""
    return TdExit(EXIT_EPT_VIOLATION, qualification=QUAL_WRITE | rwx << 3,
                  ext_qualification=accept_eeq(req_level, level, state, is_leaf, EEQ_ACCEPT),
                  gpa=gpa)


# ---------------------------------------------------------------------------- CPUID
CPUID_RESERVED_START, CPUID_RESERVED_END = 0x4000_0000, 0x4FFF_FFFF
CPUID_MAX_EXTENDED_VAL_LEAF = 0x8000_0000


def cpuid_values(eng: TdVcpuEngine, leaf: int, sub: int) -> tuple[int, int, int, int] | None:
    """td_cpuid.c td_cpuid_exit: the TD's values with the dynamic bits, or None for a #VE
    (leaf not in the lookup table or faulting, CPUID #VE enabled for this CPL, leaf 2 without
    TD_CTLS.VIRT_CPUID2, leaves 0xB/0x1F without TD_CTLS.ENUM_TOPOLOGY: the model keeps
    TD_CTLS at its initial 0)."""
    td = eng.td
    if not CPUID_RESERVED_START <= leaf <= CPUID_RESERVED_END and (
            leaf > td.last_extended_leaf
            or td.last_base_leaf < leaf < CPUID_MAX_EXTENDED_VAL_LEAF):
        leaf = td.last_base_leaf
    vals = td.cpuid_lookup(leaf, sub)
    if vals is None:
        return None
    cpl = eng.cpl()
    if (cpl == 0 and eng.cpuid_supervisor_ve) or (cpl > 0 and eng.cpuid_user_ve):
        return None
    if leaf in (0x2, 0xB, 0x1F):
        return None
    eax, ebx, ecx, edx = vals
    if leaf == 1:
        ebx = (ebx & 0x00FF_FFFF) | (eng.vcpu_index & 0xFF) << 24   # INITIAL_APIC_ID
        osxsave = eng.rd(X.UC_X86_REG_CR4) >> 18 & 1
        ecx = (ecx & ~(1 << 27)) | osxsave << 27
    elif leaf == 7 and sub == 0:
        ospke = eng.rd(X.UC_X86_REG_CR4) >> 22 & 1
        ecx = (ecx & ~(1 << 4)) | ospke << 4
    elif leaf == 0x8000_0001:
        edx = (edx & ~(1 << 11)) | int(eng.in_64bit_mode()) << 11
    return eax, ebx, ecx, edx


__all__ = ["CONTINUE", "LEVEL_4K", "dispatch", "cpuid_values"]
