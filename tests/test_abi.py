"""vtdx.abi: leaf encoding, status codes and their decoder, metadata field ids.

Checked against intel/tdx-module (tag TDX_1.5.01): include/tdx_api_defs.h (leaf numbers,
tdx_leaf_and_version_t, api_error_with_operand_id / _multiple_info),
include/auto_gen/tdx_error_codes_defs.h (status values, OPERAND_ID_*),
include/auto_gen/global_sys_fields_lookup.c (global field ids); and Linux 7.3
arch/x86/include/asm/shared/tdx_errno.h, arch/x86/virt/vmx/tdx/tdx.h and tdx_global_metadata.c.
"""

from __future__ import annotations

import pytest

from vtdx.abi import fields as fl
from vtdx.abi import leaves as lv
from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf


def test_leaf_numbers_match_linux_7_3() -> None:
    # arch/x86/virt/vmx/tdx/tdx.h (7.3)
    linux = {"TDH_SYS_KEY_CONFIG": 31, "TDH_SYS_INIT": 33, "TDH_SYS_RD": 34,
             "TDH_SYS_LP_INIT": 35, "TDH_SYS_TDMR_INIT": 36, "TDH_PHYMEM_CACHE_WB": 40,
             "TDH_SYS_CONFIG": 45, "TDH_SYS_SHUTDOWN": 52, "TDH_SYS_UPDATE": 53,
             "TDH_SYS_DISABLE": 69, "TDH_PHYMEM_PAGE_RDMD": 24, "TDH_VP_INIT": 22,
             "TDH_MEM_PAGE_AUG": 6, "TDH_VP_ENTER": 0}
    for name, num in linux.items():
        assert Leaf[name] == num


def test_leaf_encode_decode_roundtrip() -> None:
    rax = lv.encode(Leaf.TDH_VP_INIT, 1)
    assert rax == 0x10016  # what tdh_vp_init() passes (leaf 22 | 1 << 16)
    assert lv.decode(rax) == (22, 1, 0)
    assert lv.decode(rax | (1 << 24))[2] == 1 << 24
    assert lv.leaf_name(Leaf.TDH_SYS_LP_INIT) == "TDH.SYS.LP.INIT"
    assert lv.leaf_name(0x7777) == "LEAF_30583"


@pytest.mark.parametrize(("name", "value"), [
    ("TDX_OPERAND_INVALID", 0xC000010000000000),
    ("TDX_OPERAND_BUSY", 0x8000020000000000),
    ("TDX_SYS_BUSY", 0x8000020200000000),
    ("TDX_SYS_NOT_READY", 0xC000050500000000),
    ("TDX_SYS_CONFIG_NOT_PENDING", 0xC000050C00000000),
    ("TDX_KEY_CONFIGURED", 0x0000081500000000),
    ("TDX_INVALID_TDMR", 0xC0000A0000000000),
    ("TDX_PAMT_OVERLAP", 0xC0000A1200000000),
    ("TDX_PAMT_OUTSIDE_CMRS", 0xC0000A1100000000),
    ("TDX_INVALID_PAMT", 0xC0000A1000000000),
    ("TDX_TDMR_ALREADY_INITIALIZED", 0x00000A0300000000),
    ("TDX_INTERRUPTED_RESUMABLE", 0x8000000300000000),
    ("TDX_METADATA_FIELD_NOT_READABLE", 0xC0000C0200000000),
])
def test_status_values(name: str, value: int) -> None:
    assert getattr(st, name) == value
    assert st.NAMES[value] == name


def test_operand_ids_and_decoder() -> None:
    assert st.with_operand(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX) == 0x8000020000000001
    assert st.decode(0x8000020000000001) == "TDX_OPERAND_BUSY(RCX)"
    assert st.decode(st.TDX_OPERAND_BUSY + 0x0C) == "TDX_OPERAND_BUSY(R12)"
    assert st.decode(st.TDX_OPERAND_BUSY + 0x80) == "TDX_OPERAND_BUSY(TDR)"
    assert st.decode(st.TDX_OPERAND_INVALID + 0) == "TDX_OPERAND_INVALID"
    # api_error_with_multiple_info(TDX_PAMT_OVERLAP, i=1, PT_2MB, j=0, 0)
    assert st.with_info(st.TDX_PAMT_OVERLAP, 1, 1, 0) == 0xC0000A1200000101
    assert st.decode(0xC0000A1200000101) == "TDX_PAMT_OVERLAP[info=01 01 00 00]"
    assert st.decode(0) == "TDX_SUCCESS"
    assert st.decode(0x1234000000000000).startswith("UNKNOWN_STATUS")
    assert st.decode(st.TDX_SW_ERROR | 0xD) == "TDX_SW_ERROR(0xd)"
    assert st.is_error(st.TDX_OPERAND_BUSY) and not st.is_error(st.TDX_KEY_CONFIGURED)


def test_linux_errno_values_agree() -> None:
    # arch/x86/include/asm/shared/tdx_errno.h (7.3); note Linux's TDX_NON_RECOVERABLE_TD is
    # 0x4000000200000000 while the 1.5 module defines 0x6000000200000000 (fatal bit set):
    # both share the class/detail bits the kernel masks with TDX_SEAMCALL_STATUS_MASK.
    linux = {0x8000000300000000: "TDX_INTERRUPTED_RESUMABLE",
             0x8000020200000000: "TDX_SYS_BUSY", 0xC000010000000000: "TDX_OPERAND_INVALID",
             0x8000020000000000: "TDX_OPERAND_BUSY", 0xC0000B0000000000: "TDX_EPT_WALK_FAILED",
             0x0000082100000000: "TDX_NO_HKID_READY_TO_WBCACHE",
             0x8000082400000000: "TDX_FLUSHVP_NOT_DONE"}
    for value, name in linux.items():
        assert st.NAMES[value] == name


def test_global_field_ids_linux_reads_are_known() -> None:
    for name in fl.LINUX_BOOT_FIELDS:
        f = fl.GLOBAL_BY_NAME[name]
        assert fl.lookup_global(f.field_id) == (f, 0)
    assert fl.GLOBAL_BY_NAME["TDX_FEATURES0"].field_id == 0x0A00000300000008
    assert fl.GLOBAL_BY_NAME["MAX_VCPUS_PER_TD"].field_id == 0x9900000100000008
    values = fl.GLOBAL_BY_NAME["CPUID_CONFIG_VALUES"]
    assert fl.lookup_global(values.field_id + 5) == (values, 5)
    assert fl.element_size(0x9100000100000010) == 2
    assert fl.is_null(fl.FIELD_ID_NA) and fl.is_null(fl.FIELD_ID_NA & ~fl.CONTEXT_MASK)
