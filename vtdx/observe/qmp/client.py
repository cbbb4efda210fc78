"""A synchronous client of vtdx's QMP endpoint, with one typed method per query.

Built on qemu.qmp's sync wrapper (``qemu.qmp.legacy.QEMUMonitorProtocol``), for callers
that are not asyncio code: the pytest VM handle (``vm.vtdx``), ``vtdx console -c`` and
scripts. Asyncio code uses ``qemu.qmp.QMPClient`` directly. Answers are the
``vtdx.observe.answers`` types, so a test asserts on exactly what a person inspecting with
``vtdx console`` or qmp-shell would see.

The wrapper runs qemu.qmp on the calling thread's event loop (creating one if the thread
has none), so a client must not be used from inside a running event loop. Calls are
serialised by a lock; events are not collected (``vtdx console`` shows them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError, StateError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vtdx.errors import VtdxError
from vtdx.observe.answers import (
    QMP_SOCKET,
    ContentionAnswer,
    FaultRuleInfo,
    InjectAnswer,
    InjectClearAnswer,
    LocksAnswer,
    PamtAnswer,
    PamtPage,
    PamtRow,
    PamtSummary,
    PauseInfo,
    QemuStatus,
    ResumeAnswer,
    SeptAnswer,
    SeptMappings,
    SeptWalk,
    TdInfo,
    TdmrInfo,
    TimingInfo,
    TraceRecord,
    VtdxStats,
    VtdxStatus,
)

#: Seconds a command may take before the client gives up on the connection.
TIMEOUT = 30.0


class QmpCommandError(VtdxError):
    """The endpoint answered a command with a QMP error (the connection stays usable)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


def socket_path(run_dir: str | os.PathLike[str]) -> Path:
    """vtdx's QMP socket of a run directory (or the socket itself when given one)."""
    p = Path(run_dir)
    sock = p if p.is_socket() else p / QMP_SOCKET
    if not sock.exists():
        raise VtdxError(f"no vtdx QMP socket at {sock} (is the run still going?)")
    return sock


