"""TD-side state (TDR/TDCS/TDVPS, KOT) and the check-and-lock helpers every TD leaf shares.

Mirrors src/common/helpers/helpers.c of intel/tdx-module: the order of checks and the
operand id each failure reports are the module's (check_lock_and_map_explicit_tdr,
non_shared_hpa_metadata_check_and_lock, check_state_map_tdcs_and_lock,
lock_sept_check_and_walk_private_gpa...). A failed check raises ``TdxFail``; the per-call
context then releases every lock the call took, and because all state changes happen after
the last check, a failed call leaves the model unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from vtdx.abi import status as st
from vtdx.module import sept as S
from vtdx.module.errors import TdxError
from vtdx.module.pamt import PT_PAMT  # 2MB node holding a Dynamic PAMT page pair

PAGE = 4096
SZ_2M = 2 << 20
SZ_1G = 1 << 30

# PAMT page types (pamt_manager.h page_type_t).
PT_NDA, PT_RSVD, PT_REG, PT_TDR, PT_TDCX, PT_TDVPR, PT_EPT = 0, 1, 3, 4, 5, 6, 8
PT_NAMES = {PT_NDA: "NDA", PT_RSVD: "RSVD", PT_REG: "REG", PT_TDR: "TDR", PT_TDCX: "TDCX",
            PT_TDVPR: "TDVPR", PT_EPT: "EPT", PT_PAMT: "PAMT"}
LVL_4K, LVL_2M, LVL_1G = 0, 1, 2

# TDR lifecycle (td_lifecycle_state_t) and TDCS op_state (op_state_e).
TD_HKID_ASSIGNED, TD_KEYS_CONFIGURED, TD_BLOCKED, TD_TEARDOWN = 0, 1, 2, 3
OP_UNINITIALIZED, OP_INITIALIZED, OP_RUNNABLE = 0, 1, 2
SEPT_ROOT_PAGE_INDEX = 3


# seamcall_state_lookup (include/auto_gen/op_state_lookup.c), states 0..2 only.
OP_ALLOWED: dict[int, frozenset[int]] = {
    1: frozenset({0}), 2: frozenset({1}), 3: frozenset({1, 2}), 4: frozenset({1}),
    6: frozenset({1, 2}), 7: frozenset({1, 2}), 10: frozenset({1}), 11: frozenset({1, 2}),
    13: frozenset({1, 2}), 15: frozenset({1, 2}), 16: frozenset({1}), 17: frozenset({1}),
    18: frozenset({0, 1, 2}), 21: frozenset({0}), 22: frozenset({1}), 23: frozenset({1, 2}),
    25: frozenset({1, 2}), 26: frozenset({1, 2}), 29: frozenset({1, 2}), 30: frozenset({1, 2}),
    38: frozenset({1, 2}), 39: frozenset({1, 2}), 43: frozenset({1, 2}),
}
#: op_state_is_tlb_tracking_required: only once the TD can run.
TLB_TRACKING_OP_STATES = frozenset({OP_RUNNABLE})

EX, SH = True, False


class TdxFail(TdxError):
    """TdxError plus the extended-info registers (RCX, RDX) some failures report."""

    __slots__ = ("rcx", "rdx")

    def __init__(self, status: int, rcx: int | None = None, rdx: int | None = None) -> None:
        super().__init__(status)
        self.rcx = rcx
        self.rdx = rdx


def fail(base: int, operand: int = 0) -> TdxFail:
    return TdxFail(st.with_operand(base, operand))


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

    @property
    def num_pages(self) -> int:
        return 1 + len(self.tdvpx)


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
    cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    tsc_offset: int = 0
    tsc_multiplier: int = 0
    # measurement
    mrtd_ctx: Any = field(default_factory=lambda: hashlib.sha384())
    mrtd: bytes = bytes(48)
    finalized: bool = False
    # TLB tracking (epoch_tracking): td_epoch and the two refcounts
    td_epoch: int = 1
    refcount: list[int] = field(default_factory=lambda: [0, 0])
    vcpus: dict[int, VcpuState] = field(default_factory=dict)
    sept: S.SeptTree | None = None
    fields: dict[int, int] = field(default_factory=dict)

    @property
    def sept_root_level(self) -> int:
        # eptp_controls bits 5:3 = page-walk length - 1 (3 -> 4 levels, 4 -> 5 levels)
        return ((self.eptp_controls >> 3) & 7) if self.eptp_controls else 3

    @property
    def shared_bit(self) -> int:
        return 1 << (51 if self.gpaw else 47)


class TdRegistry:
    """All TD state the TD leaves keep, attached to the module as ``module.td``."""

    def __init__(self) -> None:
        self.tds: dict[int, TdState] = {}
        self.vcpus: dict[int, VcpuState] = {}
        #: vCPUs currently associated with each LP (TDH.VP.FLUSH dissociates).
        self.lp_vcpu: dict[int, int] = {}


# ----------------------------------------------------------------------------------------
# PAMT walk with TDX locks: pamt.PamtManager.walk (pamt_manager.c pamt_walk, DPAMT-aware)
# ----------------------------------------------------------------------------------------

def pamt_key(level: int, pa: int) -> tuple[str, int, int]:
    """Lock key of the PAMT entry covering ``pa`` at ``level`` (same keys as pamt.py)."""
    return ("pamt", level, pa >> (12 + 9 * level))


@dataclass(slots=True)
class PamtWalk:
    """Result of a locked PAMT walk: the level reached, a view of its entry, the PA."""

    level: int
    entry: Any
    pa: int


@dataclass(slots=True)
class DpamtNode:
    """The pamt_non_leaf_entry_t fields of a PT_PAMT 2MB entry (Dynamic PAMT)."""

    hpa0: int
    hpa1: int
    page_count: int = 0


class DpamtState:
    """Dynamic PAMT data the module keeps besides the PAMT entries themselves.

    ``nodes``: 2MB page index -> the page pair backing that range's 4KB PAMT level;
    ``bitmap``: 4KB page indexes currently used as PAMT pages (PAMT_PAGE_BITMAP bits).
    """

    def __init__(self) -> None:
        self.nodes: dict[int, DpamtNode] = {}
        self.bitmap: set[int] = set()

    def clear(self) -> None:
        self.nodes.clear()
        self.bitmap.clear()

    def bitmap_get(self, pa: int) -> bool:
        return (pa >> 12) in self.bitmap

    def node(self, pa: int) -> DpamtNode | None:
        return self.nodes.get(pa >> 21)


class TdEnv:
    """What the TD leaves need from the module: PAMT, memory, keyid layout, the TD registry.

    One object per module, built by ``env_of(module)``; the MODULE core stays unaware of TD
    internals. Cleared by the module's reset hooks.
    """

    def __init__(self, module: Any) -> None:
        self.module = module
        self.td: TdRegistry = TdRegistry()
        self.dp = DpamtState()
        profile = module.profile
        self.max_pa = 1 << profile.phys_bits
        self.keyid_shift = profile.phys_bits - profile.keyid_bits
        self.hkid_mask = ((1 << profile.keyid_bits) - 1) << self.keyid_shift
        #: TDCS pages the module reports (TDCS_BASE_SIZE); ADDCX fills exactly this many.
        self.min_tdcs = max(SEPT_ROOT_PAGE_INDEX + 1, profile.tdcs_base_size // PAGE)
        self.min_tdvps = max(1, profile.tdvps_base_size // PAGE)
        module.reset_hooks.append(self.reset)

    def reset(self) -> None:
        self.td = TdRegistry()
        self.dp.clear()

    # --- module facts ---------------------------------------------------------------------
    @property
    def pamt(self) -> Any:
        return self.module.pamt

    @property
    def dpamt(self) -> bool:
        return bool(self.module.dynamic_pamt_enabled)

    @property
    def memory(self) -> Any:
        return self.module.memory

    def hkid_of(self, pa: int) -> int:
        return (pa & self.hkid_mask) >> self.keyid_shift

    # --- address checks (helpers.c) ------------------------------------------------------
    def hpa_check(self, pa: int, align: int) -> bool:
        """hpa_check_with_pwr_2_alignment: aligned, no HKID bits, below MAX_PA."""
        return pa % align == 0 and not (pa & self.hkid_mask) and pa < self.max_pa

    def shared_hpa_check(self, pa: int, size: int, align: int) -> int:
        """shared_hpa_check_with_pwr_2_alignment (plus: the page must be RAM to be read)."""
        if not self.module.shared_hpa_ok(pa, align):
            return st.TDX_OPERAND_INVALID
        if not self.memory.contains(pa & ~self.hkid_mask, size):
            return st.TDX_OPERAND_INVALID
        return st.TDX_SUCCESS

    # --- PAMT --------------------------------------------------------------------------------
    def set_entry(self, pa: int, level: int, pt: int, owner: int = 0, bepoch: int = 0) -> None:
        self.pamt.set(pa, level, pt, owner, bepoch)

    def walk(self, ctx: Any, pa: int, exclusive: bool, target: int, operand: int) -> PamtWalk:
        """pamt_walk to ``target`` with the module's shared walk (PamtManager.walk, which
        stops at a 2MB entry without a page pair when Dynamic PAMT is on).

        A failed walk (TDX_OPERAND_BUSY) reports ``operand``, the operand whose page it is.
        """
        try:
            level, entry = self.pamt.walk(ctx, pa, exclusive, 0, target)
        except TdxError as e:
            raise fail(e.status, operand) from None
        return PamtWalk(level, entry, pa)

    def ready_walk(self, ctx: Any, pa: int, exclusive: bool, target: int,
                   operand: int) -> PamtWalk:
        """The PAMT block of ``pa`` initialised (else TDX_OPERAND_ADDR_RANGE_ERROR), then the
        locked walk: how non_shared_hpa_metadata_check_and_lock opens, and how
        TDH.PHYMEM.PAMT.ADD/REMOVE and TDH.PHYMEM.PAGE.RECLAIM open their own walks."""
        if not self.pamt.block_ready(pa):
            raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, operand)
        return self.walk(ctx, pa, exclusive, target, operand)

    def metadata_check_and_lock(self, ctx: Any, pa: int, exclusive: bool, expected_pt: int,
                                target: int, operand: int) -> PamtWalk:
        """non_shared_hpa_metadata_check_and_lock (walk_to_target_size = true)."""
        w = self.ready_walk(ctx, pa, exclusive, target, operand)
        if w.level != target:
            code = st.TDX_PAGE_METADATA_INCORRECT
            if (self.dpamt and w.level == LVL_2M and w.entry.pt == PT_NDA
                    and expected_pt == PT_NDA):
                code = st.TDX_MISSING_PAMT_PAGE_PAIR
            raise fail(code, operand)
        if w.entry.pt != expected_pt:
            raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
        if self.dpamt and w.entry.pt == PT_NDA and self.bitmap_get(pa):
            raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
        return w

    def check_lock_private(self, ctx: Any, pa: int, operand: int, exclusive: bool,
                           expected_pt: int, align: int = PAGE,
                           target: int = LVL_4K) -> PamtWalk:
        """check_and_lock_explicit_private_hpa / _4k_private_hpa."""
        if not self.hpa_check(pa, align):
            raise fail(st.TDX_OPERAND_INVALID, operand)
        return self.metadata_check_and_lock(ctx, pa, exclusive, expected_pt, target, operand)

    def range_2m_free(self, pa: int) -> bool:
        """pamt_is_2mb_range_free: no 4KB page of the range assigned (or a PAMT page)."""
        base = pa & ~(SZ_2M - 1)
        bitmap = self.dp.bitmap
        get = self.pamt.get
        for i in range(512):
            page = base + (i << 12)
            if (page >> 12) in bitmap or get(page, LVL_4K).pt != PT_NDA:
                return False
        return True

    def check_lock_free_range(self, ctx: Any, pa: int, operand: int, level: int) -> PamtWalk:
        """check_and_lock_free_range_hpa: a free 4KB page or a whole free 2MB range."""
        align = SZ_2M if level == LVL_2M else PAGE
        w = self.check_lock_private(ctx, pa, operand, EX, PT_NDA, align, level)
        if level == LVL_2M and not self.range_2m_free(pa):
            raise fail(st.TDX_PAGE_METADATA_INCORRECT, operand)
        return w

    def bitmap_get(self, pa: int) -> bool:
        """dynamic_pamt_4k_bitmap_get: a PAMT page, or a TDMR reserved page (the module sets
        reserved pages' bits at TDMR init, pamt_4kb_bitmap_init)."""
        return (pa >> 12) in self.dp.bitmap or self.pamt.default_pt(pa, LVL_4K) == PT_RSVD

    def check_lock_pair_free(self, ctx: Any, hpa0: int, op0: int, hpa1: int, op1: int,
                             locked_2m: int | None = None) -> None:
        """A Dynamic PAMT page pair about to become a range's 4KB PAMT level must be free:
        each page PAMT-walked shared to 4KB (the lock that makes PAMT.ADD and DEMOTE collide)
        and PT_NDA, then neither page already a PAMT page and the two distinct. TDH.PHYMEM.
        PAMT.ADD and DEMOTE's pamt_demote check the pair the same way; PAMT.ADD passes the
        2MB range it holds exclusive as ``locked_2m`` and its pages are not walked again."""
        for hpa, operand in ((hpa0, op0), (hpa1, op1)):
            if locked_2m is not None and hpa >> 21 == locked_2m >> 21:
                continue
            if self.walk(ctx, hpa, SH, LVL_4K, operand).entry.pt != PT_NDA:
                raise fail(st.TDX_PAGE_NOT_FREE, operand)
        if self.bitmap_get(hpa0):
            raise fail(st.TDX_PAGE_NOT_FREE, op0)
        if self.bitmap_get(hpa1) or hpa1 == hpa0:
            raise fail(st.TDX_PAGE_NOT_FREE, op1)

    def inc_page_count(self, pa: int) -> None:
        """pamt_inc_nl_page_count on the 2MB node of a newly assigned 4KB page."""
        if self.dpamt:
            node = self.dp.node(pa)
            if node is not None:
                node.page_count += 1

    def dec_page_count(self, pa: int) -> None:
        if self.dpamt:
            node = self.dp.node(pa)
            if node is not None and node.page_count > 0:
                node.page_count -= 1

    # --- TDR / TDCS ------------------------------------------------------------------------
    def lock_tdr(self, ctx: Any, tdr_pa: int, operand: int, exclusive: bool,
                 expected_pt: int = PT_TDR) -> tuple[PamtWalk, TdState | None]:
        """check_lock_and_map_explicit_tdr: the TDR's PAMT entry is the TDR lock."""
        w = self.check_lock_private(ctx, tdr_pa, operand, exclusive, expected_pt)
        return w, self.td.tds.get(tdr_pa)

    def tdcs(self, ctx: Any, td: TdState, op_lock: bool | None, leaf: int) -> None:
        """check_state_map_tdcs_and_lock: build state, then OP_STATE lock and op_state."""
        if td.fatal:
            raise TdxFail(st.TDX_TD_FATAL)
        if td.lifecycle != TD_KEYS_CONFIGURED:
            raise TdxFail(st.TDX_TD_KEYS_NOT_CONFIGURED)
        if len(td.tdcx) < self.min_tdcs:
            raise TdxFail(st.TDX_TDCS_NOT_ALLOCATED)
        if op_lock is not None and not ctx.try_lock(("opstate", td.tdr_pa), op_lock):
            raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_OP_STATE)
        if td.op_state not in OP_ALLOWED.get(leaf, frozenset()):
            raise TdxFail(st.TDX_OP_STATE_INCORRECT)

    def lock_sept_walk(self, ctx: Any, td: TdState, gpa: int, level: int, operand: int,
                       lock: bool | None = SH) -> S.WalkResult:
        """lock_sept_check_and_walk_private_gpa (walk to the requested level)."""
        if not self.gpa_valid(td, gpa):
            raise fail(st.TDX_OPERAND_INVALID, operand)
        if lock is not None and not ctx.try_lock(("sept", td.tdr_pa), lock):
            raise fail(st.TDX_OPERAND_BUSY, OPERAND_ID_SEPT_TREE)
        assert td.sept is not None
        w = td.sept.walk(gpa, level)
        if w.level != level:
            raise TdxFail(st.with_operand(st.TDX_EPT_WALK_FAILED, operand),
                          w.entry.arch_rcx(w.level), w.entry.arch_rdx(w.level))
        return w

    def gpa_valid(self, td: TdState, gpa: int) -> bool:
        """check_gpa_validity(private only)."""
        if gpa & td.shared_bit:
            return False
        if gpa >> 52:
            return False
        return td.gpaw or not (gpa >> 48)

    def lock_septe(self, ctx: Any, td: TdState, w: S.WalkResult, operand: int) -> None:
        """sept_lock_acquire_host on the walked entry."""
        if not ctx.try_lock(("septe", td.tdr_pa) + w.key, EX):
            raise TdxFail(st.with_operand(st.TDX_OPERAND_BUSY, operand),
                          w.entry.arch_rcx(w.level), w.entry.arch_rdx(w.level))

    def tlb_tracked(self, td: TdState, bepoch: int) -> bool:
        """is_tlb_tracked: the block epoch is older than the previous TD epoch and no vCPU
        still runs in it (refcount of that epoch is zero)."""
        if bepoch >= td.td_epoch:
            return False
        if bepoch == td.td_epoch - 1 and td.refcount[bepoch & 1]:
            return False
        return True


