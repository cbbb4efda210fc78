"""The seed's race: TDH.MEM.PAGE.DEMOTE (LP0) vs TDH.PHYMEM.PAMT.ADD (LP1), on demand.

Seed: Yan Zhao, "Re: [RFC PATCH v5 30/45] x86/virt/tdx: Add API to demote a 2MB mapping to
512 4KB mappings" (2026-06-11): DEMOTE of guest pfn 0x511a00 with DPAMT pages 0x1b090c (R12)
and 0x119b4f (R13) vs PAMT.ADD for pfn 0x1b090d -> PAMT.ADD returns 0x8000020000000001,
or DEMOTE returns 0x800002000000000c. Module behaviour from intel/tdx-module (commit
1666adc4) tdh_mem_page_demote.c + pamt_manager.c pamt_demote() (SHARED walk of the R12
page's 2MB PAMT entry, BUSY | R12) and tdh_phymem_pamt_add.c (EXCLUSIVE walk of the target
2MB entry, BUSY | RCX).
"""

from __future__ import annotations

import threading

import pytest
from test_td_support import World, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module.pamt import PT_PAMT, PT_REG

GUEST_2M_HPA = 0x511A00 << 12
DPAMT_A1 = 0x1B090C << 12  # R12
DPAMT_B1 = 0x119B4F << 12  # R13
PAMT_ADD_PFN = 0x1B090D << 12  # LP1 installs a pair for the 2MB range holding this pfn
GPA = 0x4000_0000
BUSY_RCX = 0x8000020000000001
BUSY_R12 = 0x800002000000000C


class Scenario:
    """A runnable TD with a 2MB private page at pfn 0x511a00, blocked and tracked."""

    def __init__(self) -> None:
        self.w: World = make_world(dpamt=True)
        h = self.w.host
        self.td = h.init_vm(hkid=self.w.module.profile.tdx_keyid_start + 1)
        h.init_vcpu(self.td, 0, 0)
        h.finalize(self.td)
        h.aug(self.td, GPA, level=1, hpa=GUEST_2M_HPA)
        h.block_track(self.td, GPA, level=1)
        self.sept_page = h.control_page()          # new S-EPT page, with its own DPAMT pair
        self.add_pair = (h.alloc.page(), h.alloc.page())  # LP1's two free pages
        self.w.check()

    def demote_regs(self) -> Regs:
        return Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE, rcx=GPA | 1, rdx=self.td.tdr,
                    r8=self.sept_page, r12=DPAMT_A1, r13=DPAMT_B1)

    def pamt_add_regs(self) -> Regs:
        return Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=(PAMT_ADD_PFN & ~0x1FFFFF) | 1,
                    rdx=self.add_pair[0], r8=self.add_pair[1])

    def in_thread(self, lp: int, regs: Regs) -> tuple[threading.Thread, list[Regs]]:
        result: list[Regs] = []
        t = threading.Thread(target=lambda: result.append(self.w.module.seamcall(lp, regs)))
        t.start()
        return t, result

    def entry(self):  # the guest page's S-EPT entry at 2MB
        td = self.w.module.gd.tds[self.td.tdr]
        return td.sept.walk(GPA, 1)

    def assert_demoted(self) -> None:
        gd = self.w.module.gd
        td = gd.tds[self.td.tdr]
        w = self.entry()
        assert w.entry.state == S.NL_MAPPED and w.entry.hpa == self.sept_page
        leaves = [(g, lvl, e) for g, lvl, e in td.sept.leaves() if GPA <= g < GPA + (2 << 20)]
        assert len(leaves) == 512
        assert all(lvl == 0 and e.state == S.PENDING and e.hpa == GUEST_2M_HPA + (g - GPA)
                   for g, lvl, e in leaves)
        pamt = self.w.module.pamt
        assert pamt.get(GUEST_2M_HPA, 1).pt == PT_PAMT
        assert all(pamt.get(GUEST_2M_HPA + (i << 12), 0).pt == PT_REG for i in range(512))
        node = gd.pamt.node(GUEST_2M_HPA)
        assert (node.hpa0, node.hpa1, node.page_count) == (DPAMT_A1, DPAMT_B1, 512)
        assert {DPAMT_A1 >> 12, DPAMT_B1 >> 12} <= gd.pamt.bitmap
        self.w.host.commit_demote(self.td, GPA, self.sept_page, (DPAMT_A1, DPAMT_B1))

    def assert_not_demoted(self) -> None:
        gd = self.w.module.gd
        w = self.entry()
        assert w.level == 1 and w.entry.state == S.PENDING_BLOCKED
        assert w.entry.hpa == GUEST_2M_HPA
        assert self.w.module.pamt.get(GUEST_2M_HPA, 1).pt == PT_REG
        assert gd.pamt.node(GUEST_2M_HPA) is None
        assert DPAMT_A1 >> 12 not in gd.pamt.bitmap and DPAMT_B1 >> 12 not in gd.pamt.bitmap


