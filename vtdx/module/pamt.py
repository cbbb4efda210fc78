"""The PAMT (Physical Address Metadata Table) as the module keeps it, held sparsely.

The real module stores one 16-byte entry per 1 GB, 2 MB and 4 KB page of every TDMR in
memory the host donates (pamt_manager.c). Here an entry is materialised only when it differs
from what TDH.SYS.TDMR.INIT leaves behind: PT_NDA everywhere, except 4 KB entries inside a
TDMR reserved area, which read as PT_RSVD. So memory is proportional to pages that TDs use,
and a 16 GiB host costs a few TDMR records.

Walks follow pamt_walk() of the Dynamic-PAMT-capable module (intel/tdx-module commit
1666adc4, pamt_manager.c): shared locks on the 1 GB and 2 MB parents, the requested mode on
the leaf, stopping early at a requested level or at a parent that has no child level: a
1 GB entry that is not PT_NDA; a 2 MB entry that is not PT_NDA, or, with Dynamic PAMT, that
is not a PT_PAMT node (a 2 MB range whose 4 KB entries live in a page pair the host added
with TDH.PHYMEM.PAMT.ADD; without one the range has no 4 KB level). Every leaf that walks the
PAMT (TD leaves, TDH.PHYMEM.PAGE.RDMD) uses this one walk.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from vtdx.abi import status as st
from vtdx.module.errors import TdxError
from vtdx.module.locks import LockKey, lock_key

if TYPE_CHECKING:
    from vtdx.module.context import CallContext

PT_NDA = 0
PT_RSVD = 1
PT_REG = 3
PT_TDR = 4
PT_TDCX = 5
PT_TDVPR = 6
PT_EPT = 8
#: A 2 MB entry holding a Dynamic PAMT page pair (pamt_non_leaf_entry_t); page_type_t value
#: in the tdx-module tree that has Dynamic PAMT (commit 1666adc4), which RDMD reports in RCX.
PT_PAMT = 15
PAGE_TYPE_NAMES = {PT_NDA: "PT_NDA", PT_RSVD: "PT_RSVD", PT_REG: "PT_REG", PT_TDR: "PT_TDR",
                   PT_TDCX: "PT_TDCX", PT_TDVPR: "PT_TDVPR", PT_EPT: "PT_EPT",
                   PT_PAMT: "PT_PAMT"}

LEVEL_4K = 0
LEVEL_2M = 1
LEVEL_1G = 2
LEVELS = (LEVEL_4K, LEVEL_2M, LEVEL_1G)
LEVEL_NAMES = ("4K", "2M", "1G")
SHIFT = (12, 21, 30)
PAGE_SIZE = (1 << 12, 1 << 21, 1 << 30)
PAGE_4K = PAGE_SIZE[LEVEL_4K]
PAGE_2M = PAGE_SIZE[LEVEL_2M]
GiB = 1 << 30


#: Builds a ``PamtWalk`` without the NamedTuple's Python-level ``__new__`` (the walk runs on
#: most SEAMCALLs; see ``locks.lock_key``).
_tuple_new = tuple.__new__


def pamt_key(level: int, pa: int) -> LockKey:
    """Lock key of the PAMT entry covering ``pa`` at ``level`` (the entry's own lock)."""
    return lock_key("pamt", level, pa >> SHIFT[level])


@dataclass(slots=True)
class DpamtNode:
    """The pamt_non_leaf_entry_t fields of a PT_PAMT 2MB entry (Dynamic PAMT): the page
    pair holding the range's 4KB PAMT entries and how many of those pages are assigned."""

    hpa0: int
    hpa1: int
    page_count: int = 0


class PamtWalk(NamedTuple):
    """Result of a locked PAMT walk: the level reached and (a view of) its entry."""

    level: int
    entry: PamtEntry
#: 4 KB PAMT entries TDH.SYS.TDMR.INIT initialises per call (TDMR_4K_PAMT_INIT_COUNT).
TDMR_INIT_4K_PER_CALL = 1024


@dataclass(slots=True)
class PamtEntry:
    """One PAMT entry: page type, owner (PA of the owning TDR / parent, 4K aligned), BEPOCH."""

    pt: int = PT_NDA
    owner: int = 0
    bepoch: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"pt": self.pt, "pt_name": PAGE_TYPE_NAMES.get(self.pt, str(self.pt)),
                "owner": self.owner, "bepoch": self.bepoch}


