"""The module's one instrumentation seam: typed events and their subscribers.

Everything that watches the model -- the trace, the inspector's in-flight table, fault
recording, run statistics, control points -- subscribes here instead of replacing parts of
the module::

    module.events.subscribe(CallObserved, lambda ev: print(ev.leaf, hex(ev.out.rax)))

``CheckpointReached`` and ``FaultInjected`` are published on the calling LP's thread with the
module mutex held (a subscriber may wait on ``module.cond``, which is how control points
pause a call); ``CallObserved`` after the call, without the mutex. Publishing costs one
truth test of a list when nobody subscribes, so an unobserved module runs at full speed.
Subscribers with a higher ``order`` run later: control points, which may block, subscribe
with ``LAST`` so the others have seen the event before the call waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from vtdx.abi.regs import Regs

#: ``order`` for subscribers that may block (they run after every other subscriber).
LAST = 100


@dataclass(frozen=True, slots=True)
class CallObserved:
    """A SEAMCALL finished: inputs, outputs (``out.rax`` is the status), time inside."""

    lp: int
    leaf: int
    inp: Regs
    out: Regs
    seconds: float
    call_id: int
    injected: bool


@dataclass(frozen=True, slots=True)
class CheckpointReached:
    """A call reached a control point: "entry" (nothing locked), "locked" (every check passed,
    every lock held, nothing committed), "done" (committed, locks still held). ``inp`` (the
    caller's registers) comes with "entry" only."""

    lp: int
    leaf: int
    point: str
    call_id: int
    inp: Regs | None = None


@dataclass(frozen=True, slots=True)
class FaultInjected:
    """A fault rule answered the call with ``status`` instead of running the leaf."""

    lp: int
    leaf: int
    status: int
    rule_id: int
    call_id: int


E = TypeVar("E", CallObserved, CheckpointReached, FaultInjected)


class EventBus:
    """Subscribers per event type.

    ``calls``, ``checkpoints`` and ``faults`` are the subscriber lists the dispatcher reads
    (empty = nothing to publish). They are replaced, never changed in place, so a publisher
    iterating one on another thread is never disturbed by a (un)subscribe.
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[CallObserved], None]] = []
        self.checkpoints: list[Callable[[CheckpointReached], None]] = []
        self.faults: list[Callable[[FaultInjected], None]] = []
        #: (order, callback) per event type, in call order.
        self._subs: dict[type, list[tuple[int, object]]] = {}

    def _pairs(self, kind: type[E]) -> list[tuple[int, Callable[[E], None]]]:
        return cast("list[tuple[int, Callable[[E], None]]]", self._subs.get(kind, []))

    def subscribe(self, kind: type[E], callback: Callable[[E], None], order: int = 0) -> None:
        """Call ``callback(event)`` for every event of type ``kind``, after subscribers with a
        lower ``order`` (then in subscription order)."""
        pairs = list(self._pairs(kind))
        pairs.append((order, callback))
        pairs.sort(key=lambda p: p[0])
        self._set(kind, pairs)

    def unsubscribe(self, kind: type[E], callback: Callable[[E], None]) -> None:
        """Stop calling ``callback`` (no error if it was not subscribed)."""
        self._set(kind, [p for p in self._pairs(kind) if p[1] != callback])

    def _set(self, kind: type[E], pairs: list[tuple[int, Callable[[E], None]]]) -> None:
        callbacks: list[object] = [cb for _, cb in pairs]
        if kind is CallObserved:
            self.calls = cast("list[Callable[[CallObserved], None]]", callbacks)
        elif kind is CheckpointReached:
            self.checkpoints = cast("list[Callable[[CheckpointReached], None]]", callbacks)
        elif kind is FaultInjected:
            self.faults = cast("list[Callable[[FaultInjected], None]]", callbacks)
        else:
            raise TypeError(f"not a module event: {kind!r}")
        self._subs[kind] = list(pairs)
