"""Secure EPT manager: the private GPA -> HPA tree of one TD, entry states as the module keeps them.

The S-EPT lives in TD-private memory that the host can never read, so the model keeps it as
Python objects (one ``SeptPage`` per S-EPT page HPA) instead of bytes in RAM. State
encodings, the walk rule (stop at the requested level, at a leaf, or at an entry without
RWX) and the per-leaf allowed-state table come from intel/tdx-module
(include/auto_gen/sept_state_lookup.{c,h}, src/common/memory_handlers/sept_manager.c,
secure_ept_walk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# State encodings (sept_state_lookup.h). Bit 4 of the encoding is TDP (pending), bit 3 the
# blocked bit, bit 5/6 "leaf present".
FREE = 0x0E
REMOVED = 0x0C
NL_MAPPED = 0x00
NL_BLOCKED = 0x08
MAPPED = 0x60
BLOCKED = 0x68
PENDING = 0x70
PENDING_BLOCKED = 0x78

STATE_NAMES = {
    FREE: "FREE", REMOVED: "REMOVED", NL_MAPPED: "NL_MAPPED", NL_BLOCKED: "NL_BLOCKED",
    MAPPED: "MAPPED", BLOCKED: "BLOCKED", PENDING: "PENDING", PENDING_BLOCKED: "PENDING_BLOCKED",
}

#: Architectural ("public") state the module reports in RDX bits 15:8 of extended error info.
PUBLIC_STATE = {
    FREE: 0, BLOCKED: 1, PENDING: 2, PENDING_BLOCKED: 3, MAPPED: 4, REMOVED: 5,
    NL_BLOCKED: 0x81, NL_MAPPED: 0x84,
}

LEAF_STATES = frozenset({MAPPED, BLOCKED, PENDING, PENDING_BLOCKED})
NON_LEAF_STATES = frozenset({NL_MAPPED, NL_BLOCKED})
ANY_BLOCKED = frozenset({NL_BLOCKED, BLOCKED, PENDING_BLOCKED})
ANY_PENDING = frozenset({PENDING, PENDING_BLOCKED})
#: States whose removal/demotion needs BLOCK + TRACK first (tlb_tracking_required flag).
TLB_TRACKING_REQUIRED = frozenset(
    {NL_MAPPED, NL_BLOCKED, MAPPED, BLOCKED, PENDING, PENDING_BLOCKED})
#: Entries with RWX != 0: the walk continues through a non-leaf one.
RWX_STATES = frozenset({NL_MAPPED, MAPPED})

#: seamcall_sept_state_lookup rows (non-migration states only), by leaf number.
SEAMCALL_ALLOWED: dict[int, frozenset[int]] = {
    2: frozenset({FREE}),                                          # MEM.PAGE.ADD
    3: frozenset({FREE, NL_MAPPED}),                               # MEM.SEPT.ADD
    6: frozenset({FREE, REMOVED}),                                 # MEM.PAGE.AUG
    7: frozenset({NL_MAPPED, MAPPED, PENDING}),                    # MEM.RANGE.BLOCK
    15: frozenset({MAPPED, BLOCKED, PENDING, PENDING_BLOCKED}),    # MEM.PAGE.DEMOTE
    16: frozenset({MAPPED}),                                       # MR.EXTEND
    23: frozenset({NL_MAPPED, NL_BLOCKED}),                        # MEM.PAGE.PROMOTE
    25: frozenset(STATE_NAMES),                                    # MEM.SEPT.RD
    29: frozenset({MAPPED, BLOCKED, PENDING, PENDING_BLOCKED}),    # MEM.PAGE.REMOVE
    30: frozenset({NL_MAPPED, NL_BLOCKED}),                        # MEM.SEPT.REMOVE
    39: frozenset({NL_BLOCKED, BLOCKED, PENDING_BLOCKED}),         # MEM.RANGE.UNBLOCK
}

ENTRIES_PER_PAGE = 512
PAGE_SHIFT = 12


def level_shift(level: int) -> int:
    """Address bits mapped below an entry at ``level`` (0 = 4KB PTE)."""
    return PAGE_SHIFT + 9 * level


def level_size(level: int) -> int:
    return 1 << level_shift(level)


def entry_index(gpa: int, level: int) -> int:
    return (gpa >> level_shift(level)) & (ENTRIES_PER_PAGE - 1)


def block(state: int) -> int:
    """State after TDH.MEM.RANGE.BLOCK (block_sept_entry)."""
    return {NL_MAPPED: NL_BLOCKED, MAPPED: BLOCKED, PENDING: PENDING_BLOCKED}[state]


def unblock(state: int) -> int:
    """State after TDH.MEM.RANGE.UNBLOCK / the unblock DEMOTE and PROMOTE do."""
    return {NL_BLOCKED: NL_MAPPED, BLOCKED: MAPPED, PENDING_BLOCKED: PENDING}.get(state, state)


@dataclass(slots=True)
class SeptEntry:
    """One S-EPT entry: state encoding and the HPA it maps (page or next-level S-EPT page)."""

    state: int = FREE
    hpa: int = 0

    @property
    def is_leaf(self) -> bool:
        return self.state in LEAF_STATES

    def arch_rcx(self, level: int) -> int:
        """Architectural entry image the module returns in RCX as extended error info."""
        if self.state in (FREE, REMOVED):
            return 1 << 63  # suppress-#VE only
        rwx = 0x7 if self.state in RWX_STATES else 0
        leaf = (1 << 7) if (self.is_leaf and level > 0) else 0
        return self.hpa | rwx | leaf

    def arch_rdx(self, level: int) -> int:
        return level | (PUBLIC_STATE[self.state] << 8)


@dataclass(slots=True)
class SeptPage:
    """One S-EPT page (512 entries; absent entries are FREE)."""

    hpa: int
    level: int
    entries: dict[int, SeptEntry] = field(default_factory=dict)

    def get(self, idx: int) -> SeptEntry:
        entry = self.entries.get(idx)
        if entry is None:
            entry = self.entries[idx] = SeptEntry()
        return entry

    def peek(self, idx: int) -> SeptEntry | None:
        return self.entries.get(idx)

    def used(self) -> int:
        return sum(1 for e in self.entries.values() if e.state != FREE)


@dataclass(slots=True)
class WalkResult:
    page: SeptPage
    idx: int
    entry: SeptEntry
    level: int

    @property
    def key(self) -> tuple[int, int]:
        """Identity of the entry (S-EPT page HPA, index) for the host-side entry lock."""
        return (self.page.hpa, self.idx)


class SeptTree:
    """The S-EPT of one TD: pages by HPA, rooted at a page given at TDH.MNG.INIT."""

    def __init__(self, root_hpa: int, root_level: int) -> None:
        self.root_level = root_level
        self.pages: dict[int, SeptPage] = {root_hpa: SeptPage(root_hpa, root_level)}
        self.root = self.pages[root_hpa]

    def walk(self, gpa: int, level: int) -> WalkResult:
        """secure_ept_walk: descend until ``level``, a leaf, or an entry without RWX."""
        page = self.root
        lvl = self.root_level
        while True:
            idx = entry_index(gpa, lvl)
            entry = page.get(idx)
            if lvl == level or lvl == 0 or entry.state not in RWX_STATES or entry.is_leaf:
                return WalkResult(page, idx, entry, lvl)
            page = self.pages[entry.hpa]
            lvl -= 1

    def add_page(self, hpa: int, level: int) -> SeptPage:
        page = self.pages[hpa] = SeptPage(hpa, level)
        return page

    def remove_page(self, hpa: int) -> None:
        del self.pages[hpa]

    def leaves(self) -> list[tuple[int, int, SeptEntry]]:
        """All leaf mappings as (gpa, level, entry); for invariants and inspection."""
        out: list[tuple[int, int, SeptEntry]] = []
        self._collect(self.root, 0, out)
        return out

    def _collect(self, page: SeptPage, base: int, out: list[tuple[int, int, SeptEntry]]) -> None:
        for idx, entry in page.entries.items():
            gpa = base | (idx << level_shift(page.level))
            if entry.is_leaf:
                out.append((gpa, page.level, entry))
            elif entry.state in NON_LEAF_STATES:
                self._collect(self.pages[entry.hpa], gpa, out)

    def non_root_pages(self) -> list[SeptPage]:
        return [p for p in self.pages.values() if p is not self.root]
