"""Class 2 of issue 13: metadata access through one layer (vtdx.module.metadata) with the
statuses of intel/tdx-module src/common/metadata_handlers/ (metadata_generic.c,
metadata_td.c, metadata_sys.c) and the leaves tdh_mng_rd_wr.c (1.5: 41-190), tdh_sys_rd.c,
tdh_sys_rdall.c. Metadata statuses are bare (no operand id); field ids are matched on class
and field code only. The ids Linux 7.3 reads are checked against the kernel's own
(arch/x86/kvm/vmx/tdx.c, arch/x86/virt/vmx/tdx/tdx_global_metadata.c).
"""

from __future__ import annotations

import struct

import pytest
from test_fidelity_support import ALL_ONES, GENERATIONS, fixture

from vtdx.abi import fields as fl
from vtdx.abi.leaves import Leaf
from vtdx.module import metadata as md

FIELD_ID_INCORRECT = 0xC0000C0000000000
NOT_WRITABLE = 0xC0000C0100000000
NOT_READABLE = 0xC0000C0200000000
VALUE_NOT_VALID = 0xC0000C0300000000
WR_MASK_NOT_VALID = 0xC0000C0A00000000
FIRST_FIELD_ID = 0x00000C0B00000000
TD_KEYS_NOT_CONFIGURED = 0x8000081000000000

TSC_OFFSET_KVM, TSC_OFFSET = 0x110000000000000A, 0x111000030000000A
ATTRIBUTES = 0x1110000300000000
HP_LOCK_TIMEOUT = 0x9110000300000011
TD_CTLS, VIRTUAL_TSC = 0x1110000300000017, 0x111000030000000D
CPUID = 0x9410000300000000
RTMR = 0x1310000300000040


def cpuid_id(leaf: int, sub: int | None, half: int = 0) -> int:
    """KVM's encoding (kvm/vmx/tdx.c tdx_read_cpuid; tdx_api_defs.h 271-279)."""
    code = ((leaf & 0x7F) << 9) | ((1 << 16) if leaf & 0x80000000 else 0) | half
    code |= (0x1FE if sub is None else (sub & 0x7F) << 1)
    return CPUID | code


def test_mng_rd_matches_class_and_code_only() -> None:
    """md_find_entry_idx + md_check_as_single_element_id: KVM's 0x110000000000000A
    (kvm/vmx/tdx.c 2858) and the table's 0x111000030000000A are the same field; an unknown
    code or a reserved bit -> FIELD_ID_INCORRECT, bare (metadata_generic.c 100-117,
    671-733)."""
    fx = fixture()
    a, b = fx.mng_rd(TSC_OFFSET_KVM), fx.mng_rd(TSC_OFFSET)
    assert a.rax == b.rax == 0 and a.r8 == b.r8
    assert fx.mng_rd(0x1100000000000FFF).rax == FIELD_ID_INCORRECT
    assert fx.mng_rd(TSC_OFFSET | (1 << 62)).rax == FIELD_ID_INCORRECT


def test_mng_wr_not_writable_fields() -> None:
    """md_td_write_element (metadata_td.c 700-730): TSC_OFFSET, TSC_MULTIPLIER and
    ATTRIBUTES have a zero host write mask -> FIELD_NOT_WRITABLE, bare."""
    fx = fixture()
    for fid in (TSC_OFFSET_KVM, 0x110000000000000B, ATTRIBUTES):
        assert fx.mng_wr(fid, 1).rax == NOT_WRITABLE, hex(fid)


def test_hp_lock_timeout_write() -> None:
    """metadata_td.c 757-770: HP_LOCK_TIMEOUT takes a full-mask write only
    (WR_MASK_NOT_VALID) of 10 ms .. 100 s in microseconds (td_control_structures.h 380-381,
    FIELD_VALUE_NOT_VALID)."""
    fx = fixture()
    assert fx.mng_wr(HP_LOCK_TIMEOUT, 1_000_000, 0xFFFFFFFF).rax == WR_MASK_NOT_VALID
    assert fx.mng_wr(HP_LOCK_TIMEOUT, 5).rax == VALUE_NOT_VALID
    assert fx.mng_wr(HP_LOCK_TIMEOUT, 1_000_000).rax == 0


@pytest.mark.parametrize("debug", [False, True])
def test_debug_only_and_never_readable_td_fields(debug: bool) -> None:
    """md_td_read_element (metadata_td.c 602-626): TD_CTLS has prod_rd 0 / dbg_rd all
    (tdr_tdcs_fields_lookup.c); VIRTUAL_TSC has neither -> FIELD_NOT_READABLE."""
    fx = fixture(debug=debug)
    assert fx.mng_rd(TD_CTLS).rax == (0 if debug else NOT_READABLE)
    assert fx.mng_rd(VIRTUAL_TSC).rax == NOT_READABLE


