"""The seed's race as a loop: DEMOTE (LP0) and PAMT.ADD (LP1) on one 2MB PAMT entry, again
and again, with no pause -- whether they meet depends only on timing, as on hardware.

LP0 cycles a blocked 2MB guest page through DEMOTE (DPAMT pair A1/B1 in R12/R13, A1 in the
2MB range R), BLOCK + TRACK of the new non-leaf entry, PROMOTE (which hands the pair and
the S-EPT page back), BLOCK + TRACK of the 2MB leaf again. LP1 cycles PAMT.ADD and
PAMT.REMOVE of a page pair for R. DEMOTE takes A1's 2MB PAMT entry shared
(pamt_manager.c pamt_demote()), PAMT.ADD and PAMT.REMOVE take it exclusive
(tdh_phymem_pamt_add.c / tdh_phymem_pamt_remove.c): when they overlap, one of them gets
TDX_OPERAND_BUSY. Each step is retried while it returns a BUSY status, like the kernel's
retry loops, and every BUSY is counted.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf, leaf_name
from vtdx.abi.regs import Regs

#: Retries of one step before the loop gives up (a livelock would be a model bug).
MAX_RETRIES = 100000


def lp0_steps(tdr: int, gpa: int, sept_page: int, pair: tuple[int, int]) -> list[Regs]:
    """DEMOTE, BLOCK, TRACK, PROMOTE, BLOCK, TRACK of the 2MB page at ``gpa``."""
    return [
        Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE, rcx=gpa | 1, rdx=tdr, r8=sept_page,
             r12=pair[0], r13=pair[1]),
        Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | 1, rdx=tdr),
        Regs(rax=Leaf.TDH_MEM_TRACK, rcx=tdr),
        Regs(rax=Leaf.TDH_MEM_PAGE_PROMOTE, rcx=gpa | 1, rdx=tdr),
        Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | 1, rdx=tdr),
        Regs(rax=Leaf.TDH_MEM_TRACK, rcx=tdr),
    ]


def lp1_steps(range_pa: int, pair: tuple[int, int]) -> list[Regs]:
    """PAMT.ADD then PAMT.REMOVE of ``pair`` for the 2MB range at ``range_pa``."""
    rcx = (range_pa & ~0x1FFFFF) | 1
    return [Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=rcx, rdx=pair[0], r8=pair[1]),
            Regs(rax=Leaf.TDH_PHYMEM_PAMT_REMOVE, rcx=rcx)]


@dataclass
class LoopResult:
    """Calls and BUSY statuses per (LP, leaf); the first non-BUSY error, if any."""

    calls: Counter[tuple[int, str]] = field(default_factory=Counter)
    busy: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def busy_total(self) -> int:
        return sum(self.busy.values())

    @property
    def calls_total(self) -> int:
        return sum(self.calls.values())


def run_threads(seamcall: Callable[[int, Regs], Regs], steps: dict[int, list[Regs]],
                iterations: int) -> LoopResult:
    """Each LP on its own thread runs its steps ``iterations`` times, retrying on BUSY."""
    res = LoopResult()
    lock = threading.Lock()
    start = threading.Barrier(len(steps))

    def run(lp: int, mine: list[Regs]) -> None:
        start.wait()
        for _ in range(iterations):
            for regs in mine:
                name = leaf_name(regs.rax & 0xFFFF)
                for _try in range(MAX_RETRIES):
                    out = seamcall(lp, regs)
                    status = out.rax
                    with lock:
                        res.calls[(lp, name)] += 1
                        if st.base(status) == st.TDX_OPERAND_BUSY:
                            res.busy[(lp, name, st.decode(status))] += 1
                    if st.base(status) != st.TDX_OPERAND_BUSY:
                        break
                if st.is_error(status):
                    with lock:
                        res.errors.append(f"LP{lp} {name}: {st.decode(status)}")
                    return

    threads = [threading.Thread(target=run, args=(lp, mine), name=f"lp{lp}")
               for lp, mine in steps.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res
