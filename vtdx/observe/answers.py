"""The contract of vtdx's QMP endpoint: what each ``query-vtdx-*`` command answers.

One place for the shape of every answer, so the server that builds it (``Inspector``), the
console that prints it and the pytest VM handle that returns it to a test agree, and mypy
checks all three. Keys are QMP style (``num-lps``), hence the functional ``TypedDict``
syntax. ``NotRequired`` keys are present only in some answers (``seamcalls`` needs a
trace recorder, ``dpamt`` needs Dynamic PAMT...).

Also here: the socket's file name inside a run directory and the event names, which both
sides need and which must not pull in the module model.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

#: vtdx's QMP socket inside a run directory (QEMU's own is ``qemu-qmp.sock``).
QMP_SOCKET = "vtdx-qmp.sock"
#: Event sent for every failed SEAMCALL (rate limited per second, see qmp.events).
EVENT_SEAMCALL_ERROR = "VTDX_SEAMCALL_ERROR"
#: Event sent when a SEAMCALL stops at an armed pause (data: ``PauseInfo``).
EVENT_CALL_PAUSED = "VTDX_SEAMCALL_PAUSED"
#: Event sent when a paused SEAMCALL goes on (data: ``PauseInfo`` with ``reason``).
EVENT_CALL_RESUMED = "VTDX_SEAMCALL_RESUMED"

# --------------------------------------------------------------------------- locks

#: Who holds a lock: a call waiting at a control point (all keys) or just its call id.
LockHolder = TypedDict("LockHolder", {
    "call": int,
    "lp": NotRequired[int],
    "leaf": NotRequired[str],
    "point": NotRequired[str],
    "waiting-s": NotRequired[float],
})

#: A call inside the module, stopped at a control point.
InflightCallInfo = TypedDict("InflightCallInfo", {
    "call": int, "lp": int, "leaf": str, "point": str, "waiting-s": float,
})


class LockState(TypedDict):
    """A TDX lock as seen on one PAMT entry or S-EPT entry."""

    mode: str  # "exclusive" | "shared"
    holders: list[LockHolder]


class HeldLock(TypedDict):
    key: str  # repr of the lock key, e.g. "('pamt', 1, 3456)"
    mode: str
    holders: list[LockHolder]


#: query-vtdx-locks
LocksAnswer = TypedDict("LocksAnswer", {
    "held": list[HeldLock],
    "waiting-calls": list[InflightCallInfo],
})

# --------------------------------------------------------------------------- pauses, timing

#: One pause of query-vtdx-pauses (and the answer of vtdx-pause, and the pause events).
#: ``call``/``call-lp``/``call-leaf`` name the call it stopped (while or after it held it);
#: ``reason`` says why that call went on: resume, until, timeout, cleared.
PauseInfo = TypedDict("PauseInfo", {
    "id": int,
    "point": str,
    "lp": int | None,
    "leaf": str | None,
    "td": int | None,
    "gpa": list[int] | None,
    "hpa": list[int] | None,
    "nth": int,
    "once": bool,
    "until-leaf": str | None,
    "timeout-s": float | None,
    "seen": int,
    "hits": int,
    "armed": bool,
    "paused": bool,
    "call": NotRequired[int],
    "call-lp": NotRequired[int],
    "call-leaf": NotRequired[str],
    "waiting-s": NotRequired[float],
    "reason": NotRequired[str],
    "locks": NotRequired[list[str]],
})


class ResumeAnswer(TypedDict):
    """vtdx-resume and vtdx-pause-clear: how many calls went on / pauses were removed."""

    resumed: int
    removed: int


#: The timing model in force (vtdx.module.timing): ``mode`` serial | overlap | explore.
TimingInfo = TypedDict("TimingInfo", {
    "mode": str,
    "slowdown": NotRequired[float],
    "seed": NotRequired[int],
    "p-hold": NotRequired[float],
    "max-hold-s": NotRequired[float],
    "p-delay": NotRequired[float],
    "max-delay-s": NotRequired[float],
    "chosen": NotRequired[bool],
    "residency-s": NotRequired[float],
})

#: One side of a contention: a call (LP, leaf, control point) and its kernel caller.
class ContentionCall(TypedDict):
    call: int
    lp: int
    leaf: str
    point: NotRequired[str]
    caller: NotRequired[str | None]

#: What the caller did after its BUSY: its next call on that LP.
NextCall = TypedDict("NextCall", {
    "call": int,
    "leaf": str,
    "action": str,  # "retried" | "moved-on"
    "same-operands": bool,
    "status": str,
    "ok": bool,
})

#: One BUSY a caller got from a lock another call held.
BusyReport = TypedDict("BusyReport", {
    "index": int,
    "call": int,
    "lp": int,
    "leaf": str,
    "status": str,
    "status-name": str,
    "operand": NotRequired[str],
    "lock": str | None,
    "wanted": NotRequired[str],
    "held": NotRequired[str],
    "caller": NotRequired[str | None],
    "holders": list[ContentionCall],
    "next": NextCall | None,
})

#: One row of the contention summary: same leaf, status, lock kind and holder leaf.
ContentionRow = TypedDict("ContentionRow", {
    "leaf": str,
    "status-name": str,
    "lock": str,
    "holder-leaf": str,
    "count": int,
    "retried": int,
    "moved-on": int,
    "callers": list[str],
})

#: query-vtdx-contention
class ContentionAnswer(TypedDict):
    timing: TimingInfo
    busy: list[BusyReport]
    summary: list[ContentionRow]
    total: int
    dropped: int

# --------------------------------------------------------------------------- status

LpStatus = TypedDict("LpStatus", {
    "lp": int, "package": int, "initialized": bool, "in-call": bool,
})

KeyIds = TypedDict("KeyIds", {
    "mktme": int,
    "tdx-start": int,
    "tdx-count": int,
    "global": int | None,  # None until TDH.SYS.CONFIG
    "configured-packages": list[int],
})

#: query-vtdx-status
VtdxStatus = TypedDict("VtdxStatus", {
    "state": str,
    "num-lps": int,
    "num-init-lps": int,
    "lps": list[LpStatus],
    "keyids": KeyIds,
    "dynamic-pamt": bool,
    "tdmrs": int,
    "pamt-bytes": int,
    "ram-bytes": int,
    "tds": int,
    "held-locks": int,
    "fault-rules": int,
    "internal-errors": int,
    "seamcalls": NotRequired[int],
    "seamcall-errors": NotRequired[int],
    "timing": NotRequired[TimingInfo],
    "profile": NotRequired[str],
    "features": NotRequired[list[str]],
})

# --------------------------------------------------------------------------- TDMRs, PAMT


class PamtArea(TypedDict):
    level: str  # "4K" | "2M" | "1G"
    base: int
    size: int


class MemArea(TypedDict):
    base: int
    size: int


#: One element of query-vtdx-tdmrs.
TdmrInfo = TypedDict("TdmrInfo", {
    "index": int,
    "base": int,
    "size": int,
    "end": int,
    "pamt": list[PamtArea],
    "reserved": list[MemArea],
    "initialized-up-to": int,
    "initialized": bool,
})

#: One level of a PAMT page answer.
PamtLevel = TypedDict("PamtLevel", {
    "level": str,
    "base": int,
    "pt": int,
    "pt-name": str,
    "owner": int,
    "bepoch": int,
    "materialised": bool,
    "lock": LockState | None,
})

#: Dynamic PAMT view of a page: the pair backing its 2M range.
DpamtInfo = TypedDict("DpamtInfo", {
    "range": int,
    "pair": list[int],
    "page-count": int,
    "is-pamt-page": bool,
})

#: query-vtdx-pamt with ``pfn`` or ``pa``.
PamtPage = TypedDict("PamtPage", {
    "pfn": int,
    "pa": int,
    "tdmr": int,
    "initialized": bool,
    "reserved": bool,
    "levels": list[PamtLevel],
    "walk-level": str,
    "dpamt": NotRequired[DpamtInfo],
})

#: One page of query-vtdx-pamt with ``count``: only ``pfn`` and ``tdmr`` (None) outside
#: every TDMR.
PamtRow = TypedDict("PamtRow", {
    "pfn": int,
    "tdmr": int | None,
    "level": NotRequired[str],
    "pt-name": NotRequired[str],
    "owner": NotRequired[int],
    "bepoch": NotRequired[int],
    "lock": NotRequired[LockState],
})


class PamtLevelCount(TypedDict):
    pages: int
    types: dict[str, int]  # "PT_NDA" -> pages


PamtSummaryTdmr = TypedDict("PamtSummaryTdmr", {
    "index": int,
    "base": int,
    "size": int,
    "initialized": bool,
    "initialized-up-to": int,
    "pamt-bytes": int,
    "levels": dict[str, PamtLevelCount],
})

#: query-vtdx-pamt without arguments.
PamtSummary = TypedDict("PamtSummary", {
    "tdmrs": list[PamtSummaryTdmr],
    "totals": dict[str, dict[str, int]],
    "pamt-bytes": int,
    "pamt-bytes-by-level": dict[str, int],
    "materialised-entries": int,
    "dynamic-pamt": bool,
})

#: Every answer of query-vtdx-pamt.
PamtAnswer = PamtSummary | PamtPage | list[PamtRow]

# --------------------------------------------------------------------------- TDs, S-EPT

VcpuInfo = TypedDict("VcpuInfo", {
    "tdvpr": int,
    "index": int,
    "initialized": bool,
    "associated-lp": int | None,
    "tdvpx": list[int],
    # UNINITIALIZED, READY, ACTIVE (running guest code) or DISABLED (tdx_tdvps.h)
    "state": str,
    "running-lp": int | None,     # the LP whose TDH.VP.ENTER runs it now
    "rip": int | None,            # guest RIP at its last TD exit (None: never ran)
    "exits": dict[str, int],      # TD exits per VMX exit reason name
})

SeptSummary = TypedDict("SeptSummary", {
    "root-level": int,
    "pages": int,
    "leaves": dict[str, int],  # leaf mappings per level ("4K", "2M"...)
})

#: One element of query-vtdx-tds.
TdInfo = TypedDict("TdInfo", {
    "tdr": int,
    "hkid": int,
    "lifecycle": str,
    "op-state": str,
    "fatal": bool,
    "finalized": bool,
    "tdcx": list[int],
    "child-pages": int,
    "max-vcpus": int,
    "vcpus": list[VcpuInfo],
    "attributes": int,
    "xfam": int,
    "td-epoch": int,
    "sept": SeptSummary | None,
})

#: One level of an S-EPT walk.
SeptStep = TypedDict("SeptStep", {
    "level": int,
    "sept-page": int,
    "index": int,
    "state": str,
    "hpa": int,
    "lock": NotRequired[LockState],
})


class SeptWalk(TypedDict):
    """query-vtdx-sept with ``gpa``."""

    tdr: int
    gpa: int
    walk: list[SeptStep]


class SeptMapping(TypedDict):
    gpa: int
    level: str
    state: str
    hpa: int


#: query-vtdx-sept without ``gpa``.
SeptMappings = TypedDict("SeptMappings", {
    "tdr": int,
    "root-level": int,
    "pages": int,
    "leaves": int,
    "mappings": list[SeptMapping],
})

SeptAnswer = SeptWalk | SeptMappings

# --------------------------------------------------------------------------- trace, stats

#: One SEAMCALL of query-vtdx-trace (and one line of trace.jsonl). Registers are hex
#: strings; ``in`` holds the non-zero inputs, ``out`` the changed outputs (RAX always).
#: ``site``, ``caller``, ``stack`` and ``kaslr`` come with a symbolised kernel.
TraceRecord = TypedDict("TraceRecord", {
    "seq": int,
    "t": float,
    "lp": int,
    "leaf": int,
    "name": str,
    "version": int,
    "in": dict[str, str],
    "out": dict[str, str],
    "status": str,
    "status-name": str,
    "ok": bool,
    "duration-us": float,
    "injected": NotRequired[bool],
    "rip": NotRequired[str],
    "site": NotRequired[str | None],
    "caller": NotRequired[str | None],
    "stack": NotRequired[list[str]],
    "kaslr": NotRequired[str | None],
    "symbolise-error": NotRequired[str],
    "call": NotRequired[int],
})

#: Per-leaf figures of query-vtdx-stats (only ``calls`` without a trace recorder).
LeafStat = TypedDict("LeafStat", {
    "calls": int,
    "errors": NotRequired[int],
    "injected": NotRequired[int],
    "total-us": NotRequired[float],
    "avg-us": NotRequired[float],
    "max-us": NotRequired[float],
    "statuses": NotRequired[dict[str, int]],
})

#: query-vtdx-stats
VtdxStats = TypedDict("VtdxStats", {
    "calls": int,
    "errors": NotRequired[int],
    "module-time-us": NotRequired[float],
    "uptime-s": NotRequired[float],
    "per-leaf": dict[str, LeafStat],
    "per-lp": NotRequired[dict[str, int]],
    "statuses": dict[str, int],
    "pamt-materialised-entries": int,
})

# --------------------------------------------------------------------------- faults

#: One element of query-vtdx-faults.
FaultRuleInfo = TypedDict("FaultRuleInfo", {
    "id": int,
    "status": int,
    "leaf": int | None,
    "count": int | None,
    "probability": float,
    "lps": list[int] | None,
    "after": int,
    "fired": int,
    "status-name": str,
    "leaf-name": NotRequired[str],
})

#: vtdx-inject
InjectAnswer = TypedDict("InjectAnswer", {"id": int, "status-name": str})


class InjectClearAnswer(TypedDict):
    """vtdx-inject-clear"""

    removed: int


#: Data of a VTDX_SEAMCALL_ERROR event (a subset of the trace record).
SeamcallErrorData = TypedDict("SeamcallErrorData", {
    "seq": int,
    "lp": int,
    "leaf": int,
    "name": str,
    "status": str,
    "status-name": str,
    "caller": NotRequired[str],
    "injected": NotRequired[bool],
    "dropped-before": NotRequired[int],
})

# --------------------------------------------------------------------------- built-ins


class ArgHelp(TypedDict):
    name: str
    type: str
    optional: bool
    doc: NotRequired[str]
    choices: NotRequired[list[str]]


class CommandHelp(TypedDict):
    """One element of query-vtdx-help."""

    name: str
    doc: str
    args: list[ArgHelp]


class VersionTriple(TypedDict):
    major: int
    minor: int
    micro: int


class VersionInfo(TypedDict):
    """query-version (and the greeting's ``version``): vtdx's version in QEMU's fields."""

    qemu: VersionTriple
    package: str


class QemuStatus(TypedDict):
    """QEMU's query-status (StatusInfo in QEMU's qapi/run-state.json), forwarded."""

    running: bool
    status: str
