"""All state of the module model, in one place (tdx_global_data.h, tdx_local_data.h, the
TDR/TDCS/TDVPS of every TD).

``ModuleState`` is what the module keeps between SEAMCALLs: the system state machine, per-LP
data, the key ownership table, the PAMT (with its Dynamic PAMT nodes and bitmap) and every
TD. ``TdxModule.reset()`` replaces it as a whole, which is also what TDH.SYS.DISABLE does;
nothing else holds model state, so nothing else needs resetting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from vtdx.module.engine.interfaces import NUM_RTMRS, RTMR_SIZE
from vtdx.module.engine.registry import TdEngines
from vtdx.module.pamt import PamtManager
from vtdx.module.sept import SeptTree
from vtdx.platform.profile import Profile

if TYPE_CHECKING:
    from vtdx.module.engine.engine import TdVcpuEngine

#: Key ownership table states (KOT_STATE_* in tdx_global_data.h).
KOT_FREE = 0
KOT_ASSIGNED = 1
KOT_FLUSHED = 2
KOT_RESERVED = 3

# TDR lifecycle (td_lifecycle_state_t) and TDCS op_state (op_state_e).
TD_HKID_ASSIGNED, TD_KEYS_CONFIGURED, TD_BLOCKED, TD_TEARDOWN = 0, 1, 2, 3
OP_UNINITIALIZED, OP_INITIALIZED, OP_RUNNABLE = 0, 1, 2
LIFECYCLE_NAMES = {TD_HKID_ASSIGNED: "HKID_ASSIGNED", TD_KEYS_CONFIGURED: "KEYS_CONFIGURED",
                   TD_BLOCKED: "BLOCKED", TD_TEARDOWN: "TEARDOWN"}
OP_STATE_NAMES = {OP_UNINITIALIZED: "UNINITIALIZED", OP_INITIALIZED: "INITIALIZED",
                  OP_RUNNABLE: "RUNNABLE"}
#: Index of the TDCS page that is the S-EPT root.
SEPT_ROOT_PAGE_INDEX = 3

#: seamcall_state_lookup (include/auto_gen/op_state_lookup.c), states 0..2 only: leaf number
#: -> op_states in which the leaf may run.
OP_ALLOWED: dict[int, frozenset[int]] = {
    0: frozenset({2}), 1: frozenset({0}), 2: frozenset({1}), 3: frozenset({1, 2}),
    4: frozenset({1}),
    6: frozenset({1, 2}), 7: frozenset({1, 2}), 10: frozenset({1}), 11: frozenset({1, 2}),
    13: frozenset({1, 2}), 15: frozenset({1, 2}), 16: frozenset({1}), 17: frozenset({1}),
    18: frozenset({0, 1, 2}), 21: frozenset({0}), 22: frozenset({1}), 23: frozenset({1, 2}),
    25: frozenset({1, 2}), 26: frozenset({1, 2}), 29: frozenset({1, 2}), 30: frozenset({1, 2}),
    38: frozenset({1, 2}), 39: frozenset({1, 2}), 43: frozenset({1, 2}),
}
#: op_state_is_tlb_tracking_required: only once the TD can run.
TLB_TRACKING_OP_STATES = frozenset({OP_RUNNABLE})


class SysState(IntEnum):
    """Module-wide state (sysinit_state_e in tdx_global_data.h)."""

    SYSINIT_PENDING = 0
    SYSINIT_DONE = 1
    SYSCONFIG_DONE = 2
    SYS_READY = 3
    SYS_SHUTDOWN = 4


@dataclass(slots=True)
class LpState:
    """Per logical processor state (the module's local data)."""

    lp: int
    package: int
    initialized: bool = False
    busy: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"lp": self.lp, "package": self.package, "initialized": self.initialized,
                "busy": self.busy}


@dataclass
class VcpuState:
    """TDVPS of one vCPU (TDVPR page + TDVPX pages)."""

    tdvpr_pa: int
    tdr_pa: int
    tdvpx: list[int] = field(default_factory=list)
    initialized: bool = False
    vcpu_index: int = -1
    x2apic_id: int = 0
    associated_lp: int | None = None
    fields: dict[int, int] = field(default_factory=dict)
    #: TDVPS.MANAGEMENT.STATE beyond INITIALIZED: VCPU_DISABLED after a non-recoverable exit
    #: (a triple fault), VCPU_ACTIVE while it runs guest code (``running_lp`` is the LP).
    disabled: bool = False
    running_lp: int | None = None
    #: TDVPS.MANAGEMENT.VCPU_EPOCH: the TD epoch this vCPU last entered in (its refcount).
    vcpu_epoch: int = 0
    #: TDVPS.MANAGEMENT.LAST_TD_EXIT (td_exit.c): async_fault, async_trap or tdvmcall.
    last_td_exit: str = "async_fault"
    #: TDVPS.MANAGEMENT.POSSIBLY_EPF_STEPPING: EPT-violation exits at one guest RIP with no
    #: forward progress, counted up to STEPPING_EPF_THRESHOLD (td_exit_stepping.c).
    possibly_epf_stepping: int = 0
    #: TDVPS.LAST_EPF_GPA_LIST (LAST_EPF_GPA_LIST_IDX is its length): private GPAs of the
    #: EPT violations past the threshold; non-empty puts TDH.VP.ENTER in 0-step mode.
    last_epf_gpa_list: list[int] = field(default_factory=list)
    #: The TD vCPU engine made at TDH.VP.INIT (None when host RAM cannot be mapped).
    engine: TdVcpuEngine | None = None

    @property
    def num_pages(self) -> int:
        return 1 + len(self.tdvpx)

    @property
    def state_name(self) -> str:
        """vcpu_state_e of tdx_tdvps.h: UNINITIALIZED, READY, ACTIVE or DISABLED."""
        if not self.initialized:
            return "UNINITIALIZED"
        if self.disabled:
            return "DISABLED"
        return "ACTIVE" if self.running_lp is not None else "READY"


