"""Read-only views of the TDX module model as plain dicts: what QMP and the console show.

On hardware the PAMT and S-EPT are encrypted; here every query reads the model under the
module mutex, so an answer is one consistent snapshot (with the machine paused through QMP,
nothing moves between two queries either). Queries never mutate the model: the S-EPT is
walked with ``peek``, PAMT defaults are computed instead of materialised.

Large answers are aggregated, not enumerated: the PAMT summary of a 6 GiB machine is
computed from the TDMR geometry plus the sparse entries that differ from their defaults,
never by visiting 1.5 M page frames.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from vtdx.abi import leaves
from vtdx.abi import status as st
from vtdx.module import pamt as P
from vtdx.module import sept as SEPT
from vtdx.module.contention import BusyRecord, ContentionLog
from vtdx.module.control import POINTS, PauseHandle
from vtdx.module.engine.exits import exit_reason_name
from vtdx.module.events import CallObserved, CheckpointReached
from vtdx.module.locks import HeldLock as ModuleHeldLock
from vtdx.module.locks import septe_key
from vtdx.module.state import LIFECYCLE_NAMES, OP_STATE_NAMES, TdState, VcpuState
from vtdx.module.timing import MODES, make_timing
from vtdx.observe.answers import (
    BusyReport,
    ContentionAnswer,
    ContentionCall,
    ContentionRow,
    DpamtInfo,
    FaultRuleInfo,
    HeldLock,
    InflightCallInfo,
    InjectAnswer,
    InjectClearAnswer,
    LockHolder,
    LocksAnswer,
    LockState,
    PamtLevel,
    PamtPage,
    PamtRow,
    PamtSummary,
    PamtSummaryTdmr,
    PauseInfo,
    ResumeAnswer,
    SeptAnswer,
    SeptStep,
    TdInfo,
    TdmrInfo,
    TimingInfo,
    TraceRecord,
    VcpuInfo,
    VtdxStats,
    VtdxStatus,
)
from vtdx.observe.trace import TraceRecorder

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

#: Upper bound of page frames one ``query-vtdx-pamt`` range returns (keeps replies small).
MAX_PAMT_RANGE = 4096
#: Upper bound of S-EPT leaf mappings one ``query-vtdx-sept`` lists.
MAX_SEPT_LIST = 4096


class InspectError(Exception):
    """A query argument that names nothing (unknown TD, page outside every TDMR...)."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls


# --------------------------------------------------------------------------- hooks


@dataclass(slots=True)
class InflightCall:
    call_id: int
    lp: int
    leaf: int
    point: str
    since: float

    def to_dict(self) -> InflightCallInfo:
        return {"call": self.call_id, "lp": self.lp, "leaf": leaves.leaf_name(self.leaf),
                "point": self.point, "waiting-s": round(time.monotonic() - self.since, 3)}


class InflightTracker:
    """Which calls wait inside the module, from its ``CheckpointReached`` events.

    Another thread can only see TDX locks held while their call waits at a control point
    (otherwise the call holds the module mutex and no query runs), so this registry names
    every lock holder a query can meet: call id -> LP, leaf, point. A call leaves the
    registry when its ``CallObserved`` event arrives (right after it released its locks).
    """

    def __init__(self, module: TdxModule) -> None:
        self.module = module
        self.calls: dict[int, InflightCall] = {}
        module.events.subscribe(CheckpointReached, self.on_checkpoint)
        module.events.subscribe(CallObserved, self.on_call)

    def on_checkpoint(self, ev: CheckpointReached) -> None:
        self.calls[ev.call_id] = InflightCall(ev.call_id, ev.lp, ev.leaf, ev.point,
                                              time.monotonic())

    def on_call(self, ev: CallObserved) -> None:
        self.calls.pop(ev.call_id, None)

    def detach(self) -> None:
        self.module.events.unsubscribe(CheckpointReached, self.on_checkpoint)
        self.module.events.unsubscribe(CallObserved, self.on_call)


# --------------------------------------------------------------------------- helpers


def _names(mapping: dict[int, str], value: int) -> str:
    return mapping.get(value, str(value))


