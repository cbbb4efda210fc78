"""Who made a call BUSY: every TDX_*BUSY a caller got from real lock contention, explained.

``ContentionLog.attach(module)`` puts an ``ObservedLockTable`` in front of the module's
lock table (same held locks, so it can be attached to a running module) which remembers,
per call, the lock it failed to take and who held it. When such a call ends with a BUSY
status, the log keeps a ``BusyRecord``: the leaf, status (operand id included), the lock,
the call holding it (LP, leaf, control point) and -- once that LP issues its next call --
what the caller did next: retried the same leaf (with the same operands or not) or moved
on. Fault injection never reaches the lock table, so injected BUSY statuses are not here.

Cost: nothing on a lock that is free; one dict write on a lock that is taken. The log
subscribes to ``CheckpointReached`` (to know which call is where) and ``CallObserved``
only while attached.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtdx.abi import status as st
from vtdx.abi.leaves import leaf_name
from vtdx.abi.regs import Regs
from vtdx.module.events import CallObserved, CheckpointReached
from vtdx.module.locks import EXCLUSIVE, LockKey, LockTable

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

#: Statuses that mean "a resource was locked" (TDX_OPERAND_BUSY and its relatives).
BUSY_BASES = frozenset({st.TDX_OPERAND_BUSY, st.TDX_PREVIOUS_TLB_EPOCH_BUSY, st.TDX_SYS_BUSY,
                        st.TDX_OPERAND_BUSY_HOST_PRIORITY})


#: Operand ids that name a register (x86 encoding: RCX=1 ... R15=15; RSP/RBP never used).
OPERAND_REGS = {1: "rcx", 2: "rdx", 3: "rbx", 6: "rsi", 7: "rdi", 8: "r8", 9: "r9",
                10: "r10", 11: "r11", 12: "r12", 13: "r13", 14: "r14", 15: "r15"}


def is_busy(status: int) -> bool:
    return st.base(status) in BUSY_BASES


@dataclass(frozen=True, slots=True)
class Conflict:
    """A try-lock that failed: the key, the mode wanted, the holders and their mode."""

    key: LockKey
    wanted: str
    held: str
    holders: tuple[int, ...]


class ObservedLockTable(LockTable):
    """A ``LockTable`` that remembers each owner's last failed try-lock."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicts: dict[int, Conflict] = {}

    @classmethod
    def over(cls, table: LockTable) -> ObservedLockTable:
        """An observed table sharing ``table``'s held locks (the module mutex is held)."""
        new = cls()
        new._held = table._held
        return new

    def _note(self, key: LockKey, owner: int, wanted: str) -> None:
        h = self._held.get(key)
        if h is not None:
            self.conflicts[owner] = Conflict(
                key, wanted, "exclusive" if h.mode == EXCLUSIVE else "shared",
                tuple(o for o in h.owners if o != owner))

    def try_acquire(self, key: LockKey, mode: int, owner: int) -> bool:
        if LockTable.try_acquire(self, key, mode, owner):
            return True
        self._note(key, owner, "exclusive" if mode == EXCLUSIVE else "shared")
        return False

    def try_promote(self, key: LockKey, owner: int) -> bool:
        if LockTable.try_promote(self, key, owner):
            return True
        self._note(key, owner, "exclusive")
        return False


@dataclass
class CallInfo:
    """A call inside the module, as the log last saw it."""

    call: int
    lp: int
    leaf: int
    point: str
    inp: Regs | None


@dataclass
class BusyRecord:
    """One BUSY a caller received from a held lock (see the module docstring)."""

    index: int
    call: int
    lp: int
    leaf: int
    status: int
    inp: Regs
    conflict: Conflict | None
    holders: list[CallInfo]
    next: dict[str, object] | None = None

    def operand_value(self) -> int | None:
        """The register the status's operand id names (e.g. RCX), if it is a register."""
        name = OPERAND_REGS.get(st.operand(self.status))
        return None if name is None else int(getattr(self.inp, name))

    def key(self) -> tuple[object, ...]:
        """What two runs compare: who met whom on what, not when."""
        h = self.holders[0] if self.holders else None
        return (self.lp, leaf_name(self.leaf), st.decode(self.status),
                str(self.conflict.key) if self.conflict else None,
                h.lp if h else None, leaf_name(h.leaf) if h else None)


