"""SEAMCALL scripts: a scenario recorded in-process, replayed by the test guest through QEMU.

KVM cannot drive TDs on vtdx yet, so whole-stack tests of the TD leaves need another caller.
A scenario is first run in-process against a ``TdxModule`` through a ``Recorder``: every
SEAMCALL is captured with its LP, input registers, output registers and the host memory
writes made since the previous call (TDMR_INFO, TD_PARAMS, source pages...). The records
are serialised into guest RAM at ``SCRIPT_PA`` and the test guest's ``test=script`` makes
every vCPU issue its LP's records in sequence order, copying the memory images first and
comparing every output register with the recorded one. Any difference is a divergence
between the model in-process and the whole stack (plugin, transport, daemon, guest RAM).

Ordering: a record starts only when every earlier record has *started* and, unless that
earlier record is ``CONCURRENT``, *completed*. ``WAIT_GO`` additionally waits for a host
flag (``Mailbox.set_go``) and ``BARRIER`` for every earlier record to complete. This is
what makes races deterministic under QEMU: LP0's call is paused inside the daemon's module
(a control point), the host sees the pause and only then lets LP1's call go.

``REENTER`` is for TDH.VP.ENTER of a vCPU that runs guest code: the module ends a time
slice on the wall clock with the OTHER_SMI exit (RAX = 6), so how many slices an entry
takes differs between the recording and QEMU. Such a record is issued again, with the same
inputs, while it returns exactly that exit, as KVM re-enters on OTHER_SMI; the recording
keeps only the first other output, and the guest compares only that one.

Layout in guest RAM (little endian, offsets from SCRIPT_PA)::

    0x000 magic "VTDXSCR1"      0x008 u32 version, u32 nrecords
    0x010 u32 records_off       0x014 u32 results_off      0x018 u32 total_size
    0x020 u64 frontier (guest)  0x028 u64 completed (guest)
    0x040 u64 go[8] (host)      0x080 u64 progress[64] (guest: (seq+1) << 8 | phase)
    records: u32 size, u32 seq, u16 lp, u16 flags, u16 cmp_mask, u8 go, u8 nwrites,
             u64 in[14], u64 out[14], then nwrites x (u64 pa, u32 len, u32 datalen,
             data padded to 8; bytes datalen..len are zero)
    results: nrecords x (u64 state, u64 rflags, u64 regs[14])   (written by the guest)

Registers are in ``vtdx.abi.regs.REG_NAMES`` order (RAX first); ``guest/testguest/main.c``
holds the C side of this layout.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vtdx.abi.leaves import leaf_name
from vtdx.abi.regs import REG_NAMES, Regs
from vtdx.errors import VtdxError
from vtdx.platform.memory import PhysMemory

MiB = 1 << 20
#: Where the script lives in guest RAM: above the test guest (image, stacks, page tables
#: end below 8 MiB) and below the pages scenarios hand to the module (256 MiB and up).
SCRIPT_PA = 64 * MiB
#: Scenarios must keep every page they give the module at or above this address.
SCENARIO_MIN_PA = 256 * MiB
MAX_SCRIPT_BYTES = SCENARIO_MIN_PA - SCRIPT_PA

MAGIC = b"VTDXSCR1"
VERSION = 1
NUM_GO = 8
MAX_CPUS = 64
NREGS = len(REG_NAMES)
ALL_REGS = (1 << NREGS) - 1

#: Later records may start while this one is still inside the module.
CONCURRENT = 1
#: Wait until the host sets go[record.go] (after it saw, e.g., a pause hit).
WAIT_GO = 2
#: Wait until every earlier record has completed (not only started).
BARRIER = 4
#: Loop phase (the script's tail): once every earlier record completed, each CPU runs its
#: LOOP records ``iters=`` times with no ordering between CPUs, retrying on BUSY and
#: counting (``loop_calls``, ``loop_busy`` in its result line). Outputs are not compared.
LOOP = 8
#: Re-issue the call while it returns the time-slice exit (``TIME_SLICE_EXIT``).
REENTER = 16
#: TDH.VP.ENTER's RAX for the exit that ends a time slice: TDX_SUCCESS | OTHER_SMI (6).
TIME_SLICE_EXIT = 6

OFF_FRONTIER = 0x20
OFF_COMPLETED = 0x28
OFF_GO = 0x40
OFF_PROGRESS = 0x80
HEADER_SIZE = OFF_PROGRESS + 8 * MAX_CPUS

_HEAD = struct.Struct("<8sIIIII")
_REC = struct.Struct(f"<IIHHHBB{NREGS}Q{NREGS}Q")
_WRITE = struct.Struct("<QII")
RESULT_SIZE = 8 * (2 + NREGS)

#: Guest progress phases (low byte of progress[cpu]).
PHASE_TURN = 1      # waiting for its turn (earlier records)
PHASE_GO = 2        # waiting for the host's go flag
PHASE_CALL = 3      # inside SEAMCALL
PHASE_DONE = 4      # every record of this CPU finished
PHASE_NAMES = {0: "idle", PHASE_TURN: "turn", PHASE_GO: "go", PHASE_CALL: "call",
               PHASE_DONE: "done"}


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class MemWrite:
    """Bytes the host wrote at a physical address before a SEAMCALL."""

    pa: int
    data: bytes

    def encode(self) -> bytes:
        body = self.data.rstrip(b"\0")  # the guest zero-fills the rest
        return _WRITE.pack(self.pa, len(self.data), len(body)) + body.ljust(_pad8(len(body)),
                                                                            b"\0")


@dataclass
class Record:
    """One SEAMCALL of a script."""

    seq: int
    lp: int
    regs_in: Regs
    regs_out: Regs
    writes: list[MemWrite] = field(default_factory=list)
    flags: int = 0
    go: int = 0
    cmp_mask: int = ALL_REGS

    @property
    def leaf(self) -> int:
        return self.regs_in.rax & 0xFFFF

    def describe(self) -> str:
        return f"seq {self.seq} LP{self.lp} {leaf_name(self.leaf)}"

    def encode(self) -> bytes:
        if len(self.writes) > 255:
            raise VtdxError(f"{self.describe()}: more than 255 memory writes")
        body = b"".join(w.encode() for w in self.writes)
        size = _REC.size + len(body)
        return _REC.pack(size, self.seq, self.lp, self.flags, self.cmp_mask, self.go,
                         len(self.writes), *self.regs_in.as_tuple(),
                         *self.regs_out.as_tuple()) + body


@dataclass(frozen=True)
class Mismatch:
    """An output register that differs from the recorded one (or a record never run)."""

    record: Record
    reg: str
    got: int | None
    want: int | None

    def __str__(self) -> str:
        if self.got is None:
            return f"{self.record.describe()}: not executed"
        return (f"{self.record.describe()}: {self.reg} got {self.got:#018x} "
                f"want {self.want:#018x}")


@dataclass
class Script:
    """Records in sequence order, ready to be installed in guest RAM."""

    records: list[Record]

    def __post_init__(self) -> None:
        looping = False
        for i, r in enumerate(self.records):
            if looping and not r.flags & LOOP:
                raise VtdxError(f"{r.describe()}: LOOP records must be the script's tail")
            looping = looping or bool(r.flags & LOOP)
            if r.seq != i:
                raise VtdxError(f"script records must be numbered 0..n-1 (record {i} has "
                                f"seq {r.seq})")
            if not 0 <= r.go < NUM_GO:
                raise VtdxError(f"{r.describe()}: go index {r.go} out of range")

    @property
    def lps(self) -> set[int]:
        return {r.lp for r in self.records}

    def find(self, lp: int, leaf: int, start: int = 0) -> Record:
        """First record at or after ``start`` of ``leaf`` on ``lp``."""
        for r in self.records[start:]:
            if r.lp == lp and r.leaf == leaf:
                return r
        raise KeyError(f"no {leaf_name(leaf)} on LP{lp} in the script")

    def to_bytes(self) -> bytes:
        body = b"".join(r.encode() for r in self.records)
        records_off = HEADER_SIZE
        results_off = _pad8(records_off + len(body))
        total = results_off + RESULT_SIZE * len(self.records)
        if total > MAX_SCRIPT_BYTES:
            raise VtdxError(f"script needs {total} bytes; at most {MAX_SCRIPT_BYTES} fit")
        head = _HEAD.pack(MAGIC, VERSION, len(self.records), records_off, results_off, total)
        return (head.ljust(HEADER_SIZE, b"\0") + body).ljust(total, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes) -> Script:
        magic, version, n, off, _results, _total = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise VtdxError("not a vtdx SEAMCALL script (bad magic or version)")
        records = []
        for _ in range(n):
            size, seq, lp, flags, mask, go, nw, *regs = _REC.unpack_from(data, off)
            pos = off + _REC.size
            writes = []
            for _ in range(nw):
                pa, length, datalen = _WRITE.unpack_from(data, pos)
                pos += _WRITE.size
                writes.append(MemWrite(pa, data[pos:pos + datalen].ljust(length, b"\0")))
                pos += _pad8(datalen)
            if pos != off + size:
                raise VtdxError(f"script record {seq}: size {size} does not match its body")
            records.append(Record(seq, lp, Regs(*regs[:NREGS]), Regs(*regs[NREGS:]), writes,
                                  flags, go, mask))
            off += size
        return cls(records)

    # -- in guest RAM --------------------------------------------------------------------
    def install(self, mem: PhysMemory, pa: int = SCRIPT_PA) -> None:
        """Write the script (and a clear mailbox and result area) into guest RAM."""
        mem.write(pa, self.to_bytes())

    def results_off(self) -> int:
        return _pad8(HEADER_SIZE + sum(_REC.size + sum(len(w.encode()) for w in r.writes)
                                       for r in self.records))

    def outputs(self, mem: PhysMemory, pa: int = SCRIPT_PA) -> list[tuple[int, Regs] | None]:
        """What the guest got per record: (RFLAGS, registers), or None if it never ran."""
        base = pa + self.results_off()
        raw = mem.read(base, RESULT_SIZE * len(self.records))
        out: list[tuple[int, Regs] | None] = []
        for i in range(len(self.records)):
            state, rflags, *regs = struct.unpack_from(f"<2Q{NREGS}Q", raw, i * RESULT_SIZE)
            out.append((rflags, Regs(*regs)) if state == 1 else None)
        return out

    def mismatches(self, mem: PhysMemory, pa: int = SCRIPT_PA) -> list[Mismatch]:
        """Every compared register the guest saw differ from the recording, record order."""
        found = []
        for rec, got in zip(self.records, self.outputs(mem, pa), strict=True):
            if got is None:
                found.append(Mismatch(rec, "", None, None))
                continue
            rflags, regs = got
            for k, name in enumerate(REG_NAMES):
                want = getattr(rec.regs_out, name)
                if rec.cmp_mask >> k & 1 and getattr(regs, name) != want:
                    found.append(Mismatch(rec, name, getattr(regs, name), want))
            if rflags & 0x8D5:  # VMsucceed clears CF PF AF ZF SF OF
                found.append(Mismatch(rec, "rflags", rflags, rflags & ~0x8D5))
        return found


class Mailbox:
    """The host's side of the guest's script header: go flags and per-CPU progress."""

    def __init__(self, mem: PhysMemory, pa: int = SCRIPT_PA) -> None:
        self.mem = mem
        self.pa = pa

    def _u64(self, off: int) -> int:
        return int.from_bytes(self.mem.read(self.pa + off, 8), "little")

    def set_go(self, index: int = 0) -> None:
        if not 0 <= index < NUM_GO:
            raise VtdxError(f"go index {index} out of range")
        self.mem.write(self.pa + OFF_GO + 8 * index, (1).to_bytes(8, "little"))

    @property
    def frontier(self) -> int:
        return self._u64(OFF_FRONTIER)

    @property
    def completed(self) -> int:
        return self._u64(OFF_COMPLETED)

    def progress(self, cpu: int) -> tuple[int | None, int]:
        """(seq the CPU is at or None, phase) as the guest last published it."""
        v = self._u64(OFF_PROGRESS + 8 * cpu)
        return ((v >> 8) - 1 if v >> 8 else None), v & 0xFF

    def wait_progress(self, cpu: int, seq: int, phase: int, timeout: float = 30.0) -> None:
        """Poll until CPU ``cpu`` publishes (seq, phase); the guest spins there meanwhile."""
        deadline = time.monotonic() + timeout
        while self.progress(cpu) != (seq, phase):
            if time.monotonic() > deadline:
                raise VtdxError(f"guest CPU {cpu} never reached seq {seq} "
                                f"{PHASE_NAMES[phase]}; {self.describe()}")
            time.sleep(0.001)

    def describe(self, cpus: Iterable[int] = range(2)) -> str:
        parts = [f"frontier={self.frontier} completed={self.completed}"]
        for c in cpus:
            seq, phase = self.progress(c)
            parts.append(f"cpu{c}: seq={seq} {PHASE_NAMES.get(phase, phase)}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- recording

class RecordingMemory:
    """The host's view of physical memory while recording: writes are kept for the script.

    Give this to the host-side driver (LinuxHost, KvmHost), not to the module: what the
    module itself writes is its own business and is redone on replay.
    """

    def __init__(self, inner: PhysMemory, on_write: Callable[[MemWrite], None]) -> None:
        self.inner = inner
        self._on_write = on_write

    def contains(self, pa: int, size: int = 1) -> bool:
        return self.inner.contains(pa, size)

    def read(self, pa: int, size: int) -> bytes:
        return self.inner.read(pa, size)

    def write(self, pa: int, data: bytes) -> None:
        self.inner.write(pa, data)
        self._on_write(MemWrite(pa, bytes(data)))

    def zero(self, pa: int, size: int) -> None:
        self.write(pa, bytes(size))


class Recorder:
    """Runs SEAMCALLs against an in-process module and keeps them as script records.

    ``seamcall`` is a drop-in ``(lp, regs) -> Regs`` target for host drivers; ``call`` also
    takes record flags. Records are numbered when the call starts (so a call paused inside
    the module keeps its place before the calls that run meanwhile) and may come from
    several threads.
    """

    def __init__(self, seamcall: Callable[[int, Regs], Regs], memory: PhysMemory,
                 min_pa: int = SCENARIO_MIN_PA) -> None:
        self._seamcall = seamcall
        self.memory = RecordingMemory(memory, self._note_write)
        self.min_pa = min_pa
        self._lock = threading.Lock()
        self._pending: list[MemWrite] = []
        self._records: dict[int, Record] = {}
        self._next = 0

    def _note_write(self, w: MemWrite) -> None:
        if w.pa < self.min_pa:
            raise VtdxError(f"scenario writes {w.pa:#x}, below {self.min_pa:#x}: the test "
                            "guest lives there")
        with self._lock:
            self._pending.append(w)

    def __len__(self) -> int:
        """Calls started so far (the next record's sequence number)."""
        return self._next

    def seamcall(self, lp: int, regs: Regs) -> Regs:
        return self.call(lp, regs)

    def call(self, lp: int, regs: Regs, *, flags: int = 0, go: int = 0,
             cmp_mask: int = ALL_REGS) -> Regs:
        with self._lock:
            seq = self._next
            self._next += 1
            writes, self._pending = self._pending, []
        out = self._seamcall(lp, regs)
        while flags & REENTER and out.rax == TIME_SLICE_EXIT:
            out = self._seamcall(lp, regs)
        rec = Record(seq, lp, regs.copy(), out.copy(), writes, flags, go, cmp_mask)
        with self._lock:
            self._records[seq] = rec
        return out

    def add_loop(self, lp: int, regs: Regs) -> None:
        """Append a LOOP record (not run here: the guest runs it in its loop phase)."""
        with self._lock:
            if self._pending:
                raise VtdxError("memory writes before a LOOP record would never be made")
            seq = self._next
            self._next += 1
            self._records[seq] = Record(seq, lp, regs.copy(), Regs(), [], LOOP, 0, 0)

    def script(self) -> Script:
        """The records so far; every started call must have finished."""
        with self._lock:
            if len(self._records) != self._next:
                raise VtdxError("a recorded SEAMCALL is still in flight")
            if self._pending:
                raise VtdxError("memory writes after the last SEAMCALL would be lost")
            return Script([self._records[i] for i in range(self._next)])


def replay(script: Script, seamcall: Callable[[int, Regs], Regs],
           memory: PhysMemory) -> list[Mismatch]:
    """Replay a script in-process, one record after another (no CONCURRENT records).

    Checks that a script is self-contained: a fresh module given only these calls and
    memory writes answers exactly what was recorded.
    """
    found = []
    for rec in script.records:
        if rec.flags & CONCURRENT:
            raise VtdxError(f"{rec.describe()} is CONCURRENT: replay it under QEMU")
        for w in rec.writes:
            memory.write(w.pa, w.data)
        out = seamcall(rec.lp, rec.regs_in)
        while rec.flags & REENTER and out.rax == TIME_SLICE_EXIT:
            out = seamcall(rec.lp, rec.regs_in)
        for k, name in enumerate(REG_NAMES):
            got, want = getattr(out, name), getattr(rec.regs_out, name)
            if rec.cmp_mask >> k & 1 and got != want:
                found.append(Mismatch(rec, name, got, want))
    return found
