"""What the daemon runs for inspection: trace recorder, inspector and QMP server, wired.

``InspectEndpoint`` owns all three: ``start()`` attaches the recorder to the module and
serves the socket ``RUN_DIR/vtdx-qmp.sock`` on its own thread; ``stop()`` closes the
socket, detaches the recorder and closes the trace file. Failed SEAMCALLs become
``VTDX_SEAMCALL_ERROR`` events; calls stopping at and leaving a pause become
``VTDX_SEAMCALL_PAUSED`` / ``VTDX_SEAMCALL_RESUMED``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from vtdx.module.control import PauseHandle
from vtdx.observe.answers import (
    EVENT_CALL_PAUSED,
    EVENT_CALL_RESUMED,
    EVENT_SEAMCALL_ERROR,
    QMP_SOCKET,
)
from vtdx.observe.inspect import Inspector, pause_info
from vtdx.observe.qmp.commands import vtdx_commands
from vtdx.observe.qmp.qemu import QemuControl
from vtdx.observe.qmp.server import QmpServer
from vtdx.observe.qmp.thread import QmpServerThread
from vtdx.observe.symbols import SYMBOL_CACHE, CallerResolver, GuestVirt, SymbolTable
from vtdx.observe.trace import TRACE_FILE, TraceRecorder
from vtdx.resources import cache_root

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

#: (RIP, RSP, CR3) of the vCPU whose SEAMCALL is being observed, if known.
CpuContext = Callable[[int], "tuple[int, int, int] | None"]
#: Keys of a trace record that a VTDX_SEAMCALL_ERROR event carries.
_EVENT_KEYS = ("seq", "lp", "leaf", "name", "status", "status-name")


def seamcall_error_event(server: QmpServer) -> Callable[[Mapping[str, object]], None]:
    """A ``TraceRecorder.on_error`` callback that emits VTDX_SEAMCALL_ERROR events
    (``SeamcallErrorData``: a trace record's identity and outcome, its caller if known)."""

    def emit(rec: Mapping[str, object]) -> None:
        data = {k: rec[k] for k in _EVENT_KEYS if k in rec}
        for k in ("caller", "injected"):
            if rec.get(k) is not None:
                data[k] = rec[k]
        server.emit(EVENT_SEAMCALL_ERROR, data)

    return emit


class InspectEndpoint:
    """Inspection of one module over QMP (see the module docstring).

    ``context(lp)`` gives the (RIP, RSP, CR3) of the vCPU whose SEAMCALL is being observed
    (the daemon knows it from the wire frame); with ``vmlinux`` (a vmlinux or System.map,
    or a directory with one), trace records then name the kernel function that made the call.
    """

    def __init__(
        self,
        module: TdxModule,
        run_dir: str | os.PathLike[str],
        *,
        qemu_qmp: str | os.PathLike[str] | None = None,
        context: CpuContext | None = None,
        vmlinux: str | os.PathLike[str] | None = None,
        trace: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.socket_path = self.run_dir / QMP_SOCKET
        symbolise = None
        self.symbols: SymbolTable | None = None
        if vmlinux is not None and context is not None:
            self.symbols = SymbolTable.load(vmlinux, cache_root() / SYMBOL_CACHE)
            symbolise = CallerResolver(self.symbols, GuestVirt(module.memory)).capture
        self.recorder = TraceRecorder(
            self.run_dir / TRACE_FILE if trace else None, context=context, symbolise=symbolise
        )
        self.inspector = Inspector.attach(module, self.recorder)
        self.qemu = QemuControl(qemu_qmp) if qemu_qmp is not None else None
        self.server = QmpServer(self.socket_path, vtdx_commands(self.inspector, self.qemu))
        self.recorder.on_error.append(seamcall_error_event(self.server))
        self.module = module
        module.control.listeners.append(self._on_pause)
        self._thread: QmpServerThread | None = None

    def _on_pause(self, what: str, handle: PauseHandle) -> None:
        """VTDX_SEAMCALL_PAUSED (with the locks the call holds) / VTDX_SEAMCALL_RESUMED."""
        if what == "paused":
            locks = [d["key"] for d in self.module.locks.snapshot()
                     if handle.paused_call in d["owners"]]
            self.server.emit(EVENT_CALL_PAUSED, pause_info(handle, locks))
        else:
            self.server.emit(EVENT_CALL_RESUMED, pause_info(handle))

    def header(self) -> dict[str, object]:
        """Platform profile, module features and timing in force (the trace's first line)."""
        p = self.module.profile
        return {"profile": p.name,
                "features": [f"{'+' if on else '-'}{n}" for n, on in p.features.items()],
                "timing": self.module.control.describe()}

    def start(self) -> InspectEndpoint:
        self.recorder.write_header(self.header())
        self._thread = QmpServerThread(self.server).start()
        return self

    def stop(self) -> None:
        if self._on_pause in self.module.control.listeners:
            self.module.control.listeners.remove(self._on_pause)
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        self.recorder.close()

    def __enter__(self) -> InspectEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_inspect(
    backend: object,
    run_dir: str | os.PathLike[str],
    *,
    qemu_qmp: str | os.PathLike[str] | None = None,
    callers: dict[int, tuple[int, ...]] | None = None,
    vmlinux: str | os.PathLike[str] | None = None,
) -> InspectEndpoint | None:
    """Start inspection for a daemon backend; None if it has no TDX module (echo/none).

    ``callers`` is the daemon's per-vCPU (RFLAGS, RIP, RSP, CR3) of the call in flight.
    """
    module = backend
    if module is not None and not hasattr(module, "pamt"):
        module = getattr(backend, "delegate", None)  # EchoBackend in front of the module
    if module is None or not hasattr(module, "pamt"):
        return None

    def context(lp: int) -> tuple[int, int, int] | None:
        c = callers.get(lp) if callers is not None else None
        return (c[1], c[2], c[3]) if c is not None else None

    return InspectEndpoint(cast("TdxModule", module), run_dir, qemu_qmp=qemu_qmp,
                           context=context if callers is not None else None,
                           vmlinux=vmlinux).start()
