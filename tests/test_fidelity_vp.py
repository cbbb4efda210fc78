"""Class 1 of issue 13: TDH.VP.RD / TDH.VP.WR take every check of
intel/tdx-module src/vmm_dispatcher/api_calls/tdh_vp_rd_wr.c (1.5: lines 42-250), in its
order: TDVPR (RCX), implicit TDR, TDCS, map_tdvps (page count), check_and_associate_vcpu
(src/common/helpers/helpers.c 960-1036: state, association with the calling LP, binding an
unassociated vCPU), the field id (metadata_generic.c 100-117) and the element access
(src/common/metadata_handlers/metadata_vp.c).
"""

from __future__ import annotations

import pytest
from test_fidelity_support import ALL_ONES, GENERATIONS, fixture

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf

VCPU_STATE_INCORRECT = 0xC000070000000000
VCPU_ASSOCIATED = 0x8000070100000000
VCPU_NOT_ASSOCIATED = 0x8000070200000000
FLUSHVP_NOT_DONE = 0x8000082400000000
TDCX_NUM_INCORRECT = 0xC000061000000000
FIELD_ID_INCORRECT = 0xC0000C0000000000
NOT_WRITABLE = 0xC0000C0100000000
NOT_READABLE = 0xC0000C0200000000
VALUE_NOT_VALID = 0xC0000C0300000000
FIRST_FIELD_ID = 0x00000C0B00000000
TD_VMCS_FIELD_NOT_INITIALIZED = 0xC000073000000000
OPERAND_INVALID_RAX = 0xC000010000000000

SHARED_EPTP = 0x203C
PI_NV, PI_DESC, PIN_BASED, PROC_BASED, GUEST_RIP = 0x0002, 0x2016, 0x4000, 0x4002, 0x681E
GPR_RAX = 0x1020000300000000
PEND_NMI = 0x200000000000000B
VCPU_STATE_DETAILS = 0x9100000000000100


@pytest.mark.parametrize("gen", GENERATIONS)
def test_page_count_before_state(gen: str) -> None:
    """map_tdvps (tdh_vp_rd_wr.c 132-140, helpers.c 616-640): a vCPU whose TDVPX pages are
    not all added -> TDX_TDCX_NUM_INCORRECT, bare, before the state check."""
    fx = fixture(gen, runnable=False)  # VP.CREATE needs op_state INITIALIZED
    v = fx.bare_vcpu(addcx=0)
    assert fx.vp_rd(PI_NV, vcpu=v).rax == TDCX_NUM_INCORRECT
    assert fx.vp_wr(PI_NV, 1, vcpu=v).rax == TDCX_NUM_INCORRECT


@pytest.mark.parametrize("gen", GENERATIONS)
def test_uninitialised_vcpu_state_incorrect(gen: str) -> None:
    """check_and_associate_vcpu (helpers.c 1028-1033): not VCPU_READY ->
    VCPU_STATE_INCORRECT; the state UNINITIALIZED is 0, so 2.0.08's | state is the same
    value (0xC000070000000000) in both generations."""
    fx = fixture(gen, runnable=False)
    v = fx.bare_vcpu()
    assert fx.vp_rd(PI_NV, vcpu=v).rax == VCPU_STATE_INCORRECT
    assert fx.vp_wr(PI_NV, 1, vcpu=v).rax == VCPU_STATE_INCORRECT


def test_associated_with_another_lp() -> None:
    """associate_vcpu (helpers.c 975-980): associated with LP 0, called from LP 1 ->
    TDX_VCPU_ASSOCIATED, bare."""
    fx = fixture()
    assert fx.vp_rd(PI_NV, lp=1).rax == VCPU_ASSOCIATED
    assert fx.vp_wr(PI_NV, 0xF2, lp=1).rax == VCPU_ASSOCIATED
    assert fx.vp_rd(PI_NV, lp=0).rax == 0


def test_vp_rd_binds_a_flushed_vcpu_to_the_calling_lp() -> None:
    """associate_vcpu (helpers.c 960-1014) binds an unassociated vCPU to the calling LP and
    the binding outlives the call; TDH.VP.FLUSH (tdh_vp_flush.c 116-123) then has to run
    on that LP."""
    fx = fixture()
    tdvpr = fx.vcpu.tdvpr
    assert fx.rax(Leaf.TDH_VP_FLUSH, 0, rcx=tdvpr) == 0
    assert fx.vp_rd(PI_NV, lp=1).rax == 0
    assert fx.rax(Leaf.TDH_VP_FLUSH, 0, rcx=tdvpr) == VCPU_NOT_ASSOCIATED
    assert fx.vp_rd(PI_NV, lp=0).rax == VCPU_ASSOCIATED
    assert fx.rax(Leaf.TDH_VP_FLUSH, 1, rcx=tdvpr) == 0


