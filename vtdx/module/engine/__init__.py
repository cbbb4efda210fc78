"""TD vCPU engine: runs a TD's guest code for TDH.VP.ENTER (unicorn 2.1.4 with vtdx's patch).

Imports: ``vtdx.abi``, ``vtdx.platform``, ``vtdx.errors``, ``vtdx.resources`` and unicorn
only, never the rest of ``vtdx.module``: the module reaches the engine through the protocols of
``interfaces`` (S-EPT walk and accept, TD metadata, CPUID configuration, TD parameters),
so either side can change its internals.

- ``engine.TdVcpuEngine``: one per TD vCPU, in the state TDH.VP.INIT leaves; ``enter(regs)``
  is the guest half of TDH.VP.ENTER (re-entry ABI in, exit ABI out).
- ``exits``: ``TdExit`` and the VP.ENTER output / re-entry register layouts.
- ``guest_leaves``: TDCALL leaves answered without leaving the TD.
- ``registry.TdEngines``: the invalidation calls the module makes on S-EPT changes.
- ``hostram.HostRam``: host RAM mapped once.
- ``unicorn_lib``: loads vtdx's patched unicorn when setup built it (imported first).

The in-process TD for engine tests and benchmarks (a ``TdView`` without the module) and the
assembled test guest live in ``vtdx.testing`` (``td_sandbox``, ``td_test_guest``).
"""

# isort: off
from vtdx.module.engine import unicorn_lib  # first: it chooses the library unicorn loads
from vtdx.module.engine.engine import TdVcpuEngine, Watchdog
# isort: on
from vtdx.module.engine.errors import EngineUnsupported
from vtdx.module.engine.exits import TdExit, vmcall_reply, vp_enter_outputs
from vtdx.module.engine.hostram import HostRam
from vtdx.module.engine.interfaces import (
    CpuidConfig,
    GpaTranslator,
    SeptWalk,
    TdConfig,
    TdMetadata,
    TdView,
)
from vtdx.module.engine.registry import TdEngines

__all__ = [
    "CpuidConfig", "EngineUnsupported", "GpaTranslator", "HostRam", "SeptWalk", "TdConfig",
    "TdEngines", "TdExit", "TdMetadata", "TdVcpuEngine", "TdView", "Watchdog",
    "unicorn_lib", "vmcall_reply", "vp_enter_outputs",
]
