"""The platform facade: what the virtual CPU must look like for Linux to use TDX.

TCG's CPU has no VMX, no MOVDIR64B, no MKTME/TME MSRs. The plugin patches them in from
rows built here from a ``vtdx.platform.profile.Profile`` and sent at connection time, so adding
a platform fact (a capability MSR KVM reads, a CPUID bit) means adding a row, never C.

Row kinds (vtdx.runtime.protocol): CPUID (leaf, subleaf, register, bits to set, bits to clear),
MSR (index, value, write behaviour: ignore / store / #GP) and FEATURE (instruction
emulation switches). Values follow the SDM and what Linux reads: arch/x86/kvm/vmx/vmx.c
(setup_vmcs_config, the VMX capability MSRs), arch/x86/virt/vmx/tdx/tdx.c (MKTME keyid
partitioning, MOVDIR64B) and arch/x86/kernel/cpu/feat_ctl.c (IA32_FEAT_CTL).
"""

from __future__ import annotations

# CPUID bits: their rows come from vtdx.platform.cpuid, which the module's native CPUID reads.
from vtdx.platform.cpuid import (
    CPUID1_ECX_VMX,
    CPUID1_ECX_XSAVE,
    CPUID1_EDX_SS,
    CPUID7_ECX_MOVDIR64B,
    CPUID7_ECX_TME,
    CPUID7_EDX_ARCH_CAPABILITIES,
    adjustments,
)
from vtdx.platform.profile import Profile
from vtdx.runtime.protocol import CpuidReg, Feature, MsrWrite, Row, RowType

#: The CPUID bits stay importable from here (tests and tools name them as the facade's).
__all__ = ["CPUID1_ECX_VMX", "CPUID1_ECX_XSAVE", "CPUID1_EDX_SS", "CPUID7_ECX_MOVDIR64B",
           "CPUID7_ECX_TME", "CPUID7_EDX_ARCH_CAPABILITIES", "cpuid_rows", "feature_rows",
           "msr_rows", "platform_rows"]

# MSR indices
MSR_FEAT_CTL = 0x3A
MSR_MKTME_KEYID_PARTITIONING = 0x87
MSR_ARCH_CAPABILITIES = 0x10A
MSR_VMX_BASIC = 0x480
MSR_TME_CAPABILITY = 0x981
MSR_TME_ACTIVATE = 0x982

FEAT_CTL_LOCKED = 1 << 0
FEAT_CTL_VMX_OUTSIDE_SMX = 1 << 2

#: IA32_ARCH_CAPABILITIES bit 0: not affected by rogue data cache load (Meltdown), hence by
#: L1TF either. TDX-capable Xeons report it; without it Linux marks the CPU L1TF-affected
#: and kvm's kvm_mmu_reset_all_pte_masks (mmu/spte.c) warns, since an L1TF-affected CPU
#: with a MAXPHYADDR of 47 bits or more does not exist.
ARCH_CAP_RDCL_NO = 1 << 0

#: VMCS revision id the test guest and Linux put in the VMXON region (VMX_BASIC[30:0]).
VMCS_REVISION = 1
#: VMX_BASIC: revision 1, VMCS size 4 KiB (44:32), WB memory type (53:50), INS/OUTS info (54).
VMX_BASIC = VMCS_REVISION | (0x1000 << 32) | (6 << 50) | (1 << 54)


def _ctls(default1: int, allowed1: int) -> int:
    """A VMX control capability MSR: allowed-0 settings low, allowed-1 high (SDM A.3)."""
    return ((allowed1 | default1) << 32) | default1


#: VMX capability MSRs kvm_intel reads (values from the reference notes; read-only).
VMX_CAPS: dict[int, int] = {
    0x481: _ctls(0x16, 0xA9),  # pin-based: ext-intr, NMI exiting, virtual NMIs, posted intr
    0x482: _ctls(0x0401E172, 0xB1F98E8C),  # primary processor-based
    0x483: _ctls(0x00036DFF, 0x8204),  # VM-exit
    0x484: _ctls(0x000011FF, 0x0204),  # VM-entry
    0x485: 0x1E5,  # misc
    0x486: 0x80000021,  # CR0 fixed0: PE, NE, PG
    0x487: 0xFFFFFFFF,  # CR0 fixed1
    0x488: 0x2000,  # CR4 fixed0: VMXE
    0x489: 0x1FF7FFF,  # CR4 fixed1 (bits 0-24 but 15)
    0x48A: 0x2A,  # VMCS enum
    0x48B: 0x3B3 << 32,  # secondary processor-based: allowed-1 only
    0x48C: 0x06304040,  # EPT/VPID capabilities
    0x491: 0,  # VM functions
}


def cpuid_rows(p: Profile) -> list[Row]:
    """CPUID bits: VMX, XSAVE, SELFSNOOP, TME, MOVDIR64B (as the profile says),
    ARCH_CAPABILITIES, MAXPHYADDR;
    the same adjustments the module's native CPUID applies (vtdx.platform.cpuid)."""
    return [Row(RowType.CPUID, leaf, sub, CpuidReg(reg), set_, clear)
            for leaf, sub, reg, set_, clear in adjustments(p)]


def msr_rows(p: Profile) -> list[Row]:
    """FEAT_CTL locked with VMX on; keyid partitioning and TME MSRs agreeing on keyid bits;
    ARCH_CAPABILITIES with RDCL_NO."""
    def ro(index: int, value: int) -> Row:
        return Row(RowType.MSR, index, d=value, flags=MsrWrite.GP)

    max_keys = (1 << p.keyid_bits) - 1
    rows = [
        ro(MSR_FEAT_CTL, FEAT_CTL_LOCKED | FEAT_CTL_VMX_OUTSIDE_SMX),
        ro(MSR_MKTME_KEYID_PARTITIONING, (p.tdx_keyids << 32) | p.mktme_keyids),
        # TME_CAPABILITY: AES-XTS-128 (bit 0), MK_TME_MAX_KEYID_BITS 35:32, MAX_KEYS 50:36.
        ro(MSR_TME_CAPABILITY, 1 | (p.keyid_bits << 32) | (max_keys << 36)),
        # TME_ACTIVATE: locked (0), enabled (1), keyid bits 35:32, AES-XTS-128 allowed (48).
        ro(MSR_TME_ACTIVATE, 1 | 2 | (p.keyid_bits << 32) | (1 << 48)),
        ro(MSR_ARCH_CAPABILITIES, ARCH_CAP_RDCL_NO),
        ro(MSR_VMX_BASIC, VMX_BASIC),
    ]
    rows += [ro(index, value) for index, value in VMX_CAPS.items()]
    return rows


def feature_rows(p: Profile, *, seam_module: bool) -> list[Row]:
    def feat(f: Feature, value: int) -> Row:
        return Row(RowType.FEATURE, f, d=value)

    return [
        feat(Feature.SEAM, int(seam_module)),
        feat(Feature.VMX, 1),
        feat(Feature.MOVDIR64B, int(p.movdir64b)),
        feat(Feature.PHYS_BITS, p.phys_bits),
    ]


def platform_rows(p: Profile, *, seam_module: bool = True) -> list[Row]:
    """Every row the daemon sends in its WELCOME for profile ``p``.

    ``seam_module=False`` models a platform with no TDX module loaded: SEAMCALL then
    ends in VMfailInvalid, as on hardware without a SEAM module.
    """
    return cpuid_rows(p) + msr_rows(p) + feature_rows(p, seam_module=seam_module)
