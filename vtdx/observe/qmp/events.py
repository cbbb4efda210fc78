"""QMP events: the message format and the per-name rate limit.

An event is ``{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}``
(QEMU's docs/interop/qmp-spec). A guest in an error loop can fail thousands of SEAMCALLs a
second; every client would drown in events, so each name gets ``EVENT_RATE`` per second
and the next one sent reports how many were dropped (``dropped-before``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Events of one name sent per second before the rest are dropped (and counted).
EVENT_RATE = 50

Event = dict[str, object]


def timestamp() -> dict[str, int]:
    now = time.time()
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}


def event_message(name: str, data: Mapping[str, object] | None = None) -> Event:
    return {"event": name, "data": dict(data or {}), "timestamp": timestamp()}


@dataclass(slots=True)
class _Budget:
    window_start: float = 0.0
    sent: int = 0
    dropped: int = 0


@dataclass
class RateLimiter:
    """Decides, per event name and one-second window, whether an event goes out."""

    rate: int = EVENT_RATE
    _budgets: dict[str, _Budget] = field(default_factory=dict)

    def admit(self, event: Event) -> Event | None:
        """The event to send (with ``dropped-before`` after a drop), or None to drop it."""
        b = self._budgets.setdefault(str(event["event"]), _Budget())
        now = time.monotonic()
        if now - b.window_start >= 1.0:
            b.window_start, b.sent = now, 0
        if b.sent >= self.rate:
            b.dropped += 1
            return None
        b.sent += 1
        if b.dropped:
            data = event["data"]
            assert isinstance(data, dict)
            event = {**event, "data": {**data, "dropped-before": b.dropped}}
            b.dropped = 0
        return event
