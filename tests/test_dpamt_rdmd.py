"""TDH.PHYMEM.PAGE.RDMD with Dynamic PAMT: the module's own PAMT walk (vtdx/module/pamt.py).

Checked against intel/tdx-module, DPAMT-capable tree (commit 1666adc4):
src/vmm_dispatcher/api_calls/tdh_phymem_page_rdmd.c and
src/common/memory_handlers/pamt_manager.c (pamt_walk). RDMD walks the PAMT with locks, every
entry SHARED, to the level given in RCX bits 2:0 (2M/1G only with Dynamic PAMT). With Dynamic
PAMT, pamt_walk ends at a 2MB entry that is not PT_PAMT: a 4K page in a 2MB range without a
page pair is reported through that 2MB entry (R8 = 1), unless the page's PAMT_PAGE_BITMAP bit
is set, which reports PT_PAMT at 4K without an owner. After TDH.PHYMEM.PAMT.ADD the walk
reaches the 4K entry; the 2MB PT_PAMT node itself reads as non-leaf (RCX bit 63) with the pair
in R10/R11.
"""

from __future__ import annotations

from test_td_support import GiB, MiB, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.leaves.phymem import RDMD_NON_LEAF
from vtdx.module.locks import EXCLUSIVE
from vtdx.module.pamt import PT_NDA, PT_PAMT, PT_REG, PT_RSVD, pamt_key

RANGE = 6 * GiB + 64 * MiB          # a free 2MB range (no TD, no pair yet)
PAGE = RANGE + 0x5000               # a 4K page inside it
PAIR = (6 * GiB + 128 * MiB, 6 * GiB + 128 * MiB + 0x3000)  # the pair, in another range


def rdmd(m, rcx: int, lp: int = 0) -> Regs:  # type: ignore[no-untyped-def]
    return m.seamcall(lp, Regs(rax=Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=rcx))


def regs(out: Regs) -> tuple[int, ...]:
    return (out.rax, out.rcx, out.rdx, out.r8, out.r9, out.r10, out.r11)


def test_rdmd_stops_at_2m_entry_without_pair_then_sees_4k_after_pamt_add() -> None:
    w = make_world(dpamt=True)
    m = w.module
    assert m.pamt.block_ready(PAGE) and m.pamt.block_ready(PAIR[0])
    # No pair: the walk ends at the range's 2MB PT_NDA entry, reported at level 2M.
    assert regs(rdmd(m, PAGE)) == (0, PT_NDA, 0, 1, 0, 0, 0)
    # ...and only locks 1G and 2M (SHARED): a 4K entry held EXCLUSIVE does not make it busy,
    # the 2MB entry held EXCLUSIVE does.
    other = 10**9
    k4 = pamt_key(0, PAGE)
    k2 = pamt_key(1, PAGE)
    assert m.locks.try_acquire(k4, EXCLUSIVE, other)
    assert rdmd(m, PAGE).rax == 0
    m.locks.release(k4, other)
    assert m.locks.try_acquire(k2, EXCLUSIVE, other)
    assert rdmd(m, PAGE).rax == st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX
    m.locks.release(k2, other)

    add = Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=RANGE | 1, rdx=PAIR[0], r8=PAIR[1])
    assert m.seamcall(1, add).rax == 0
    w.check()
    # With a pair the walk reaches the 4K entry (level 4K), now also locked by RDMD.
    assert regs(rdmd(m, PAGE)) == (0, PT_NDA, 0, 0, 0, 0, 0)
    assert m.locks.try_acquire(k4, EXCLUSIVE, other)
    assert rdmd(m, PAGE).rax == st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX
    m.locks.release(k4, other)
    # The 2MB level asked for explicitly: the PT_PAMT node, non-leaf, pair in R10/R11.
    assert regs(rdmd(m, RANGE | 1)) == (0, PT_PAMT | RDMD_NON_LEAF, 0, 1, 0, *PAIR)
    # A pair page is a PAMT page (bitmap bit set) although its own range has no pair.
    assert regs(rdmd(m, PAIR[1])) == (0, PT_PAMT, 0, 0, 0, 0, 0)
    assert PT_PAMT == 15  # page_type_t in the Dynamic PAMT tree (1666adc4): RCX's raw value
    # An assigned 4K entry is reported with its owner and BEPOCH (set directly here).
    m.pamt.set(PAGE, 0, PT_REG, owner=0x7000, bepoch=5)
    assert regs(rdmd(m, PAGE)) == (0, PT_REG, 0x7000, 0, 5, 0, 0)
    m.pamt.set(PAGE, 0, PT_NDA)

    rem = Regs(rax=Leaf.TDH_PHYMEM_PAMT_REMOVE, rcx=RANGE | 1)
    out = m.seamcall(1, rem)
    assert (out.rax, out.rdx, out.r8) == (0, *PAIR)
    assert regs(rdmd(m, PAGE)) == (0, PT_NDA, 0, 1, 0, 0, 0)
    assert regs(rdmd(m, PAIR[1])) == (0, PT_NDA, 0, 1, 0, 0, 0)
    w.check()


def test_rdmd_level_input_and_reserved_pages() -> None:
    w = make_world(dpamt=True)
    m = w.module
    block = RANGE & ~(GiB - 1)
    assert regs(rdmd(m, block | 2)) == (0, PT_NDA, 0, 2, 0, 0, 0)
    assert regs(rdmd(m, RANGE | 1)) == (0, PT_NDA, 0, 1, 0, 0, 0)
    bad = st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    assert rdmd(m, (RANGE + 0x1000) | 1).rax == bad     # not 2MB aligned
    assert rdmd(m, RANGE | 3).rax == bad                 # no level above 1G
    assert rdmd(m, RANGE | 0x8).rax == bad               # reserved bits 11:3
    # A TDMR reserved page has its bitmap bit set (pamt_4kb_bitmap_init): PT_PAMT at 4K.
    rsvd = next(t.base + off for t in m.pamt.tdmrs for off, _ in t.reserved
                if m.pamt.block_ready(t.base + off))
    assert m.pamt.default_pt(rsvd, 0) == PT_RSVD
    assert regs(rdmd(m, rsvd)) == (0, PT_PAMT, 0, 0, 0, 0, 0)


def test_rdmd_without_dpamt_walks_to_4k_and_takes_4k_only() -> None:
    w = make_world(dpamt=False)
    m = w.module
    assert regs(rdmd(m, PAGE)) == (0, PT_NDA, 0, 0, 0, 0, 0)
    assert rdmd(m, RANGE | 1).rax == st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    rsvd = next(t.base + off for t in m.pamt.tdmrs for off, _ in t.reserved
                if m.pamt.block_ready(t.base + off))
    assert regs(rdmd(m, rsvd)) == (0, PT_RSVD, 0, 0, 0, 0, 0)
