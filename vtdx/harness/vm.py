"""A booted vtdx machine driven from synchronous code (pytest tests, scripts).

``Vm`` boots ``Machine`` (QEMU + plugin + daemon) on an event loop in a background thread,
so the machine keeps running between test functions, and offers what a kernel test needs:

    vm.run("cat /proc/cpuinfo")  -> CommandResult (unpacks as rc, stdout), via the guest agent
    vm.dmesg()                   -> the kernel log, read in the guest (not scraped)
    vm.payload("tdx-state")      -> KtapResult of an in-guest program from guest/payloads
    vm.vtdx                      -> the vtdx QMP endpoint (VtdxClient): status, tdmrs, pamt,
                                    trace, inject... answers typed as in observe.answers
    vm.trace                     -> the SEAMCALL trace (JSONL in the run directory)
    vm.console_tail(40)          -> the serial console as the kernel printed it

Faults that must hit during boot (TDMR.INIT, KEY.CONFIG, LP.INIT) cannot be injected over
QMP in time, so ``BootSpec.faults`` arms them in the module before QEMU starts; ``after``
lets a fault strike the N+1-th matching call (a TDMR half initialized).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtdx.errors import VtdxError
from vtdx.harness.guest_agent import (
    AGENT_APPEND,
    AgentError,
    CommandFailed,
    CommandResult,
    GuestAgent,
    PayloadSet,
    agent_initramfs,
    agent_machine_class,
)
from vtdx.host.payloads import KtapResult, build_payloads, kernel_headers
from vtdx.module import TdxModule
from vtdx.module.timing import requested
from vtdx.observe.qmp.client import VtdxClient
from vtdx.observe.qmp.commands import parse_status
from vtdx.observe.trace import HEADER_KEY, format_record, parse_leaf
from vtdx.platform.profile import Profile
from vtdx.session.machine import KERNEL_APPEND
from vtdx.units import parse_size

_TIMESTAMP = re.compile(r"^\[\s*[\d.]+\]\s*")


@dataclass(frozen=True)
class Fault:
    """Make ``count`` calls of ``leaf`` (on ``lp``) return ``status``, once ``after``
    matching calls have succeeded. Armed in the module before the machine boots."""

    status: int | str
    leaf: int | str | None = None
    count: int | None = 1
    lp: int | None = None
    after: int = 0

    def arm(self, module: Any) -> None:
        status = parse_status(self.status)
        leaf = parse_leaf(self.leaf) if self.leaf is not None else None
        lps = {self.lp} if self.lp is not None else None
        module.faults.add(status, leaf, count=self.count, lps=lps, after=self.after)


@dataclass(frozen=True)
class Pause:
    """A control-point pause armed before the machine boots (``module.control.pause``):
    the ``nth`` call of ``leaf`` (on ``lp``) stops at ``point`` until resumed
    (``vm.vtdx.resume(id)``; ids count from 1 in arming order), until a call of ``until``
    on another LP returned, or ``timeout`` seconds."""

    leaf: int | str | None = None
    lp: int | None = None
    point: str = "locked"
    nth: int = 1
    until: int | str | None = None
    timeout: float | None = None

    def arm(self, module: Any) -> None:
        module.control.pause(
            self.lp, parse_leaf(self.leaf) if self.leaf is not None else None, self.point,
            nth=self.nth, until_leaf=parse_leaf(self.until) if self.until is not None else None,
            timeout_s=self.timeout)


@dataclass(frozen=True)
class BootSpec:
    """Everything that makes two machines different (the pool key for reuse)."""

    kernel: Path
    vmlinux: Path | None = None
    smp: int = 2
    mem: str = "2G"
    append: str = ""
    faults: tuple[Fault, ...] = ()
    boot_timeout: float = 300.0
    #: Source tree of the kernel: payloads are built against its UAPI headers (KVM).
    kernel_src: Path | None = None
    #: Named platform profile (``default``, ``dpamt``) and module feature toggles.
    profile: str = "default"
    features: str = ""
    #: Pauses armed before boot.
    pauses: tuple[Pause, ...] = ()
    #: Module timing: contention exploration from this seed, or fully serial; default
    #: overlap (docs/races.md).
    contend: int | None = None
    serial: bool = False

    def platform(self) -> Profile:
        return Profile.named(self.profile, self.smp, parse_size(self.mem), self.features)

    def cmdline(self) -> str:
        return f"{KERNEL_APPEND} {AGENT_APPEND} {self.append}".strip()


# --------------------------------------------------------------------------- trace


class TraceView:
    """The run's SEAMCALL trace file, read incrementally (records are never rewritten).
    ``flush`` (the in-process recorder's) is called before each read, so every call made
    so far is in the file."""

    def __init__(self, path: Path, flush: Callable[[], None] | None = None) -> None:
        self.path = path
        self.flush = flush
        self._records: list[dict[str, Any]] = []
        self._offset = 0

    def records(self) -> list[dict[str, Any]]:
        """All records so far (a torn last line is left for the next read)."""
        if self.flush is not None:
            self.flush()
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self._records
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if HEADER_KEY not in rec:
                    self._records.append(rec)
        self._offset += end
        return self._records

    def mark(self) -> int:
        """A position: ``since(mark)`` returns only the calls made after it."""
        return len(self.records())

    def since(self, mark: int = 0, **filters: Any) -> list[dict[str, Any]]:
        return self.select(self.records()[mark:], **filters)

    def last(self, count: int = 20, **filters: Any) -> list[dict[str, Any]]:
        out = self.select(self.records(), **filters)
        return out[-count:] if count > 0 else []

    @staticmethod
    def select(recs: list[dict[str, Any]], leaf: str | int | None = None,
               lp: int | None = None, ok: bool | None = None,
               status: str | None = None) -> list[dict[str, Any]]:
        want = parse_leaf(leaf) if leaf is not None else None
        return [r for r in recs
                if (want is None or r.get("leaf") == want)
                and (lp is None or r.get("lp") == lp)
                and (ok is None or r.get("ok") == ok)
                and (status is None or status.upper() in str(r.get("status-name")).upper())]

    def count(self, leaf: str | int | None = None, **filters: Any) -> int:
        return len(self.since(0, leaf=leaf, **filters))

    @staticmethod
    def format(recs: list[dict[str, Any]]) -> str:
        return "\n".join(format_record(r).splitlines()[0] for r in recs)


# --------------------------------------------------------------------------- the machine


@dataclass(repr=False)
class Vm:
    """One booted machine with the guest agent (see the module docstring)."""

    spec: BootSpec
    cache: Path | None = None
    payloads: PayloadSet | None = None
    boot_seconds: float = 0.0
    machine: Any = None
    module: Any = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _agent: GuestAgent | None = None
    _vtdx: VtdxClient | None = None
    _trace: TraceView | None = None
    commands: list[CommandResult] = field(default_factory=list)

    def __repr__(self) -> str:  # short: pytest prints it in every failing test's traceback
        state = "running" if self.alive else "stopped"
        return (f"Vm({self.spec.kernel}, smp={self.spec.smp}, mem={self.spec.mem}, "
                f"faults={len(self.spec.faults)}, {state})")

    # -- lifecycle

    def start(self) -> Vm:
        if not self.spec.kernel.is_file():
            raise VtdxError(f"kernel {self.spec.kernel} not found")
        headers = kernel_headers(self.spec.kernel_src, self.cache) if self.spec.kernel_src \
            else None
        payloads = self.payloads or PayloadSet(build_payloads(self.cache, headers=headers))
        initrd = agent_initramfs(self.cache, payloads)
        t0 = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vtdx-vm",
                                        daemon=True)
        self._thread.start()

        def backend(profile: Any, memory: Any) -> Any:
            self.module = TdxModule(profile, memory)
            for f in self.spec.faults:
                f.arm(self.module)
            for p in self.spec.pauses:
                p.arm(self.module)
            timing = requested(self.spec.serial, self.spec.contend)
            if timing is not None:
                self.module.control.set_timing(timing)
            return self.module

        self.machine = agent_machine_class()(
            self.spec.kernel, initrd=initrd, append=self.spec.cmdline(), smp=self.spec.smp,
            mem=self.spec.mem, backend=backend, vmlinux=self.spec.vmlinux,
            profile=self.spec.platform())
        try:
            self._call(self.machine.start(), timeout=120)
            self._agent = GuestAgent.connect(self.machine.agent_path)
            self._agent.wait_ready(self.spec.boot_timeout, alive=lambda: self.alive)
        except BaseException as e:
            tail = self.console_tail(25)
            self.stop()
            if isinstance(e, VtdxError):
                raise VtdxError(f"{e}\n--- guest console (last lines) ---\n{tail}") from None
            raise
        self._vtdx = VtdxClient(self.machine.vtdx_qmp_path)
        recorder = getattr(self.machine.inspect, "recorder", None)
        self._trace = TraceView(self.machine.run_dir / "trace.jsonl",
                                recorder.flush if recorder is not None else None)
        self.boot_seconds = time.monotonic() - t0
        return self

    def _call(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        """Stop QEMU and the daemon, remove the run directory (idempotent)."""
        for closer in (self._agent, self._vtdx):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self._agent = self._vtdx = None
        if self.machine is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._call(self.machine.stop(), timeout=30)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        q = getattr(self.machine, "qemu", None)
        return q is not None and q.returncode is None

    # -- the guest

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        """Run ``cmd`` in the guest (busybox sh); ``check`` raises on non-zero status."""
        if self._agent is None or not self.alive:
            raise AgentError("the machine is not running\n" + self.console_tail(15))
        res = self._agent.run(cmd, timeout)
        self.commands.append(res)
        if check and res.rc:
            raise CommandFailed(res)
        return res

    def put(self, path: str, data: bytes, mode: int = 0o755, chunk: int = 12 << 10) -> None:
        """Copy a file into the guest (e.g. a test binary of your own) through the agent."""
        q = shlex.quote(path)
        self.run(f": > {q}", check=True)
        for off in range(0, len(data), chunk):
            b64 = base64.b64encode(data[off:off + chunk]).decode()
            self.run(f"echo {b64} | base64 -d >> {q}", check=True)
        self.run(f"chmod {mode:o} {q}", check=True)

    def dmesg(self) -> str:
        return self.run("dmesg", check=True).stdout

    def payload(self, name: str, *args: str | int, timeout: float = 120.0) -> KtapResult:
        """Run /vtdx/bin/<name> and parse its KTAP output."""
        argv = " ".join([name, *(str(a) for a in args)])
        res = self.run(argv, timeout=timeout)
        return KtapResult.parse(argv, res.rc, res.stdout, res.stderr)

    def tdx_log(self) -> list[str]:
        """The kernel's TDX host lines (pr_fmt "virt/tdx: "), without timestamps."""
        return [_TIMESTAMP.sub("", ln) for ln in self.dmesg().splitlines() if "virt/tdx: " in ln]

    def pamt_ranges(self) -> list[tuple[int, int]]:
        """(first PFN, pages) of each TDMR's PAMT as the module was given it: the kernel
        allocates one TDMR's 4K/2M/1G PAMT areas as one contiguous block."""
        out = []
        for t in self.vtdx.tdmrs():
            areas = [(a["base"], a["base"] + a["size"]) for a in t["pamt"] if a["size"]]
            if areas:
                lo, hi = min(a for a, _ in areas), max(b for _, b in areas)
                out.append((lo >> 12, (hi - lo) >> 12))
        return out

    def console_tail(self, lines: int = 40) -> str:
        got = list(getattr(self.machine, "console_lines", []) or [])
        return "\n".join(got[-lines:])

    @property
    def vtdx(self) -> VtdxClient:
        if self._vtdx is None:
            raise VtdxError("the machine is not running")
        return self._vtdx

    @property
    def trace(self) -> TraceView:
        if self._trace is None:
            raise VtdxError("the machine is not running")
        return self._trace
