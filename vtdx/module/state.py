"""Module-wide state: the system state machine, per-LP data and the key ownership table
(tdx_global_data.h, tdx_local_data.h)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

#: Key ownership table states (KOT_STATE_* in tdx_global_data.h).
KOT_FREE = 0
KOT_ASSIGNED = 1
KOT_FLUSHED = 2
KOT_RESERVED = 3


class SysState(IntEnum):
    """Module-wide state (sysinit_state_e in tdx_global_data.h)."""

    SYSINIT_PENDING = 0
    SYSINIT_DONE = 1
    SYSCONFIG_DONE = 2
    SYS_READY = 3
    SYS_SHUTDOWN = 4


@dataclass(slots=True)
class LpState:
    """Per logical processor state (the module's local data)."""

    lp: int
    package: int
    initialized: bool = False
    busy: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"lp": self.lp, "package": self.package, "initialized": self.initialized,
                "busy": self.busy}