@pytest.mark.parametrize("debug", [False, True])
def test_rtmr_reads_what_the_guest_extended(debug: bool) -> None:
    """RTMR (tdr_tdcs_fields_lookup.c: 4 fields x 6 qwords, prod_rd 0, dbg_rd all): a debug
    TD's host reads the qwords TDG.MR.RTMR.EXTEND left in TDCS.RTMR (engine test
    test_rtmr_extend_checks_then_extends); a production TD's host cannot."""
    fx = fixture(debug=debug)
    rtmr1 = bytes(range(200, 248))
    fx.m.gd.tds[fx.td.tdr].rtmr[1] = rtmr1
    want = int.from_bytes(rtmr1[16:24], "little")
    r = fx.mng_rd(RTMR + 6 + 2)                       # RTMR[1], qword 2
    assert (r.rax, r.r8) == ((0, want) if debug else (NOT_READABLE, 0))
    assert fx.mng_rd(RTMR).rax == (0 if debug else NOT_READABLE)


def test_cpuid_values() -> None:
    """metadata_td.c 476-504: CPUID_VALUES codes carry leaf/subleaf; reserved code bits
    -> FIELD_ID_INCORRECT. The model knows the TD's configured leaves only."""
    fx = fixture()
    assert fx.mng_rd(cpuid_id(7, 0)).rax == 0
    assert fx.mng_rd(cpuid_id(1, None)).rax == 0
    assert fx.mng_rd(cpuid_id(1, None) | (1 << 17)).rax == FIELD_ID_INCORRECT


@pytest.mark.parametrize("debug,first", [(False, 0x8010000000000001),
                                         (True, 0x8010000000000001)])
def test_mng_rd_version_1(debug: bool, first: int) -> None:
    """tdh_mng_rd_wr.c 113-124: version 1 with the null id -> FIRST_FIELD_ID_IN_CONTEXT and
    the first readable TD field (FATAL, tdr_tdcs entry 0); a read returns the next readable
    element id (NUM_TDCX follows FATAL). Version 2 -> OPERAND_INVALID | RAX (lines 72-78)."""
    fx = fixture(debug=debug)
    out = fx.mng_rd(ALL_ONES, version=1)
    assert (out.rax, out.rdx, out.r8) == (FIRST_FIELD_ID, first, 0)
    out = fx.mng_rd(first, version=1)
    assert (out.rax, out.r8, out.rdx) == (0, 0, 0x8010000200000002)
    assert fx.mng_rd(first, version=2).rax == 0xC000010000000000


def test_mng_rd_before_key_config() -> None:
    """check_state_map_tdcs_and_lock (helpers.c 522-600): lifecycle -> TD_KEYS_NOT_CONFIGURED."""
    fx = fixture()
    h = fx.w.host
    tdr = h.control_page()
    h.call(0, Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=fx.m.profile.tdx_keyid_start + 2)
    assert fx.rax(Leaf.TDH_MNG_RD, rcx=tdr, rdx=TSC_OFFSET) == TD_KEYS_NOT_CONFIGURED


# --- TDH.SYS.RD / RDALL -----------------------------------------------------------------------

def test_sys_rd_l2_sizes_and_size_code_ignored() -> None:
    """metadata_sys.c 181-200: TDCS_SIZE_PER_L2_VM = 4K; the element size code is ignored
    for a single element and the next id is the next entry's table id."""
    fx = fixture()
    out = fx.sys_rd(0x9800000100000101)
    assert (out.rax, out.r8) == (0, 0x1000)
    out = fx.sys_rd(0x9800000000000100)
    assert (out.rax, out.rdx) == (0, 0x9800000100000101)


def test_sys_rd_next_keeps_caller_bits_inside_an_entry() -> None:
    """md_get_next_item_with_iterator (metadata_generic.c 372-494): within PKG_FMS only the
    field code advances, the caller's size code stays."""
    fx = fixture()
    out = fx.sys_rd(0x0000000000000001)
    assert (out.rax, out.rdx) == (0, 0x0000000000000002)


def test_sys_rd_cpuid_slots_past_num() -> None:
    """metadata_sys.c 262-285: every CPUID_CONFIG slot is readable; past NUM_CPUID_CONFIG
    the leaf reads ~0 and the values 0 (no FIELD_SKIP)."""
    fx = fixture()
    n = fx.sys_rd(0x9900000100000004).r8
    out = fx.sys_rd(0x9900000300000400 + n)
    assert (out.rax, out.r8) == (0, ALL_ONES)
    out = fx.sys_rd(0x9900000300000500 + 2 * n)
    assert (out.rax, out.r8) == (0, 0)


def test_rdall_start_id_must_open_a_field() -> None:
    """md_check_field_and_get_entry (metadata_generic.c 735-766): RDALL's start id must be
    the first element of a field with the entry's size code, else FIELD_ID_INCORRECT."""
    fx = fixture()
    buf = fx.w.host.alloc.page()
    for start, want in ((0x0000000200000002, 0), (0x9900000300000501, FIELD_ID_INCORRECT),
                        (0x9900000100000400, FIELD_ID_INCORRECT)):
        out = fx.call(Leaf.TDH_SYS_RDALL, rdx=buf, r8=start)
        assert out.rax == want, hex(start)
    size, nseq, _ = struct.unpack("<HHI", fx.m.memory.read(buf, 8))
    assert size > 8 and nseq > 0


