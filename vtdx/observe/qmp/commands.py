"""The vtdx QMP commands: one table over an ``Inspector``, plus QEMU's run control.

Each entry names the command, documents it and declares its arguments; answers are the
``vtdx.observe.answers`` types the ``Inspector`` builds. Domain arguments (leaf and status
names) are converted here, so ``qmp-shell`` users can write ``leaf=TDH.SYS.LP.INIT`` and
``status=TDX_OPERAND_BUSY+RCX``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from vtdx.abi import status as st
from vtdx.errors import VtdxError
from vtdx.module.control import POINTS
from vtdx.module.timing import MODES
from vtdx.observe.answers import InjectAnswer, PamtAnswer, PauseInfo, TraceRecord
from vtdx.observe.inspect import ControlQueries, InspectError, Inspector
from vtdx.observe.qmp.errors import QmpError
from vtdx.observe.qmp.qemu import QemuControl
from vtdx.observe.qmp.schema import Arg, Command, as_int, type_error
from vtdx.observe.trace import parse_leaf

#: Largest physical address a query accepts (52-bit MAXPHYADDR).
MAX_PA = (1 << 52) - 1
#: Pages or mappings one query lists at most (inspect.MAX_PAMT_RANGE / MAX_SEPT_LIST).
MAX_LIST = 4096

_P = ParamSpec("_P")
_R = TypeVar("_R")

_STATUS_BY_NAME = {v: k for k, v in st.NAMES.items()}
_OPERAND_BY_NAME = {v: k for k, v in st.OPERAND_IDS.items()}


def parse_status(value: int | str) -> int:
    """A TDX status from a number or a name: ``0x8000020200000000``, ``TDX_SYS_BUSY``,
    ``OPERAND_BUSY+RCX`` (name plus operand id, as ``decode`` prints it)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    name, _, operand = text.upper().replace("|", "+").partition("+")
    if not name.startswith(("TDX_", "TD_")):
        name = "TDX_" + name
    if name not in _STATUS_BY_NAME:
        raise VtdxError(f"unknown TDX status {value!r} (e.g. TDX_SYS_BUSY, "
                        "TDX_OPERAND_BUSY+RCX or 0x8000020200000000)")
    op = 0
    if operand:
        try:
            op = _OPERAND_BY_NAME[operand] if operand in _OPERAND_BY_NAME else int(operand, 0)
        except ValueError:
            raise VtdxError(f"unknown operand {operand!r} (RCX, R8, TDR... or a number)"
                            ) from None
    return _STATUS_BY_NAME[name] + op


