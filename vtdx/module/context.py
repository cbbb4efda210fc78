"""One SEAMCALL in flight (``CallContext``) and the shape of a leaf (``Handler``).

Every leaf handler, in every family, has the same signature, like the functions of
intel/tdx-module src/vmm_dispatcher/api_calls/::

    def tdh_mem_page_demote(ctx: CallContext, inp: Regs, out: Regs) -> None

``inp`` is the caller's register file (read only); ``out`` the one returned to the caller
(it starts as a copy of ``inp``, RAX is set by the dispatcher). A handler returns nothing on
success and abandons the call by raising ``TdxError(status, rcx, rdx)``. A leaf that
completes with a non-zero status that is not an error (a warning such as
TDX_NO_HKID_READY_TO_WBCACHE, bit 63 clear) says so with ``ctx.set_status(status)`` and
returns normally. The context owns the TDX locks the call takes and releases them all when
the call ends, whatever path it ends on (the module's ``EXIT:`` label).

Control points: the dispatcher publishes "entry" before the handler and "done" after it
succeeds; a handler publishes "locked" itself with ``ctx.checkpoint("locked")`` right after
its last check, where every lock it needs is held and nothing is committed yet (the
module's ALL_CHECKS_PASSED point).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtdx.abi.regs import Regs
from vtdx.abi.status import is_error
from vtdx.module.errors import TdxError
from vtdx.module.events import CheckpointReached
from vtdx.module.locks import EXCLUSIVE, SHARED, LockKey
from vtdx.module.state import LpState, ModuleState

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

#: The one leaf handler shape.
Handler = Callable[["CallContext", Regs, Regs], None]


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """A registered leaf: its handler and the highest version it accepts."""

    leaf: int
    handler: Handler
    max_version: int = 0


def copy_regs(r: Regs) -> Regs:
    """Fast copy (the inputs are already 64-bit, so skip Regs.__post_init__)."""
    o = object.__new__(Regs)
    o.rax, o.rcx, o.rdx, o.rbx, o.rsi, o.rdi = r.rax, r.rcx, r.rdx, r.rbx, r.rsi, r.rdi
    o.r8, o.r9, o.r10, o.r11, o.r12, o.r13 = r.r8, r.r9, r.r10, r.r11, r.r12, r.r13
    o.r14, o.r15 = r.r14, r.r15
    return o


class CallContext:
    """One SEAMCALL in flight: the module and its state, the caller, the TDX locks it holds."""

    __slots__ = ("module", "gd", "lp", "leaf", "version", "id", "_held", "lp_state", "status")

    def __init__(self, module: TdxModule, lp: int, leaf: int, version: int,
                 call_id: int) -> None:
        self.module = module
        #: The module state this call works on (``module.gd``, fixed for the call).
        self.gd: ModuleState = module.gd
        self.lp = lp
        self.leaf = leaf
        self.version = version
        self.id = call_id
        self.lp_state: LpState = self.gd.lps[lp]
        self._held: list[LockKey] = []
        #: Status of a successful call (see ``set_status``).
        self.status = 0

    def set_status(self, status: int) -> None:
        """Complete the call with a non-error status other than TDX_SUCCESS (a warning);
        the handler then returns normally. Errors are raised as ``TdxError`` instead."""
        if is_error(status):
            raise ValueError(f"0x{status:x} is an error status: raise TdxError instead")
        self.status = status

    # -- TDX locks ---------------------------------------------------------------------
    def try_lock(self, key: LockKey, exclusive: bool) -> bool:
        ok = self.module.locks.try_acquire(key, EXCLUSIVE if exclusive else SHARED, self.id)
        if ok:
            self._held.append(key)
        return ok

    def lock(self, key: LockKey, exclusive: bool, busy_status: int) -> None:
        """Take a lock or abandon the call with ``busy_status``."""
        if not self.try_lock(key, exclusive):
            raise TdxError(busy_status)

    def promote(self, key: LockKey, busy_status: int) -> None:
        if not self.module.locks.try_promote(key, self.id):
            raise TdxError(busy_status)

    def unlock(self, key: LockKey) -> None:
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
    def held(self) -> tuple[LockKey, ...]:
        return tuple(self._held)

    # -- control points ----------------------------------------------------------------
    def checkpoint(self, point: str) -> None:
        """Publish ``CheckpointReached``; free when nobody subscribes."""
        subs = self.module.events.checkpoints
        if subs:
            ev = CheckpointReached(self.lp, self.leaf, point, self.id)
            for cb in subs:
                cb(ev)

    # -- physical memory -----------------------------------------------------------------
    def read(self, pa: int, size: int) -> bytes:
        """Read host memory; unbacked addresses read as all-ones, like a read with no target."""
        mem = self.module.memory
        if mem.contains(pa, size):
            return mem.read(pa, size)
        return b"\xff" * size

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")
