"""TDX-level locks: non-blocking shared/exclusive try-locks keyed by resource.

The module never waits for its own locks: a SEAMCALL that finds a resource locked fails with a
BUSY status and the host retries. All lock state is only touched while the module mutex is
held (see ``core.TdxModule``), so the table itself needs no further synchronisation. Keys are
any hashable value; by convention tuples such as ``("pamt", level, index)``, ``("sys",)`` or
``("tdr", pa)``.
"""

from __future__ import annotations

from collections.abc import Hashable

SHARED = 1
EXCLUSIVE = 2


class _Held:
    __slots__ = ("mode", "owners")

    def __init__(self, mode: int) -> None:
        self.mode = mode
        self.owners: dict[int, int] = {}


class LockTable:
    """Shared/exclusive try-locks; an owner is an opaque int (the call context id)."""

    def __init__(self) -> None:
        self._held: dict[Hashable, _Held] = {}

    def try_acquire(self, key: Hashable, mode: int, owner: int) -> bool:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(mode)
            held.owners[owner] = 1
            return True
        if mode == SHARED and held.mode == SHARED:
            held.owners[owner] = held.owners.get(owner, 0) + 1
            return True
        return False

    def try_promote(self, key: Hashable, owner: int) -> bool:
        """Shared -> exclusive, only if ``owner`` is the sole holder."""
        held = self._held.get(key)
        if held is None or set(held.owners) != {owner} or held.owners[owner] != 1:
            return False
        held.mode = EXCLUSIVE
        return True

    def release(self, key: Hashable, owner: int) -> None:
        held = self._held.get(key)
        if held is None or owner not in held.owners:
            return
        n = held.owners[owner] - 1
        if n:
            held.owners[owner] = n
        else:
            del held.owners[owner]
        if not held.owners:
            del self._held[key]

    def mode_of(self, key: Hashable) -> int:
        """0 if free, else SHARED or EXCLUSIVE."""
        held = self._held.get(key)
        return held.mode if held else 0

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return len(self._held)

    def snapshot(self) -> list[dict[str, object]]:
        """Plain data: every held lock with its mode and owners."""
        return [
            {"key": repr(k), "mode": "exclusive" if h.mode == EXCLUSIVE else "shared",
             "owners": sorted(h.owners)}
            for k, h in self._held.items()
        ]
