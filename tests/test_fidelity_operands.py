"""Class 3 of issue 13: flag and reserved bits in operands. td_handle_and_flags_t
(include/tdx_api_defs.h 1208-1229) is taken by TDH.MEM.SEPT.ADD (tdh_mem_sept_add.c of the 1.5
tree, 283-470 and process_l1_page 61-127) and TDH.MEM.PAGE.DEMOTE (tdh_mem_page_demote.c
119-124); every other leaf takes a plain TDR HPA (helpers.c 254-275: 4K alignment).
"""

from __future__ import annotations

import pytest
from test_fidelity_support import ALL_ONES, fixture

from vtdx.abi.leaves import Leaf

OPERAND_INVALID = 0xC000010000000000
EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
RCX, RDX, R8, R9 = 1, 2, 8, 9
GPA = 1 << 39  # 512 GB: aligned for every S-EPT level, far from the fixture's pages


def _sept_add(fx, gpa: int, level: int, rdx_flags: int = 0, r8: int | None = None,  # noqa: ANN001
              version: int = 0, **regs: int):  # noqa: ANN202
    page = fx.w.host.control_page() if r8 is None else r8
    return fx.call(Leaf.TDH_MEM_SEPT_ADD, 0, version, rcx=gpa | level,
                   rdx=fx.td.tdr | rdx_flags, r8=page, **regs)


def test_allow_existing_on_a_free_entry_adds_the_page() -> None:
    """Bit 0 (ALLOW_EXISTING) is not a reserved bit: with the entry free the page is added
    (tdh_mem_sept_add.c 331 checks reserved_0/1 only)."""
    fx = fixture()
    assert _sept_add(fx, GPA, 3, rdx_flags=1).rax == 0
    assert _sept_add(fx, GPA, 2).rax == 0


def test_allow_existing_on_a_mapped_entry() -> None:
    """process_l1_page 103-119: a non-free parent entry with ALLOW_EXISTING -> SUCCESS and
    R8 is not even looked at (a misaligned R8 passes); without it ->
    EPT_ENTRY_STATE_INCORRECT | RCX."""
    fx = fixture()
    assert _sept_add(fx, GPA, 3).rax == 0
    assert _sept_add(fx, GPA, 3, rdx_flags=1, r8=0x123).rax == 0
    assert _sept_add(fx, GPA, 3).rax == EPT_ENTRY_STATE_INCORRECT | RCX


@pytest.mark.parametrize("flags", [2, 1 << 11, 1 << 52, 1 << 63])
def test_reserved_handle_bits(flags: int) -> None:
    """reserved_0 (11:1) and reserved_1 (63:52) -> OPERAND_INVALID | RDX before the TDR is
    touched (tdh_mem_sept_add.c 331-336), and before R8 = NULL_PA is looked at."""
    fx = fixture()
    assert _sept_add(fx, GPA, 3, rdx_flags=flags).rax == OPERAND_INVALID | RDX
    assert _sept_add(fx, GPA, 3, rdx_flags=flags, r8=ALL_ONES).rax == OPERAND_INVALID | RDX


def test_null_page_in_version_0_after_the_walk() -> None:
    """process_l1_page 71-76: R8 = NULL_PA in version 0 -> OPERAND_INVALID | R8, after the
    TDR, TDCS, page-info and walk checks (a bad level still gives RCX first)."""
    fx = fixture()
    assert _sept_add(fx, GPA, 3, r8=ALL_ONES).rax == OPERAND_INVALID | R8
    assert _sept_add(fx, GPA, 7, r8=ALL_ONES).rax == OPERAND_INVALID | RCX


def test_bit_63_of_the_page_is_ignored() -> None:
    """tdh_mem_sept_add.c 317-326: bit 63 of a page PA other than NULL_PA is ignored."""
    fx = fixture()
    page = fx.w.host.control_page()
    assert _sept_add(fx, GPA, 3, r8=page | (1 << 63)).rax == 0


