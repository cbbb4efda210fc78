"""Python model of Intel's TDX module (see vtdx.module.core).

Import rule: ``vtdx.module`` imports only ``vtdx.abi``, ``vtdx.platform`` and the base
modules (``vtdx.errors``, ``vtdx.units``, ``vtdx.lazy``); everything above observes it
through ``module.events``.

The names below load on first use (PEP 562): importing a light part (``timing``,
``control``, ``events``, ``stats``) does not import the leaves, the state and the TD engine,
~30 ms that `vtdx run` spends while QEMU boots instead of before it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtdx.lazy import exports

if TYPE_CHECKING:
    from vtdx.module.context import CallContext, LeafSpec
    from vtdx.module.core import TdxModule
    from vtdx.module.errors import TdxError
    from vtdx.module.events import CallObserved, CheckpointReached, FaultInjected
    from vtdx.module.state import ModuleState, SysState

#: Exported name -> the submodule that defines it.
_SOURCE = {
    "CallContext": "context", "LeafSpec": "context", "TdxModule": "core", "TdxError": "errors",
    "CallObserved": "events", "CheckpointReached": "events", "FaultInjected": "events",
    "ModuleState": "state", "SysState": "state",
}

__all__ = ["CallContext", "CallObserved", "CheckpointReached", "FaultInjected", "LeafSpec",
           "ModuleState", "SysState", "TdxError", "TdxModule"]

__getattr__ = exports(__name__, globals(), _SOURCE)
