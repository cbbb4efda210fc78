"""What the TD vCPU engine needs from the rest of the module, as narrow protocols.

The engine runs TD guest code; the S-EPT, the TD's metadata and its CPUID configuration
belong to the module. The engine reaches them only through the protocols below, so the
module's internals can change without touching the engine:

- ``GpaTranslator``: a walk of the TD's secure EPT for a private GPA, reported with the
  architectural S-EPT entry state (the numbers TDH.MEM.SEPT.RD returns), plus the one
  state change the guest itself makes (TDG.MEM.PAGE.ACCEPT: PENDING -> MAPPED).
- ``TdMetadata``: TDG.VM.RD / TDG.VM.WR of TD-scope fields with the guest's access rights.
- ``CpuidConfig``: the CPUID values TDH.MNG.INIT computed for the TD.
- ``TdConfig``: fixed TD parameters the guest-side leaves report.

KVM's shared EPT is not behind a protocol: it is bytes in host memory, walked by the
engine from the shared EPTP KVM writes with TDH.VP.WR (field 0x203C).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

# Architectural S-EPT entry states (TDX module spec, "Secure EPT entry state"; the values
# TDH.MEM.SEPT.RD reports and the EPT-violation extended exit qualification carries in
# ERR_SEPT_STATE; intel/tdx-module src/common/memory_handlers/sept_manager.c
# sept_get_arch_state).
SEPT_FREE = 0
SEPT_BLOCKED = 1
SEPT_PENDING = 2
SEPT_PENDING_BLOCKED = 3
SEPT_MAPPED = 4
SEPT_REMOVED = 5
SEPT_NL_BLOCKED = 0x81
SEPT_NL_MAPPED = 0x84

#: S-EPT levels as the module numbers them (ept_level_t): 0 = 4 KB leaf, 1 = 2 MB, 2 = 1 GB.
LEVEL_4K, LEVEL_2M, LEVEL_1G = 0, 1, 2


def level_size(level: int) -> int:
    """Bytes mapped by one S-EPT entry at ``level``."""
    return 1 << (12 + 9 * level)


@dataclass(frozen=True, slots=True)
class SeptWalk:
    """Where a walk of the secure EPT stopped, as secure_ept_walk() reports it.

    ``level`` is the level of the entry the walk ended on: the requested level, or a higher
    one when it met a leaf or an entry without RWX on the way down. ``hpa`` is the entry's
    physical address field (the page or the next S-EPT page), meaningful for MAPPED and
    PENDING leaves. ``is_leaf`` is the entry's leaf bit (a 4 KB entry is always a leaf).
    """

    level: int
    state: int
    is_leaf: bool
    hpa: int = 0

    @property
    def rwx(self) -> int:
        """Entry permission bits 2:0 (R, W, X): only MAPPED leaves and NL_MAPPED entries
        have them set in the S-EPT; every other state has RWX = 0."""
        return 7 if self.state in (SEPT_MAPPED, SEPT_NL_MAPPED) else 0


class GpaTranslator(Protocol):
    """The TD's secure EPT, seen from the guest side."""

    def sept_walk(self, gpa: int, level: int) -> SeptWalk:
        """Walk toward ``gpa`` (shared bit clear) down to ``level``; never changes state."""
        ...

    def sept_accept(self, gpa: int, level: int) -> bool:
        """Atomically turn the PENDING leaf at (``gpa``, ``level``) into MAPPED.

        Returns False when the entry is no longer a PENDING leaf (the host changed it since
        the walk); the engine then reports TDX_OPERAND_BUSY as sept_lock_acquire_guest()
        failing would. The caller has already zeroed the page.
        """
        ...


class TdMetadata(Protocol):
    """TD-scope metadata with the guest's access rights (MD_GUEST_RD / MD_GUEST_WR)."""

    def guest_read(self, field_id: int) -> tuple[int, int]:
        """Return (status, value); status is TDX_SUCCESS or the module's error for it."""
        ...

    def guest_write(self, field_id: int, value: int, mask: int) -> tuple[int, int]:
        """Write ``value`` under ``mask``; return (status, previous value)."""
        ...


class CpuidConfig(Protocol):
    """The CPUID values of the TD (TDCS.CPUID_CONFIG_VALS as TDH.MNG.INIT computed them)."""

    last_base_leaf: int
    last_extended_leaf: int

    def cpuid_lookup(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        """(EAX, EBX, ECX, EDX), or None for a leaf the module does not virtualise or marks
        faulting: the guest then gets a #VE (td_cpuid.c)."""
        ...


#: TDCS run-time measurement registers (NUM_RTMRS, the index bound tdg_mr_rtmr_extend.c
#: checks), each one SHA-384 digest.
NUM_RTMRS, RTMR_SIZE = 4, 48


def rtmr_extended(rtmr: bytes, data: bytes) -> bytes:
    """TDG.MR.RTMR.EXTEND's new value of a register: SHA-384(RTMR || data)."""
    return hashlib.sha384(rtmr + data).digest()


@dataclass(frozen=True, slots=True)
class TdConfig:
    """TD parameters fixed at TDH.MNG.INIT that the guest-side leaves report."""

    gpaw: bool = False             # TD_PARAMS.EXEC_CONTROLS.GPAW: shared bit 51, else 47
    attributes: int = 1 << 28      # TD_PARAMS.ATTRIBUTES (bit 28 SEPT_VE_DISABLE)
    max_vcpus: int = 1
    no_rbp_mod: bool = True        # TD_PARAMS.CONFIG_FLAGS.NO_RBP_MOD (KVM sets it)
    cpuid1_eax: int = 0x000806F8   # CPUID(1).EAX the module saved at TDH.SYS.INIT
    #: EPT levels of the TD (TD_PARAMS.EPTP_CONTROLS page-walk length: 4 or 5). The shared
    #: EPT is walked with it too: the module takes the walk length of the shared EPTP from
    #: the TD's EPTP (helpers.c check_walk_and_map_guest_side_gpa), and KVM writes the bare
    #: root HPA as the shared EPTP (Linux arch/x86/kvm/vmx/tdx.c tdx_load_mmu_pgd).
    ept_levels: int = 4

    @property
    def shared_bit(self) -> int:
        return 1 << (51 if self.gpaw else 47)

    @property
    def max_pa_for_gpa(self) -> int:
        """MAX_PA_FOR_GPAW (52) or MAX_PA_FOR_GPA_NOT_WIDE (48) (x86_defs.h)."""
        return 52 if self.gpaw else 48

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.attributes >> 28 & 1)


class TdView(GpaTranslator, TdMetadata, CpuidConfig, Protocol):
    """Everything the engine asks of one TD: its S-EPT, metadata, CPUID and configuration."""

    config: TdConfig

    def num_vcpus(self) -> int:
        """TDCS.NUM_VCPUS: vCPUs initialised so far (TDG.VP.INFO reports it)."""
        ...

    def rtmr_extend(self, index: int, data: bytes) -> None:
        """TDG.MR.RTMR.EXTEND's update: RTMR[index] = SHA-384(RTMR[index] || data), 48 bytes
        of ``data``; the engine has checked the operands."""
        ...
