"""The platform's native CPUID: what the host kernel's CPUID instruction returns on vtdx.

The host runs on QEMU TCG's ``max`` CPU model with the Intel vendor string; the plugin then
sets or clears the few bits the profile owns (``adjustments``). The TDX module samples the
same native CPUID at TDH.SYS.INIT and derives every TD's virtual CPUID from it
(``vtdx.module.cpuid``), so both sides must read one table: ``QEMU_TCG_MAX`` below, with
the profile's adjustments applied by ``native_cpuid``. The table was measured inside the
default kernel on QEMU 11.1 (vCPU 0 of two, default profile rows applied; the adjustments
only set or clear bits, so applying another profile's adjustments again gives that
profile's view). It holds what the module samples (the leaves of its CPUID lookup table,
checked against a booted kernel by tests/test_cpuid.py); the host answers a few more
(0x8000000A, 0x8000001D, 0x80000021, 0xB beyond subleaf 2) that ``native_cpuid`` reads as
all-zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtdx.platform.profile import Profile

#: A CPUID adjustment or table row that applies to every subleaf of its leaf.
ANY_SUBLEAF = 0xFFFF_FFFF
EAX, EBX, ECX, EDX = 0, 1, 2, 3

# Bits the profile owns (the Linux TDX host code checks them; TCG lacks some of them).
CPUID1_EAX_FMS = 0x0FFF3FFF  # stepping, model, family, type, extended model and family
CPUID1_ECX_VMX = 1 << 5
CPUID1_ECX_XSAVE = 1 << 26
CPUID1_EDX_SS = 1 << 27  # self-snoop
CPUID7_ECX_TME = 1 << 13
CPUID7_ECX_MOVDIR64B = 1 << 28
CPUID7_EDX_ARCH_CAPABILITIES = 1 << 29  # IA32_ARCH_CAPABILITIES exists (read-only MSR 0x10A)

Values = tuple[int, int, int, int]

#: QEMU 11.1 TCG ``-cpu max,vendor=GenuineIntel``, ``-smp 2``, vCPU 0, as the default
#: profile's host sees it. Base leaves end at 0xD, extended leaves at 0x80000021.
QEMU_TCG_MAX: dict[tuple[int, int], Values] = {
    (0x0, 0x0): (0x0000000D, 0x756E6547, 0x6C65746E, 0x49656E69),
    (0x1, 0x0): (0x00000663, 0x00020800, 0xFEF8322B, 0x1FCBFBFD),
    (0x2, 0x0): (0x00000001, 0x00000000, 0x00000000, 0x000000FF),
    (0x4, 0x0): (0x04000121, 0x01C0003F, 0x0000003F, 0x00000001),
    (0x4, 0x1): (0x04000122, 0x01C0003F, 0x0000003F, 0x00000001),
    (0x4, 0x2): (0x04000143, 0x03C0003F, 0x00000FFF, 0x00000001),
    (0x4, 0x3): (0x04004163, 0x03C0003F, 0x00003FFF, 0x00000006),
    (0x5, 0x0): (0x00000000, 0x00000000, 0x00000003, 0x00000000),
    (0x6, 0x0): (0x00000004, 0x00000000, 0x00000000, 0x00000000),
    (0x7, 0x0): (0x00000001, 0x219C43A9, 0x9041221C, 0x00000010),
    (0x7, 0x1): (0x00001C80, 0x00000000, 0x00000000, 0x00000000),
    (0xB, 0x0): (0x00000000, 0x00000001, 0x00000100, 0x00000000),
    (0xB, 0x1): (0x00000001, 0x00000002, 0x00000201, 0x00000000),
    (0xB, 0x2): (0x00000000, 0x00000000, 0x00000002, 0x00000000),
    (0xD, 0x0): (0x0000021F, 0x00000A88, 0x00000A88, 0x00000000),
    (0xD, 0x1): (0x00000005, 0x000003C8, 0x00000000, 0x00000000),
    (0xD, 0x2): (0x00000100, 0x00000240, 0x00000000, 0x00000000),
    (0xD, 0x3): (0x00000040, 0x000003C0, 0x00000000, 0x00000000),
    (0xD, 0x4): (0x00000040, 0x00000400, 0x00000000, 0x00000000),
    (0xD, 0x5): (0x00000000, 0x00000440, 0x00000000, 0x00000000),
    (0xD, 0x6): (0x00000000, 0x00000480, 0x00000000, 0x00000000),
    (0xD, 0x7): (0x00000000, 0x00000680, 0x00000000, 0x00000000),
    (0xD, 0x9): (0x00000008, 0x00000A80, 0x00000000, 0x00000000),
    (0x80000000, 0x0): (0x80000021, 0x00000000, 0x00000000, 0x00000000),
    (0x80000001, 0x0): (0x00000663, 0x00000000, 0x00000177, 0xEC500800),
    (0x80000002, 0x0): (0x554D4551, 0x47435420, 0x55504320, 0x72657620),
    (0x80000003, 0x0): (0x6E6F6973, 0x352E3220, 0x0000002B, 0x00000000),
    (0x80000006, 0x0): (0x00000000, 0x00000000, 0x10008040, 0x00000000),
    (0x80000008, 0x0): (0x0000392E, 0x00000204, 0x00000000, 0x00000000),
}

#: Leaves whose values depend on the subleaf (ECX); the others answer every subleaf alike.
SUBLEAF_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1A,
                            0x1B, 0x1D, 0x1F, 0x20, 0x23, 0x24})


def adjustments(p: Profile) -> list[tuple[int, int, int, int, int]]:
    """(leaf, subleaf or ANY_SUBLEAF, register, bits to set, bits to clear) the plugin applies
    to the host's CPUID: the F/M/S, VMX, XSAVE, SELFSNOOP, TME, MOVDIR64B (as the profile
    says), ARCH_CAPABILITIES, MAXPHYADDR."""
    md = CPUID7_ECX_MOVDIR64B
    return [
        (1, ANY_SUBLEAF, EAX, p.cpu_fms & CPUID1_EAX_FMS, CPUID1_EAX_FMS),
        (1, ANY_SUBLEAF, ECX, CPUID1_ECX_VMX | CPUID1_ECX_XSAVE, 0),
        (1, ANY_SUBLEAF, EDX, CPUID1_EDX_SS, 0),
        (7, 0, ECX, CPUID7_ECX_TME | (md if p.movdir64b else 0), 0 if p.movdir64b else md),
        (7, 0, EDX, CPUID7_EDX_ARCH_CAPABILITIES, 0),
        (0x8000_0008, ANY_SUBLEAF, EAX, p.phys_bits, 0xFF),
    ]


def native_cpuid(p: Profile, leaf: int, subleaf: int) -> Values:
    """CPUID(leaf, subleaf) as the host of profile ``p`` sees it on vCPU 0 (the plugin's
    cpuid_msr.c applies ``adjustments`` the same way: clear, then set)."""
    key = (leaf, subleaf if leaf in SUBLEAF_LEAVES else 0)
    regs = list(QEMU_TCG_MAX.get(key, (0, 0, 0, 0)))
    for a_leaf, a_sub, reg, set_, clear in adjustments(p):
        if a_leaf == leaf and a_sub in (ANY_SUBLEAF, subleaf):
            regs[reg] = (regs[reg] & ~clear) | set_
    return regs[0], regs[1], regs[2], regs[3]


def last_base_leaf(p: Profile) -> int:
    return native_cpuid(p, 0, 0)[0]


def last_extended_leaf(p: Profile) -> int:
    return native_cpuid(p, 0x8000_0000, 0)[0]