class VtdxClient:
    """Synchronous QMP session with vtdx's endpoint at ``path``.

    Connects on first use (or ``connect()``); after a connection failure the next call
    connects again. ``close()`` (or leaving a ``with`` block) ends the session.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._qmp: QEMUMonitorProtocol | None = None
        self._lock = threading.Lock()

    # -- lifetime

    def connect(self) -> None:
        with self._lock:
            self._connected()

    def _connected(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            qmp = QEMUMonitorProtocol(self.path, nickname="vtdx-client")
            try:
                qmp.connect()
            except (QMPError, OSError) as e:
                raise VtdxError(f"vtdx QMP socket {self.path}: {error_reason(e)}") from None
            qmp.settimeout(self.timeout)
            self._qmp = qmp
        return self._qmp

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):  # the reason was reported already
                qmp.close()

    def __enter__(self) -> VtdxClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands

    def execute(self, command: str, /, **arguments: object) -> object:
        """Run a QMP command; its ``return`` value. Arguments that are None are left out.

        QmpCommandError if the endpoint refused it; VtdxError if the connection failed.
        """
        args = {k: v for k, v in arguments.items() if v is not None}
        with self._lock:
            qmp = self._connected()
            try:
                return qmp.cmd(command, **args)
            except ExecuteError as e:
                raise QmpCommandError(command, e.error_class, str(e)) from None
            except (QMPError, OSError, TimeoutError) as e:
                self._drop()
                raise VtdxError(f"vtdx QMP socket {self.path}: {command}: {error_reason(e)}"
                                ) from None
            finally:
                if self._qmp is not None:
                    self._qmp.clear_events()  # nobody reads them here; do not hoard them

    # -- the vtdx queries (commands.py), by name

    def status(self) -> VtdxStatus:
        return cast(VtdxStatus, self.execute("query-vtdx-status"))

    def tdmrs(self) -> list[TdmrInfo]:
        return cast(list[TdmrInfo], self.execute("query-vtdx-tdmrs"))

    def pamt(self, pfn: int | str | None = None, *, pa: int | str | None = None,
             count: int | None = None) -> PamtAnswer:
        """A page (``pfn`` or ``pa``), ``count`` pages from there, or the summary."""
        return cast(PamtAnswer, self.execute("query-vtdx-pamt", pfn=pfn, pa=pa, count=count))

    def pamt_page(self, pfn: int | str | None = None, *, pa: int | str | None = None
                  ) -> PamtPage:
        """One page (``pfn`` or ``pa``) at every PAMT level."""
        return cast(PamtPage, self.execute("query-vtdx-pamt", pfn=pfn, pa=pa))

    def pamt_range(self, pfn: int | str | None = None, *, pa: int | str | None = None,
                   count: int) -> list[PamtRow]:
        """``count`` pages from ``pfn`` or ``pa``, one row each."""
        return cast(list[PamtRow], self.execute("query-vtdx-pamt", pfn=pfn, pa=pa,
                                                count=count))

    def pamt_summary(self) -> PamtSummary:
        return cast(PamtSummary, self.execute("query-vtdx-pamt"))

    def tds(self) -> list[TdInfo]:
        return cast(list[TdInfo], self.execute("query-vtdx-tds"))

    def sept(self, td: int, gpa: int | None = None, *, count: int | None = None
             ) -> SeptAnswer:
        return cast(SeptAnswer, self.execute("query-vtdx-sept", td=td, gpa=gpa, count=count))

    def sept_walk(self, td: int, gpa: int) -> SeptWalk:
        return cast(SeptWalk, self.execute("query-vtdx-sept", td=td, gpa=gpa))

    def sept_mappings(self, td: int, count: int | None = None) -> SeptMappings:
        return cast(SeptMappings, self.execute("query-vtdx-sept", td=td, count=count))

    def locks(self) -> LocksAnswer:
        return cast(LocksAnswer, self.execute("query-vtdx-locks"))

    def stats(self) -> VtdxStats:
        return cast(VtdxStats, self.execute("query-vtdx-stats"))

    def trace(self, count: int = 20, *, leaf: int | str | None = None, lp: int | None = None,
              errors: bool | None = None) -> list[TraceRecord]:
        return cast(list[TraceRecord], self.execute("query-vtdx-trace", count=count,
                                                    leaf=leaf, lp=lp, errors=errors))

    def faults(self) -> list[FaultRuleInfo]:
        return cast(list[FaultRuleInfo], self.execute("query-vtdx-faults"))

    def inject(self, status: int | str, leaf: int | str | None = None, *,
               count: int | None = None, lp: int | None = None,
               probability: float | None = None) -> int:
        """Arm a fault rule now; its id (for ``inject_clear``)."""
        r = cast(InjectAnswer, self.execute("vtdx-inject", status=status, leaf=leaf,
                                            count=count, lp=lp, probability=probability))
        return int(r["id"])

    def inject_clear(self, rule_id: int | None = None) -> int:
        """Remove one rule (or all); how many were removed."""
        r = cast(InjectClearAnswer, self.execute("vtdx-inject-clear", rule_id=rule_id))
        return int(r["removed"])

    @contextlib.contextmanager
    def injecting(self, status: int | str, leaf: int | str | None = None, *,
                  count: int | None = None, lp: int | None = None,
                  probability: float | None = None) -> Iterator[int]:
        """``with vm.vtdx.injecting("TDX_SYS_BUSY", "TDH.SYS.LP.INIT", lp=1): ...``"""
        rid = self.inject(status, leaf, count=count, lp=lp, probability=probability)
        try:
            yield rid
        finally:
            with contextlib.suppress(VtdxError):  # a count-limited rule removes itself
                self.inject_clear(rid)

    # -- pauses, timing, contention (docs/races.md)

    def pause(self, leaf: int | str | None = None, *, lp: int | None = None,
              point: str | None = None, td: int | None = None, gpa: int | None = None,
              gpa_size: int | None = None, hpa: int | None = None,
              hpa_size: int | None = None, nth: int | None = None,
              persistent: bool | None = None, until_leaf: int | str | None = None,
              timeout: float | None = None) -> PauseInfo:
        """Arm a pause (``vtdx-pause``); ``info["id"]`` names it for ``resume``."""
        return cast(PauseInfo, self.execute(
            "vtdx-pause", leaf=leaf, lp=lp, point=point, td=td, gpa=gpa,
            **{"gpa-size": gpa_size, "hpa-size": hpa_size, "until-leaf": until_leaf},
            hpa=hpa, nth=nth, persistent=persistent, timeout=timeout))

    def pauses(self) -> list[PauseInfo]:
        return cast(list[PauseInfo], self.execute("query-vtdx-pauses"))

    def pause_state(self, pause_id: int) -> PauseInfo:
        """One pause by id (QmpCommandError-free: VtdxError if it is gone)."""
        for p in self.pauses():
            if p["id"] == pause_id:
                return p
        raise VtdxError(f"pause {pause_id} is no longer armed or holding a call")

    def wait_paused(self, pause_id: int, timeout: float = 30.0, poll: float = 0.02
                    ) -> PauseInfo:
        """Poll until the pause holds a call; its state then (VtdxError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.pause_state(pause_id)
            if p["paused"]:
                return p
            if time.monotonic() > deadline:
                raise VtdxError(f"pause {pause_id} held no call within {timeout:g} s "
                                f"(seen {p['seen']} matching calls)")
            time.sleep(poll)

    def resume(self, pause_id: int | None = None) -> int:
        """Let the call held by one pause (or all) go on; how many went on."""
        return int(cast(ResumeAnswer, self.execute("vtdx-resume", id=pause_id))["resumed"])

    def pause_clear(self, pause_id: int | None = None) -> int:
        """Remove a pause (or all); how many were removed."""
        r = cast(ResumeAnswer, self.execute("vtdx-pause-clear", id=pause_id))
        return int(r["removed"])

    @contextlib.contextmanager
    def pausing(self, leaf: int | str | None = None, **kw: object) -> Iterator[PauseInfo]:
        """``with vm.vtdx.pausing("TDH.MEM.PAGE.AUG", lp=0) as p: ...`` -- removed (and its
        call released) on leaving the block."""
        info = self.pause(leaf, **kw)  # type: ignore[arg-type]
        try:
            yield info
        finally:
            with contextlib.suppress(VtdxError):  # a fired one-shot pause removed itself
                self.pause_clear(info["id"])

    def timing(self) -> TimingInfo:
        return cast(TimingInfo, self.execute("query-vtdx-timing"))

    def set_timing(self, mode: str, *, seed: int | None = None,
                   slowdown: float | None = None) -> TimingInfo:
        """``serial``, ``overlap`` or ``explore`` (with ``seed``)."""
        return cast(TimingInfo, self.execute("vtdx-timing", mode=mode, seed=seed,
                                             slowdown=slowdown))

    def contention(self, count: int | None = None, *, clear: bool | None = None
                   ) -> ContentionAnswer:
        return cast(ContentionAnswer, self.execute("query-vtdx-contention", count=count,
                                                   clear=clear))

    def qemu_status(self) -> QemuStatus:
        """QEMU's run state (only when the endpoint forwards to QEMU)."""
        return cast(QemuStatus, self.execute("query-status"))


#: What a client says when the endpoint went away (the machine stopped, usually).
CLOSED = "the endpoint closed the connection (has the machine stopped?)"


def error_reason(e: BaseException) -> str:
    """The root cause of a qemu.qmp or socket error in a few words, for one-line messages."""
    if isinstance(e, StateError | ExecInterruptedError | EOFError | BrokenPipeError |
                  ConnectionResetError):
        return CLOSED  # qemu.qmp's own words ("QMPClient is disconnecting...") mean this
    cause = getattr(e, "exc", None)  # ConnectError wraps the OSError
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, TimeoutError):
        return "no answer (timeout)"
    return str(e) or type(e).__name__