def test_vp_rd_after_flush_blocks_vpflushdone_even_when_the_read_fails() -> None:
    """The association is made before the field is looked at (tdh_vp_rd_wr.c 142-150 vs
    180-204) and is not undone at EXIT: a VP.RD of an unknown field after VP.FLUSH still
    makes TDH.MNG.VPFLUSHDONE fail (tdh_mng_vpflushdone.c 101-114: FLUSHVP_NOT_DONE)."""
    fx = fixture()
    assert fx.rax(Leaf.TDH_VP_FLUSH, 0, rcx=fx.vcpu.tdvpr) == 0
    assert fx.vp_rd(0x3F00000000000000).rax == FIELD_ID_INCORRECT
    assert fx.rax(Leaf.TDH_MNG_VPFLUSHDONE, rcx=fx.td.tdr) == FLUSHVP_NOT_DONE
    assert fx.rax(Leaf.TDH_VP_FLUSH, 0, rcx=fx.vcpu.tdvpr) == 0
    assert fx.rax(Leaf.TDH_MNG_VPFLUSHDONE, rcx=fx.td.tdr) == 0


@pytest.mark.parametrize("fid", [
    SHARED_EPTP | (1 << 24),            # reserved_0 (bits 31:24)
    SHARED_EPTP | (1 << 34),            # last_element_in_field
    SHARED_EPTP | (1 << 38),            # last_field_in_sequence
    SHARED_EPTP | (1 << 47),            # reserved_1
    SHARED_EPTP | (1 << 55),            # reserved_2
    SHARED_EPTP | (1 << 62),            # reserved_3
])
def test_single_element_id_bits(fid: int) -> None:
    """md_check_as_single_element_id (metadata_generic.c 100-117): FIELD_ID_INCORRECT,
    bare."""
    fx = fixture()
    assert fx.vp_rd(fid).rax == FIELD_ID_INCORRECT
    assert fx.vp_wr(fid, 0x1000).rax == FIELD_ID_INCORRECT


def test_ignored_id_bits_name_the_same_field() -> None:
    """Element size, inc_size, write_mask_valid, context and non_arch bits are ignored
    (metadata_generic.c 100-117, the context forced by tdh_vp_rd_wr.c 158): KVM's bare
    0x203C, the canonical 0x002400030000203C and the non-arch spelling are one field."""
    fx = fixture()
    hpa = 0x1_2345_6000
    assert fx.vp_wr(SHARED_EPTP, hpa).rax == 0
    for fid in (SHARED_EPTP, 0x002400030000203C, 0x802400030000203C,
                SHARED_EPTP | (1 << 51) | (5 << 52)):
        out = fx.vp_rd(fid)
        assert (out.rax, out.r8) == (0, hpa), hex(fid)


def test_vmcs_high_access_and_unknown_class() -> None:
    """metadata_vp.c 557-563: the HIGH half of a 64-bit VMCS field (0x203D) is refused;
    class 63 has no table entry (md_read_element, metadata_generic.c 671-733)."""
    fx = fixture()
    assert fx.vp_rd(SHARED_EPTP + 1).rax == FIELD_ID_INCORRECT
    assert fx.vp_rd(0x3F00000000000000).rax == FIELD_ID_INCORRECT


@pytest.mark.parametrize("debug", [False, True])
def test_debug_only_fields(debug: bool) -> None:
    """md_vp_read_element (metadata_vp.c 650-674) with the prod/debug read mask chosen by
    ATTRIBUTES.DEBUG (tdh_vp_rd_wr.c 156; masks from td_vmcs/tdvps_fields_lookup.c):
    guest RIP and the GPRs are readable on a debug TD only."""
    fx = fixture(debug=debug)
    want = 0 if debug else NOT_READABLE
    assert fx.vp_rd(GUEST_RIP).rax == want
    assert fx.vp_rd(GPR_RAX).rax == want
    # VCPU_STATE_DETAILS (KVM's non-arch spelling) is readable in production.
    assert fx.vp_rd(VCPU_STATE_DETAILS).rax == 0


def test_vp_wr_masks_and_forbidden_bits() -> None:
    """md_vp_write_element (metadata_vp.c 1413-1516): combined mask 0 -> NOT_WRITABLE;
    bits asked for outside the write mask must keep their value
    (md_check_forbidden_bits_unchanged, metadata_generic.h 251-264) else VALUE_NOT_VALID."""
    fx = fixture()
    assert fx.vp_wr(PROC_BASED, 0, ALL_ONES).rax == NOT_WRITABLE          # prod wr 0
    assert fx.vp_wr(PI_NV, 0x30, 0).rax == NOT_WRITABLE                   # R9 = 0
    assert fx.vp_wr(PIN_BASED, 0x81, 0x81).rax == VALUE_NOT_VALID         # bit 0 not writable
    assert fx.vp_wr(PEND_NMI, 1, 0xFF).rax == 0
    out = fx.vp_rd(PEND_NMI)
    assert (out.rax, out.r8) == (0, 1)