@pytest.fixture
def sc() -> Scenario:
    return Scenario()


def test_demote_first_pamt_add_gets_busy_rcx(sc: Scenario) -> None:
    pause = sc.w.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE, point="locked")
    t, res = sc.in_thread(0, sc.demote_regs())
    assert pause.wait_paused(5)
    out = sc.w.module.seamcall(1, sc.pamt_add_regs())
    assert out.rax == BUSY_RCX == st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX
    assert sc.w.module.pamt.node(PAMT_ADD_PFN) is None  # failed PAMT.ADD changed nothing
    pause.resume()
    t.join(5)
    assert res[0].rax == 0
    sc.assert_demoted()
    sc.w.check()
    assert len(sc.w.module.locks) == 0


def test_pamt_add_first_demote_gets_busy_r12(sc: Scenario) -> None:
    pause = sc.w.control.pause(lp=1, leaf=Leaf.TDH_PHYMEM_PAMT_ADD, point="locked")
    t, res = sc.in_thread(1, sc.pamt_add_regs())
    assert pause.wait_paused(5)
    out = sc.w.module.seamcall(0, sc.demote_regs())
    assert out.rax == BUSY_R12 == st.TDX_OPERAND_BUSY + st.OPERAND_ID_R12
    sc.assert_not_demoted()
    pause.resume()
    t.join(5)
    assert res[0].rax == 0
    assert sc.w.module.pamt.node(PAMT_ADD_PFN).hpa0 == sc.add_pair[0]
    sc.w.check()
    assert len(sc.w.module.locks) == 0


def test_serialised_by_pamt_lock_both_succeed(sc: Scenario) -> None:
    """Yan Zhao's fix: DEMOTE and PAMT.ADD both under the kernel's global pamt_lock."""
    pamt_lock = threading.Lock()
    results: dict[str, Regs] = {}

    def locked(name: str, lp: int, regs: Regs) -> None:
        with pamt_lock:
            results[name] = sc.w.module.seamcall(lp, regs)

    pause = sc.w.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE, point="locked")
    t0 = threading.Thread(target=locked, args=("demote", 0, sc.demote_regs()))
    t0.start()
    assert pause.wait_paused(5)  # DEMOTE is inside the module, holding its TDX locks
    t1 = threading.Thread(target=locked, args=("pamt_add", 1, sc.pamt_add_regs()))
    t1.start()
    t1.join(0.2)
    assert t1.is_alive() and "pamt_add" not in results  # spinning on pamt_lock, not BUSY
    pause.resume()
    t0.join(5)
    t1.join(5)
    assert results["demote"].rax == 0 and results["pamt_add"].rax == 0
    sc.assert_demoted()
    gd = sc.w.module.gd
    assert gd.pamt.node(PAMT_ADD_PFN).hpa0 == sc.add_pair[0]
    # DPAMT_A1 now sits inside a range that has its own pair, still a PAMT page
    assert DPAMT_A1 >> 12 in gd.pamt.bitmap
    sc.w.check()
    assert len(sc.w.module.locks) == 0


def test_optimisation_try_unlocked_then_retry(sc: Scenario) -> None:
    """The proposed optimisation: DEMOTE unlocked first; on BUSY retry under pamt_lock."""
    pause = sc.w.control.pause(lp=1, leaf=Leaf.TDH_PHYMEM_PAMT_ADD, point="locked")
    t, res = sc.in_thread(1, sc.pamt_add_regs())
    assert pause.wait_paused(5)
    first = sc.w.module.seamcall(0, sc.demote_regs())
    assert first.rax == BUSY_R12
    pause.resume()  # the PAMT.ADD holder finishes and drops pamt_lock
    t.join(5)
    assert res[0].rax == 0
    second = sc.w.module.seamcall(0, sc.demote_regs())
    assert second.rax == 0
    sc.assert_demoted()
    sc.w.check()


def test_same_interleaving_through_the_kernel_demote_sequence(sc: Scenario) -> None:
    """KVM's retry: BUSY from DEMOTE is retried once (all vCPUs kicked) and then succeeds."""
    pause = sc.w.control.pause(lp=1, leaf=Leaf.TDH_PHYMEM_PAMT_ADD, point="locked")
    t, _ = sc.in_thread(1, sc.pamt_add_regs())
    assert pause.wait_paused(5)
    out = sc.w.host.demote(sc.td, GPA, lp=0, pair=(DPAMT_A1, DPAMT_B1),
                           sept_page=sc.sept_page, expect=None)
    assert out.rax == BUSY_R12 and out.rcx == 0 and out.rdx == 0
    pause.resume()
    t.join(5)
    out = sc.w.host.demote(sc.td, GPA, lp=0, pair=(DPAMT_A1, DPAMT_B1),
                           sept_page=sc.sept_page)
    assert out.rax == 0
    sc.w.check()
