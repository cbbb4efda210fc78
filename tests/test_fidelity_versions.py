"""Classes 4-6 of issue 13: leaf versions, the module generation, and structure sizes.

The "1.5" generation follows intel/tdx-module 1.5.06 (commit 1e636985), the "dpamt"
generation 2.0.08 (commit 1666adc4); each reports its own version. Sources per test.
"""

from __future__ import annotations

import pytest
from test_fidelity_support import ALL_ONES, GENERATIONS, fixture

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import TdxModule
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import GiB, Profile

OPERAND_INVALID = 0xC000010000000000
RAX, R8 = 0, 8
SYS_NOT_READY = 0xC000050500000000
TDCS_NOT_ALLOCATED = 0xC000060600000000
TDCX_NUM_INCORRECT = 0xC000061000000000
X2APIC_ID_NOT_UNIQUE = 0xC000062100000000


def fresh(gen: str) -> TdxModule:
    p = Profile.from_vm(2, 2 * GiB, generation=gen)
    return TdxModule(p, SparseMemory(p.ram))


@pytest.mark.parametrize("gen,version,text", [("1.5", (1, 5, 6), "1.5.06"),
                                              ("dpamt", (2, 0, 8), "2.0.08")])
def test_reported_version(gen: str, version: tuple[int, int, int], text: str) -> None:
    """metadata_sys.c (MAJOR/MINOR/UPDATE from proj_defs.mk of each tree); Linux prints
    "Module version: %u.%u.%02u" (tdx_global_metadata.c 121-125)."""
    fx = fixture(gen)
    got = tuple(fx.sys_rd(fid).r8 for fid in (0x0800000100000004, 0x0800000100000003,
                                              0x0800000100000005))
    assert got == version
    assert fx.m.profile.gen.version_string == text
    assert fx.m.profile.to_dict()["module_version"] == text


@pytest.mark.parametrize("gen,tdcs,max_vcpus", [("1.5", 0x6000, 576), ("dpamt", 0x9000, 1376)])
def test_structure_sizes(gen: str, tdcs: int, max_vcpus: int) -> None:
    """metadata_sys.c 181-200: TDCS_BASE_SIZE = MIN_NUM_TDCS_PAGES * 4K
    (td_control_structures.h: 6 in 1.5, 9 in 2.0.08), TDVPS_BASE_SIZE = 6 * 4K
    (tdx_tdvps.h 52-65, both), TDR 4K; MAX_VCPUS_PER_TD 576 / 1376."""
    fx = fixture(gen)
    assert fx.sys_rd(0x9800000100000000).r8 == 0x1000
    assert fx.sys_rd(0x9800000100000100).r8 == tdcs
    assert fx.sys_rd(0x9800000100000200).r8 == 0x6000
    assert fx.sys_rd(0x9800000100000201).r8 == 0x3000
    assert fx.sys_rd(0x9900000100000008).r8 == max_vcpus


def test_features0_of_1_5_06() -> None:
    """metadata_sys.c of 1.5.06: 0x2E1F0EBF (1.5.01's set without local attestation, plus
    TOPOLOGY_ENUM, ICSSD, FIXED_CTR12_PROF, MAXPA_VIRT, CPUID2_VIRT); bits above 31 are the
    profile's switchable features (SYS.DISABLE)."""
    fx = fixture("1.5")
    assert fx.sys_rd(0x0A00000300000008).r8 & 0xFFFFFFFF == 0x2E1F0EBF


@pytest.mark.parametrize("gen", GENERATIONS)
def test_tdcs_page_count_enforced(gen: str) -> None:
    """The module enforces what it reports: MNG.INIT with fewer TDCS pages ->
    TDCS_NOT_ALLOCATED (check_state_map_tdcs_and_lock, helpers.c 522-600); one more ADDCX ->
    TDCX_NUM_INCORRECT (tdh_mng_add_cx.c)."""
    fx = fixture(gen)
    h = fx.w.host
    pages = fx.m.profile.gen.tdcs_pages
    tdr = h.control_page()
    h.call(0, Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=fx.m.profile.tdx_keyid_start + 3)
    h.call(0, Leaf.TDH_MNG_KEY_CONFIG, rcx=tdr)
    for _ in range(pages - 1):
        h.call(0, Leaf.TDH_MNG_ADDCX, rcx=h.control_page(), rdx=tdr)
    assert fx.rax(Leaf.TDH_MNG_INIT, rcx=tdr, rdx=h.control_page()) == TDCS_NOT_ALLOCATED
    h.call(0, Leaf.TDH_MNG_ADDCX, rcx=h.control_page(), rdx=tdr)
    assert fx.rax(Leaf.TDH_MNG_ADDCX, rcx=h.control_page(), rdx=tdr) == TDCX_NUM_INCORRECT


