"""TDX-level locks: non-blocking shared/exclusive try-locks keyed by resource.

The module never waits for its own locks: a SEAMCALL that finds a resource locked fails with a
BUSY status and the host retries. All lock state is only touched while the module mutex is
held (see ``core.TdxModule``), so the table itself needs no further synchronisation.

Every key is a ``LockKey``, built by one of the constructors below (PAMT entry keys come from
``vtdx.module.pamt.pamt_key``, which owns page levels); ``str(key)`` is what inspection shows,
e.g. ``pamt 2M 0x1b0`` or ``opstate tdr=0x7f000``.
"""

from __future__ import annotations

from typing import NamedTuple, TypedDict

#: Names of the page levels, as PAMT keys print them (index = level).
_LEVEL_NAMES = ("4K", "2M", "1G")


class LockKey(NamedTuple):
    """What one TDX lock protects.

    ``kind`` names the resource; ``level`` is the PAMT level of a ``pamt`` key (else -1);
    ``addr`` is the page index (pamt), the TDR PA (sept, opstate, epoch), the S-EPT page PA
    (septe), the package (ket, wbt) or the TDMR index (tdmr); ``entry`` is the entry index
    inside an S-EPT page (septe). A NamedTuple, so hashing stays as cheap as a plain tuple.
    """

    kind: str
    level: int = -1
    addr: int = 0
    entry: int = 0

    def __str__(self) -> str:
        kind = self.kind
        if kind == "pamt":
            return f"pamt {_LEVEL_NAMES[self.level]} 0x{self.addr:x}"
        if kind in ("sept", "opstate", "epoch"):
            return f"{kind} tdr=0x{self.addr:x}"
        if kind == "septe":
            return f"septe page=0x{self.addr:x} [{self.entry}]"
        if kind in ("ket", "wbt"):
            return f"{kind} package {self.addr}"
        if kind == "tdmr":
            return f"tdmr {self.addr}"
        return kind


_tuple_new = tuple.__new__


def lock_key(kind: str, level: int = -1, addr: int = 0, entry: int = 0) -> LockKey:
    """``LockKey(...)`` without the NamedTuple's Python-level ``__new__``: keys are built on
    every SEAMCALL (up to three per PAMT walk), so this is the one way the model makes them."""
    return _tuple_new(LockKey, (kind, level, addr, entry))


#: The module-wide lock every TDH.SYS.* configuration leaf takes.
SYS_LOCK = lock_key("sys")
#: The key ownership table (KOT).
KOT_LOCK = lock_key("kot")


def tdmr_key(index: int) -> LockKey:
    """One TDMR during TDH.SYS.TDMR.INIT."""
    return lock_key("tdmr", -1, index)


def sept_key(tdr_pa: int) -> LockKey:
    """A TD's whole S-EPT tree (the TDCS sept_lock)."""
    return lock_key("sept", -1, tdr_pa)


def septe_key(page_pa: int, index: int) -> LockKey:
    """One S-EPT entry (sept_lock_acquire_host); S-EPT pages belong to exactly one TD."""
    return lock_key("septe", -1, page_pa, index)


def opstate_key(tdr_pa: int) -> LockKey:
    """A TD's TDCS OP_STATE lock."""
    return lock_key("opstate", -1, tdr_pa)


def epoch_key(tdr_pa: int) -> LockKey:
    """A TD's TLB epoch lock (TDH.MEM.TRACK)."""
    return lock_key("epoch", -1, tdr_pa)


def ket_key(package: int) -> LockKey:
    """A package's key encryption table (TDH.MNG.KEY.CONFIG)."""
    return lock_key("ket", -1, package)


def wbt_key(package: int) -> LockKey:
    """A package's cache write-back state (TDH.PHYMEM.CACHE.WB)."""
    return lock_key("wbt", -1, package)


class HeldLock(TypedDict):
    """One held lock as ``LockTable.snapshot`` reports it."""

    key: str
    mode: str
    owners: list[int]


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
        self._held: dict[LockKey, _Held] = {}

    def try_acquire(self, key: LockKey, mode: int, owner: int) -> bool:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(mode)
            held.owners[owner] = 1
            return True
        if mode == SHARED and held.mode == SHARED:
            held.owners[owner] = held.owners.get(owner, 0) + 1
            return True
        return False

    def try_promote(self, key: LockKey, owner: int) -> bool:
        """Shared -> exclusive, only if ``owner`` is the sole holder."""
        held = self._held.get(key)
        if held is None or set(held.owners) != {owner} or held.owners[owner] != 1:
            return False
        held.mode = EXCLUSIVE
        return True

    def release(self, key: LockKey, owner: int) -> None:
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

    def mode_of(self, key: LockKey) -> int:
        """0 if free, else SHARED or EXCLUSIVE."""
        held = self._held.get(key)
        return held.mode if held else 0

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return len(self._held)

    def snapshot(self) -> list[HeldLock]:
        """Plain data: every held lock with its mode and owners."""
        return [
            {"key": str(k), "mode": "exclusive" if h.mode == EXCLUSIVE else "shared",
             "owners": sorted(h.owners)}
            for k, h in self._held.items()
        ]
