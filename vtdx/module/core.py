"""The TDX module model: state, the SEAMCALL dispatcher and the per-call context.

``TdxModule.seamcall(lp, regs)`` is the single entry point. It mirrors
tdx_vmm_dispatcher.c: decode RAX into leaf and version, reject reserved bits and unsupported
versions with TDX_OPERAND_INVALID | RAX, refuse everything but TDH.SYS.LP.SHUTDOWN after
shutdown, refuse non-SYS leaves before the module is ready (TDX_SYS_NOT_READY), and answer an
unknown leaf with TDX_OPERAND_INVALID | RAX. Handlers live in one file per leaf family and are
found through ``vtdx.module.families.FAMILIES``.

Concurrency: every handler runs holding ``module.cond`` (the module mutex), so model state is
never torn. TDX-level locks are try-locks taken through the ``CallContext`` and always
released when the call ends. A handler may call ``ctx.checkpoint(name)`` after taking its
locks; with a controller installed that can wait on ``module.cond`` (releasing the mutex) so
another LP's SEAMCALL runs and meets those locks.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from vtdx.abi import leaves as lv
from vtdx.abi import status as st
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, Controller, LeafSpec, Observer, copy_regs
from vtdx.module.errors import TdxError
from vtdx.module.faults import FaultInjector
from vtdx.module.leaves import leaf_table
from vtdx.module.locks import LockTable
from vtdx.module.pamt import PamtManager
from vtdx.module.state import LpState, SysState
from vtdx.platform.memory import PhysMemory
from vtdx.platform.profile import Profile

MASK64 = (1 << 64) - 1
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
        self.controller: Controller | None = None
        # TD engineer: control points (pause at ctx.checkpoint, residency); idle = no-op.
        from vtdx.module.control import attach as attach_controller

        self.control = attach_controller(self)
        self.pamt = PamtManager(profile.pamt_entry_sizes)
        self._observers: list[Observer] = []
        self._ids = itertools.count(1)
        #: Unexpected exceptions inside handlers (model bugs); the call still returns a status.
        self.internal_errors: deque[str] = deque(maxlen=32)
        #: Callbacks run by ``reset`` (TD state owners register here).
        self.reset_hooks: list[Callable[[], None]] = []
        #: Free-form per-family state (e.g. TD engineer's TD table) keyed by family name.
        self.ext: dict[str, Any] = {}
        self.call_counts: dict[int, int] = {}
        self.status_counts: dict[int, int] = {}
        self._table: dict[int, LeafSpec] = leaf_table()
        self.reset()

    # -- registration ----------------------------------------------------------------------
    def register(self, spec: LeafSpec) -> None:
        self._table[spec.leaf] = spec

    @property
    def leaves(self) -> dict[int, LeafSpec]:
        return dict(self._table)

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after the module is loaded (also what TDH.SYS.DISABLE leaves)."""
        p = self.profile
        self.state = SysState.SYSINIT_PENDING
        self.sys_attributes = 0
        self.lps = [LpState(i, p.package_of(i)) for i in range(p.num_lps)]
        self.num_init_lps = 0
        self.pkg_config: set[int] = set()
        self.global_keyid: int | None = None
        self.dynamic_pamt_enabled = False
        self.locks.clear()
        self.pamt.reset()
        self.cachewb_intr: dict[int, int] = {}
        #: Key ownership table: keyid -> KOT_* state (absent = KOT_FREE), and per keyid the
        #: packages that still need a cache write-back before the keyid can be freed.
        self.kot: dict[int, int] = {}
        self.kot_wbinvd: dict[int, set[int]] = {}
        for hook in self.reset_hooks:
            hook()

    @property
    def dynamic_pamt_enabled(self) -> bool:
        """Dynamic PAMT (TDH.SYS.CONFIG); held by the PAMT manager, whose walk depends on it."""
        return self.pamt.dynamic

    @dynamic_pamt_enabled.setter
    def dynamic_pamt_enabled(self, value: bool) -> None:
        self.pamt.dynamic = bool(value)

    @property
    def max_pa(self) -> int:
        return self.profile.phys_bits

    def hkid_of(self, pa: int) -> int:
        p = self.profile
        return (pa >> p.hkid_start_bit) & ((1 << p.keyid_bits) - 1)

    def is_private_hkid(self, hkid: int) -> bool:
        p = self.profile
        return p.tdx_keyid_start <= hkid < p.tdx_keyid_end

    def pa_ok(self, pa: int) -> bool:
        """Below MAX_PA and no keyid bits (the module's is_pa_smaller_than_max_pa + hkid 0)."""
        return pa < (1 << self.max_pa) and self.hkid_of(pa) == 0

    def shared_hpa_ok(self, pa: int, align: int) -> bool:
        """shared_hpa_check_with_pwr_2_alignment() in helpers.c (there is no SEAMRR in RAM)."""
        return (pa & (align - 1)) == 0 and pa < (1 << self.max_pa) and (
            self.hkid_of(pa) < self.profile.tdx_keyid_start)

    # -- entry point -----------------------------------------------------------------------
    def add_observer(self, cb: Observer) -> None:
        self._observers.append(cb)

    def remove_observer(self, cb: Observer) -> None:
        if cb in self._observers:
            self._observers.remove(cb)

    def seamcall(self, lp: int, regs: Regs) -> Regs:
        """Run one SEAMCALL from logical processor ``lp``; never raises."""
        t0 = time.perf_counter()
        out = copy_regs(regs)
        rax = regs.rax
        leaf = rax & 0xFFFF
        with self.cond:
            try:
                status = self._dispatch(lp, leaf, (rax >> 16) & 0xFF, rax, regs, out)
            except Exception:  # a model bug must not take the daemon down
                self.internal_errors.append(traceback.format_exc())
                status = _OPERAND_INVALID_RAX
            out.rax = status & MASK64
            self.call_counts[leaf] = self.call_counts.get(leaf, 0) + 1
            self.status_counts[out.rax] = self.status_counts.get(out.rax, 0) + 1
        if self._observers:
            dt = time.perf_counter() - t0
            for cb in tuple(self._observers):
                try:
                    cb(lp, leaf, regs, out, dt)
                except Exception:
                    self.internal_errors.append(traceback.format_exc())
        return out

    def _dispatch(self, lp: int, leaf: int, version: int, rax: int, regs: Regs,
                  out: Regs) -> int:
        if rax & _RESERVED_RAX:
            return _OPERAND_INVALID_RAX
        spec = self._table.get(leaf)
        if version and (spec is None or version > spec.max_version):
            return _OPERAND_INVALID_RAX
        state = self.state
        if state == SysState.SYS_SHUTDOWN and leaf != _LP_SHUTDOWN:
            return st.TDX_SYS_SHUTDOWN
        if state != SysState.SYS_READY and leaf not in _ALLOWED_BEFORE_READY:
            return st.TDX_SYS_NOT_READY
        if spec is None:
            return _OPERAND_INVALID_RAX
        if not 0 <= lp < len(self.lps):
            # Cannot happen on hardware (vtdx-specific): an LP the profile does not have.
            return _OPERAND_INVALID_RAX
        if self.faults.active:
            injected = self.faults.check(lp, leaf)
            if injected is not None:
                return injected
        ctx = CallContext(self, lp, leaf, version, regs, out, next(self._ids))
        lp_state = ctx.lp_state
        lp_state.busy = True
        try:
            result = spec.handler(ctx)
            return st.TDX_SUCCESS if result is None else result
        except TdxError as e:
            return e.status
        finally:
            ctx.release_all()
            lp_state.busy = False

    # -- inspection (plain data) ----------------------------------------------------------
    def lp_states(self) -> list[dict[str, object]]:
        with self.cond:
            return [s.to_dict() for s in self.lps]

    def tdmrs(self) -> list[dict[str, object]]:
        with self.cond:
            return [t.to_dict() for t in self.pamt.tdmrs]

    def pamt_entry(self, pa: int) -> dict[str, object]:
        """PAMT view of the 4K page at ``pa``: entries at each level and the TDMR."""
        from vtdx.module.pamt import LEVEL_NAMES, LEVELS

        with self.cond:
            t = self.pamt.tdmr_for(pa)
            return {
                "pa": pa, "tdmr": t.index if t else None,
                "ready": self.pamt.block_ready(pa),
                "levels": {LEVEL_NAMES[x]: self.pamt.get(pa, x).to_dict() for x in LEVELS},
            }

    def pamt_entry_by_pfn(self, pfn: int) -> dict[str, object]:
        return self.pamt_entry(pfn << 12)

    def keyids(self) -> dict[str, object]:
        p = self.profile
        with self.cond:
            return {"global": self.global_keyid, "tdx_start": p.tdx_keyid_start,
                    "tdx_end": p.tdx_keyid_end, "mktme": p.mktme_keyids,
                    "configured_packages": sorted(self.pkg_config)}

    def snapshot(self) -> dict[str, object]:
        """Everything an inspector wants, as plain Python data."""
        from vtdx.abi.leaves import leaf_name

        with self.cond:
            return {
                "state": self.state.name,
                "lps": [s.to_dict() for s in self.lps],
                "num_init_lps": self.num_init_lps,
                "keyids": {"global": self.global_keyid,
                           "configured_packages": sorted(self.pkg_config)},
                "dynamic_pamt": self.dynamic_pamt_enabled,
                "tdmrs": [t.to_dict() for t in self.pamt.tdmrs],
                "pamt_bytes": self.pamt.pamt_bytes_by_level(),
                "pamt_materialised_entries": self.pamt.materialised,
                "locks": self.locks.snapshot(),
                "call_counts": {leaf_name(k): v for k, v in sorted(self.call_counts.items())},
                "faults": self.faults.snapshot(),
                "internal_errors": len(self.internal_errors),
            }
