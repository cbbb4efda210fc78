"""How the module keeps the TD vCPU engines (``vtdx.module.engine``) of its TDs.

- ``ModuleTdView``: the ``TdView`` an engine asks for the TD's S-EPT, metadata, CPUID and
  configuration; one per TD, over its ``TdState``. Engines call it from the LP thread that
  runs guest code, without the module mutex, so every call takes the mutex for the short
  time of one S-EPT read or change (a host-side SEAMCALL never keeps it while it waits).
- ``host_ram``: host RAM mapped once per module for every engine (the daemon's
  ``GuestRam`` file mapped a second time, MAP_SHARED). A memory without a backing file
  (``SparseMemory``) has no engine: TDs can be built, not run.
- ``make_engine`` (TDH.VP.INIT), ``sept_changed`` (every committed S-EPT change) and
  ``kick`` (TDH.MEM.TRACK) are the calls the leaves make.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from vtdx.abi import status as st
from vtdx.module import sept as S
from vtdx.module.cpuid import XCR0_USER_BIT_MASK, platform_cpuid, td_lookup
from vtdx.module.engine.engine import TdVcpuEngine
from vtdx.module.engine.hostram import HostRam
from vtdx.module.engine.interfaces import SeptWalk, TdConfig, rtmr_extended
from vtdx.module.locks import EXCLUSIVE, sept_key, septe_key
from vtdx.module.state import TdState, VcpuState

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

# TD-scope fields the guest may read with TDG.VM.RD (TDX module ABI spec, TDCS fields with
# guest read access; the ids KVM and the kvm-td guest use).
FIELD_ATTRIBUTES = 0x1110000300000000
FIELD_XFAM = 0x1110000300000001
FIELD_NUM_VCPUS = 0x1110000200000002
FIELD_MAX_VCPUS = 0x1110000200000003
#: TD_PARAMS.CONFIG_FLAGS.NO_RBP_MOD (bit 2; Linux arch/x86/include/asm/shared/tdx.h).
CONFIG_FLAGS_NO_RBP_MOD = 1 << 2


class ModuleTdView:
    """One TD as its vCPU engines see it (the engine's ``TdView`` protocol)."""

    def __init__(self, module: TdxModule, td: TdState) -> None:
        self.module = module
        self.td = td
        self.config = TdConfig(gpaw=td.gpaw, attributes=td.attributes,
                               max_vcpus=td.max_vcpus,
                               no_rbp_mod=bool(td.config_flags & CONFIG_FLAGS_NO_RBP_MOD),
                               cpuid1_eax=module.profile.cpu_fms,
                               ept_levels=td.sept_root_level + 1)
        # cpuid_last_base_leaf / cpuid_last_extended_leaf of TDH.SYS.INIT
        self._platform = platform_cpuid(module.profile)
        self.last_base_leaf = self._platform.last_base_leaf
        self.last_extended_leaf = self._platform.last_extended_leaf

    def num_vcpus(self) -> int:
        return self.td.num_vcpus

    def rtmr_extend(self, index: int, data: bytes) -> None:
        """tdg_mr_rtmr_extend.c's update under the module mutex. The module takes TDCS's
        RTMR lock exclusive around it (OPERAND_BUSY, operand RTMR, if it cannot); no host
        leaf the model serves holds that lock, so the guest always gets it."""
        with self.module.cond:
            rtmr = self.td.rtmr
            rtmr[index] = rtmr_extended(rtmr[index], data)

    # -- GpaTranslator ---------------------------------------------------------------------
    def sept_walk(self, gpa: int, level: int) -> SeptWalk:
        """secure_ept_walk() on the TD's S-EPT, reported with architectural states."""
        with self.module.cond:
            sept = self.td.sept
            if sept is None:
                return SeptWalk(sept_root_level(self.td), 0, False)
            w = sept.walk(gpa, level)
            e = w.entry
            return SeptWalk(w.level, S.PUBLIC_STATE[e.state], e.is_leaf, e.hpa)

    def sept_accept(self, gpa: int, level: int) -> bool:
        """TDG.MEM.PAGE.ACCEPT's commit: the guest side takes the S-EPT tree lock shared and
        the entry lock (sept_lock_acquire_guest); a host SEAMCALL holding either exclusive
        (a call paused at a control point) makes it fail, as does an entry that changed."""
        with self.module.cond:
            td = self.td
            locks = self.module.locks
            if td.sept is None or locks.mode_of(sept_key(td.tdr_pa)) == EXCLUSIVE:
                return False
            w = td.sept.walk(gpa, level)
            if w.level != level or w.entry.state != S.PENDING:
                return False
            if locks.mode_of(septe_key(w.page.hpa, w.idx)):
                return False
            w.entry.state = S.MAPPED
            return True

    # -- TdMetadata ------------------------------------------------------------------------
    def _guest_fields(self) -> dict[int, int]:
        td = self.td
        return {FIELD_ATTRIBUTES: td.attributes, FIELD_XFAM: td.xfam,
                FIELD_NUM_VCPUS: td.num_vcpus, FIELD_MAX_VCPUS: td.max_vcpus}

    def guest_read(self, field_id: int) -> tuple[int, int]:
        """TDG.VM.RD of a TD-scope field (tdg_vm_rd_wr.c: an unknown field id is
        TDX_METADATA_FIELD_ID_INCORRECT with operand RDX)."""
        with self.module.cond:
            value = self._guest_fields().get(field_id)
        if value is None:
            return st.with_operand(st.TDX_METADATA_FIELD_ID_INCORRECT, st.OPERAND_ID_RDX), 0
        return st.TDX_SUCCESS, value

    def guest_write(self, field_id: int, value: int, mask: int) -> tuple[int, int]:
        """TDG.VM.WR: none of the modelled fields is guest-writable."""
        with self.module.cond:
            known = field_id in self._guest_fields()
        code = st.TDX_METADATA_FIELD_NOT_WRITABLE if known else \
            st.TDX_METADATA_FIELD_ID_INCORRECT
        return st.with_operand(code, st.OPERAND_ID_RDX), 0

    # -- CpuidConfig -----------------------------------------------------------------------
    def cpuid_lookup(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        """td_cpuid.c: the values TDH.MNG.INIT stored for the lookup slot of (leaf, subleaf)
        (the same values TDH.MNG.RD of CPUID_VALUES answers); None (a #VE) for a leaf the
        lookup table does not have or marks faulting.

        CPUID(0xD, 0 or 1).EBX is the CPU's live answer for the guest's XCR0 (and IA32_XSS);
        the engine cannot see XCR0, so the model answers for the largest the TD may enable:
        XFAM's user bits (sub-leaf 0) or all of XFAM, compacted (sub-leaf 1)."""
        vals = td_lookup(self.td.cpuid, leaf, subleaf)
        if vals is None or leaf != 0xD or subleaf > 1:
            return vals
        xfam = self.td.xfam
        if subleaf == 0:
            ebx = self._platform.xsave_size(xfam & XCR0_USER_BIT_MASK)
        else:
            ebx = self._platform.xsave_size_compacted(xfam)
        return vals[0], ebx, vals[2], vals[3]


def sept_root_level(td: TdState) -> int:
    return td.sept_root_level


_ram_lock = threading.Lock()


def host_ram(module: TdxModule) -> HostRam | None:
    """The module's one mapping of host RAM for engines, made on first use; None when the
    module's memory is not a file-backed ``GuestRam`` (no ``path``)."""
    with _ram_lock:
        ram = module.host_ram
        if ram is None and getattr(module.memory, "path", None) is not None:
            ram = module.host_ram = HostRam.for_guest_ram(module.memory)  # type: ignore[arg-type]
        return ram


def td_view(module: TdxModule, td: TdState) -> ModuleTdView:
    if not isinstance(td.view, ModuleTdView):
        td.view = ModuleTdView(module, td)
    return td.view


def make_engine(module: TdxModule, td: TdState, vcpu: VcpuState, init_rcx: int) -> None:
    """TDH.VP.INIT: the vCPU's engine in the state VP.INIT leaves, kept with the vCPU."""
    ram = host_ram(module)
    if ram is None:
        return
    engine = TdVcpuEngine(ram, td_view(module, td), vcpu.vcpu_index, init_rcx)
    vcpu.engine = engine
    td.engines.add(engine)


def sept_changed(td: TdState, op: str, gpa: int, level: int) -> None:
    """A committed S-EPT change (op: ADD, AUG, BLOCK, UNBLOCK, REMOVE, DEMOTE, PROMOTE,
    RELOCATE) reaches every engine of the TD before it next runs guest code."""
    td.engines.sept_changed(op, gpa, level)


def kick(td: TdState) -> int:
    """TDH.MEM.TRACK's IPIs: every vCPU of the TD running guest code exits (time slice)."""
    return td.engines.kick_all()


def drop_engine(td: TdState, vcpu: VcpuState) -> None:
    """The TDVPR page went back to the host: its engine goes with it."""
    engine = vcpu.engine
    if engine is not None:
        td.engines.remove(engine)
        vcpu.engine = None
        engine.close()
