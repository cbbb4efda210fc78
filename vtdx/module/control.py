"""Control points: pause a SEAMCALL at a chosen point, let other LPs run, resume it.

Races such as DEMOTE vs PAMT.ADD happen on hardware only when two SEAMCALLs overlap inside
the module. Every call reaches fixed control points: ``entry`` (nothing locked yet),
``locked`` (every check passed, every TDX lock held, nothing committed: the module's
ALL_CHECKS_PASSED) and ``done`` (committed, locks still held). A call waiting at a point
waits on the module's Condition, which releases the module mutex, so other LPs' SEAMCALLs
run meanwhile and meet the TDX locks it holds.

Three things make calls wait:

* **Pauses** (``pause``): the n-th call matching a ``PauseSpec`` -- leaf, LP, point, TD
  (TDR PA in RCX or RDX), GPA range (RCX of the GPA leaves), HPA range (any operand) --
  stops until ``resume``d, or for a bounded hold: until a SEAMCALL of leaf ``until_leaf``
  on another LP has returned, or ``timeout_s`` passed. Listeners (``listeners``) hear
  ``paused`` and ``resumed``; the QMP endpoint turns them into events.
* **Timing** (``vtdx.module.timing``): how long every call stays at ``locked`` so calls
  on different LPs overlap as on hardware (``Overlap``), never (``SERIAL``), or a seeded
  exploration schedule (``Explore``).
* The legacy ``set_residency(seconds)``: a fixed hold at ``locked`` for every call.

The controller subscribes to the module's events only while one of them is active, so an
idle controller costs nothing::

    pause = module.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE, point="locked")
    threading.Thread(target=module.seamcall, args=(0, demote_regs)).start()
    pause.wait_paused(5)                # DEMOTE now holds its TDX locks
    module.seamcall(1, pamt_add_regs)   # -> TDX_OPERAND_BUSY | RCX
    pause.resume()
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.errors import VtdxError
from vtdx.module.events import LAST, CallObserved, CheckpointReached, EventBus
from vtdx.module.timing import SERIAL, Timing

#: The control points every leaf offers.
POINTS = ("entry", "locked", "done")
#: Leaves whose RCX is GPA | level (what a ``gpa`` range of a pause matches).
GPA_LEAVES = frozenset(int(x) for x in (
    Leaf.TDH_MEM_PAGE_ADD, Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_PAGE_RELOCATE,
    Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_PAGE_DEMOTE,
    Leaf.TDH_MR_EXTEND, Leaf.TDH_MEM_PAGE_PROMOTE, Leaf.TDH_MEM_SEPT_RD,
    Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_MEM_SEPT_REMOVE, Leaf.TDH_MEM_RANGE_UNBLOCK,
    Leaf.TDH_MEM_RD, Leaf.TDH_MEM_WR, Leaf.TDH_MEM_SEPT_WR))
_PAGE = ~0xFFF
#: Bits of an operand that are a physical address (keyid bits and flags stripped).
_PA_MASK = ((1 << 46) - 1) & _PAGE

#: ``listener(what, handle)`` with ``what`` "paused" or "resumed" (module mutex held).
Listener = Callable[[str, "PauseHandle"], None]


def _hpa_operands(r: Regs) -> tuple[int, ...]:
    return (r.rcx, r.rdx, r.r8, r.r9, r.r12, r.r13)


#: The end of a hold spent yielding rather than in a timed wait (see ``_wait``).
SPIN_S = 60e-6


@dataclass(eq=False)
class PauseHandle:
    """One armed pause; the test waits for it to trigger and then resumes the call."""

    controller: Controller
    lp: int | None
    leaf: int | None
    point: str
    once: bool = True
    td: int | None = None
    gpa: tuple[int, int] | None = None  # [start, end)
    hpa: tuple[int, int] | None = None
    nth: int = 1
    until_leaf: int | None = None
    timeout_s: float | None = None
    id: int = 0
    #: Matching calls seen so far (the pause fires on the ``nth``).
    seen: int = 0
    hits: int = 0
    paused: bool = False
    released: bool = False
    armed: bool = True
    paused_lp: int | None = None
    paused_leaf: int | None = None
    paused_call: int | None = None
    paused_since: float = 0.0
    #: Why the last paused call went on: "resume", "until", "timeout", "cleared".
    reason: str = ""
    _gen: int = field(default=0, repr=False)

    def matches(self, lp: int, leaf: int, point: str, inp: Regs | None = None) -> bool:
        if point != self.point or (self.lp is not None and self.lp != lp) or (
                self.leaf is not None and self.leaf != leaf) or not self.armed:
            return False
        if self.td is not None or self.gpa is not None or self.hpa is not None:
            if inp is None:
                return False
            if self.td is not None and self.td not in (inp.rcx & _PA_MASK, inp.rdx & _PA_MASK):
                return False
            if self.gpa is not None:
                g = inp.rcx & _PAGE
                if leaf not in GPA_LEAVES or not self.gpa[0] <= g < self.gpa[1]:
                    return False
            if self.hpa is not None:
                lo, hi = self.hpa
                if not any(lo <= (v & _PA_MASK) < hi for v in _hpa_operands(inp)):
                    return False
        return True

    def wait_paused(self, timeout: float = 5.0) -> bool:
        """Block until a SEAMCALL sits at this pause point; False on timeout."""
        cond = self.controller.cond
        with cond:
            return cond.wait_for(lambda: self.paused, timeout)

    def wait_resumed(self, timeout: float = 5.0) -> bool:
        """Block until the call paused here went on (and the pause fired at least once)."""
        cond = self.controller.cond
        with cond:
            return cond.wait_for(lambda: self.hits > 0 and not self.paused, timeout)

    def resume(self) -> None:
        """Let the paused call continue (and disarm a one-shot pause)."""
        cond = self.controller.cond
        with cond:
            self.released = True
            self.reason = self.reason or "resume"
            if self.once:
                self.controller.disarm(self)
            cond.notify_all()

    def cancel(self) -> None:
        """Disarm without waiting for a hit (resumes a call paused here, if any)."""
        cond = self.controller.cond
        with cond:
            self.released = True
            self.reason = self.reason or "cleared"
            self.controller.disarm(self)
            cond.notify_all()

    def info(self) -> dict[str, object]:
        """Plain data for inspection (QMP's ``query-vtdx-pauses``)."""
        d: dict[str, object] = {
            "id": self.id, "point": self.point, "lp": self.lp, "leaf": self.leaf,
            "td": self.td, "gpa": list(self.gpa) if self.gpa else None,
            "hpa": list(self.hpa) if self.hpa else None, "nth": self.nth, "once": self.once,
            "until-leaf": self.until_leaf, "timeout-s": self.timeout_s, "seen": self.seen,
            "hits": self.hits, "armed": self.armed, "paused": self.paused,
        }
        if self.paused_call is not None:
            d.update({"call": self.paused_call, "call-lp": self.paused_lp,
                      "call-leaf": self.paused_leaf})
            if self.paused:
                d["waiting-s"] = round(time.monotonic() - self.paused_since, 3)
            elif self.reason:
                d["reason"] = self.reason
        return d


class Controller:
    """Pauses, the timing model and the residency time, consulted at every control point."""

    def __init__(self, cond: threading.Condition, events: EventBus) -> None:
        self.cond = cond
        self.events = events
        self._pauses: list[PauseHandle] = []
        #: Pauses that fired and are not disarmed yet or still hold a call (for listing).
        self._paused: list[PauseHandle] = []
        self.residency_s = 0.0
        self.max_pause_s = 60.0
        #: None until chosen: an in-process module is serial; the daemon picks overlap.
        self.timing: Timing | None = None
        self._timing: Timing = SERIAL
        self.listeners: list[Listener] = []
        self._ids = itertools.count(1)
        self._inputs: dict[int, Regs] = {}
        #: (LP, leaf) -> calls of that leaf the LP has begun: the key of a timing's draw.
        self._ordinals: dict[tuple[int, int], int] = {}
        self._subscribed = False
        self._observing = False
        self._num_lps = 0

    # -- subscription
    def _sync(self) -> None:
        """Subscribe while active, unsubscribe when idle (an idle controller costs nothing).
        Subscribed ``LAST``: a pause waits, so every other subscriber sees the point first."""
        want = self.active
        if want and not self._subscribed:
            self.events.subscribe(CheckpointReached, self.on_checkpoint, LAST)
        elif not want and self._subscribed:
            self.events.unsubscribe(CheckpointReached, self.on_checkpoint)
        self._subscribed = want
        observe = any(h.until_leaf is not None for h in [*self._pauses, *self._paused])
        if observe and not self._observing:
            self.events.subscribe(CallObserved, self.on_call)
        elif not observe and self._observing:
            self.events.unsubscribe(CallObserved, self.on_call)
        self._observing = observe

    @property
    def active(self) -> bool:
        """Cheap test for the dispatcher's hot path."""
        return bool(self._pauses) or self.residency_s > 0 or self._timing.holds

    # -- pauses
    def pause(
        self, lp: int | None = None, leaf: int | None = None, point: str = "locked",
        once: bool = True, *, td: int | None = None, gpa: tuple[int, int] | None = None,
        hpa: tuple[int, int] | None = None, nth: int = 1, until_leaf: int | None = None,
        timeout_s: float | None = None,
    ) -> PauseHandle:
        """Arm a pause (see the module docstring); None matches anything."""
        if not point:
            raise VtdxError("pause point name must not be empty")
        if nth < 1:
            raise VtdxError("nth must be >= 1")
        for name, rng in (("gpa", gpa), ("hpa", hpa)):
            if rng is not None and not rng[0] < rng[1]:
                raise VtdxError(f"{name} range must not be empty")
        if timeout_s is not None and timeout_s <= 0:
            raise VtdxError("timeout must be > 0 seconds")
        handle = PauseHandle(self, lp, None if leaf is None else int(leaf), point, once,
                             td=None if td is None else td & _PA_MASK, gpa=gpa, hpa=hpa,
                             nth=nth, until_leaf=None if until_leaf is None else int(until_leaf),
                             timeout_s=timeout_s, id=next(self._ids))
        with self.cond:
            self._pauses.append(handle)
            self._sync()
        return handle

    def disarm(self, handle: PauseHandle) -> None:
        """Stop matching new calls (mutex held); a call paused here stays until released."""
        handle.armed = False
        if handle in self._pauses:
            self._pauses.remove(handle)
        if not handle.paused and handle in self._paused:
            self._paused.remove(handle)
        self._sync()

    def pauses(self) -> list[PauseHandle]:
        """Armed pauses and pauses holding a call, oldest first."""
        with self.cond:
            seen: dict[int, PauseHandle] = {h.id: h for h in self._pauses}
            for h in self._paused:
                seen.setdefault(h.id, h)
            return sorted(seen.values(), key=lambda h: h.id)

    def find(self, pause_id: int) -> PauseHandle | None:
        return next((h for h in self.pauses() if h.id == pause_id), None)

    def clear(self) -> None:
        """Disarm everything and release every paused call."""
        with self.cond:
            for h in [*self._pauses, *self._paused]:
                h.released = True
                h.reason = h.reason or "cleared"
                h.armed = False
            self._pauses.clear()
            self._paused = [h for h in self._paused if h.paused]
            self._sync()
            self.cond.notify_all()

    # -- timing
    def set_timing(self, timing: Timing) -> None:
        """Choose the timing model (``vtdx.module.timing``)."""
        with self.cond:
            self.timing = timing
            self._timing = timing
            self._ordinals.clear()
            self._sync()

    @property
    def timing_in_force(self) -> Timing:
        return self._timing

    def set_residency(self, seconds: float) -> None:
        if seconds < 0:
            raise VtdxError("residency time must be >= 0")
        with self.cond:
            self.residency_s = float(seconds)
            self._sync()

    # -- the subscribers
    def on_checkpoint(self, ev: CheckpointReached) -> None:
        """The ``CheckpointReached`` subscriber (runs with the module mutex held)."""
        lp, leaf, point = ev.lp, ev.leaf, ev.point
        timing = self._timing
        if point == "entry":
            if ev.inp is not None:
                self._inputs[lp] = ev.inp
            n = self._ordinals.get((lp, leaf), 0)
            self._ordinals[(lp, leaf)] = n + 1
            if timing.holds:
                delay = timing.entry_delay(lp, leaf, n)
                if delay > 0:
                    self._wait(delay)
        if self._pauses:
            self.hit(lp, leaf, point, ev.call_id)
        if point == "locked":
            hold = self.residency_s
            if timing.holds:
                hold = max(hold, timing.hold(lp, leaf, self._ordinals.get((lp, leaf), 1) - 1))
            if hold > 0:
                self._wait(hold)

    def _wait(self, seconds: float) -> None:
        """Wait ``seconds`` with the module mutex released, as exactly as a thread can: a
        timed wait wakes tens of microseconds late (timer slack, thread wake-up), longer
        than an overlap hold itself (75 us for most leaves), so the last ``SPIN_S`` is a
        yield loop instead."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > SPIN_S:
            self.cond.wait(left - SPIN_S)
        if left <= 0:
            return
        self.cond.release()
        try:
            while time.monotonic() < deadline:
                time.sleep(0)  # releases the GIL: other LPs' calls run meanwhile
        finally:
            self.cond.acquire()

    def hit(self, lp: int, leaf: int, point: str, call_id: int = 0) -> None:
        """Called with the module mutex held; may wait (releasing it) until resumed."""
        inp = self._inputs.get(lp)
        for handle in list(self._pauses):
            if not handle.matches(lp, leaf, point, inp):
                continue
            handle.seen += 1
            if handle.seen < handle.nth:
                continue
            self._hold(handle, lp, leaf, call_id)
            break

    def _hold(self, handle: PauseHandle, lp: int, leaf: int, call_id: int) -> None:
        handle.hits += 1
        handle.paused = True
        handle.released = False
        handle.reason = ""
        handle.paused_lp, handle.paused_leaf, handle.paused_call = lp, leaf, call_id
        handle.paused_since = time.monotonic()
        if handle.once:
            handle.armed = False
            if handle in self._pauses:
                self._pauses.remove(handle)
        if handle not in self._paused:
            self._paused.append(handle)
        self._sync()
        self._tell("paused", handle)
        self.cond.notify_all()
        limit = handle.timeout_s if handle.timeout_s is not None else self.max_pause_s
        deadline = handle.paused_since + limit
        while not handle.released:
            left = deadline - time.monotonic()
            if left <= 0:
                handle.reason = "timeout"  # never wedge an LP forever
                break
            self.cond.wait(left)
        handle.paused = False
        if not handle.armed and handle in self._paused:
            self._paused.remove(handle)
        self._sync()
        self._tell("resumed", handle)
        self.cond.notify_all()

    def _tell(self, what: str, handle: PauseHandle) -> None:
        for cb in list(self.listeners):
            try:
                cb(what, handle)
            except Exception:  # a listener must never wedge a paused LP
                pass

    def on_call(self, ev: CallObserved) -> None:
        """A call returned: release bounded holds waiting for its leaf on another LP."""
        with self.cond:
            for h in self._paused:
                if (h.paused and h.until_leaf == ev.leaf and ev.lp != h.paused_lp
                        and not h.released):
                    h.released = True
                    h.reason = "until"
            self.cond.notify_all()

    def describe(self) -> dict[str, object]:
        """The timing in force, for status answers and trace headers."""
        d = dict(self._timing.describe())
        if self.timing is None:
            d["chosen"] = False
        if self.residency_s:
            d["residency-s"] = self.residency_s
        return d