def _pt_name(pt: int) -> str:
    """``PT_REG`` style."""
    return P.PAGE_TYPE_NAMES.get(pt, f"PT_{pt}")


# --------------------------------------------------------------------------- inspector


class Inspector:
    """Queries over one module (and optionally its trace) returning plain data."""

    def __init__(
        self,
        module: TdxModule,
        recorder: TraceRecorder | None = None,
        tracker: InflightTracker | None = None,
        contention: ContentionLog | None = None,
    ) -> None:
        self.module = module
        self.recorder = recorder
        self.tracker = tracker
        self.contention = contention

    @classmethod
    def attach(cls, module: TdxModule, recorder: TraceRecorder | None = None) -> Inspector:
        """Subscribe the in-flight tracker, the contention log (and the trace recorder, if
        any) to the module."""
        tracker = InflightTracker(module)
        if recorder is not None:
            recorder.attach(module)
        log = module.contention or ContentionLog().attach(module)
        return cls(module, recorder, tracker, log)

    @property
    def lock(self) -> threading.Condition:
        return self.module.cond

    # -- status -----------------------------------------------------------------------

    def status(self) -> VtdxStatus:
        m = self.module
        p = m.profile
        with self.lock:
            out: VtdxStatus = {
                "state": m.state.name,
                "num-lps": p.num_lps,
                "num-init-lps": m.num_init_lps,
                "lps": [
                    {"lp": s.lp, "package": s.package, "initialized": s.initialized,
                     "in-call": s.busy}
                    for s in m.lps
                ],
                "keyids": {
                    "mktme": p.mktme_keyids,
                    "tdx-start": p.tdx_keyid_start,
                    "tdx-count": p.tdx_keyids,
                    "global": m.global_keyid,
                    "configured-packages": sorted(m.pkg_config),
                },
                "dynamic-pamt": bool(m.dynamic_pamt_enabled),
                "tdmrs": len(m.pamt.tdmrs),
                "pamt-bytes": sum(m.pamt.pamt_bytes_by_level().values()),
                "ram-bytes": p.ram_bytes,
                "tds": len(m.gd.tds),
                "held-locks": len(m.locks),
                "fault-rules": len(m.faults.rules),
                "internal-errors": len(m.internal_errors),
                "timing": cast(TimingInfo, m.control.describe()),
            }
            if p.name:
                out["profile"] = p.name
            out["features"] = [f"{'+' if on else '-'}{n}" for n, on in p.features.items()]
        if self.recorder is not None:
            s = self.recorder.stats()
            out["seamcalls"] = s["calls"]
            out["seamcall-errors"] = s["errors"]
        return out

    def tdmrs(self) -> list[TdmrInfo]:
        with self.lock:
            out: list[TdmrInfo] = []
            for t in self.module.pamt.tdmrs:
                out.append({
                    "index": t.index,
                    "base": t.base,
                    "size": t.size,
                    "end": t.end,
                    "pamt": [
                        {"level": P.LEVEL_NAMES[lv], "base": t.pamt_base[lv],
                         "size": t.pamt_size[lv]}
                        for lv in P.LEVELS
                    ],
                    "reserved": [{"base": t.base + o, "size": s} for o, s in t.reserved],
                    "initialized-up-to": t.next_init,
                    "initialized": t.done,
                })
            return out

    # -- PAMT ---------------------------------------------------------------------------

    def pamt_page(self, pa: int) -> PamtPage:
        """Every level of the PAMT for the 4K page at ``pa``, with lock holders."""
        m = self.module
        pa &= ~0xFFF
        with self.lock:
            t = m.pamt.tdmr_for(pa)
            if t is None:
                raise InspectError(f"page 0x{pa >> 12:x} (PA 0x{pa:x}) is not in any TDMR")
            locks = self._lock_index()
            levels: list[PamtLevel] = []
            effective = P.LEVEL_4K
            for lv in (P.LEVEL_1G, P.LEVEL_2M, P.LEVEL_4K):
                e = m.pamt.get(pa, lv)
                base = pa & ~(P.PAGE_SIZE[lv] - 1)
                levels.append({
                    "level": P.LEVEL_NAMES[lv],
                    "base": base,
                    "pt": e.pt,
                    "pt-name": _pt_name(e.pt),
                    "owner": e.owner,
                    "bepoch": e.bepoch,
                    "materialised": (base >> P.SHIFT[lv]) in m.pamt.entries(lv),
                    "lock": self._pamt_lock(locks, lv, base),
                })
                if e.pt == P.PT_REG and lv != P.LEVEL_4K and effective == P.LEVEL_4K:
                    effective = lv
            out: PamtPage = {
                "pfn": pa >> 12,
                "pa": pa,
                "tdmr": t.index,
                "initialized": m.pamt.block_ready(pa),
                "reserved": t.is_reserved(pa),
                "levels": levels,
                "walk-level": P.LEVEL_NAMES[effective],
            }
            dpamt = self._dpamt_of(pa)
            if dpamt is not None:
                out["dpamt"] = dpamt
            return out

    def pamt_range(self, pa: int, count: int) -> list[PamtRow]:
        """Compact rows (effective entry) for ``count`` consecutive 4K pages from ``pa``."""
        if not 1 <= count <= MAX_PAMT_RANGE:
            raise InspectError(f"count must be within 1..{MAX_PAMT_RANGE}")
        m = self.module
        pa &= ~0xFFF
        rows: list[PamtRow] = []
        with self.lock:
            locks = self._lock_index()
            for i in range(count):
                a = pa + (i << 12)
                t = m.pamt.tdmr_for(a)
                if t is None:
                    rows.append({"pfn": a >> 12, "tdmr": None})
                    continue
                lv, e = self._effective(a)
                row: PamtRow = {"pfn": a >> 12, "tdmr": t.index, "level": P.LEVEL_NAMES[lv],
                       "pt-name": _pt_name(e.pt), "owner": e.owner, "bepoch": e.bepoch}
                lk = self._pamt_lock(locks, lv, a & ~(P.PAGE_SIZE[lv] - 1))
                if lk is not None:
                    row["lock"] = lk
                rows.append(row)
        return rows

    def _effective(self, pa: int) -> tuple[int, P.PamtEntry]:
        """The entry pamt_walk() stops at (PamtManager.leaf: a huge page, or with Dynamic
        PAMT a 2M range without a page pair), else the 4K entry."""
        return self.module.pamt.leaf(pa)

    def pamt_summary(self) -> PamtSummary:
        """Pages per level and page type, per TDMR and in total.

        Cost follows the materialised (non-default) entries, not the page frames: each
        TDMR starts from its geometry (all PT_NDA, reserved 4K pages PT_RSVD) and the
        sorted sparse entries inside it replace their defaults.
        """
        pm = self.module.pamt
        with self.lock:
            tdmrs = list(pm.tdmrs)
            per_tdmr: list[PamtSummaryTdmr] = [
                {"index": t.index, "base": t.base, "size": t.size, "initialized": t.done,
                 "initialized-up-to": t.next_init, "pamt-bytes": sum(t.pamt_size),
                 "levels": {}}
                for t in tdmrs
            ]
            totals: dict[str, Counter[str]] = {n: Counter() for n in P.LEVEL_NAMES}
            for lv in P.LEVELS:
                shift = P.SHIFT[lv]
                entries = pm.entries(lv)
                keys = sorted(entries)
                for t, out in zip(tdmrs, per_tdmr, strict=True):
                    lo = bisect.bisect_left(keys, t.base >> shift)
                    hi = bisect.bisect_left(keys, t.end >> shift)
                    c: Counter[int] = Counter(entries[k].pt for k in keys[lo:hi])
                    pages = t.size >> shift
                    rsvd = in_rsvd = 0
                    if lv == P.LEVEL_4K:  # only 4K entries default to PT_RSVD
                        for off, sz in t.reserved:
                            rsvd += sz >> 12
                            a = (t.base + off) >> 12
                            in_rsvd += (bisect.bisect_left(keys, a + (sz >> 12), lo, hi)
                                        - bisect.bisect_left(keys, a, lo, hi))
                    c[P.PT_RSVD] += rsvd - in_rsvd
                    c[P.PT_NDA] += pages - rsvd - ((hi - lo) - in_rsvd)
                    named = {_pt_name(k): v for k, v in sorted(c.items()) if v}
                    totals[P.LEVEL_NAMES[lv]].update(named)
                    out["levels"][P.LEVEL_NAMES[lv]] = {"pages": pages, "types": named}
            return {
                "tdmrs": per_tdmr,
                "totals": {k: dict(v) for k, v in totals.items()},
                "pamt-bytes": sum(sum(t.pamt_size) for t in tdmrs),
                "pamt-bytes-by-level": pm.pamt_bytes_by_level(),
                "materialised-entries": pm.materialised,
                "dynamic-pamt": bool(self.module.dynamic_pamt_enabled),
            }

    def _dpamt_of(self, pa: int) -> DpamtInfo | None:
        """Dynamic PAMT view of ``pa``: the page pair backing its 2M range (the PT_PAMT
        node), the range's 4K refcount, and whether ``pa`` itself serves as a PAMT page."""
        if not self.module.dynamic_pamt_enabled:
            return None
        pamt = self.module.pamt
        base = pa & ~(P.PAGE_SIZE[P.LEVEL_2M] - 1)
        info: DpamtInfo = {"range": base, "pair": [], "page-count": 0,
                                "is-pamt-page": pamt.bitmap_get(pa)}
        node = pamt.node(pa)
        if node is not None:
            info["pair"] = [node.hpa0, node.hpa1]
            info["page-count"] = node.page_count
        return info

    # -- locks ---------------------------------------------------------------------------

    def _holder(self, owner: int) -> LockHolder:
        if self.tracker is not None:
            call = self.tracker.calls.get(owner)
            if call is not None:
                return cast(LockHolder, call.to_dict())
        return {"call": owner}

    def _lock_index(self) -> dict[str, ModuleHeldLock]:
        """Held locks by ``str(key)`` (the LockTable's public snapshot form)."""
        return {d["key"]: d for d in self.module.locks.snapshot()}

    def _pamt_lock(
        self, index: dict[str, ModuleHeldLock], level: int, base: int
    ) -> LockState | None:
        d = index.get(str(P.pamt_key(level, base)))
        if d is None:
            return None
        return {"mode": d["mode"], "holders": [self._holder(o) for o in d["owners"]]}

    def locks(self) -> LocksAnswer:
        with self.lock:
            held: list[HeldLock] = []
            for d in self.module.locks.snapshot():
                held.append({"key": d["key"], "mode": d["mode"],
                             "holders": [self._holder(o) for o in d["owners"]]})
            # list() copies in one step: a finished call leaves the registry without the mutex
            inflight = ([c.to_dict() for c in list(self.tracker.calls.values())]
                        if self.tracker is not None else [])
            return {"held": held, "waiting-calls": inflight}

    # -- TDs and S-EPT ------------------------------------------------------------------

    def tds(self) -> list[TdInfo]:
        with self.lock:
            return [self._td_dict(td) for _, td in sorted(self.module.gd.tds.items())]

    def _td_dict(self, td: TdState) -> TdInfo:
        sept = td.sept
        leaves_by_level: Counter[str] = Counter()
        if sept is not None:
            for _gpa, lvl, _e in sept.leaves():
                leaves_by_level[P.LEVEL_NAMES[lvl] if lvl < 3 else str(lvl)] += 1
        return {
            "tdr": td.tdr_pa,
            "hkid": td.hkid,
            "lifecycle": _names(LIFECYCLE_NAMES, td.lifecycle),
            "op-state": _names(OP_STATE_NAMES, td.op_state),
            "fatal": td.fatal,
            "finalized": td.finalized,
            "tdcx": list(td.tdcx),
            "child-pages": td.chldcnt,
            "max-vcpus": td.max_vcpus,
            "vcpus": [_vcpu_dict(v) for _, v in sorted(td.vcpus.items())],
            "attributes": td.attributes,
            "xfam": td.xfam,
            "td-epoch": td.td_epoch,
            "sept": None if sept is None else {
                "root-level": sept.root_level,
                "pages": len(sept.pages),
                "leaves": dict(leaves_by_level),
            },
        }

    def _find_td(self, td: int) -> TdState:
        tds = self.module.gd.tds
        if not tds:
            raise InspectError("no TD exists", "DeviceNotFound")
        if td in tds:
            return tds[td]
        ordered = [v for _, v in sorted(tds.items())]
        if 0 <= td < len(ordered):  # small numbers: the TD's position in query-vtdx-tds
            return ordered[td]
        raise InspectError(f"no TD with TDR 0x{td:x} (query-vtdx-tds lists them)",
                           "DeviceNotFound")

    def sept(self, td: int, gpa: int | None = None, count: int = 256) -> SeptAnswer:
        """One GPA's S-EPT walk (every level), or the TD's leaf mappings."""
        with self.lock:
            t = self._find_td(td)
            tree = t.sept
            if tree is None:
                raise InspectError(f"TD 0x{t.tdr_pa:x} has no S-EPT yet (TDH.MNG.INIT)")
            if gpa is not None:
                return {"tdr": t.tdr_pa, "gpa": gpa, "walk": self._walk(t, gpa)}
            if not 1 <= count <= MAX_SEPT_LIST:
                raise InspectError(f"count must be within 1..{MAX_SEPT_LIST}")
            mappings = sorted(tree.leaves(), key=lambda x: x[0])
            return {
                "tdr": t.tdr_pa,
                "root-level": tree.root_level,
                "pages": len(tree.pages),
                "leaves": len(mappings),
                "mappings": [
                    {"gpa": g, "level": P.LEVEL_NAMES[lv] if lv < 3 else str(lv),
                     "state": _names(SEPT.STATE_NAMES, e.state), "hpa": e.hpa}
                    for g, lv, e in mappings[:count]
                ],
            }

    def _walk(self, td: Any, gpa: int) -> list[SeptStep]:
        """secure_ept_walk without side effects: absent entries read as FREE."""
        tree = td.sept
        out: list[SeptStep] = []
        page = tree.root
        lvl = tree.root_level
        locks = self._lock_index()
        while True:
            idx = SEPT.entry_index(gpa, lvl)
            e = page.peek(idx)
            state = e.state if e is not None else SEPT.FREE
            hpa = e.hpa if e is not None else 0
            row: SeptStep = {
                "level": lvl, "sept-page": page.hpa, "index": idx,
                "state": _names(SEPT.STATE_NAMES, state), "hpa": hpa,
            }
            d = locks.get(str(septe_key(page.hpa, idx)))
            if d is not None:
                row["lock"] = {"mode": d["mode"],
                               "holders": [self._holder(o) for o in d["owners"]]}
            out.append(row)
            if lvl == 0 or state not in SEPT.RWX_STATES or (e is not None and e.is_leaf):
                return out
            nxt = tree.pages.get(hpa)
            if nxt is None:
                return out
            page = nxt
            lvl -= 1

    # -- trace, stats, faults -----------------------------------------------------------

    def trace(self, count: int = 20, leaf: int | None = None, lp: int | None = None,
              errors: bool = False) -> list[TraceRecord]:
        if self.recorder is None:
            raise InspectError("tracing is off in this daemon")
        recs = self.recorder.last(count, leaf=leaf, lp=lp, errors=errors)
        return cast(list[TraceRecord], recs)

    def stats(self) -> VtdxStats:
        """The module's call statistics, with totals per status and the PAMT footprint."""
        m = self.module
        with self.lock:
            out = cast(VtdxStats, m.stats.as_dict())
            out["statuses"] = {st.decode(k): v for k, v in sorted(m.stats.by_status().items())}
            out["pamt-materialised-entries"] = m.pamt.materialised
        return out

    def inject(self, status: int, leaf: int | None = None, count: int | None = None,
               probability: float = 1.0, lps: list[int] | None = None) -> InjectAnswer:
        if not st.is_known(status) or (st.base(status) == st.TDX_SUCCESS and status):
            raise InspectError(f"0x{status:x} is not a status the TDX module returns "
                               "(see vtdx/abi/status.py)")
        if leaf is not None and leaf not in self.module.leaves:
            raise InspectError(f"leaf {leaf} is not implemented by the module")
        if lps is not None:
            bad = [x for x in lps if not 0 <= x < len(self.module.lps)]
            if bad:
                raise InspectError(f"no such LP: {bad} (the machine has "
                                   f"{len(self.module.lps)})")
        rid = self.module.faults.add(status, leaf, count=count, probability=probability,
                                     lps=set(lps) if lps is not None else None)
        return {"id": rid, "status-name": st.decode(status)}

    def inject_clear(self, rule_id: int | None = None) -> InjectClearAnswer:
        faults = self.module.faults
        if rule_id is None:
            n = len(faults.rules)
            faults.clear()
            return {"removed": n}
        if not faults.remove(rule_id):
            raise InspectError(f"no fault rule {rule_id}")
        return {"removed": 1}

    def faults(self) -> list[FaultRuleInfo]:
        rows: list[FaultRuleInfo] = []
        for r in self.module.faults.snapshot():
            row = cast(FaultRuleInfo, dict(r))
            row["status-name"] = st.decode(r["status"])
            if r["leaf"] is not None:
                row["leaf-name"] = leaves.leaf_name(r["leaf"])
            rows.append(row)
        return rows



