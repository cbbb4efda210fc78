"""The TD exit ABI: what TDH.VP.ENTER returns to KVM, and what KVM hands back on re-entry.

Register layout from intel/tdx-module (TDX 1.5):
- src/td_transitions/td_exit.c ``async_tdexit_internal``: RAX = completion status with the
  VMX exit reason in bits 31:0, RCX = exit qualification (bits 33:32 the VM index, 0 here),
  RDX = extended exit qualification, R8 = GPA (bits 11:0 cleared for EPT violations,
  td_other_exits.c ``tdx_ept_violation_exit_to_vmm``), R9 = interruption information,
  RBX, RSI, RDI, R10-R15 = 0.
- src/td_dispatcher/vm_exits/tdg_vp_vmcall.c: RAX = 77 (TDCALL), RCX = the guest's
  GPR_SELECT | XMM_SELECT << 16, each GPR from RDX to R15 copied from the guest when its bit
  is set, zero otherwise (RBP left alone under NO_RBP_MOD).
- src/td_transitions/tdh_vp_enter.c ``save_regs_after_tdvmcall``: on the next entry after a
  TDG.VP.VMCALL, the selected GPRs come from KVM's registers, RAX = TDX_SUCCESS and RCX keeps
  the guest's control value.

KVM's reading of it: Linux arch/x86/kvm/vmx/tdx.c ``tdx_vcpu_enter_exit`` (exit_reason from
RAX[31:0], exit_qualification = RCX, ext_exit_qualification = RDX, exit_gpa = R8,
exit_intr_info = R9) and ``__tdx_handle_exit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vtdx.abi.regs import Regs
from vtdx.abi.status import TDX_NON_RECOVERABLE_VCPU, TDX_SUCCESS

# Basic VMX exit reasons the engine produces (SDM Vol. 3 Appendix C).
EXIT_TRIPLE_FAULT = 2
EXIT_OTHER_SMI = 6
EXIT_EPT_VIOLATION = 48
EXIT_TDCALL = 77

#: Names of the basic exit reasons a TD exit reports (SDM Vol. 3 Appendix C), for traces
#: and inspection.
EXIT_REASON_NAMES = {EXIT_TRIPLE_FAULT: "TRIPLE_FAULT", EXIT_OTHER_SMI: "OTHER_SMI",
                     EXIT_EPT_VIOLATION: "EPT_VIOLATION", EXIT_TDCALL: "TDCALL"}


def exit_reason_name(reason: int) -> str:
    """``TDCALL``, ``EPT_VIOLATION``...; an unnamed reason as its number."""
    return EXIT_REASON_NAMES.get(reason & 0xFFFF, str(reason & 0xFFFF))


#: The exit used to end a time slice. KVM re-enters on OTHER_SMI without doing anything
#: (Linux 7.3 arch/x86/kvm/vmx/tdx.c ``__tdx_handle_exit``: ``case EXIT_REASON_OTHER_SMI:``
#: ... ``return 1;``, lines 2130-2150), and ``vmx_handle_exit_irqoff`` (vmx.c lines
#: 7177-7195; main.c line 1029 installs it for TDs too) runs nothing for it. An
#: EXTERNAL_INTERRUPT exit would make that function call ``handle_external_interrupt_irqoff``
#: (vmx.c lines 7161-7175), which dispatches the host IDT handler of the vector in R9 and
#: KVM_BUG()s unless R9 holds a valid external-interrupt vector: wrong for an interrupt that
#: was never raised.
EXIT_TIME_SLICE = EXIT_OTHER_SMI

# Extended exit qualification types (src/common/x86_defs/vmcs_defs.h vmx_eeq_type_t).
EEQ_NONE = 0
EEQ_ACCEPT = 1
EEQ_GPA_DETAILS = 2
EEQ_PENDING_EPT_VIOLATION = 6

# EPT-violation exit qualification bits (SDM 28.2.1 Table 28-7).
QUAL_READ, QUAL_WRITE, QUAL_FETCH = 1, 2, 4

#: vCPU bookkeeping after the exit, as td_vmexit_to_vmm() records it in TDVPS.
LAST_EXIT_ASYNC_FAULT = "async_fault"
LAST_EXIT_ASYNC_TRAP = "async_trap"
LAST_EXIT_TDVMCALL = "tdvmcall"

_GPR_INDEX = {"rdx": 2, "rbx": 3, "rbp": 5, "rsi": 6, "rdi": 7, "r8": 8, "r9": 9, "r10": 10,
              "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15}
#: GPRs (index order) a TDVMCALL can pass, other than RBP which Regs does not carry.
VMCALL_GPRS: tuple[tuple[int, str], ...] = tuple(
    (i, n) for n, i in sorted(_GPR_INDEX.items(), key=lambda kv: kv[1]) if n != "rbp")


def accept_eeq(req_level: int, err_level: int, err_state: int, err_is_leaf: bool,
               eeq_type: int = EEQ_ACCEPT) -> int:
    """Extended exit qualification of an ACCEPT (or ATTR.WR) EPT violation.

    td_other_exits.c ``async_tdexit_ept_violation``: type in bits 3:0, and in bits 63:32 the
    tdaccept_vmx_eeq_info_t of include/tdx_api_defs.h: requested level 2:0, level of the
    failing entry 5:3, its architectural state 13:6, its leaf bit 14.
    """
    info = (req_level & 7) | (err_level & 7) << 3 | (err_state & 0xFF) << 6 \
        | int(err_is_leaf) << 14
    return eeq_type | info << 32


@dataclass(slots=True)
class TdExit:
    """One TD exit, before it is laid out in KVM's registers."""

    reason: int
    status: int = TDX_SUCCESS
    qualification: int = 0
    ext_qualification: int = 0
    gpa: int = 0
    intr_info: int = 0
    #: TDG.VP.VMCALL only: the guest's RCX control (GPR_SELECT | XMM_SELECT << 16) and the
    #: selected GPRs' values by name.
    control: int = 0
    gprs: dict[str, int] = field(default_factory=dict)
    last_exit: str = LAST_EXIT_ASYNC_FAULT
    #: Guest RIP after the exit (the next instruction for trap-like exits): the 0-step
    #: filter of TDH.VP.ENTER compares it with the RIP the vCPU was entered at.
    rip: int = 0
    #: An EPT-violation exit on a private GPA that reaches the host (td_ept_violation.c
    #: calls td_exit_epf_stepping_log for it): the GPA to log for 0-step tracking. None for
    #: shared GPAs, #VE-converted violations and TDG.MEM.PAGE.ACCEPT's violation exits.
    epf_gpa: int | None = None

    @property
    def gpr_select(self) -> int:
        return self.control & 0xFFFF

    @property
    def vcpu_disabled(self) -> bool:
        """TDX_NON_RECOVERABLE_VCPU: the module marks the vCPU VCPU_DISABLED (td_exit.c)."""
        return self.status == TDX_NON_RECOVERABLE_VCPU


