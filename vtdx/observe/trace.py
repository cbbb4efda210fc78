"""SEAMCALL trace: one JSON line per call, plus the in-memory ring and statistics QMP serves.

A record says which LP called which leaf with what, what came back (status decoded), how
long the module took and which kernel function made the call. Registers are hex strings
(JSON numbers above 2**53 lose bits in many readers); ``in`` lists the non-zero inputs,
``out`` the registers the call changed (RAX always), so a line stays short.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from vtdx.abi import leaves, status
from vtdx.abi.regs import REG_NAMES, Regs
from vtdx.errors import VtdxError
from vtdx.module.engine.exits import exit_reason_name
from vtdx.module.events import CallObserved

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

TRACE_FILE = "trace.jsonl"
#: The trace's first line: ``{"vtdx-header": {"profile", "features", "timing"}}`` -- what
#: platform and timing the records were made under. Readers skip it.
HEADER_KEY = "vtdx-header"
HEADER_PREFIX = b'{"vtdx-header"'

#: (rip, rsp, cr3) of the vCPU that issued the call being observed, if the daemon knows it.
CpuContext = Callable[[int], "tuple[int, int, int] | None"]
#: (rip, rsp, cr3) -> a function giving {"site", "caller", "stack", ...}. The call reads what
#: must be read while the vCPU still waits (its stack); the function it returns does the rest
#: later, off the vCPU's path (a symbols.CallerResolver.capture).
Symboliser = Callable[[int, int, int], Callable[[], dict[str, Any]]]


def parse_leaf(text: str | int) -> int:
    """Leaf number from ``35``, ``0x23``, ``TDH.SYS.LP.INIT``, ``sys.lp.init``."""
    if isinstance(text, int):
        return text
    t = text.strip()
    try:
        return int(t, 0)
    except ValueError:
        pass
    key = t.upper().replace(".", "_").replace("-", "_")
    if not key.startswith("TDH_"):
        key = "TDH_" + key
    try:
        return int(leaves.Leaf[key])
    except KeyError:
        raise VtdxError(f"unknown SEAMCALL leaf {text!r} (e.g. TDH.SYS.LP.INIT or 35)") from None


def _hex(v: int) -> str:
    return f"0x{v:x}"


class TraceRecorder:
    """The daemon's SEAMCALL trace: ring buffer and the JSONL file.

    ``attach(module)`` subscribes it to the module's ``CallObserved`` events. The subscriber
    runs on the vCPU thread before the SEAMCALL returns to the guest, so it only takes what
    cannot wait (the time, the caller's stack) and queues the call; one writer thread builds
    the record, symbolises it, writes the line and calls ``on_error`` (QMP events) for a
    failed call. That keeps the record's cost (about a third of a TD exit round trip) off the
    guest's path. Readers in this process call ``flush()`` first (``last``, ``caller_of``,
    ``close`` do); ``seq`` is the order of the calls. Counts live in the module
    (``module.stats``); ``stats()`` reads them from there.
    """

    #: How long the writer lets calls gather before it writes them (see ``_write_loop``).
    BATCH_SECONDS = 0.002

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        ring: int = 4096,
        context: CpuContext | None = None,
        symbolise: Symboliser | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = (
            open(self.path, "a", encoding="utf-8") if self.path else None  # noqa: SIM115
        )
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=ring)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self.context = context
        self.symbolise = symbolise
        self.on_error: list[Callable[[dict[str, Any]], None]] = []
        self.module: TdxModule | None = None
        self._attached = False
        self._pending: collections.deque[_Pending] = collections.deque()  # under _lock
        self._done = threading.Condition(self._lock)
        self._queued = 0            # calls queued so far (under _lock)
        self._written = 0           # of them turned into records (under _lock)
        self._writer: threading.Thread | None = None
        self._idle = True           # the writer waits for _wake (under _lock)
        self._closing = False
        #: Set by the first call queued while the writer is idle.
        self._wake = threading.Event()
        #: Set by flush()/close(): write what is queued now, without the batch wait.
        self._hurry = threading.Event()

    def write_header(self, header: dict[str, Any]) -> None:
        """The first line of the trace file (see ``HEADER_KEY``); once, before any record."""
        with self._lock:
            if self._file is not None and self._file.tell() == 0:
                self._file.write(json.dumps({HEADER_KEY: header}, separators=(",", ":"))
                                 + "\n")
                self._file.flush()

    def caller_of(self, call_id: int) -> str | None:
        """The kernel caller of a recent call (by the module's call id), if symbolised."""
        self.flush()
        with self._lock:
            for rec in reversed(self._ring):
                if rec.get("call") == call_id:
                    caller = rec.get("caller")
                    return str(caller) if caller is not None else None
        return None

    def attach(self, module: TdxModule) -> TraceRecorder:
        """Record every call ``module`` answers from now on (once; returns self)."""
        if not self._attached:
            self.module = module
            module.events.subscribe(CallObserved, self.on_call)
            self._attached = True
        return self

    def detach(self) -> None:
        """Stop recording (``stats()`` keeps reading the module attached last)."""
        if self._attached and self.module is not None:
            self.module.events.unsubscribe(CallObserved, self.on_call)
        self._attached = False

    def on_call(self, ev: CallObserved) -> None:
        """The ``CallObserved`` subscriber: queue the call for the writer thread."""
        t = time.time()
        ctx = self.context(ev.lp) if self.context is not None else None
        described: Callable[[], dict[str, Any]] | None = None
        if ctx is not None and self.symbolise is not None:
            try:
                described = self.symbolise(*ctx)
            except Exception as e:  # symbolising is best effort, the record is not
                described = _failed(e)
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="vtdx-trace",
                                                 daemon=True)
                self._writer.start()
            self._queued += 1
            self._pending.append(_Pending(next(self._seq), t, ev, ctx, described))
            if self._idle:
                self._idle = False
                self._wake.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every call queued so far is in the ring and the file."""
        with self._done:
            target = self._queued
            self._hurry.set()
            self._done.wait_for(lambda: self._written >= target, timeout)

    def _write_loop(self) -> None:
        """Write the queued calls in batches: wake on the first call after an idle spell,
        let ``BATCH_SECONDS`` of calls gather, write them all. One wake-up per record made
        the writer and the vCPU threads hand the GIL (and a futex wake-up, costly in a VM)
        back and forth on every SEAMCALL: during a TD's exit loop the writer spent 83 us of
        CPU per record, most of it in the kernel's scheduler."""
        while True:
            self._wake.wait()
            self._hurry.wait(self.BATCH_SECONDS)
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._hurry.clear()
            for p in batch:
                self._write(p)
            with self._lock:
                if self._file is not None:
                    self._file.flush()      # one write per batch; `vtdx trace -f` reads it
                if not self._pending:
                    self._idle = True
                    self._wake.clear()
                    if self._closing:
                        return

    def _write(self, p: _Pending) -> None:
        ev = p.ev
        try:
            rec = self.record(ev.lp, ev.leaf, ev.inp, ev.out, ev.seconds,
                              injected=ev.injected, t=p.t, ctx=p.ctx, described=p.described)
            rec["call"] = ev.call_id
            rec["seq"] = p.seq
            line = json.dumps(rec, separators=(",", ":")) + "\n"
        except Exception as e:  # noqa: BLE001 - one bad record must not stop the trace
            rec = {"seq": p.seq, "t": p.t, "lp": ev.lp, "leaf": ev.leaf,
                   "record-error": repr(e), "ok": True}
            line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self._done:
            self._ring.append(rec)
            if self._file is not None:
                self._file.write(line)
            self._written += 1
            self._done.notify_all()
        if not rec["ok"]:
            for cb in self.on_error:
                cb(rec)

    def record(
        self, lp: int, leaf: int, regs_in: Regs, regs_out: Regs, duration_s: float,
        *, t: float, injected: bool = False,
        ctx: tuple[int, int, int] | None = None,
        described: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The trace record of one call (``seq`` is assigned when it is logged). ``t``,
        ``ctx`` and ``described`` are the call's time, the caller's (rip, rsp, cr3) and the
        rest of its symbolisation, which ``on_call`` took while the vCPU waited."""
        vin, vout = regs_in.as_tuple(), regs_out.as_tuple()
        ins = {n: _hex(v) for n, v in zip(REG_NAMES, vin, strict=True) if v}
        outs = {
            n: _hex(b)
            for n, a, b in zip(REG_NAMES, vin, vout, strict=True)
            if a != b or n == "rax"
        }
        st = regs_out.rax
        rec: dict[str, Any] = {
            "seq": 0,
            "t": round(t, 6),
            "lp": lp,
            "leaf": leaf,
            "name": leaves.leaf_name(leaf),
            "version": (regs_in.rax >> leaves.VERSION_SHIFT) & leaves.VERSION_MASK,
            "in": ins,
            "out": outs,
            "status": _hex(st),
            "status-name": status.decode(st),
            "ok": not status.is_error(st),
            "duration-us": round(duration_s * 1e6, 1),
        }
        if leaf == leaves.Leaf.TDH_VP_ENTER and not status.is_error(st) and st & 0xFFFF_FFFF:
            # A TD exit: RAX[31:0] is the VMX exit reason, RAX[63:32] the completion status
            # (tdx-module td_exit.c; KVM's tdx_vcpu_enter_exit reads it the same way).
            reason = exit_reason_name(st)
            rec["exit-reason"] = reason
            rec["status-name"] = f"{status.decode(st & ~0xFFFF_FFFF)} exit {reason}"
        if injected:
            rec["injected"] = True
        if ctx is not None:
            rec["rip"] = _hex(ctx[0])
            if described is not None:
                try:
                    rec.update(described())
                except Exception as e:  # symbolising is best effort, the record is not
                    rec["symbolise-error"] = repr(e)
        return rec

    # -- queries (QMP)

    def last(
        self,
        count: int = 20,
        *,
        leaf: int | None = None,
        lp: int | None = None,
        errors: bool = False,
    ) -> list[dict[str, Any]]:
        self.flush()
        with self._lock:
            recs = list(self._ring)
        out = [r for r in recs if matches(r, leaves_={leaf} if leaf is not None else None,
                                          lps={lp} if lp is not None else None, errors=errors)]
        return out[-count:] if count > 0 else []

    def stats(self) -> dict[str, Any]:
        """The module's call statistics (``module.stats``); empty before ``attach``."""
        m = self.module
        if m is None:
            return {"calls": 0, "errors": 0, "per-leaf": {}, "per-lp": {}}
        with m.cond:
            return m.stats.as_dict()

    def close(self) -> None:
        """Stop recording, write what is queued and close the file."""
        self.detach()
        self.flush()
        with self._lock:
            writer, self._writer = self._writer, None
            self._closing = True
        if writer is not None:
            self._wake.set()
            self._hurry.set()
            writer.join(10)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class _Pending:
    """A call waiting for the writer thread."""

    __slots__ = ("seq", "t", "ev", "ctx", "described")

    def __init__(self, seq: int, t: float, ev: CallObserved, ctx: tuple[int, int, int] | None,
                 described: Callable[[], dict[str, Any]] | None) -> None:
        self.seq, self.t, self.ev, self.ctx, self.described = seq, t, ev, ctx, described


def _failed(e: Exception) -> Callable[[], dict[str, Any]]:
    def error() -> dict[str, Any]:
        return {"symbolise-error": repr(e)}
    return error


# --------------------------------------------------------------------------- reading


def matches(
    rec: dict[str, Any],
    *,
    leaves_: set[int] | None = None,
    lps: set[int] | None = None,
    errors: bool = False,
    status_name: str | None = None,
    caller: str | None = None,
) -> bool:
    """Does a trace record pass the filters (all given filters must hold)?"""
    if leaves_ is not None and rec.get("leaf") not in leaves_:
        return False
    if lps is not None and rec.get("lp") not in lps:
        return False
    if errors and rec.get("ok", True):
        return False
    if status_name and status_name.upper() not in str(rec.get("status-name", "")).upper():
        return False
    if caller:
        where = " ".join(str(x) for x in [rec.get("caller"), *rec.get("stack", [])])
        if caller not in where:
            return False
    return True


def _parse_line(raw: bytes, path: str | os.PathLike[str], lineno: int) -> dict[str, Any]:
    """One complete trace line as a record; VtdxError (one line) for anything else."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        rec = None
    if not isinstance(rec, dict) or "leaf" not in rec or "seq" not in rec:
        what = "binary data" if b"\0" in raw or not raw.isascii() else "not a SEAMCALL record"
        raise VtdxError(f"{path}: not a vtdx SEAMCALL trace (line {lineno}: {what})")
    return rec


def read_trace(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a trace file; a torn last line (run still writing) is skipped. A file that
    is not a trace (binary, some other text) raises VtdxError naming the first bad line."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise VtdxError(f"cannot read trace {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if line.strip() and not (lineno == 1 and line.startswith(HEADER_PREFIX)):
                yield _parse_line(line, path, lineno)


def follow_trace(path: str | os.PathLike[str], *, poll: float = 0.2,
                 wait: Callable[[float], None] = time.sleep,
                 on_wait: Callable[[], None] | None = None,
                 ) -> Iterator[dict[str, Any] | None]:
    """Every record of a run's trace, old and new, as the run writes them (``tail -f``);
    one ``None`` marks the point where the records already written end.

    Waits for the file to appear while its directory exists (``on_wait`` is called once
    then). The file stays open, so when the run ends and removes its directory the records
    written last are still read; the iterator then ends. A file outside a run directory
    (a saved trace) is followed until the caller stops.
    """
    p = Path(path)
    announced = False
    while True:
        try:
            f = open(p, "rb")  # noqa: SIM115
            break
        except FileNotFoundError:
            if not p.parent.is_dir():
                raise VtdxError(f"no trace at {p}: {p.parent} does not exist "
                                "(the run is over, or not a run directory)") from None
            if on_wait is not None and not announced:
                on_wait()
                announced = True
            wait(poll)
        except OSError as e:
            raise VtdxError(f"cannot read trace {p}: {e.strerror}") from None
    with f:
        buf = b""
        lineno = 0
        caught_up = False
        while True:
            chunk = f.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    lineno += 1
                    if line.strip() and not (lineno == 1 and line.startswith(HEADER_PREFIX)):
                        yield _parse_line(line + b"\n", p, lineno)
                continue
            if not caught_up:
                caught_up = True
                yield None
            if not p.exists():  # the run ended and removed it: what was written is read
                return
            wait(poll)


def reg_in(rec: dict[str, Any], name: str) -> int:
    """An input register of a record (absent = zero)."""
    return int(rec.get("in", {}).get(name, "0x0"), 16)


def reg_out(rec: dict[str, Any], name: str) -> int:
    """An output register of a record (absent from ``out`` = unchanged input)."""
    out = rec.get("out", {})
    return int(out[name], 16) if name in out else reg_in(rec, name)


def trace_path(run_dir: str | os.PathLike[str]) -> Path:
    """The trace file of a run directory (or the file itself when given one)."""
    p = Path(run_dir)
    return p if p.is_file() else p / TRACE_FILE


def format_record(rec: dict[str, Any]) -> str:
    """One readable line: ``#12 lp1 TDH.SYS.LP.INIT -> TDX_SYS_BUSY 3.1us init_tdx_module+0x..``."""
    ins = " ".join(f"{k}={v}" for k, v in rec.get("in", {}).items() if k != "rax")
    outs = " ".join(f"{k}={v}" for k, v in rec.get("out", {}).items() if k != "rax")
    who = rec.get("caller") or rec.get("rip")
    mark = " [injected]" if rec.get("injected") else ""
    return (
        f"#{rec.get('seq', '?')} lp{rec.get('lp')} {rec.get('name')}"
        f" -> {rec.get('status-name')}{mark} {rec.get('duration-us', 0):.1f}us"
        + (f" from {who}" if who else "")
        + (f"\n    in:  {ins}" if ins else "")
        + (f"\n    out: {outs}" if outs else "")
    )


def filter_trace(
    records: Iterable[dict[str, Any]],
    *,
    leaves_: Iterable[str | int] = (),
    lps: Iterable[int] = (),
    errors: bool = False,
    status_name: str | None = None,
    caller: str | None = None,
    last: int | None = None,
) -> list[dict[str, Any]]:
    """The records passing every filter (``last``: only the final N of those)."""
    leaf_set = {parse_leaf(x) for x in leaves_} or None
    lp_set = set(lps) or None
    out: collections.deque[dict[str, Any]] = collections.deque(maxlen=last or None)
    for rec in records:
        if matches(rec, leaves_=leaf_set, lps=lp_set, errors=errors,
                   status_name=status_name, caller=caller):
            out.append(rec)
    return list(out)