def _vcpu_dict(v: VcpuState) -> VcpuInfo:
    """One TD vCPU: its TDVPS state, where it runs, and what its engine has seen."""
    eng = v.engine
    exits = {} if eng is None else {
        exit_reason_name(r): n for r, n in sorted(eng.exit_counts.items())}
    ran = eng is not None and eng.last_exit is not None
    return {"tdvpr": v.tdvpr_pa, "index": v.vcpu_index, "initialized": v.initialized,
            "associated-lp": v.associated_lp, "tdvpx": list(v.tdvpx),
            "state": v.state_name, "running-lp": v.running_lp,
            "rip": eng.rip if ran and eng is not None else None, "exits": exits}


# --------------------------------------------------------------------------- pauses


def pause_info(h: PauseHandle, locks: list[str] | None = None) -> PauseInfo:
    """A pause as QMP shows it (leaf names instead of numbers)."""
    d = cast(PauseInfo, h.info())
    d["leaf"] = leaves.leaf_name(h.leaf) if h.leaf is not None else None
    d["until-leaf"] = leaves.leaf_name(h.until_leaf) if h.until_leaf is not None else None
    if h.paused_leaf is not None:
        d["call-leaf"] = leaves.leaf_name(h.paused_leaf)
    if locks is not None:
        d["locks"] = locks
    return d


