"""A TD's whole life, SEAMCALL by SEAMCALL as KVM issues them, with invariants after each call.

Sequence from Linux arch/x86/kvm/vmx/tdx.c (KVM_TDX_INIT_VM, INIT_VCPU,
INIT_MEM_REGION, FINALIZE_VM, EPT violation -> SEPT.ADD + PAGE.AUG, zap, teardown) and, with
Dynamic PAMT, the RFC v5 series' tdx_pamt_get/put around every page. MRTD is checked against
an independent SHA-384 of the module's MEM.PAGE.ADD / MR.EXTEND blocks (tdh_mem_page_add.c,
tdh_mr_extend.c, crypto/sha384.h).
"""

from __future__ import annotations

import pytest
from test_td_support import expected_mrtd, make_world

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.pamt import PT_NDA, PT_RSVD
from vtdx.testing.invariants import check_invariants


@pytest.mark.parametrize("dpamt", [False, True], ids=["static-pamt", "dynamic-pamt"])
def test_td_life_ends_with_every_page_free(dpamt: bool) -> None:
    w = make_world(dpamt=dpamt)
    m = w.module
    checked: list[int] = []
    inner = w.host._seamcall

    def checking(lp: int, regs: Regs) -> Regs:
        out = inner(lp, regs)
        problems = check_invariants(m, expect_no_locks=True)
        assert not problems, f"after leaf {regs.rax & 0xFFFF}: {problems}"
        checked.append(regs.rax & 0xFFFF)
        return out

    w.host._seamcall = checking
    h = w.host
    hkid = m.profile.tdx_keyid_start + 1
    td = h.init_vm(hkid)
    vcpus = [h.init_vcpu(td, lp, lp) for lp in (0, 1)]
    assert len(vcpus) == 2
    images = {0x1000: b"\x90" * 4096, 0x2000: bytes(range(256)) * 16}
    for gpa, image in images.items():
        h.add_page(td, gpa, image)
    h.finalize(td)
    assert m.gd.tds[td.tdr].mrtd == expected_mrtd(images)
    # runtime: EPT violations fault pages in at 4KB and 2MB
    h.aug(td, 0x10_0000, level=0)
    h.aug(td, 0x20_0000, level=1)
    h.aug(td, 0x40_0000, level=1)
    # split one 2MB page (BLOCK, TRACK, DEMOTE), then zap a 4KB piece of it and a 4KB page
    h.block_track(td, 0x20_0000, level=1)
    h.demote(td, 0x20_0000)
    h.remove(td, 0x20_3000)
    h.remove(td, 0x10_0000)
    h.remove(td, 0x1000)
    # teardown: VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID, RECLAIM everything
    h.teardown(td)
    assert not m.gd.tds
    left = [(lvl, idx, e.pt) for lvl in (0, 1, 2) for idx, e in m.pamt.entries(lvl).items()
            if e.pt not in (PT_NDA, PT_RSVD)]
    assert left == []
    assert not m.pamt.nodes and not m.pamt.bitmap
    assert hkid not in m.kot
    assert not h.pamt_refcount
    for leaf in (Leaf.TDH_MNG_CREATE, Leaf.TDH_MNG_KEY_CONFIG, Leaf.TDH_MNG_ADDCX,
                 Leaf.TDH_MNG_INIT, Leaf.TDH_VP_CREATE, Leaf.TDH_VP_INIT, Leaf.TDH_MEM_SEPT_ADD,
                 Leaf.TDH_MEM_PAGE_ADD, Leaf.TDH_MR_EXTEND, Leaf.TDH_MR_FINALIZE,
                 Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK,
                 Leaf.TDH_MEM_PAGE_DEMOTE, Leaf.TDH_MEM_PAGE_REMOVE,
                 Leaf.TDH_PHYMEM_PAGE_WBINVD, Leaf.TDH_VP_FLUSH, Leaf.TDH_MNG_VPFLUSHDONE,
                 Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_MNG_KEY_FREEID,
                 Leaf.TDH_PHYMEM_PAGE_RECLAIM):
        assert leaf in checked, Leaf(leaf).name
    if dpamt:
        assert Leaf.TDH_PHYMEM_PAMT_ADD in checked and Leaf.TDH_PHYMEM_PAMT_REMOVE in checked
    assert not m.internal_errors