def test_version_1_registers() -> None:
    """Version 1 (tdh_mem_sept_add.c 292-300 and EXIT 438-470): R9-R11 are L2 S-EPT pages,
    refused with OPERAND_INVALID | R8+vm when the TD has no such L2 VM
    (process_l2_pages 143-147); on success R8 = NULL_PA (the page was used), on an existing
    entry with ALLOW_EXISTING R8 has bit 63 set (not used); R8 = NULL_PA is allowed when the
    entry is already mapped."""
    fx = fixture()
    page = fx.w.host.control_page()
    out = _sept_add(fx, GPA, 3, r8=page, version=1, r9=0, r10=ALL_ONES, r11=ALL_ONES)
    assert out.rax == OPERAND_INVALID | R9
    out = _sept_add(fx, GPA, 3, r8=page, version=1, r9=ALL_ONES, r10=ALL_ONES, r11=ALL_ONES)
    assert (out.rax, out.r8, out.r9) == (0, ALL_ONES, ALL_ONES)
    other = fx.w.host.control_page()
    out = _sept_add(fx, GPA, 3, rdx_flags=1, r8=other, version=1, r9=ALL_ONES, r10=ALL_ONES,
                    r11=ALL_ONES)
    assert (out.rax, out.r8) == (0, other | (1 << 63))
    out = _sept_add(fx, GPA, 3, r8=ALL_ONES, version=1, r9=ALL_ONES, r10=ALL_ONES,
                    r11=ALL_ONES)
    assert out.rax == 0
    assert _sept_add(fx, GPA, 3, version=2).rax == OPERAND_INVALID


def test_plain_handle_leaves_refuse_bit_0() -> None:
    """TDH.MEM.PAGE.AUG takes a plain TDR HPA: bit 0 is a misalignment ->
    OPERAND_INVALID | RDX (helpers.c 257-260)."""
    fx = fixture()
    page = fx.w.host.control_page()
    assert fx.rax(Leaf.TDH_MEM_PAGE_AUG, rcx=0x20_0000, rdx=fx.td.tdr | 1,
                  r8=page) == OPERAND_INVALID | RDX


def test_demote_l2_sept_add_mode_has_no_effect_without_l2_vms() -> None:
    """tdh_mem_page_demote.c 119-124: bit 0 of RDX (L2_SEPT_ADD_MODE) is accepted; with no
    L2 VM the demote proceeds as with bit 0 clear; bit 1 is reserved."""
    fx = fixture(runnable=True)
    h, td = fx.w.host, fx.td
    gpa = 0x60_0000
    h.aug(td, gpa, level=1)
    h.block_track(td, gpa, 1)
    sept = h.control_page()
    pair = (h.alloc.page(), h.alloc.page()) if h.dpamt else None
    regs = h.demote_regs(td, gpa, sept, pair, 1)
    bad = dict(regs, rdx=regs["rdx"] | 2)
    assert fx.rax(Leaf.TDH_MEM_PAGE_DEMOTE, **bad) == OPERAND_INVALID | RDX
    regs["rdx"] |= 1
    assert fx.rax(Leaf.TDH_MEM_PAGE_DEMOTE, **regs) == 0


def test_gpa_level_reserved_bits() -> None:
    """verify_page_info_input (helpers.c 672-700): reserved bits 11:3 and the level range per
    leaf (PAGE.AUG 0..1, tdh_mem_page_aug.c 105-110) -> OPERAND_INVALID | RCX."""
    fx = fixture()
    assert fx.rax(Leaf.TDH_MEM_RANGE_BLOCK, rcx=0x1000 | (1 << 3),
                  rdx=fx.td.tdr) == OPERAND_INVALID | RCX
    page = fx.w.host.control_page()
    assert fx.rax(Leaf.TDH_MEM_PAGE_AUG, rcx=0x4000_0000 | 2, rdx=fx.td.tdr,
                  r8=page) == OPERAND_INVALID | RCX