class ControlQueries:
    """Pauses, timing and the contention report of one module (the ``Inspector``'s part
    that changes what the module does, kept apart from the read-only queries)."""

    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector
        self.module = inspector.module

    def _locks_of(self, call_id: int | None) -> list[str]:
        if call_id is None:
            return []
        return [d["key"] for d in self.module.locks.snapshot() if call_id in d["owners"]]

    def _info(self, h: PauseHandle) -> PauseInfo:
        return pause_info(h, self._locks_of(h.paused_call) if h.paused else None)

    def pause(self, point: str = "locked", leaf: int | None = None, lp: int | None = None,
              td: int | None = None, gpa: tuple[int, int] | None = None,
              hpa: tuple[int, int] | None = None, nth: int = 1, once: bool = True,
              until_leaf: int | None = None, timeout: float | None = None) -> PauseInfo:
        m = self.module
        if point not in POINTS:
            raise InspectError(f"unknown control point {point!r} (one of {', '.join(POINTS)})")
        for what, lf in (("leaf", leaf), ("until-leaf", until_leaf)):
            if lf is not None and lf not in m.leaves:
                raise InspectError(f"{what} {lf} is not implemented by the module")
        if lp is not None and not 0 <= lp < len(m.lps):
            raise InspectError(f"no such LP: {lp} (the machine has {len(m.lps)})")
        h = m.control.pause(lp, leaf, point, once, td=td, gpa=gpa, hpa=hpa, nth=nth,
                            until_leaf=until_leaf, timeout_s=timeout)
        return self._info(h)

    def pauses(self) -> list[PauseInfo]:
        with self.module.cond:
            return [self._info(h) for h in self.module.control.pauses()]

    def _select(self, pause_id: int | None) -> list[PauseHandle]:
        hs = self.module.control.pauses()
        if pause_id is None:
            return hs
        got = [h for h in hs if h.id == pause_id]
        if not got:
            raise InspectError(f"no pause {pause_id} (query-vtdx-pauses lists them)")
        return got

    def resume(self, id: int | None = None) -> ResumeAnswer:  # noqa: A002 - QMP's name
        """Let the call paused by ``pause_id`` (or every paused call) go on."""
        resumed = removed = 0
        for h in self._select(id):
            if h.paused:
                resumed += 1
                removed += h.once
                h.resume()
        return {"resumed": resumed, "removed": removed}

    def pause_clear(self, id: int | None = None) -> ResumeAnswer:  # noqa: A002 - QMP's name
        """Disarm one pause (or all), releasing a call it holds."""
        hs = self._select(id)
        resumed = sum(1 for h in hs if h.paused)
        for h in hs:
            h.cancel()
        return {"resumed": resumed, "removed": len(hs)}

    # -- timing

    def timing(self) -> TimingInfo:
        return cast(TimingInfo, self.module.control.describe())

    def set_timing(self, mode: str, seed: int | None = None,
                   slowdown: float | None = None) -> TimingInfo:
        if mode not in MODES:
            raise InspectError(f"unknown timing mode {mode!r} (one of {', '.join(MODES)})")
        if seed is not None and mode != "explore":
            raise InspectError("'seed' goes with mode=explore")
        kw: dict[str, Any] = {"seed": seed or 0}
        if slowdown is not None:
            kw["slowdown"] = slowdown
        self.module.control.set_timing(make_timing(mode, **kw))
        return self.timing()

    # -- contention

    def contention(self, count: int = 100, clear: bool = False) -> ContentionAnswer:
        log = self.inspector.contention
        recs = log.snapshot() if log is not None else []
        out: ContentionAnswer = {
            "timing": self.timing(),
            "busy": [self._busy(r) for r in recs[-count:]] if count else [],
            "summary": summarise(recs, self._caller),
            "total": len(recs),
            "dropped": log.dropped if log is not None else 0,
        }
        if clear and log is not None:
            log.clear()
        return out

    def _caller(self, call_id: int) -> str | None:
        rec = self.inspector.recorder
        return rec.caller_of(call_id) if rec is not None else None

    def _busy(self, r: BusyRecord) -> BusyReport:
        d: BusyReport = {
            "index": r.index, "call": r.call, "lp": r.lp, "leaf": leaves.leaf_name(r.leaf),
            "status": f"0x{r.status:x}", "status-name": st.decode(r.status),
            "lock": str(r.conflict.key) if r.conflict else None,
            "holders": [], "next": cast(Any, r.next),
        }
        v = r.operand_value()
        if v is not None:
            d["operand"] = f"0x{v:x}"
        if r.conflict is not None:
            d["wanted"], d["held"] = r.conflict.wanted, r.conflict.held
        d["caller"] = self._caller(r.call)
        for h in r.holders:
            c: ContentionCall = {"call": h.call, "lp": h.lp,
                                 "leaf": leaves.leaf_name(h.leaf) if h.leaf >= 0 else "?",
                                 "point": h.point, "caller": self._caller(h.call)}
            d["holders"].append(c)
        return d


def summarise(recs: list[BusyRecord], caller: Any = None) -> list[ContentionRow]:
    """Rows of equal (leaf, status, lock kind, holder leaf), most frequent first."""
    rows: dict[tuple[str, str, str, str], ContentionRow] = {}
    for r in recs:
        h = r.holders[0] if r.holders else None
        key = (leaves.leaf_name(r.leaf), st.decode(r.status),
               r.conflict.key.kind if r.conflict else "?",
               leaves.leaf_name(h.leaf) if h and h.leaf >= 0 else "?")
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"leaf": key[0], "status-name": key[1], "lock": key[2],
                               "holder-leaf": key[3], "count": 0, "retried": 0,
                               "moved-on": 0, "callers": []}
        row["count"] += 1
        nxt = r.next
        if nxt is not None:
            row["retried" if nxt["action"] == "retried" else "moved-on"] += 1
        if caller is not None and len(row["callers"]) < 4:
            c = caller(r.call)
            if c and c not in row["callers"]:
                row["callers"].append(c)
    return sorted(rows.values(), key=lambda x: -x["count"])