@dataclass(slots=True)
class Tdmr:
    """A configured TDMR with its PAMT areas (index by level) and reserved areas."""

    index: int
    base: int
    size: int
    pamt_base: tuple[int, int, int]
    pamt_size: tuple[int, int, int]
    #: (offset, size) pairs, sorted, non-overlapping, no null entries.
    reserved: tuple[tuple[int, int], ...] = ()
    #: Next-to-initialise address (the module's last_initialized).
    next_init: int = 0
    _rsvd_starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_init = self.base
        self._rsvd_starts = [self.base + off for off, _ in self.reserved]

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def initialized_end(self) -> int:
        """Blocks below this (1 GB granular) are usable; what TDMR.INIT reports in RDX."""
        return self.next_init & ~(GiB - 1)

    @property
    def done(self) -> bool:
        return self.next_init >= self.end

    def is_reserved(self, pa: int) -> bool:
        i = bisect_right(self._rsvd_starts, pa) - 1
        if i < 0:
            return False
        return pa < self._rsvd_starts[i] + self.reserved[i][1]

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index, "base": self.base, "size": self.size,
            "pamt": {LEVEL_NAMES[lv]: {"base": self.pamt_base[lv], "size": self.pamt_size[lv]}
                     for lv in LEVELS},
            "reserved": [{"offset": o, "size": s} for o, s in self.reserved],
            "next_init": self.next_init, "initialized_end": self.initialized_end,
            "done": self.done,
        }