def vp_enter_outputs(ex: TdExit) -> Regs:
    """The registers TDH.VP.ENTER returns for ``ex``."""
    if ex.reason == EXIT_TDCALL and ex.last_exit == LAST_EXIT_TDVMCALL:
        out = Regs(rax=EXIT_TDCALL, rcx=ex.control & 0xFFFF_FFFF)
        sel = ex.gpr_select
        for idx, name in VMCALL_GPRS:
            setattr(out, name, ex.gprs.get(name, 0) if sel >> idx & 1 else 0)
        return out
    return Regs(rax=ex.status | (ex.reason & 0xFFFF_FFFF), rcx=ex.qualification & 0xFFFF_FFFF,
                rdx=ex.ext_qualification, r8=ex.gpa, r9=ex.intr_info)


def vmcall_reply(control: int, vmm: Regs) -> dict[str, int]:
    """Guest GPRs to load on the entry after a TDG.VP.VMCALL (``save_regs_after_tdvmcall``):
    the GPRs the guest selected, from KVM's registers, plus RAX = TDX_SUCCESS and RCX = the
    guest's control value. RBP, when selected, is not carried by ``Regs`` and reads 0."""
    out = {"rax": TDX_SUCCESS, "rcx": control}
    sel = control & 0xFFFF
    for name, idx in _GPR_INDEX.items():
        if sel >> idx & 1:
            out[name] = getattr(vmm, name) if name != "rbp" else 0
    return out