def test_kvm_posted_interrupt_sequence() -> None:
    """md_vp_element_vmcs_wr_handle (metadata_vp.c 798-840): pin-based bit 7 needs the
    notification vector (initial 0xFFFF, td_vmcs_init.c 74) and the descriptor address
    (initial NULL_PA, line 75) first -> TD_VMCS_FIELD_NOT_INITIALIZED | VMCS encoding;
    the vector must be 0..255; the descriptor is a shared HPA checked for 64 bytes with bits
    5:0 outside the write mask. KVM's order (kvm/vmx/tdx.c 3191-3193) passes."""
    fx = fixture(runnable=False)
    v = fx.bare_vcpu()
    tdvpr = v.tdvpr
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=tdvpr, rdx=0, r8=7) == 0
    assert fx.vp_wr(PIN_BASED, 0x80, 0x80, vcpu=v).rax == TD_VMCS_FIELD_NOT_INITIALIZED | PI_NV
    assert fx.vp_wr(PI_NV, 0x100, 0xFFFF, vcpu=v).rax == VALUE_NOT_VALID
    out = fx.vp_wr(PI_NV, 0xF2, vcpu=v)
    assert (out.rax, out.r8) == (0, 0xFFFF)  # old value: the initial one
    assert fx.vp_wr(PIN_BASED, 0x80, 0x80, vcpu=v).rax == TD_VMCS_FIELD_NOT_INITIALIZED | PI_DESC
    assert fx.vp_wr(PI_DESC, 0x1008, vcpu=v).rax == VALUE_NOT_VALID       # bits 5:0 forbidden
    private = fx.m.profile.tdx_keyid_start << fx.m.profile.hkid_start_bit
    assert fx.vp_wr(PI_DESC, private | 0x1000, vcpu=v).rax == VALUE_NOT_VALID
    assert fx.vp_wr(PI_DESC, 0x1000, vcpu=v).rax == 0
    out = fx.vp_wr(PIN_BASED, 0x80, 0x80, vcpu=v)
    assert out.rax == 0
    assert fx.vp_rd(PIN_BASED, vcpu=v).r8 == 0x80


@pytest.mark.parametrize("debug,first", [(False, 0x0024000100000002),
                                         (True, 0x0024000100000000)])
def test_vp_rd_version_1_iterates(debug: bool, first: int) -> None:
    """tdh_vp_rd_wr.c 160-171 and 193-197: version 1 with the null id -> the first
    readable VP field (td_vmcs_lookup order: VPID is debug-only, the PI notification vector
    is the first production-readable entry) and FIRST_FIELD_ID_IN_CONTEXT; a successful read
    returns the next readable element in RDX (the MSR-bitmap address follows the vector in
    production)."""
    fx = fixture(debug=debug)
    out = fx.vp_rd(ALL_ONES, version=1)
    assert (out.rax, out.rdx, out.r8) == (FIRST_FIELD_ID, first, 0)
    out = fx.vp_rd(0x0024000100000002, version=1)
    assert out.rax == 0
    if not debug:
        assert out.rdx == 0x0024000300002004
    # version 0 keeps RDX and refuses the null id as a single element
    out = fx.vp_rd(ALL_ONES)
    assert (out.rax, out.rdx) == (FIELD_ID_INCORRECT, ALL_ONES)


def test_versions() -> None:
    """VP.RD rejects version 2 itself (tdh_vp_rd_wr.c 82-88); VP.WR has no version 1 in
    the dispatcher's list (tdx_vmm_dispatcher.c 147-162)."""
    fx = fixture()
    assert fx.vp_rd(PI_NV, version=2).rax == OPERAND_INVALID_RAX
    assert fx.call(Leaf.TDH_VP_WR, 0, 1, rcx=fx.vcpu.tdvpr, rdx=PI_NV, r8=1,
                   r9=ALL_ONES).rax == OPERAND_INVALID_RAX


@pytest.mark.parametrize("gen,status", [("1.5", VCPU_STATE_INCORRECT),
                                        ("dpamt", VCPU_STATE_INCORRECT | 2)])
def test_vp_init_twice(gen: str, status: int) -> None:
    """tdh_vp_init.c: an initialised vCPU -> VCPU_STATE_INCORRECT, bare in 1.5.06 and
    | state (READY = 2) in 2.0.08 (the TD still INITIALIZED: VP.INIT's op state)."""
    fx = fixture(gen, runnable=False)
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=fx.vcpu.tdvpr, rdx=0, r8=9) == status


def test_failed_metadata_access_changes_nothing_but_association() -> None:
    """A refused write leaves the field as it was."""
    fx = fixture()
    assert fx.vp_wr(PI_NV, 0x100, 0xFFFF).rax == VALUE_NOT_VALID
    assert fx.vp_rd(PI_NV).r8 == 0xF2
    assert st.decode(VALUE_NOT_VALID) == "TDX_METADATA_FIELD_VALUE_NOT_VALID"


def test_private_gpa_field_on_a_debug_td() -> None:
    """md_vp_handle_field_attribute_on_wr (metadata_vp.c 1400-1408): guest CR3 (GPA,
    private; debug-writable) must be a valid private GPA: the shared bit set ->
    FIELD_VALUE_NOT_VALID; on a production TD it is not writable at all."""
    fx = fixture(debug=True)
    shared = 1 << 47
    assert fx.vp_wr(0x6802, 0x1000).rax == 0
    assert fx.vp_wr(0x6802, shared | 0x1000).rax == VALUE_NOT_VALID
    assert fixture().vp_wr(0x6802, 0x1000).rax == NOT_WRITABLE