class ContentionLog:
    """BUSY records of one module (see the module docstring)."""

    def __init__(self, limit: int = 10000) -> None:
        self.records: list[BusyRecord] = []
        self.limit = limit
        self.dropped = 0
        self.module: TdxModule | None = None
        #: call id -> the call's "entry" event and its latest control point (no allocation
        #: per call: the events themselves are kept until the call ends).
        self._inflight: dict[int, tuple[CheckpointReached, str]] = {}
        self._waiting_next: dict[int, BusyRecord] = {}
        self._lock = threading.Lock()

    # -- lifetime
    def attach(self, module: TdxModule) -> ContentionLog:
        with module.cond:
            if not isinstance(module.locks, ObservedLockTable):
                module.locks = ObservedLockTable.over(module.locks)
            module.contention = self
            self.module = module
            module.events.subscribe(CheckpointReached, self.on_checkpoint)
            module.events.subscribe(CallObserved, self.on_call)
        return self

    def detach(self) -> None:
        m = self.module
        if m is None:
            return
        with m.cond:
            m.events.unsubscribe(CheckpointReached, self.on_checkpoint)
            m.events.unsubscribe(CallObserved, self.on_call)
            if m.contention is self:
                m.contention = None
        self.module = None

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self._waiting_next.clear()
            self.dropped = 0

    # -- events
    def on_checkpoint(self, ev: CheckpointReached) -> None:
        if ev.point == "entry":
            self._inflight[ev.call_id] = (ev, "entry")
        else:
            got = self._inflight.get(ev.call_id)
            self._inflight[ev.call_id] = (got[0] if got else ev, ev.point)

    def _info(self, call_id: int) -> CallInfo:
        got = self._inflight.get(call_id)
        if got is None:
            return CallInfo(call_id, -1, -1, "?", None)
        ev, point = got
        return CallInfo(call_id, ev.lp, ev.leaf, point, ev.inp)

    def on_busy(self, call_id: int, lp: int, leaf: int, status: int, inp: Regs) -> None:
        """The dispatcher's report of a call that failed with ``status`` (mutex held)."""
        table = self.module.locks if self.module is not None else None
        conflict = (table.conflicts.pop(call_id, None)
                    if isinstance(table, ObservedLockTable) else None)
        if conflict is None or not is_busy(status):
            return  # BUSY without a lock that was taken: not contention between calls
        holders = [self._info(o) for o in conflict.holders]
        with self._lock:
            if len(self.records) >= self.limit:
                self.dropped += 1
                return
            rec = BusyRecord(len(self.records), call_id, lp, leaf, status, inp, conflict,
                             holders)
            self.records.append(rec)
            # A caller that retries into the same lock: this BUSY is the previous one's
            # next call (its CallObserved comes after, when this record is the one waiting).
            prev = self._waiting_next.get(lp)
            if prev is not None and prev.call != call_id:
                self._follow(prev, call_id, leaf, inp, status)
            self._waiting_next[lp] = rec

    def on_call(self, ev: CallObserved) -> None:
        self._inflight.pop(ev.call_id, None)
        table = self.module.locks if self.module is not None else None
        if isinstance(table, ObservedLockTable) and table.conflicts:
            table.conflicts.pop(ev.call_id, None)
        if ev.lp not in self._waiting_next:  # the common case: nothing to follow up
            return
        with self._lock:
            rec = self._waiting_next.get(ev.lp)
            if rec is None or rec.call == ev.call_id:
                return
            del self._waiting_next[ev.lp]
            self._follow(rec, ev.call_id, ev.leaf, ev.inp, ev.out.rax)

    @staticmethod
    def _follow(rec: BusyRecord, call_id: int, leaf: int, inp: Regs, status: int) -> None:
        """Record what the caller of ``rec`` did next: the LP's next call."""
        same_leaf = leaf == rec.leaf
        rec.next = {
            "call": call_id,
            "leaf": leaf_name(leaf),
            "action": "retried" if same_leaf else "moved-on",
            "same-operands": same_leaf and inp.as_tuple()[1:] == rec.inp.as_tuple()[1:],
            "status": st.decode(status),
            "ok": not st.is_error(status),
        }

    # -- answers
    def snapshot(self) -> list[BusyRecord]:
        with self._lock:
            return list(self.records)