OPERAND_ID_OP_STATE = 172
OPERAND_ID_SEPT_TREE = 146
OPERAND_ID_TD_EPOCH = 169


def env_of(module: Any) -> TdEnv:
    """The module's TdEnv, created on first use."""
    env = getattr(module, "_td_env", None)
    if env is None:
        env = module._td_env = TdEnv(module)
    return env


def septe_fail(code: int, operand: int, w: S.WalkResult) -> TdxFail:
    """A SEPT-entry failure with the architectural entry in RCX/RDX (extended info)."""
    return TdxFail(st.with_operand(code, operand), w.entry.arch_rcx(w.level),
                   w.entry.arch_rdx(w.level))


def td_leaf(leaf: int, fn: Any, max_version: int = 0) -> Any:
    """LeafSpec whose handler runs ``fn(env, ctx, regs)`` on the output register file.

    Control points of every TD leaf: "entry" (no lock taken yet), "locked" (all checks
    passed, every lock held, nothing committed), "done" (committed, locks still held).

    ``ctx.out`` starts as a copy of the inputs, so ``fn`` reads its operands from it and
    writes results in place. A TdxFail carrying extended info sets RCX/RDX before the
    dispatcher turns the status into RAX.
    """
    from vtdx.module.context import LeafSpec

    def handler(ctx: Any) -> int | None:
        env = env_of(ctx.module)
        ctx.checkpoint("entry")
        try:
            fn(env, ctx, ctx.out)
            ctx.checkpoint("done")  # committed, locks still held
        except TdxFail as e:
            if e.rcx is not None:
                ctx.out.rcx = e.rcx
            if e.rdx is not None:
                ctx.out.rdx = e.rdx
            raise
        return None

    handler.__name__ = handler.__qualname__ = getattr(fn, "__name__", "td_leaf")
    return LeafSpec(int(leaf), handler, max_version)
