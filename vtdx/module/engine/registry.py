"""The engines of one TD, and the calls the module makes when the TD's memory changes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtdx.module.engine.engine import TdVcpuEngine

#: S-EPT operations after which a cached GPA translation may be stale.
STALE_TRANSLATION_OPS = frozenset({"BLOCK", "REMOVE", "DEMOTE", "PROMOTE", "RELOCATE",
                                   "UNBLOCK"})
#: Operations that put new contents into a host page (its old translated code is stale).
NEW_CONTENT_OPS = frozenset({"ADD", "AUG", "RELOCATE", "PROMOTE", "DEMOTE"})


class TdEngines:
    """All vCPU engines of one TD. The module calls ``sept_changed`` after every S-EPT
    change it commits (TDH.MEM.SEPT.ADD/REMOVE, PAGE.ADD/AUG/REMOVE/RELOCATE, RANGE.BLOCK/
    UNBLOCK, PAGE.DEMOTE/PROMOTE) and ``kick_all`` where TDH.MEM.TRACK's IPIs would reach
    the LPs running the TD."""

    def __init__(self) -> None:
        self._engines: list[TdVcpuEngine] = []
        self._lock = threading.Lock()

    def add(self, engine: TdVcpuEngine) -> None:
        with self._lock:
            self._engines.append(engine)

    def remove(self, engine: TdVcpuEngine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    def __iter__(self):  # type: ignore[no-untyped-def]
        with self._lock:
            return iter(tuple(self._engines))

    def sept_changed(self, op: str, gpa: int = 0, level: int = 0) -> None:
        """``op`` is the leaf family name: BLOCK, UNBLOCK, REMOVE, DEMOTE, PROMOTE,
        RELOCATE, ADD, AUG. Each engine drops its translations (and translated code where
        the host page got new contents) before it next runs guest code."""
        op = op.upper()
        for e in self:
            if op in NEW_CONTENT_OPS:
                e.invalidate_code()
            elif op in STALE_TRANSLATION_OPS:
                e.invalidate_translations()
            else:
                raise ValueError(f"unknown S-EPT operation {op!r}")

    def memory_written(self) -> None:
        """The host wrote TD memory behind the engines' back (e.g. PAGE.ADD's copy)."""
        for e in self:
            e.invalidate_code()

    def kick_all(self) -> int:
        """End every running slice (the TLB-tracking IPI); returns how many were running."""
        return sum(e.kick() for e in self)