@dataclass
class TdState:
    """TDR plus TDCS of one TD, keyed by the TDR HPA."""

    tdr_pa: int
    hkid: int
    lifecycle: int = TD_HKID_ASSIGNED
    fatal: bool = False
    tdcx: list[int] = field(default_factory=list)
    chldcnt: int = 0
    pkg_config_bitmap: int = 0
    op_state: int = OP_UNINITIALIZED
    # TD_PARAMS-derived configuration
    attributes: int = 0
    xfam: int = 0
    max_vcpus: int = 0
    num_vcpus: int = 0
    gpaw: bool = False
    eptp_controls: int = 0
    config_flags: int = 0
    tsc_frequency: int = 0
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    #: TDCS.CPUID_CONFIG_VALS by cpuid_lookup slot (vtdx.module.cpuid), set by TDH.MNG.INIT;
    #: empty before it (every CPUID_VALID flag still 0).
    cpuid: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    tsc_offset: int = 0
    tsc_multiplier: int = 0
    # measurement
    mrtd_ctx: hashlib._Hash = field(default_factory=hashlib.sha384)
    mrtd: bytes = bytes(48)
    #: TDCS.RTMR[0..3]: run-time measurement registers the guest extends
    #: (TDG.MR.RTMR.EXTEND); zero at TDH.MNG.INIT.
    rtmr: list[bytes] = field(default_factory=lambda: [bytes(RTMR_SIZE)] * NUM_RTMRS)
    finalized: bool = False
    # TLB tracking (epoch_tracking): td_epoch and the two refcounts
    td_epoch: int = 1
    refcount: list[int] = field(default_factory=lambda: [0, 0])
    vcpus: dict[int, VcpuState] = field(default_factory=dict)
    sept: SeptTree | None = None
    fields: dict[int, int] = field(default_factory=dict)
    #: The vCPU engines of this TD: S-EPT changes and TDH.MEM.TRACK reach them through it.
    engines: TdEngines = field(default_factory=TdEngines)
    #: The TD as its engines see it (``vtdx.module.td_engine.ModuleTdView``), made once.
    view: object | None = None

    @property
    def sept_root_level(self) -> int:
        # eptp_controls bits 5:3 = page-walk length - 1 (3 -> 4 levels, 4 -> 5 levels)
        return ((self.eptp_controls >> 3) & 7) if self.eptp_controls else 3

    @property
    def shared_bit(self) -> int:
        return 1 << (51 if self.gpaw else 47)


class ModuleState:
    """Everything the module keeps between SEAMCALLs, fresh as after the module is loaded."""

    def __init__(self, profile: Profile) -> None:
        p = profile
        self.sys_state = SysState.SYSINIT_PENDING
        self.sys_attributes = 0
        self.lps = [LpState(i, p.package_of(i)) for i in range(p.num_lps)]
        self.num_init_lps = 0
        self.pkg_config: set[int] = set()
        self.global_keyid: int | None = None
        self.pamt = PamtManager(p.pamt_entry_sizes)
        #: TDH.PHYMEM.CACHE.WB interruption point per package.
        self.cachewb_intr: dict[int, int] = {}
        #: Key ownership table: keyid -> KOT_* state (absent = KOT_FREE), and per keyid the
        #: packages that still need a cache write-back before the keyid can be freed.
        self.kot: dict[int, int] = {}
        self.kot_wbinvd: dict[int, set[int]] = {}
        #: Every TD by TDR PA, every vCPU by TDVPR PA, the vCPU associated with each LP.
        self.tds: dict[int, TdState] = {}
        self.vcpus: dict[int, VcpuState] = {}
        self.lp_vcpu: dict[int, int] = {}
        #: Cached TDH.SYS.RD catalogue (derived from the profile and sys_attributes).
        self.sys_rd_catalogue: object | None = None