def _status_arg(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise type_error("status", "status number or name")
    try:
        return parse_status(value)
    except VtdxError as e:
        raise QmpError(str(e)) from None


def _leaf_arg(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise type_error("leaf", "leaf number or name")
    try:
        return parse_leaf(value)
    except VtdxError as e:
        raise QmpError(str(e)) from None


def _int_list(value: object) -> list[int]:
    if isinstance(value, list):
        return [as_int("lps", v) for v in value]
    if isinstance(value, str):  # qmp-shell: lps=0,1
        return [as_int("lps", v) for v in value.split(",") if v.strip()]
    return [as_int("lps", value)]


def _qmp_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """The query with InspectError (a name that names nothing) as a QMP error."""

    def run(*args: _P.args, **kw: _P.kwargs) -> _R:
        try:
            return fn(*args, **kw)
        except InspectError as e:
            raise QmpError(str(e), e.cls) from None

    return run


class VtdxCommands:
    """The handlers whose arguments need more than the inspector's signature."""

    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector

    def pamt(self, pfn: int | None = None, pa: int | None = None, count: int | None = None,
             summary: bool = False) -> PamtAnswer:
        if pfn is not None and pa is not None:
            raise QmpError("give either 'pfn' or 'pa', not both")
        if pfn is None and pa is None:
            if count is not None:
                raise QmpError("'count' needs 'pfn' or 'pa'")
            return self.inspector.pamt_summary()
        if summary:
            raise QmpError("'summary' takes no 'pfn' or 'pa'")
        addr = pa if pa is not None else (pfn or 0) << 12
        if count is None:
            return self.inspector.pamt_page(addr)
        return self.inspector.pamt_range(addr, count)

    def trace(self, count: int = 20, leaf: int | None = None, lp: int | None = None,
              errors: bool = False) -> list[TraceRecord]:
        return self.inspector.trace(count, leaf, lp, errors)

    def inject(self, status: int, leaf: int | None = None, count: int | None = None,
               probability: float = 1.0, lp: int | None = None,
               lps: list[int] | None = None) -> InjectAnswer:
        if lp is not None and lps is not None:
            raise QmpError("give either 'lp' or 'lps', not both")
        if lp is not None:
            lps = [lp]
        return self.inspector.inject(status, leaf, count, probability, lps)

    def pause(self, **kw: object) -> PauseInfo:
        """vtdx-pause: QMP's hyphenated arguments to ``ControlQueries.pause``."""
        ranges: dict[str, tuple[int, int]] = {}
        for what in ("gpa", "hpa"):
            start = kw.pop(what, None)
            size = kw.pop(f"{what}-size", None)
            if start is None:
                if size is not None:
                    raise QmpError(f"'{what}-size' needs '{what}'")
                continue
            assert isinstance(start, int)
            ranges[what] = (start & ~0xFFF, start + (size if isinstance(size, int) else 0x1000))
        until = kw.pop("until-leaf", None)
        once = not kw.pop("persistent", False)
        return self.control.pause(gpa=ranges.get("gpa"), hpa=ranges.get("hpa"),
                                  until_leaf=until, once=once,  # type: ignore[arg-type]
                                  **kw)  # type: ignore[arg-type]

    @property
    def control(self) -> ControlQueries:
        return ControlQueries(self.inspector)


def vtdx_commands(inspector: Inspector, qemu: QemuControl | None = None) -> list[Command]:
    """The vtdx QMP command table over ``inspector`` (with QEMU's run control if given)."""
    q = _qmp_errors
    h = VtdxCommands(inspector)
    c = ControlQueries(inspector)
    cmds = [
        Command("query-vtdx-status", q(inspector.status),
                "Module state, LPs, keyids, TDMR/TD counts, SEAMCALL totals."),
        Command("query-vtdx-tdmrs", q(inspector.tdmrs),
                "TDMRs with PAMT areas, reserved areas and init progress."),
        Command("query-vtdx-pamt", q(h.pamt),
                "PAMT: one page at every level with lock holders and DPAMT pair (pfn or "
                "pa), a range of pages (with count), or without arguments a summary by "
                "level and page type.",
                (Arg("pfn", "int", "page frame number", optional=True, minimum=0,
                     maximum=MAX_PA),
                 Arg("pa", "int", "physical address", optional=True, minimum=0,
                     maximum=MAX_PA),
                 Arg("count", "int", "pages in a range", optional=True, minimum=1,
                     maximum=MAX_LIST),
                 Arg("summary", "bool", "summary (the default without pfn/pa)",
                     optional=True))),
        Command("query-vtdx-tds", q(inspector.tds), "TDs: TDR, HKID, state, vCPUs, S-EPT."),
        Command("query-vtdx-sept", q(inspector.sept),
                "S-EPT of a TD: the walk for one GPA, or its leaf mappings.",
                (Arg("td", "int", "TDR physical address or index in query-vtdx-tds",
                     minimum=0),
                 Arg("gpa", "int", "guest physical address", optional=True, minimum=0,
                     maximum=MAX_PA),
                 Arg("count", "int", "mappings listed without gpa", optional=True,
                     minimum=1, maximum=MAX_LIST))),
        Command("query-vtdx-locks", q(inspector.locks),
                "TDX locks held right now, with the calls (LP, leaf) holding them."),
        Command("query-vtdx-trace", q(h.trace), "The last SEAMCALLs (newest last).",
                (Arg("count", "int", "how many", optional=True, minimum=1, maximum=MAX_LIST),
                 Arg("leaf", "leaf", "leaf number or name", optional=True,
                     convert=_leaf_arg),
                 Arg("lp", "int", "logical processor", optional=True, minimum=0),
                 Arg("errors", "bool", "only failed calls", optional=True))),
        Command("query-vtdx-stats", q(inspector.stats),
                "SEAMCALL counts, errors and module time per leaf and LP."),
        Command("query-vtdx-faults", q(inspector.faults), "Armed fault-injection rules."),
        Command("vtdx-inject", q(h.inject),
                "Make matching SEAMCALLs return a status (registers as the module leaves "
                "them on that error).",
                (Arg("status", "status", "status number or name, e.g. TDX_SYS_BUSY or "
                     "TDX_OPERAND_BUSY+RCX", convert=_status_arg),
                 Arg("leaf", "leaf", "leaf number or name (default: any)", optional=True,
                     convert=_leaf_arg),
                 Arg("count", "int", "fire this many times (default: unlimited)",
                     optional=True, minimum=1),
                 Arg("probability", "number", "chance per matching call", optional=True,
                     minimum=0.0, maximum=1.0),
                 Arg("lp", "int", "only this LP", optional=True, minimum=0),
                 Arg("lps", "int-list", "only these LPs", optional=True,
                     convert=_int_list))),
        Command("vtdx-inject-clear", q(inspector.inject_clear),
                "Remove one fault rule (id) or all.",
                (Arg("rule_id", "int", "rule id from vtdx-inject", optional=True,
                     minimum=1),)),
        Command("vtdx-pause", q(h.pause),
                "Arm a pause: the nth SEAMCALL matching every given filter stops at the "
                "control point (entry, locked = every lock held, done) until vtdx-resume, "
                "until a call of until-leaf on another LP returned, or timeout seconds. "
                "Events VTDX_SEAMCALL_PAUSED / VTDX_SEAMCALL_RESUMED.",
                (Arg("point", "str", "control point (default locked)", optional=True,
                     choices=POINTS),
                 Arg("leaf", "leaf", "leaf number or name (default: any)", optional=True,
                     convert=_leaf_arg),
                 Arg("lp", "int", "only this LP", optional=True, minimum=0),
                 Arg("td", "int", "only calls on this TD (TDR PA in RCX or RDX)",
                     optional=True, minimum=0, maximum=MAX_PA),
                 Arg("gpa", "int", "only GPA leaves whose GPA (RCX) is in [gpa, gpa+size)",
                     optional=True, minimum=0, maximum=MAX_PA),
                 Arg("gpa-size", "int", "bytes of the GPA range (default 4096)",
                     optional=True, minimum=1, maximum=MAX_PA),
                 Arg("hpa", "int", "only calls with an operand page in [hpa, hpa+size)",
                     optional=True, minimum=0, maximum=MAX_PA),
                 Arg("hpa-size", "int", "bytes of the HPA range (default 4096)",
                     optional=True, minimum=1, maximum=MAX_PA),
                 Arg("nth", "int", "pause the nth matching call (default 1)", optional=True,
                     minimum=1, maximum=1 << 32),
                 Arg("persistent", "bool", "stay armed after a hit", optional=True),
                 Arg("until-leaf", "leaf", "go on once a call of this leaf on another LP "
                     "returned", optional=True, convert=_leaf_arg),
                 Arg("timeout", "number", "go on after this many seconds (default 60)",
                     optional=True, minimum=0.001, maximum=3600))),
        Command("query-vtdx-pauses", q(c.pauses),
                "Armed pauses and the calls they hold (with the locks those hold)."),
        Command("vtdx-resume", q(c.resume),
                "Let the call held by pause id (or every held call) go on.",
                (Arg("id", "int", "pause id (default: all)", optional=True, minimum=1),)),
        Command("vtdx-pause-clear", q(c.pause_clear),
                "Remove a pause (or all), releasing any call it holds.",
                (Arg("id", "int", "pause id (default: all)", optional=True, minimum=1),)),
        Command("query-vtdx-timing", q(c.timing),
                "How long calls hold their locks: serial, overlap or explore (seeded)."),
        Command("vtdx-timing", q(c.set_timing),
                "Choose the timing: serial (no overlap, deterministic), overlap (calls of "
                "different LPs overlap as on hardware), explore (seeded varied holds).",
                (Arg("mode", "str", "serial | overlap | explore", choices=MODES),
                 Arg("seed", "int", "exploration seed", optional=True, minimum=0,
                     maximum=(1 << 64) - 1),
                 Arg("slowdown", "number", "guest slowdown under TCG (default 50)",
                     optional=True, minimum=0, maximum=100000))),
        Command("query-vtdx-contention", q(c.contention),
                "Every BUSY a caller got from a lock another call held: leaf, operand, "
                "lock, the holder, both kernel callers, the caller's next call; and a "
                "summary.",
                (Arg("count", "int", "BUSY records listed (newest, default 100)",
                     optional=True, minimum=0, maximum=MAX_LIST),
                 Arg("clear", "bool", "forget the records after answering", optional=True))),
    ]
    if qemu is not None:
        cmds += qemu.commands()
    return cmds
