"""Control points: pause a SEAMCALL after it took its locks, let another LP run, resume.

Races such as DEMOTE vs PAMT.ADD happen on hardware only when two SEAMCALLs overlap inside
the module. The model makes the overlap deterministic: every call reaches fixed control
points (``"locked"`` = every TDX lock of the call is held, see below); an armed pause for
(lp, leaf, point) makes that call wait on the module's Condition, which releases the module
mutex, so a second thread can issue another LP's SEAMCALL and find the
TDX locks still held. ``residency_s`` gives every call a realistic time inside the module
(again waiting on the Condition) for runs under a live guest.

The controller is a ``CheckpointReached`` subscriber (``vtdx.module.events``), subscribed
only while a pause is armed or a residency time is set, so an idle controller costs nothing.

Usage (every module has one, ``module.control``)::

    pause = module.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE, point="locked")
    threading.Thread(target=module.seamcall, args=(0, demote_regs)).start()
    pause.wait_paused(5)                # DEMOTE now holds its TDX locks
    module.seamcall(1, pamt_add_regs)   # -> TDX_OPERAND_BUSY | RCX
    pause.resume()
    module.control.set_residency(0.0002)  # every call stays 200 us inside the module

Points every leaf offers: "entry" (nothing locked yet; published by the dispatcher),
"locked" (all checks passed and locks held, nothing committed; published by the leaf) and
"done" (committed, locks still held; published by the dispatcher).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vtdx.errors import VtdxError
from vtdx.module.events import LAST, CheckpointReached, EventBus


@dataclass(eq=False)
class PauseHandle:
    """One armed pause; the test waits for it to trigger and then resumes the call."""

    controller: Controller
    lp: int | None
    leaf: int | None
    point: str
    once: bool = True
    hits: int = 0
    paused: bool = False
    released: bool = False
    paused_lp: int | None = None
    paused_leaf: int | None = None
    _gen: int = field(default=0, repr=False)

    def matches(self, lp: int, leaf: int, point: str) -> bool:
        return (
            point == self.point
            and (self.lp is None or self.lp == lp)
            and (self.leaf is None or self.leaf == leaf)
            and not (self.once and self.hits)
        )

    def wait_paused(self, timeout: float = 5.0) -> bool:
        """Block until a SEAMCALL sits at this pause point; False on timeout."""
        cond = self.controller.cond
        with cond:
            return cond.wait_for(lambda: self.paused, timeout)

    def resume(self) -> None:
        """Let the paused call continue (and disarm a one-shot pause)."""
        cond = self.controller.cond
        with cond:
            self.released = True
            if self.once:
                self.controller.disarm(self)
            cond.notify_all()

    def cancel(self) -> None:
        """Disarm without waiting for a hit (resumes a call paused here, if any)."""
        self.resume()
        with self.controller.cond:
            self.controller.disarm(self)


class Controller:
    """Registry of pauses plus the residency time, consulted by ``ctx.checkpoint``."""

    def __init__(self, cond: threading.Condition, events: EventBus) -> None:
        self.cond = cond
        self.events = events
        self._pauses: list[PauseHandle] = []
        self.residency_s = 0.0
        self.max_pause_s = 60.0
        self._subscribed = False

    def _sync(self) -> None:
        """Subscribe while active, unsubscribe when idle (an idle controller costs nothing).
        Subscribed ``LAST``: a pause waits, so every other subscriber sees the point first."""
        want = self.active
        if want and not self._subscribed:
            self.events.subscribe(CheckpointReached, self.on_checkpoint, LAST)
        elif not want and self._subscribed:
            self.events.unsubscribe(CheckpointReached, self.on_checkpoint)
        self._subscribed = want

    @property
    def active(self) -> bool:
        """Cheap test for the dispatcher's hot path."""
        return bool(self._pauses) or self.residency_s > 0

    def pause(
        self, lp: int | None = None, leaf: int | None = None, point: str = "locked",
        once: bool = True,
    ) -> PauseHandle:
        """Arm a pause for (lp, leaf, point); None matches any LP / leaf."""
        if not point:
            raise VtdxError("pause point name must not be empty")
        handle = PauseHandle(self, lp, None if leaf is None else int(leaf), point, once)
        with self.cond:
            self._pauses.append(handle)
            self._sync()
        return handle

    def disarm(self, handle: PauseHandle) -> None:
        if handle in self._pauses:
            self._pauses.remove(handle)
            self._sync()

    def clear(self) -> None:
        """Disarm everything and release every paused call."""
        with self.cond:
            for h in self._pauses:
                h.released = True
            self._pauses.clear()
            self._sync()
            self.cond.notify_all()

    def set_residency(self, seconds: float) -> None:
        if seconds < 0:
            raise VtdxError("residency time must be >= 0")
        with self.cond:
            self.residency_s = float(seconds)
            self._sync()

    def hit(self, lp: int, leaf: int, point: str) -> None:
        """Called with the module mutex held; may wait (releasing it) until resumed."""
        for handle in list(self._pauses):
            if handle.matches(lp, leaf, point):
                handle.hits += 1
                handle.paused = True
                handle.released = False
                handle.paused_lp, handle.paused_leaf = lp, leaf
                self.cond.notify_all()
                deadline = time.monotonic() + self.max_pause_s
                while not handle.released:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break  # never wedge an LP forever; a forgotten pause times out
                    self.cond.wait(left)
                handle.paused = False
                self.cond.notify_all()
                break
        if point == "locked" and self.residency_s > 0:
            deadline = time.monotonic() + self.residency_s
            while (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)

    def on_checkpoint(self, ev: CheckpointReached) -> None:
        """The ``CheckpointReached`` subscriber (runs with the module mutex held)."""
        if self._pauses or self.residency_s > 0:
            self.hit(ev.lp, ev.leaf, ev.point)
