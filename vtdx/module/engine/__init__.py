"""TD vCPU engine: runs a TD's guest code for TDH.VP.ENTER (unicorn 2.1.4 with vtdx's patch).

Imports: ``vtdx.abi``, ``vtdx.platform``, the base modules (``vtdx.errors``,
``vtdx.resources``, ``vtdx.lazy``) and unicorn only, never the rest of ``vtdx.module``:
the module reaches the engine through the protocols of ``interfaces`` (S-EPT walk and
accept, TD metadata, CPUID configuration, TD parameters), so either side can change its
internals.

- ``engine.TdVcpuEngine``: one per TD vCPU, in the state TDH.VP.INIT leaves; ``enter(regs)``
  is the guest half of TDH.VP.ENTER (re-entry ABI in, exit ABI out).
- ``exits``: ``TdExit`` and the VP.ENTER output / re-entry register layouts.
- ``guest_leaves``: TDCALL leaves answered without leaving the TD.
- ``registry.TdEngines``: the invalidation calls the module makes on S-EPT changes.
- ``hostram.HostRam``: host RAM mapped once.
- ``unicorn_lib``: loads vtdx's patched unicorn when setup built it (imported first, by
  this package; the rest loads on first use).

The in-process TD for engine tests and benchmarks (a ``TdView`` without the module) and the
assembled test guest live in ``vtdx.testing`` (``td_sandbox``, ``td_test_guest``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtdx.lazy import exports
from vtdx.module.engine import unicorn_lib  # first: it chooses the library unicorn loads

if TYPE_CHECKING:
    from vtdx.module.engine.engine import TdVcpuEngine, Watchdog
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

#: Exported name -> the submodule that defines it; loaded on first use (PEP 562), so that
#: ``exits`` or ``interfaces`` alone do not import unicorn and the engine.
_SOURCE = {
    "TdVcpuEngine": "engine", "Watchdog": "engine", "EngineUnsupported": "errors",
    "TdExit": "exits", "vmcall_reply": "exits", "vp_enter_outputs": "exits",
    "HostRam": "hostram", "CpuidConfig": "interfaces", "GpaTranslator": "interfaces",
    "SeptWalk": "interfaces", "TdConfig": "interfaces", "TdMetadata": "interfaces",
    "TdView": "interfaces", "TdEngines": "registry",
}

__all__ = [
    "CpuidConfig", "EngineUnsupported", "GpaTranslator", "HostRam", "SeptWalk", "TdConfig",
    "TdEngines", "TdExit", "TdMetadata", "TdVcpuEngine", "TdView", "Watchdog",
    "unicorn_lib", "vmcall_reply", "vp_enter_outputs",
]

__getattr__ = exports(__name__, globals(), _SOURCE)
