"""Fault injection: make chosen SEAMCALLs fail with a chosen status.

Used by tests and (through QMP) by people reproducing a kernel's error paths: "the next 3
TDH.MEM.PAGE.AUG calls on LP 1 return TDX_OPERAND_BUSY | RCX" or "10 % of TDH.SYS.TDMR.INIT
calls fail". Deterministic for a given seed, so a failing run can be replayed.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import TypedDict

from vtdx.abi.regs import MASK64


class FaultRuleInfo(TypedDict):
    """One fault rule as ``FaultInjector.snapshot`` reports it."""

    id: int
    status: int
    leaf: int | None
    count: int | None
    probability: float
    lps: list[int] | None
    after: int
    fired: int


@dataclass(slots=True)
class FaultRule:
    """Inject ``status`` into calls of ``leaf`` (None = any leaf) on ``lps`` (None = any),
    once ``after`` matching calls have run normally (e.g. fail the second TD's creation)."""

    status: int
    leaf: int | None = None
    count: int | None = None
    probability: float = 1.0
    lps: frozenset[int] | None = None
    after: int = 0
    passed: int = 0
    fired: int = 0
    id: int = 0

    def matches(self, lp: int, leaf: int) -> bool:
        return (self.leaf is None or self.leaf == leaf) and (self.lps is None or lp in self.lps)

    def to_dict(self) -> FaultRuleInfo:
        return {
            "id": self.id, "status": self.status, "leaf": self.leaf, "count": self.count,
            "probability": self.probability,
            "lps": sorted(self.lps) if self.lps is not None else None, "after": self.after,
            "fired": self.fired,
        }


@dataclass
class FaultInjector:
    """Ordered fault rules; the first matching rule that fires wins."""

    seed: int = 0
    rules: list[FaultRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._next_id = 1
        self._lock = threading.Lock()
        #: Fast-path flag read by the dispatcher without taking the lock.
        self.active = bool(self.rules)

    def add(self, status: int, leaf: int | None = None, *, count: int | None = None,
            probability: float = 1.0, lps: set[int] | frozenset[int] | None = None,
            after: int = 0) -> int:
        """Add a rule; returns its id. ``count`` None = unlimited; the first ``after``
        matching calls run normally."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if after < 0:
            raise ValueError("after must be >= 0")
        with self._lock:
            rule = FaultRule(status & MASK64, leaf, count, probability,
                             frozenset(lps) if lps is not None else None, after,
                             id=self._next_id)
            self._next_id += 1
            self.rules.append(rule)
            self.active = True
            return rule.id

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self.rules)
            self.rules = [r for r in self.rules if r.id != rule_id]
            self.active = bool(self.rules)
            return len(self.rules) != before

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.active = False

    def reseed(self, seed: int) -> None:
        with self._lock:
            self.seed = seed
            self._rng = random.Random(seed)

    def check(self, lp: int, leaf: int) -> tuple[int, int] | None:
        """(status, rule id) to inject for this call, or None to run the leaf normally."""
        with self._lock:
            for rule in self.rules:
                if not rule.matches(lp, leaf):
                    continue
                if rule.passed < rule.after:
                    rule.passed += 1
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                if rule.count is not None and rule.fired >= rule.count:
                    self.rules.remove(rule)
                    self.active = bool(self.rules)
                return rule.status, rule.id
            return None

    def snapshot(self) -> list[FaultRuleInfo]:
        with self._lock:
            return [r.to_dict() for r in self.rules]
