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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vtdx.abi import leaves, status
from vtdx.abi.regs import REG_NAMES, Regs
from vtdx.errors import VtdxError

TRACE_FILE = "trace.jsonl"

#: (rip, rsp, cr3) of the vCPU that issued the call being observed, if the daemon knows it.
CpuContext = Callable[[int], "tuple[int, int, int] | None"]
#: (rip, rsp, cr3) -> {"site", "caller", "stack", ...} (a symbols.CallerResolver.describe).
Symboliser = Callable[[int, int, int], dict[str, Any]]


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


@dataclass
class LeafStats:
    calls: int = 0
    errors: int = 0
    injected: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "injected": self.injected,
            "total-us": round(self.total_s * 1e6, 1),
            "avg-us": round(self.total_s * 1e6 / self.calls, 1) if self.calls else 0.0,
            "max-us": round(self.max_s * 1e6, 1),
            "statuses": dict(self.statuses),
        }


class TraceRecorder:
    """The daemon's module observer: ring buffer, statistics and the JSONL file.

    Called on the vCPU thread right after each SEAMCALL, so it does little: build a dict,
    write one line. ``on_error`` callbacks (QMP events) get each failed call's record.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        ring: int = 4096,
        context: CpuContext | None = None,
        symbolise: Symboliser | None = None,
        is_injected: Callable[[int], bool] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = (
            open(self.path, "a", buffering=1, encoding="utf-8") if self.path else None  # noqa: SIM115
        )
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=ring)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self.context = context
        self.symbolise = symbolise
        self.is_injected = is_injected
        self.on_error: list[Callable[[dict[str, Any]], None]] = []
        self.by_leaf: dict[int, LeafStats] = {}
        self.by_lp: collections.Counter[int] = collections.Counter()
        self.started = time.time()

    def __call__(
        self, lp: int, leaf: int, regs_in: Regs, regs_out: Regs, duration_s: float
    ) -> None:
        rec = self.record(lp, leaf, regs_in, regs_out, duration_s)
        with self._lock:
            rec["seq"] = next(self._seq)
            self._ring.append(rec)
            st = self.by_leaf.setdefault(leaf, LeafStats())
            st.calls += 1
            st.total_s += duration_s
            st.max_s = max(st.max_s, duration_s)
            st.statuses[rec["status-name"]] += 1
            if not rec["ok"]:
                st.errors += 1
            if rec.get("injected"):
                st.injected += 1
            self.by_lp[lp] += 1
            if self._file is not None:
                self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        if not rec["ok"]:
            for cb in self.on_error:
                cb(rec)

    def record(
        self, lp: int, leaf: int, regs_in: Regs, regs_out: Regs, duration_s: float
    ) -> dict[str, Any]:
        """The trace record of one call (``seq`` is assigned when it is logged)."""
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
            "t": round(time.time(), 6),
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
        if self.is_injected is not None and self.is_injected(lp):
            rec["injected"] = True
        ctx = self.context(lp) if self.context is not None else None
        if ctx is not None:
            rip, rsp, cr3 = ctx
            rec["rip"] = _hex(rip)
            if self.symbolise is not None:
                try:
                    rec.update(self.symbolise(rip, rsp, cr3))
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
        with self._lock:
            recs = list(self._ring)
        out = [r for r in recs if matches(r, leaves_={leaf} if leaf is not None else None,
                                          lps={lp} if lp is not None else None, errors=errors)]
        return out[-count:] if count > 0 else []

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per_leaf = {leaves.leaf_name(k): v.as_dict() for k, v in sorted(self.by_leaf.items())}
            calls = sum(v.calls for v in self.by_leaf.values())
            errors = sum(v.errors for v in self.by_leaf.values())
            total = sum(v.total_s for v in self.by_leaf.values())
            per_lp = {str(k): v for k, v in sorted(self.by_lp.items())}
        return {
            "calls": calls,
            "errors": errors,
            "module-time-us": round(total * 1e6, 1),
            "uptime-s": round(time.time() - self.started, 3),
            "per-leaf": per_leaf,
            "per-lp": per_lp,
        }

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


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
            if line.strip():
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
                    if line.strip():
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
