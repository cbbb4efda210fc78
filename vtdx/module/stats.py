"""SEAMCALL statistics, kept once, by the module itself (``module.stats``).

Counts per (LP, leaf, status), time inside the module per leaf, injected calls per leaf and
the order leaves were first used. The trace, the inspector's ``query-vtdx-stats`` and the
run summary all read these numbers instead of counting on their own. Updated by the
dispatcher under the module mutex; read under it too (``TdxModule.cond``).
"""

from __future__ import annotations

import time
from collections import Counter

from vtdx.abi import leaves, status


class LeafTimes:
    """Time one leaf spent inside the module, and how many of its calls were injected."""

    __slots__ = ("total_s", "max_s", "injected")

    def __init__(self) -> None:
        self.total_s = 0.0
        self.max_s = 0.0
        self.injected = 0


class CallStats:
    """Counts of every SEAMCALL the module answered."""

    def __init__(self) -> None:
        #: (lp, leaf, status) -> calls; dict order = first use.
        self.counts: dict[tuple[int, int, int], int] = {}
        self.times: dict[int, LeafTimes] = {}
        self.started = time.time()

    @classmethod
    def merged(cls, parts: list[CallStats]) -> CallStats:
        """One ``CallStats`` adding up ``parts`` (e.g. the modules of one run, in order)."""
        out = cls()
        for p in parts:
            for key, n in p.counts.items():
                out.counts[key] = out.counts.get(key, 0) + n
            for leaf, t in p.times.items():
                o = out.times.setdefault(leaf, LeafTimes())
                o.total_s += t.total_s
                o.max_s = max(o.max_s, t.max_s)
                o.injected += t.injected
        return out

    def record(self, lp: int, leaf: int, rax: int, seconds: float, injected: bool) -> None:
        key = (lp, leaf, rax)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        t = self.times.get(leaf)
        if t is None:
            t = self.times[leaf] = LeafTimes()
        t.total_s += seconds
        if seconds > t.max_s:
            t.max_s = seconds
        if injected:
            t.injected += 1

    # -- views ---------------------------------------------------------------------------
    def calls_by_leaf(self) -> dict[int, int]:
        """Leaf -> calls, leaves in the order they were first used."""
        out: dict[int, int] = {}
        for (_, leaf, _), n in self.counts.items():
            out[leaf] = out.get(leaf, 0) + n
        return out

    def by_status(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (_, _, rax), n in self.counts.items():
            out[rax] = out.get(rax, 0) + n
        return out

    def errors_by_leaf(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (_, leaf, rax), n in self.counts.items():
            if status.is_error(rax):
                out[leaf] = out.get(leaf, 0) + n
        return out

    def per_leaf(self) -> dict[int, dict[int, int]]:
        """{leaf: {lp: calls}}, leaves in the order they were first used, LPs sorted."""
        out: dict[int, dict[int, int]] = {}
        for (lp, leaf, _), n in self.counts.items():
            row = out.setdefault(leaf, {})
            row[lp] = row.get(lp, 0) + n
        return {leaf: dict(sorted(row.items())) for leaf, row in out.items()}

    def count(self, leaf: int, lp: int | None = None) -> int:
        return sum(n for (p, lf, _), n in self.counts.items()
                   if lf == leaf and (lp is None or p == lp))

    def as_dict(self) -> dict[str, object]:
        """The ``query-vtdx-stats`` answer: totals, per leaf and per LP."""
        calls_of: Counter[int] = Counter()
        errors_of: Counter[int] = Counter()
        statuses: dict[int, Counter[str]] = {}
        per_lp: Counter[int] = Counter()
        for (lp, leaf, rax), n in self.counts.items():
            calls_of[leaf] += n
            statuses.setdefault(leaf, Counter())[status.decode(rax)] += n
            per_lp[lp] += n
            if status.is_error(rax):
                errors_of[leaf] += n
        per_leaf: dict[str, dict[str, object]] = {}
        for leaf in sorted(calls_of):
            n = calls_of[leaf]
            t = self.times.get(leaf, LeafTimes())
            per_leaf[leaves.leaf_name(leaf)] = {
                "calls": n,
                "errors": errors_of[leaf],
                "injected": t.injected,
                "total-us": round(t.total_s * 1e6, 1),
                "avg-us": round(t.total_s * 1e6 / n, 1) if n else 0.0,
                "max-us": round(t.max_s * 1e6, 1),
                "statuses": dict(statuses[leaf]),
            }
        total = sum(t.total_s for t in self.times.values())
        return {
            "calls": sum(calls_of.values()),
            "errors": sum(errors_of.values()),
            "module-time-us": round(total * 1e6, 1),
            "uptime-s": round(time.time() - self.started, 3),
            "per-leaf": per_leaf,
            "per-lp": {str(k): v for k, v in sorted(per_lp.items())},
        }
