"""The TDX module model: the SEAMCALL dispatcher over one ``ModuleState``.

``TdxModule.seamcall(lp, regs)`` is the single entry point. It mirrors
tdx_vmm_dispatcher.c: decode RAX into leaf and version, reject reserved bits and unsupported
versions with TDX_OPERAND_INVALID | RAX, refuse everything but TDH.SYS.LP.SHUTDOWN after
shutdown, refuse non-SYS leaves before the module is ready (TDX_SYS_NOT_READY), and answer an
unknown leaf with TDX_OPERAND_INVALID | RAX. Handlers live in one file per leaf family and are
listed in ``vtdx.module.leaves`` (see ``vtdx.module.context`` for their one shape).

State: everything the model keeps is in ``module.gd`` (a ``ModuleState``), replaced as a whole
by ``reset()``. Observation: ``module.events`` (``vtdx.module.events``) and ``module.stats``.

Concurrency: every handler runs holding ``module.cond`` (the module mutex), so model state is
never torn. TDX-level locks are try-locks taken through the ``CallContext`` and always
released when the call ends. A control point (``CheckpointReached`` subscriber) may wait on
``module.cond`` (releasing the mutex) so another LP's SEAMCALL runs and meets those locks:
pauses and the timing model (``module.control``, ``vtdx.module.timing``) do that. A call
that fails with BUSY is reported to ``module.contention`` when one is attached.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque

from vtdx.abi import leaves as lv
from vtdx.abi import status as st
from vtdx.abi.regs import MASK64, Regs
from vtdx.module.contention import ContentionLog
from vtdx.module.context import CallContext, LeafSpec, copy_regs
from vtdx.module.control import Controller
from vtdx.module.engine.hostram import HostRam
from vtdx.module.errors import TdxError
from vtdx.module.events import CallObserved, CheckpointReached, EventBus, FaultInjected
from vtdx.module.faults import FaultInjector
from vtdx.module.leaves import leaf_table
from vtdx.module.locks import LockTable
from vtdx.module.pamt import LEVEL_NAMES, LEVELS, PAGE_4K, PamtManager
from vtdx.module.state import SEPT_ROOT_PAGE_INDEX, LpState, ModuleState, SysState
from vtdx.module.stats import CallStats
from vtdx.platform.memory import PhysMemory
from vtdx.platform.profile import Profile

_RESERVED_RAX = lv.RESERVED_MASK
_ALLOWED_BEFORE_READY = frozenset(int(x) for x in lv.ALLOWED_BEFORE_READY)
_LP_SHUTDOWN = int(lv.Leaf.TDH_SYS_LP_SHUTDOWN)
_OPERAND_INVALID_RAX = st.TDX_OPERAND_INVALID + st.OPERAND_ID_RAX



class TdxModule:
    """A model of Intel's TDX module for one platform profile and one physical memory."""

    def __init__(self, profile: Profile, memory: PhysMemory) -> None:
        self.profile = profile
        self.memory = memory
        self.cond = threading.Condition()
        self.locks = LockTable()
        self.faults = FaultInjector()
        self.events = EventBus()
        self.stats = CallStats()
        #: Control points: pauses and residency time (a ``CheckpointReached`` subscriber).
        self.control = Controller(self.cond, self.events)
        #: BUSY statuses explained (``vtdx.module.contention``), when attached.
        self.contention: ContentionLog | None = None
        # Address and size facts of the profile (immutable for the module's life).
        #: MAX_PA: first physical address above the platform's address width.
        self.max_pa = 1 << profile.phys_bits
        self.keyid_shift = profile.hkid_start_bit
        self.hkid_mask = ((1 << profile.keyid_bits) - 1) << self.keyid_shift
        #: TDCS pages the module reports (TDCS_BASE_SIZE); ADDCX fills exactly this many.
        self.min_tdcs = max(SEPT_ROOT_PAGE_INDEX + 1, profile.tdcs_base_size // PAGE_4K)
        self.min_tdvps = max(1, profile.tdvps_base_size // PAGE_4K)
        self._ids = itertools.count(1)
        #: Unexpected exceptions inside handlers (model bugs); the call still returns a status.
        self.internal_errors: deque[str] = deque(maxlen=32)
        self._table: dict[int, LeafSpec] = leaf_table()
        #: Leaves the dispatcher lets through with any version (the generation's list in
        #: tdx_vmm_dispatcher.c); each of them rejects versions it lacks itself.
        self._multi_version = frozenset(leaf for leaf, v in profile.gen.leaf_versions if v)
        #: All model state, named after the module's global data (tdx_global_data_t, reached
        #: through get_global_data() in the module); replaced as a whole by ``reset``.
        self.gd = ModuleState(profile)
        #: Host RAM mapped once for every TD vCPU engine (``vtdx.module.td_engine.host_ram``).
        self.host_ram: HostRam | None = None

    # -- registration ----------------------------------------------------------------------
    @property
    def leaves(self) -> dict[int, LeafSpec]:
        return dict(self._table)

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after the module is loaded (also what TDH.SYS.DISABLE leaves)."""
        self.locks.clear()
        self.gd = ModuleState(self.profile)

    # Read-only views of ``gd`` most callers want.
    @property
    def state(self) -> SysState:
        return self.gd.sys_state

    @property
    def lps(self) -> list[LpState]:
        return self.gd.lps

    @property
    def pamt(self) -> PamtManager:
        return self.gd.pamt

    @property
    def num_init_lps(self) -> int:
        return self.gd.num_init_lps

    @property
    def global_keyid(self) -> int | None:
        return self.gd.global_keyid

    @property
    def pkg_config(self) -> set[int]:
        return self.gd.pkg_config

    @property
    def kot(self) -> dict[int, int]:
        return self.gd.kot

    @property
    def dynamic_pamt_enabled(self) -> bool:
        """Dynamic PAMT (TDH.SYS.CONFIG); held by the PAMT manager, whose walk depends on it."""
        return self.gd.pamt.dynamic

    @property
    def controller(self) -> Controller:
        """The control-point controller (same object as ``control``)."""
        return self.control

    def hkid_of(self, pa: int) -> int:
        return (pa & self.hkid_mask) >> self.keyid_shift

    def is_private_hkid(self, hkid: int) -> bool:
        p = self.profile
        return p.tdx_keyid_start <= hkid < p.tdx_keyid_end

    def pa_ok(self, pa: int) -> bool:
        """Below MAX_PA and no keyid bits (the module's is_pa_smaller_than_max_pa + hkid 0)."""
        return pa < self.max_pa and self.hkid_of(pa) == 0

    def shared_hpa_ok(self, pa: int, align: int) -> bool:
        """shared_hpa_check_with_pwr_2_alignment() in helpers.c (there is no SEAMRR in RAM)."""
        return (pa & (align - 1)) == 0 and pa < self.max_pa and (
            self.hkid_of(pa) < self.profile.tdx_keyid_start)

    # -- entry point -----------------------------------------------------------------------
    def seamcall(self, lp: int, regs: Regs) -> Regs:
        """Run one SEAMCALL from logical processor ``lp``; never raises."""
        t0 = time.perf_counter()
        out = copy_regs(regs)
        rax = regs.rax
        leaf = rax & 0xFFFF
        call_id = next(self._ids)
        with self.cond:
            try:
                status, injected = self._dispatch(lp, leaf, (rax >> 16) & 0xFF, rax, regs, out,
                                                  call_id)
            except Exception:  # a model bug must not take the daemon down
                self.internal_errors.append(traceback.format_exc())
                status, injected = _OPERAND_INVALID_RAX, False
            out.rax = status & MASK64
            dt = time.perf_counter() - t0
            self.stats.record(lp, leaf, out.rax, dt, injected)
        subs = self.events.calls
        if subs:
            ev = CallObserved(lp, leaf, regs, out, dt, call_id, injected)
            for cb in subs:
                try:
                    cb(ev)
                except Exception:
                    self.internal_errors.append(traceback.format_exc())
        return out

    def _dispatch(self, lp: int, leaf: int, version: int, rax: int, inp: Regs,
                  out: Regs, call_id: int) -> tuple[int, bool]:
        if rax & _RESERVED_RAX:
            return _OPERAND_INVALID_RAX, False
        spec = self._table.get(leaf)
        if version and leaf not in self._multi_version and (
                spec is None or version > spec.max_version):
            return _OPERAND_INVALID_RAX, False
        state = self.gd.sys_state
        if state == SysState.SYS_SHUTDOWN and leaf != _LP_SHUTDOWN:
            return st.TDX_SYS_SHUTDOWN, False
        if state != SysState.SYS_READY and leaf not in _ALLOWED_BEFORE_READY:
            return st.TDX_SYS_NOT_READY, False
        if spec is None:
            return _OPERAND_INVALID_RAX, False
        if not 0 <= lp < len(self.gd.lps):
            # Cannot happen on hardware (vtdx-specific): an LP the profile does not have.
            return _OPERAND_INVALID_RAX, False
        if self.faults.active:
            hit = self.faults.check(lp, leaf)
            if hit is not None:
                status, rule_id = hit
                subs = self.events.faults
                if subs:
                    ev = FaultInjected(lp, leaf, status, rule_id, call_id)
                    for cb in subs:
                        cb(ev)
                return status, True
        ctx = CallContext(self, lp, leaf, version, call_id)
        lp_state = ctx.lp_state
        lp_state.busy = True
        try:
            points = self.events.checkpoints
            if points:
                entry = CheckpointReached(lp, leaf, "entry", call_id, inp)
                for point_cb in points:
                    point_cb(entry)
                spec.handler(ctx, inp, out)
                ctx.checkpoint("done")  # committed, locks still held
            else:  # nobody watches control points: no event objects at all
                spec.handler(ctx, inp, out)
            return ctx.status, False
        except TdxError as e:
            if self.contention is not None:
                self.contention.on_busy(call_id, lp, leaf, e.status, inp)
            if e.rcx is not None:
                out.rcx = e.rcx
            if e.rdx is not None:
                out.rdx = e.rdx
            return e.status, False
        finally:
            ctx.release_all()
            lp_state.busy = False

    # -- inspection (plain data) ----------------------------------------------------------
    def lp_states(self) -> list[dict[str, object]]:
        with self.cond:
            return [s.to_dict() for s in self.gd.lps]

    def tdmrs(self) -> list[dict[str, object]]:
        with self.cond:
            return [t.to_dict() for t in self.gd.pamt.tdmrs]

    def pamt_entry(self, pa: int) -> dict[str, object]:
        """PAMT view of the 4K page at ``pa``: entries at each level and the TDMR."""
        with self.cond:
            pamt = self.gd.pamt
            t = pamt.tdmr_for(pa)
            return {
                "pa": pa, "tdmr": t.index if t else None,
                "ready": pamt.block_ready(pa),
                "levels": {LEVEL_NAMES[x]: pamt.get(pa, x).to_dict() for x in LEVELS},
            }

    def pamt_entry_by_pfn(self, pfn: int) -> dict[str, object]:
        return self.pamt_entry(pfn << 12)

    def keyids(self) -> dict[str, object]:
        p = self.profile
        with self.cond:
            return {"global": self.gd.global_keyid, "tdx_start": p.tdx_keyid_start,
                    "tdx_end": p.tdx_keyid_end, "mktme": p.mktme_keyids,
                    "configured_packages": sorted(self.gd.pkg_config)}

    def snapshot(self) -> dict[str, object]:
        """Everything an inspector wants, as plain Python data."""
        with self.cond:
            gd = self.gd
            return {
                "state": gd.sys_state.name,
                "lps": [s.to_dict() for s in gd.lps],
                "num_init_lps": gd.num_init_lps,
                "keyids": {"global": gd.global_keyid,
                           "configured_packages": sorted(gd.pkg_config)},
                "dynamic_pamt": gd.pamt.dynamic,
                "tdmrs": [t.to_dict() for t in gd.pamt.tdmrs],
                "pamt_bytes": gd.pamt.pamt_bytes_by_level(),
                "pamt_materialised_entries": gd.pamt.materialised,
                "locks": self.locks.snapshot(),
                "call_counts": {lv.leaf_name(k): v
                                for k, v in sorted(self.stats.calls_by_leaf().items())},
                "faults": self.faults.snapshot(),
                "internal_errors": len(self.internal_errors),
            }
