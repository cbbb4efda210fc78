"""One SEAMCALL in flight (``CallContext``) and the shape of a leaf (``LeafSpec``).

Every leaf handler, in every family, takes the call context and reads its operands from the
input register file; it writes results into the output register file and abandons the call by
raising ``TdxError``. The context owns the TDX locks the call takes and releases them all when
the call ends, whatever path it ends on (the module's ``EXIT:`` label).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vtdx.abi.regs import Regs
from vtdx.module.errors import TdxError
from vtdx.module.locks import EXCLUSIVE, SHARED

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule


Handler = Callable[["CallContext"], int | None]


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """A registered leaf: its handler and the highest version it accepts."""

    leaf: int
    handler: Handler
    max_version: int = 0


class Controller(Protocol):
    """Control-point hook (implemented by vtdx.module.control, owned by TD)."""

    def checkpoint(self, ctx: CallContext, name: str) -> None: ...


Observer = Callable[[int, int, Regs, Regs, float], None]


def copy_regs(r: Regs) -> Regs:
    """Fast copy (the inputs are already 64-bit, so skip Regs.__post_init__)."""
    o = object.__new__(Regs)
    o.rax, o.rcx, o.rdx, o.rbx, o.rsi, o.rdi = r.rax, r.rcx, r.rdx, r.rbx, r.rsi, r.rdi
    o.r8, o.r9, o.r10, o.r11, o.r12, o.r13 = r.r8, r.r9, r.r10, r.r11, r.r12, r.r13
    o.r14, o.r15 = r.r14, r.r15
    return o


class CallContext:
    """One SEAMCALL in flight: inputs, outputs, and the TDX locks it holds."""

    __slots__ = ("module", "lp", "leaf", "version", "regs", "out", "id", "_held", "lp_state")

    def __init__(self, module: TdxModule, lp: int, leaf: int, version: int, regs: Regs,
                 out: Regs, call_id: int) -> None:
        self.module = module
        self.lp = lp
        self.leaf = leaf
        self.version = version
        self.regs = regs
        self.out = out
        self.id = call_id
        self.lp_state = module.lps[lp]
        self._held: list[Hashable] = []

    # -- TDX locks ---------------------------------------------------------------------
    def try_lock(self, key: Hashable, exclusive: bool) -> bool:
        ok = self.module.locks.try_acquire(key, EXCLUSIVE if exclusive else SHARED, self.id)
        if ok:
            self._held.append(key)
        return ok

    def lock(self, key: Hashable, exclusive: bool, busy_status: int) -> None:
        """Take a lock or abandon the call with ``busy_status``."""
        if not self.try_lock(key, exclusive):
            raise TdxError(busy_status)

    def promote(self, key: Hashable, busy_status: int) -> None:
        if not self.module.locks.try_promote(key, self.id):
            raise TdxError(busy_status)

    def unlock(self, key: Hashable) -> None:
        """Release one lock early (most handlers just let the call end)."""
        if key in self._held:
            self._held.remove(key)
            self.module.locks.release(key, self.id)

    def release_all(self) -> None:
        locks = self.module.locks
        for key in reversed(self._held):
            locks.release(key, self.id)
        self._held.clear()

    @property
    def held(self) -> tuple[Hashable, ...]:
        return tuple(self._held)

    # -- hooks -------------------------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        """Control point; a no-op unless a controller is installed."""
        controller = self.module.controller
        if controller is not None:
            controller.checkpoint(self, name)

    # -- physical memory -----------------------------------------------------------------
    def read(self, pa: int, size: int) -> bytes:
        """Read host memory; unbacked addresses read as all-ones, like a read with no target."""
        mem = self.module.memory
        if mem.contains(pa, size):
            return mem.read(pa, size)
        return b"\xff" * size

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")
