"""Python model of Intel's TDX module (see vtdx.module.core).

Import rule: ``vtdx.module`` imports only ``vtdx.abi``, ``vtdx.platform`` and the base modules
(``vtdx.errors``, ``vtdx.units``); everything above observes it through ``module.events``.
"""

from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.core import TdxModule
from vtdx.module.errors import TdxError
from vtdx.module.events import CallObserved, CheckpointReached, FaultInjected
from vtdx.module.state import ModuleState, SysState

__all__ = ["CallContext", "CallObserved", "CheckpointReached", "FaultInjected", "LeafSpec",
           "ModuleState", "SysState", "TdxError", "TdxModule"]