@pytest.mark.parametrize("gen", GENERATIONS)
def test_dispatcher_version_list(gen: str) -> None:
    """tdx_vmm_dispatcher.c 147-162: only the listed leaves pass a version above 0, before
    the SYS_NOT_READY check; the leaf then refuses what it lacks (VP.RD 82-88)."""
    m = fresh(gen)
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MNG_WR | (1 << 16))).rax == OPERAND_INVALID | RAX
    assert m.seamcall(0, Regs(rax=Leaf.TDH_VP_RD | (2 << 16))).rax == SYS_NOT_READY
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE | (1 << 16))).rax == (
        OPERAND_INVALID | RAX)


@pytest.mark.parametrize("gen,v1", [("1.5", OPERAND_INVALID | RAX), ("dpamt", 0)])
def test_sys_init_version_1(gen: str, v1: int) -> None:
    """TDH.SYS.INIT version 1 exists in 2.0.08 only (dispatcher); version 2 ->
    OPERAND_INVALID | RAX before the global lock; R8 != 0 is refused by the model."""
    m = fresh(gen)
    if gen == "dpamt":
        assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT | (2 << 16))).rax == (
            OPERAND_INVALID | RAX)
        assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT | (1 << 16), r8=1)).rax == (
            OPERAND_INVALID | R8)
    assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT | (1 << 16))).rax == v1
    # RCX is checked before the state in every tree (tdh_sys_init.c 1282-1291).
    assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT, rcx=1)).rax == 0xC000010000000001


@pytest.mark.parametrize("gen", GENERATIONS)
def test_vp_init_version_1_operands(gen: str) -> None:
    """tdh_vp_init.c (1.5.06 / 2.0.08): R8 above 32 bits -> OPERAND_INVALID | R8; an x2APIC
    id another vCPU has -> X2APIC_ID_NOT_UNIQUE | that id."""
    fx = fixture(gen, runnable=False)
    fx.w.host.init_vcpu(fx.td, 0, 5)
    v = fx.bare_vcpu()
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=v.tdvpr, r8=1 << 32) == OPERAND_INVALID | R8
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=v.tdvpr, r8=5) == X2APIC_ID_NOT_UNIQUE | 5
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=v.tdvpr, r8=6) == 0
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 2, rcx=v.tdvpr, r8=6) == OPERAND_INVALID | RAX


@pytest.mark.parametrize("gen", GENERATIONS)
def test_multi_version_leaves_accept_version_1(gen: str) -> None:
    """MNG.RD, VP.RD, SEPT.ADD, SEPT.REMOVE, PROMOTE and VP.INIT pass the dispatcher with
    version 1 in both trees (MNG.RD shown here; the others in their own tests)."""
    fx = fixture(gen)
    assert fx.mng_rd(ALL_ONES, version=1).rax == 0x00000C0B00000000


@pytest.mark.parametrize("gen,num_vcpus", [("1.5", 3), ("dpamt", 2)])
def test_vp_init_duplicate_x2apic_vcpu_count(gen: str, num_vcpus: int) -> None:
    """tdh_vp_init.c (1.5 tree, version 1): the vCPU index is taken (NUM_VCPUS++) before the
    x2APIC checks; R8 above 32 bits undoes it, a duplicate id does not (goto EXIT); 2.0.08
    undoes both. MNG.RD NUM_VCPUS (0x9010000200000001) shows the difference."""
    fx = fixture(gen, runnable=False)
    fx.w.host.init_vcpu(fx.td, 0, 5)
    v = fx.bare_vcpu()
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=v.tdvpr, r8=1 << 32) == OPERAND_INVALID | R8
    assert fx.rax(Leaf.TDH_VP_INIT, 0, 1, rcx=v.tdvpr, r8=5) == X2APIC_ID_NOT_UNIQUE | 5
    assert fx.mng_rd(0x9010000200000001).r8 == num_vcpus