def test_kernel_metadata_ids_are_the_kernels() -> None:
    """The ids tdx_global_metadata.c reads (and the Dynamic PAMT kernel's
    PAMT_PAGE_BITMAP_ENTRY_BITS, 16-bit: 0x9100000100000013) are in the SYS table with the
    kernel's element size."""
    ids = {0x0800000100000003, 0x0800000100000004, 0x0800000100000005, 0x0A00000300000008,
           0x9100000100000008, 0x9100000100000009, 0x9100000100000010, 0x9100000100000011,
           0x9100000100000012, 0x9800000100000000, 0x9800000100000100, 0x9800000100000200,
           0x1900000300000000, 0x1900000300000001, 0x1900000300000002, 0x1900000300000003,
           0x9900000100000004, 0x9900000100000008, 0x8900000100000000, 0x9100000100000013}
    table = {f.field_id for f in fl.GLOBAL_FIELDS}
    assert ids <= table, sorted(hex(x) for x in ids - table)


def test_kvm_td_and_vp_ids_resolve() -> None:
    """Every id KVM 7.3 sends with MNG.RD / VP.RD / VP.WR (kvm/vmx/tdx.c, BUILD_TDX_FIELD:
    class << 56 | field, no size, no context) finds its table entry."""
    for fid, name in ((TSC_OFFSET_KVM, "TSC_OFFSET"), (0x110000000000000B, "TSC_MULTIPLIER")):
        e = md.TD_TABLE.find(fid)
        assert e is not None and e.name == name
    for fid in (0x2, 0x2016, 0x4000, 0x401E, 0x4024, 0x203C, PEND_NMI_KVM,
                0x9100000000000100):
        assert md.VP_TABLE.find(fid) is not None, hex(fid)


PEND_NMI_KVM = 0x200000000000000B


@pytest.mark.parametrize("gen", GENERATIONS)
def test_generation_metadata(gen: str) -> None:
    """SYS.RD reports the generation's values (see tests/test_fidelity_versions.py)."""
    fx = fixture(gen)
    p = fx.m.profile
    assert fx.sys_rd(0x9800000100000100).r8 == p.gen.tdcs_pages * 4096
    assert fx.sys_rd(0x9900000100000008).r8 == p.gen.max_vcpus_per_td


@pytest.mark.parametrize("gen", GENERATIONS)
def test_num_cmrs(gen: str) -> None:
    """metadata_sys.c 143-146 (1.5): NUM_CMRS is MAX_CMR (32) whatever the platform has;
    unused CMR_BASE slots read 0. The 2.0 generation reports the CMR count."""
    fx = fixture(gen)
    cmrs = [c for c in fx.m.profile.cmrs if c.size]
    want = 32 if gen == "1.5" else len(cmrs)
    assert fx.sys_rd(0x9000000100000000).r8 == want
    out = fx.sys_rd(0x9000000300000080 + 31)
    assert (out.rax, out.r8) == (0, 0)


def _sequences(data: bytes) -> dict[int, tuple[int, list[int]]]:
    """Parse a metadata list: header id (counts cleared) -> (number of fields, elements)."""
    size, nseq, _ = struct.unpack_from("<HHI", data, 0)
    out, off = {}, 8
    for _ in range(nseq):
        (hdr,) = struct.unpack_from("<Q", data, off)
        nelem = ((hdr >> 34) & 0xF) + 1
        nfields = ((hdr >> 38) & 0x1FF) + 1
        elems = list(struct.unpack_from(f"<{nelem * nfields}Q", data, off + 8))
        out[hdr & ~((0xF << 34) | (0x1FF << 38))] = (nfields, elems)
        off += 8 + 8 * nelem * nfields
    assert off == size
    return out


def test_rdall_merges_consecutive_fields_into_one_sequence() -> None:
    """md_dump_sequence (metadata_generic.c 872-950) + is_sequential_field_id: fields of one
    class with consecutive codes, the same element count and size share a sequence: the
    three PAMT entry sizes are one sequence of 3 fields, MAX_TDMRS and
    MAX_RESERVED_PER_TDMR one of 2; NUM_PKGS and PKG_FMS' 8 fields one of 9."""
    fx = fixture()
    buf = fx.w.host.alloc.page()
    out = fx.call(Leaf.TDH_SYS_RDALL, rdx=buf, r8=ALL_ONES)
    assert (out.rax, out.r8) == (0, ALL_ONES)
    seqs = _sequences(fx.m.memory.read(buf, 4096))
    assert seqs[0x9100000100000010] == (3, [16, 16, 16])
    assert seqs[0x9100000100000008][0] == 2
    assert seqs[0x0000000200000000][0] == 9
    assert 0x9100000100000011 not in seqs