class PamtManager:
    """Sparse PAMT for all TDMRs; lookups by physical address."""

    def __init__(self, entry_sizes: tuple[int, int, int] = (16, 16, 16)) -> None:
        self.entry_sizes = entry_sizes
        self.tdmrs: list[Tdmr] = []
        self._bases: list[int] = []
        #: Per level: page index (pa >> shift) -> entry, only for non-default entries.
        self._entries: tuple[dict[int, PamtEntry], ...] = ({}, {}, {})
        #: Dynamic PAMT (TDH.SYS.CONFIG R8 bit 16); the module's ``dynamic_pamt_enabled``.
        self.dynamic = False
        #: Dynamic PAMT: 2MB page index -> the page pair backing that range's 4KB level.
        self.nodes: dict[int, DpamtNode] = {}
        #: Dynamic PAMT: 4KB page indexes in use as PAMT pages (PAMT_PAGE_BITMAP bits).
        self.bitmap: set[int] = set()

    # -- configuration -------------------------------------------------------------------
    def configure(self, tdmrs: list[Tdmr]) -> None:
        self.tdmrs = list(tdmrs)
        self._bases = [t.base for t in self.tdmrs]
        for d in self._entries:
            d.clear()

    def reset(self) -> None:
        self.configure([])
        self.dynamic = False
        self.nodes.clear()
        self.bitmap.clear()

    # -- lookups -------------------------------------------------------------------------
    def tdmr_for(self, pa: int) -> Tdmr | None:
        """The TDMR covering ``pa`` (the module's pamt_get_block, minus the init check)."""
        i = bisect_right(self._bases, pa) - 1
        if i < 0:
            return None
        t = self.tdmrs[i]
        return t if pa < t.end else None

    def tdmr_by_base(self, base: int) -> Tdmr | None:
        i = bisect_right(self._bases, base) - 1
        if i >= 0 and self.tdmrs[i].base == base:
            return self.tdmrs[i]
        return None

    def block_ready(self, pa: int) -> bool:
        """True if ``pa`` is in a TDMR whose 1 GB block TDH.SYS.TDMR.INIT has finished."""
        t = self.tdmr_for(pa)
        return t is not None and pa < t.initialized_end

    def default_pt(self, pa: int, level: int) -> int:
        if level == LEVEL_4K:
            t = self.tdmr_for(pa)
            if t is not None and t.is_reserved(pa & ~0xFFF):
                return PT_RSVD
        return PT_NDA

    def get(self, pa: int, level: int) -> PamtEntry:
        """The entry for the ``level`` page containing ``pa`` (a copy if not materialised)."""
        e = self._entries[level].get(pa >> SHIFT[level])
        if e is not None:
            return e
        return PamtEntry(self.default_pt(pa, level))

    def entry_for_update(self, pa: int, level: int) -> PamtEntry:
        """The stored entry, materialising it; call ``compact`` after setting it back."""
        d = self._entries[level]
        idx = pa >> SHIFT[level]
        e = d.get(idx)
        if e is None:
            e = d[idx] = PamtEntry(self.default_pt(pa, level))
        return e

    def set(self, pa: int, level: int, pt: int, owner: int = 0, bepoch: int = 0) -> None:
        """Set page type/owner of the ``level`` page containing ``pa``."""
        idx = pa >> SHIFT[level]
        if owner == 0 and bepoch == 0 and pt == self.default_pt(pa, level):
            self._entries[level].pop(idx, None)
        else:
            self._entries[level][idx] = PamtEntry(pt, owner & ~0xFFF, bepoch)

    def compact(self, pa: int, level: int) -> None:
        """Drop a materialised entry that went back to its default."""
        idx = pa >> SHIFT[level]
        e = self._entries[level].get(idx)
        if e is not None and e.owner == 0 and e.bepoch == 0 and e.pt == self.default_pt(pa,
                                                                                       level):
            del self._entries[level][idx]

    def entries(self, level: int) -> dict[int, PamtEntry]:
        """Materialised entries of one level (page index -> entry); read-only use."""
        return self._entries[level]

    @property
    def materialised(self) -> int:
        return sum(len(d) for d in self._entries)

    # -- walks -----------------------------------------------------------------------------
    def ends_walk(self, entry: PamtEntry, level: int) -> bool:
        """True if ``entry`` (a 1 GB or 2 MB entry) has no child level for pamt_walk()."""
        if level == LEVEL_2M and self.dynamic:
            return entry.pt != PT_PAMT
        return entry.pt != PT_NDA

    def leaf(self, pa: int) -> tuple[int, PamtEntry]:
        """(level, entry) a walk to 4 KB stops at, without locks (for inspection)."""
        for level in (LEVEL_1G, LEVEL_2M):
            e = self.get(pa, level)
            if self.ends_walk(e, level):
                return level, e
        return LEVEL_4K, self.get(pa, LEVEL_4K)

    def walk(self, ctx: CallContext, pa: int, exclusive: bool, operand_id: int,
             target_level: int = LEVEL_4K) -> PamtWalk:
        """Lock and return the entry for ``pa`` like the module's pamt_walk().

        Parents are locked shared; the entry returned shared or exclusive (a parent that ends
        the walk is promoted). The walk stops at ``target_level`` or earlier where
        ``ends_walk`` says so. A lock conflict raises TDX_OPERAND_BUSY | ``operand_id``.
        Locks are released by the call context.
        """
        busy = st.TDX_OPERAND_BUSY + operand_id
        for level in (LEVEL_1G, LEVEL_2M):
            key = pamt_key(level, pa)
            ctx.lock(key, False, busy)
            e = self.get(pa, level)
            if target_level == level or self.ends_walk(e, level):
                if exclusive:
                    ctx.promote(key, busy)
                return _tuple_new(PamtWalk, (level, e))
        ctx.lock(pamt_key(LEVEL_4K, pa), exclusive, busy)
        return _tuple_new(PamtWalk, (LEVEL_4K, self.get(pa, LEVEL_4K)))

    def ready_walk(self, ctx: CallContext, pa: int, exclusive: bool, target_level: int,
                   operand_id: int) -> PamtWalk:
        """The PAMT block of ``pa`` initialised (else TDX_OPERAND_ADDR_RANGE_ERROR), then the
        locked walk: how non_shared_hpa_metadata_check_and_lock opens, and how
        TDH.PHYMEM.PAMT.ADD/REMOVE and TDH.PHYMEM.PAGE.RECLAIM open their own walks."""
        if not self.block_ready(pa):
            raise TdxError(st.TDX_OPERAND_ADDR_RANGE_ERROR + operand_id)
        return self.walk(ctx, pa, exclusive, operand_id, target_level)

    # -- Dynamic PAMT ----------------------------------------------------------------------
    def node(self, pa: int) -> DpamtNode | None:
        """The page pair node of the 2MB range holding ``pa``, if any."""
        return self.nodes.get(pa >> SHIFT[LEVEL_2M])

    def bitmap_get(self, pa: int) -> bool:
        """dynamic_pamt_4k_bitmap_get: a PAMT page, or a TDMR reserved page (the module sets
        reserved pages' bits at TDMR init, pamt_4kb_bitmap_init)."""
        return (pa >> 12) in self.bitmap or self.default_pt(pa, LEVEL_4K) == PT_RSVD

    def bitmap_test_and_set(self, pa: int) -> bool:
        """dynamic_pamt_4k_bitmap_set: take the page's PAMT_PAGE_BITMAP bit; False if it was
        set already (a PAMT page, one another call is adding, or a reserved page)."""
        if self.bitmap_get(pa):
            return False
        self.bitmap.add(pa >> 12)
        return True

    def bitmap_clear(self, pa: int) -> None:
        """dynamic_pamt_4k_bitmap_clear."""
        self.bitmap.discard(pa >> 12)

    def add_node(self, pa: int, hpa0: int, hpa1: int, page_count: int) -> None:
        """Install a page pair as the 4KB level of the 2MB range at ``pa`` (PT_PAMT); the
        pair's bitmap bits were taken at the check (helpers.check_and_lock_dpamt_pair)."""
        self.nodes[pa >> SHIFT[LEVEL_2M]] = DpamtNode(hpa0, hpa1, page_count)
        self.set(pa, LEVEL_2M, PT_PAMT)

    def remove_node(self, pa: int) -> DpamtNode | None:
        """Take the page pair off the 2MB range at ``pa``; the 2MB entry is left to the
        caller (PROMOTE makes it PT_REG, PAMT.REMOVE PT_NDA)."""
        node = self.nodes.pop(pa >> SHIFT[LEVEL_2M], None)
        if node is not None:
            self.bitmap.discard(node.hpa0 >> 12)
            self.bitmap.discard(node.hpa1 >> 12)
        return node

    def range_2m_free(self, pa: int) -> bool:
        """pamt_is_2mb_range_free: no 4KB page of the range assigned (or a PAMT page)."""
        base = pa & ~(PAGE_2M - 1)
        bitmap = self.bitmap
        for i in range(512):
            page = base + (i << 12)
            if (page >> 12) in bitmap or self.get(page, LEVEL_4K).pt != PT_NDA:
                return False
        return True

    def inc_page_count(self, pa: int) -> None:
        """pamt_inc_nl_page_count on the 2MB node of a newly assigned 4KB page."""
        if self.dynamic:
            node = self.node(pa)
            if node is not None:
                node.page_count += 1

    def dec_page_count(self, pa: int) -> None:
        if self.dynamic:
            node = self.node(pa)
            if node is not None and node.page_count > 0:
                node.page_count -= 1

    # -- accounting ------------------------------------------------------------------------
    def required_size(self, level: int, tdmr_size: int) -> int:
        """Bytes the module requires for one TDMR's PAMT at ``level`` (no 4K rounding)."""
        return (tdmr_size >> SHIFT[level]) * self.entry_sizes[level]

    def pamt_bytes(self) -> list[dict[str, int]]:
        """Per TDMR and level: PAMT bytes the host donated."""
        return [{LEVEL_NAMES[lv]: t.pamt_size[lv] for lv in LEVELS} for t in self.tdmrs]

    def pamt_bytes_total(self) -> int:
        return sum(sum(t.pamt_size) for t in self.tdmrs)

    def pamt_bytes_by_level(self) -> dict[str, int]:
        return {LEVEL_NAMES[lv]: sum(t.pamt_size[lv] for t in self.tdmrs) for lv in LEVELS}
