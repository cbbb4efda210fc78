"""Negative tests: each TD leaf's main checks return the module's status and operand id, and
a failed call leaves the model exactly as it was and holds no lock afterwards.

The expected values are taken from intel/tdx-module src/vmm_dispatcher/api_calls/ (file
named per test) and, for Dynamic PAMT, the DPAMT-capable tree (commit 1666adc4:
tdh_phymem_pamt_add.c, tdh_phymem_pamt_remove.c, tdh_mem_page_demote.c, pamt_manager.c,
helpers.c non_shared_hpa_metadata_check_and_lock -> TDX_MISSING_PAMT_PAGE_PAIR).
"""

from __future__ import annotations

import threading

import pytest
from test_td_support import World, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.testing.invariants import check_invariants, fingerprint
from vtdx.testing.td_host import Td, td_params

OP_ATTRIBUTES, OP_XFAM, OP_EPTP, OP_MAX_VCPUS, OP_CPUID = 64, 65, 67, 68, 69
OP_SEPT_TREE, OP_TD_EPOCH = 146, 169


class Env:
    def __init__(self, dpamt: bool = True, runnable: bool = True) -> None:
        self.w: World = make_world(dpamt=dpamt)
        self.m = self.w.module
        self.h = self.w.host
        self.hkid = self.m.profile.tdx_keyid_start + 1
        self.td: Td = self.h.init_vm(self.hkid)
        self.vcpu = self.h.init_vcpu(self.td, 0, 0)
        self.h.add_page(self.td, 0x1000, b"x")
        if runnable:
            self.h.finalize(self.td)

    def fail(self, leaf: int, status: int, lp: int = 0, version: int = 0, **regs: int) -> Regs:
        """Run a call that must fail with ``status``; state and locks must not change."""
        before = fingerprint(self.m)
        out = self.m.seamcall(lp, Regs(rax=int(leaf) | (version << 16), **regs))
        assert out.rax == status, f"{st.decode(out.rax)} != {st.decode(status)}"
        assert fingerprint(self.m) == before, "failed call changed model state"
        assert len(self.m.locks) == 0
        assert not check_invariants(self.m)
        return out

    def page(self) -> int:
        return self.h.control_page()


def busy(op: int) -> int:
    return st.TDX_OPERAND_BUSY + op


@pytest.fixture(params=[True, False], ids=["dpamt", "static"])
def env(request: pytest.FixtureRequest) -> Env:
    return Env(dpamt=request.param)


@pytest.fixture
def dp() -> Env:
    return Env(dpamt=True)


# -- tdh_mng_create.c ---------------------------------------------------------------------------
def test_mng_create_checks(env: Env) -> None:
    pa = env.page()
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX, rcx=pa, rdx=1)
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX, rcx=pa,
             rdx=env.hkid | (1 << 16))
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX, rcx=pa + 8,
             rdx=env.hkid + 1)
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
             rcx=env.td.tdr, rdx=env.hkid + 1)
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_HKID_NOT_FREE, rcx=pa, rdx=env.hkid)
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_HKID_NOT_FREE, rcx=pa,
             rdx=env.m.profile.tdx_keyid_start)  # the global private keyid is reserved
    env.fail(Leaf.TDH_MNG_CREATE, st.TDX_OPERAND_ADDR_RANGE_ERROR + st.OPERAND_ID_RCX,
             rcx=40 << 30, rdx=env.hkid + 1)


def test_dpamt_page_without_pair_is_missing_pamt_page_pair(dp: Env) -> None:
    bare = dp.h.alloc.huge() + 0x5000  # a 2MB range nobody gave a DPAMT pair
    dp.fail(Leaf.TDH_MNG_CREATE, st.TDX_MISSING_PAMT_PAGE_PAIR + st.OPERAND_ID_RCX,
            rcx=bare, rdx=dp.hkid + 1)
    dp.h.ensure_sept(dp.td, 0x30_0000, 0)
    dp.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_MISSING_PAMT_PAGE_PAIR + st.OPERAND_ID_R8,
            rcx=0x30_0000, rdx=dp.td.tdr, r8=bare)


# -- tdh_mng_key_config.c, tdh_mng_add_cx.c, tdh_mng_init.c ---------------------------------
def test_key_config_addcx_init_checks(env: Env) -> None:
    h, m = env.h, env.m
    tdr = h.control_page()
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=env.hkid + 1)).rax == 0
    cx = h.control_page()
    env.fail(Leaf.TDH_MNG_ADDCX, st.TDX_TD_KEYS_NOT_CONFIGURED, rcx=cx, rdx=tdr)
    env.fail(Leaf.TDH_MNG_INIT, st.TDX_TD_KEYS_NOT_CONFIGURED, rcx=tdr, rdx=0)
    env.fail(Leaf.TDH_MNG_KEY_CONFIG, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
             rcx=cx)
    assert m.seamcall(0, Regs(rax=Leaf.TDH_MNG_KEY_CONFIG, rcx=tdr)).rax == 0
    env.fail(Leaf.TDH_MNG_KEY_CONFIG, st.TDX_LIFECYCLE_STATE_INCORRECT, rcx=tdr)
    env.fail(Leaf.TDH_MNG_INIT, st.TDX_TDCS_NOT_ALLOCATED, rcx=tdr, rdx=0)
    env.fail(Leaf.TDH_MNG_ADDCX, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
             rcx=env.td.tdr, rdx=tdr)
    # the TDR itself as TDCX: its PAMT entry is already locked exclusive by this call
    env.fail(Leaf.TDH_MNG_ADDCX, st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX, rcx=tdr, rdx=tdr)
    for _ in range(h.tdcs_pages):
        assert m.seamcall(0, Regs(rax=Leaf.TDH_MNG_ADDCX, rcx=h.control_page(), rdx=tdr)).rax == 0
    env.fail(Leaf.TDH_MNG_ADDCX, st.TDX_TDCX_NUM_INCORRECT, rcx=cx, rdx=tdr)
    params = h.alloc.page() & ~0xFFF
    params -= params % 1024

    def init_with(status: int, **kw: object) -> None:
        m.memory.write(params, td_params(**kw))  # type: ignore[arg-type]
        env.fail(Leaf.TDH_MNG_INIT, status, rcx=tdr, rdx=params)

    init_with(st.TDX_OPERAND_INVALID + OP_ATTRIBUTES, attributes=1 << 5)
    init_with(st.TDX_OPERAND_INVALID + OP_XFAM, xfam=0x1)
    init_with(st.TDX_OPERAND_INVALID + OP_MAX_VCPUS, max_vcpus=0)
    init_with(st.TDX_OPERAND_INVALID + 70, tsc_frequency=401)  # OPERAND_ID_TSC_FREQUENCY
    init_with(st.TDX_OPERAND_INVALID + OP_EPTP, eptp_controls=0x16)
    init_with(st.TDX_OPERAND_INVALID + OP_CPUID, cpuid_values=[(1, 0, 0, 0)])
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MNG_INIT, rcx=tdr, rdx=params)).rcx == (
        0x1 | (0xFFFFFFFF << 32))  # leaf/subleaf of the rejected CPUID_CONFIG entry
    m.memory.write(params, td_params())
    env.fail(Leaf.TDH_MNG_INIT, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX, rcx=tdr,
             rdx=params + 512)
    m.memory.write(params + 20, b"\x01")
    env.fail(Leaf.TDH_MNG_INIT, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX, rcx=tdr, rdx=params)
    # an initialised TD cannot be initialised again
    env.fail(Leaf.TDH_MNG_INIT, st.TDX_OP_STATE_INCORRECT, rcx=env.td.tdr, rdx=params)


# -- tdh_vp_*.c, tdh_mng_vpflushdone.c, tdh_mng_key_freeid.c, tdh_phymem_page_reclaim.c ----
def test_vcpu_and_teardown_order_checks(env: Env) -> None:
    h, td = env.h, env.td
    v = env.vcpu
    env.fail(Leaf.TDH_VP_INIT, st.TDX_OP_STATE_INCORRECT, 1, rcx=v.tdvpr)  # runnable TD
    env.fail(Leaf.TDH_VP_FLUSH, st.TDX_VCPU_NOT_ASSOCIATED, lp=1, rcx=v.tdvpr)
    env.fail(Leaf.TDH_MNG_VPFLUSHDONE, st.TDX_FLUSHVP_NOT_DONE, rcx=td.tdr)
    env.fail(Leaf.TDH_MNG_KEY_FREEID, st.TDX_LIFECYCLE_STATE_INCORRECT, rcx=td.tdr)
    env.fail(Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_LIFECYCLE_STATE_INCORRECT, rcx=td.tdcx[0])
    env.fail(Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
             rcx=h.alloc.page())
    env.fail(Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
             rcx=td.tdr + 1)
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_VP_FLUSH, rcx=v.tdvpr)).rax == 0
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MNG_VPFLUSHDONE, rcx=td.tdr)).rax == 0
    env.fail(Leaf.TDH_MNG_KEY_FREEID, st.TDX_WBCACHE_NOT_COMPLETE, rcx=td.tdr)
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_PHYMEM_CACHE_WB, rcx=0)).rax == 0
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MNG_KEY_FREEID, rcx=td.tdr)).rax == 0
    env.fail(Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_TD_ASSOCIATED_PAGES_EXIST, rcx=td.tdr)


def test_vp_init_limits() -> None:
    e = Env(dpamt=False, runnable=False)
    h = e.h
    env_tdr = e.td.tdr
    # max_vcpus = 4 in td_params(): three more fit, the fifth does not
    for lp in (1, 2, 3):
        h.init_vcpu(e.td, lp, lp)
    v = h.control_page()
    assert e.m.seamcall(0, Regs(rax=Leaf.TDH_VP_CREATE, rcx=v, rdx=env_tdr)).rax == 0
    for _ in range(h.tdvps_pages - 1):
        assert e.m.seamcall(0, Regs(rax=Leaf.TDH_VP_ADDCX, rcx=h.control_page(),
                                    rdx=v)).rax == 0
    e.fail(Leaf.TDH_VP_INIT, st.TDX_MAX_VCPUS_EXCEEDED, 0, 1, rcx=v, r8=9)
    e.fail(Leaf.TDH_VP_CREATE, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
           rcx=e.td.tdcx[0], rdx=env_tdr)
    e.fail(Leaf.TDH_VP_CREATE, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RDX,
           rcx=e.page(), rdx=e.td.tdcx[0])
    e.fail(Leaf.TDH_VP_INIT, st.TDX_VCPU_STATE_INCORRECT, 0, 1, rcx=e.vcpu.tdvpr, r8=9)
    e.fail(Leaf.TDH_VP_ADDCX, st.TDX_VCPU_STATE_INCORRECT, rcx=h.control_page(),
           rdx=e.vcpu.tdvpr)


# -- tdh_mem_sept_add.c, tdh_mem_page_add.c, tdh_mem_page_aug.c --------------------------------
def test_sept_add_page_add_aug_checks(env: Env) -> None:
    h, td = env.h, env.td
    new = env.page()
    env.fail(Leaf.TDH_MEM_SEPT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
             rcx=0x1000 | 0, rdx=td.tdr, r8=new)
    out = env.fail(Leaf.TDH_MEM_SEPT_ADD, st.TDX_EPT_ENTRY_STATE_INCORRECT + st.OPERAND_ID_RCX,
                   rcx=0 | 1, rdx=td.tdr, r8=new)
    assert out.rdx == 1 | (0x84 << 8)  # level 1, state NL_MAPPED (extended error info)
    env.fail(Leaf.TDH_MEM_SEPT_ADD, st.TDX_EPT_WALK_FAILED + st.OPERAND_ID_RCX,
             rcx=(1 << 39) | 1, rdx=td.tdr, r8=new)
    env.fail(Leaf.TDH_MEM_SEPT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX,
             rcx=0 | 1, rdx=td.tdr | 0x800, r8=new)
    env.fail(Leaf.TDH_MEM_PAGE_ADD, st.TDX_OP_STATE_INCORRECT, rcx=0x3000, rdx=td.tdr,
             r8=new, r9=h.alloc.page())
    env.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_EPT_ENTRY_STATE_INCORRECT + st.OPERAND_ID_RCX,
             rcx=0x1000, rdx=td.tdr, r8=new)
    env.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_R8,
             rcx=0x3000, rdx=td.tdr, r8=td.tdcx[0])
    env.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_OPERAND_INVALID + st.OPERAND_ID_R8,
             rcx=0x40_0000 | 1, rdx=td.tdr, r8=h.alloc.huge() + 0x1000)
    env.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
             rcx=0x3000 | (1 << 47), rdx=td.tdr, r8=new)  # shared GPA
    env.fail(Leaf.TDH_MEM_PAGE_AUG, st.TDX_EPT_WALK_FAILED + st.OPERAND_ID_RCX,
             rcx=0x8000_0000, rdx=td.tdr, r8=new)


def test_page_add_source_must_be_shared() -> None:
    e = Env(dpamt=False, runnable=False)
    hk = e.hkid << (e.m.profile.phys_bits - e.m.profile.keyid_bits)
    e.fail(Leaf.TDH_MEM_PAGE_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_R9, rcx=0x3000,
           rdx=e.td.tdr, r8=e.page(), r9=e.h.alloc.page() | hk)
    e.fail(Leaf.TDH_MEM_PAGE_ADD, st.TDX_EPT_ENTRY_STATE_INCORRECT + st.OPERAND_ID_RCX,
           rcx=0x1000, rdx=e.td.tdr, r8=e.page(), r9=e.h.alloc.page())
    e.fail(Leaf.TDH_MR_EXTEND, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX, rcx=0x1080,
           rdx=e.td.tdr)
    e.fail(Leaf.TDH_MR_FINALIZE, st.TDX_NO_VCPUS, rcx=e.h.init_vm(e.hkid + 1).tdr)


# -- tdh_mem_range_block.c, tdh_mem_track.c, tdh_mem_page_remove.c, tdh_mem_page_demote.c ------
def test_block_remove_demote_need_block_and_track(env: Env) -> None:
    h, td = env.h, env.td
    h.aug(td, 0x20_0000, level=1)
    h.aug(td, 0x10_0000, level=0)
    sept_page = env.page()
    pair = {"r12": h.alloc.page(), "r13": h.alloc.page()} if h.dpamt else {}
    env.fail(Leaf.TDH_MEM_PAGE_REMOVE, st.TDX_GPA_RANGE_NOT_BLOCKED + st.OPERAND_ID_RCX,
             rcx=0x10_0000, rdx=td.tdr)
    env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_GPA_RANGE_NOT_BLOCKED + st.OPERAND_ID_RCX,
             rcx=0x20_0000 | 1, rdx=td.tdr, r8=sept_page, **pair)
    env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
             rcx=0x20_0000 | 0, rdx=td.tdr, r8=sept_page, **pair)
    for gpa, lvl in ((0x20_0000, 1), (0x10_0000, 0)):
        assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa | lvl,
                                      rdx=td.tdr)).rax == 0
    env.fail(Leaf.TDH_MEM_RANGE_BLOCK, st.TDX_GPA_RANGE_ALREADY_BLOCKED + st.OPERAND_ID_RCX,
             rcx=0x10_0000, rdx=td.tdr)
    env.fail(Leaf.TDH_MEM_PAGE_REMOVE, st.TDX_TLB_TRACKING_NOT_DONE + st.OPERAND_ID_RCX,
             rcx=0x10_0000, rdx=td.tdr)
    env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_TLB_TRACKING_NOT_DONE + st.OPERAND_ID_RCX,
             rcx=0x20_0000 | 1, rdx=td.tdr, r8=sept_page, **pair)
    env.fail(Leaf.TDH_MEM_RANGE_UNBLOCK, st.TDX_TLB_TRACKING_NOT_DONE + OP_SEPT_TREE,
             rcx=0x10_0000, rdx=td.tdr)
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=td.tdr)).rax == 0
    env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_R8,
             rcx=0x20_0000 | 1, rdx=td.tdr, r8=td.tdcx[1], **pair)
    if h.dpamt:
        env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_OPERAND_INVALID + st.OPERAND_ID_R12,
                 rcx=0x20_0000 | 1, rdx=td.tdr, r8=sept_page, r12=pair["r12"] + 8,
                 r13=pair["r13"])
        env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_PAGE_NOT_FREE + st.OPERAND_ID_R13,
                 rcx=0x20_0000 | 1, rdx=td.tdr, r8=sept_page, r12=pair["r12"],
                 r13=td.tdcx[0])
        env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_PAGE_NOT_FREE + st.OPERAND_ID_R13,
                 rcx=0x20_0000 | 1, rdx=td.tdr, r8=sept_page, r12=pair["r12"],
                 r13=pair["r12"])
        bare = h.alloc.huge()
        env.fail(Leaf.TDH_MEM_PAGE_DEMOTE, st.TDX_MISSING_PAMT_PAGE_PAIR + st.OPERAND_ID_R8,
                 rcx=0x20_0000 | 1, rdx=td.tdr, r8=bare, **pair)
    out = env.m.seamcall(0, Regs(rax=Leaf.TDH_MEM_PAGE_DEMOTE, rcx=0x20_0000 | 1, rdx=td.tdr,
                                 r8=sept_page, **pair))
    assert out.rax == 0
    assert not check_invariants(env.m)


# -- DPAMT: tdh_phymem_pamt_add.c / tdh_phymem_pamt_remove.c ---------------------------------
def test_pamt_add_remove_checks(dp: Env) -> None:
    h = dp.h
    rng = h.alloc.huge()
    a, b = h.alloc.page(), h.alloc.page()
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
            rcx=rng | 0, rdx=a, r8=b)
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX,
            rcx=(rng + 0x1000) | 1, rdx=a, r8=b)
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RDX,
            rcx=rng | 1, rdx=a + 1, r8=b)
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_R8,
            rcx=rng | 1, rdx=a, r8=b | (1 << dp.m.profile.hkid_start_bit))  # a keyid
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_HPA_RANGE_NOT_FREE + st.OPERAND_ID_RCX,
            rcx=(dp.td.tdr & ~0x1FFFFF) | 1, rdx=a, r8=b)
    pair_page = h.pamt_pairs[dp.td.tdr & ~0x1FFFFF][0]
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_PAGE_NOT_FREE + st.OPERAND_ID_RDX,
            rcx=rng | 1, rdx=pair_page, r8=b)
    dp.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_PAGE_NOT_FREE + st.OPERAND_ID_R8,
            rcx=rng | 1, rdx=a, r8=dp.td.tdcx[0])
    dp.fail(Leaf.TDH_PHYMEM_PAMT_REMOVE, st.TDX_NO_PAMT_PAGE_PAIR + st.OPERAND_ID_RCX,
            rcx=rng | 1)
    dp.fail(Leaf.TDH_PHYMEM_PAMT_REMOVE, st.TDX_PAMT_PAGE_NOT_EMPTY + 0,
            rcx=(dp.td.tdr & ~0x1FFFFF) | 1)
    out = dp.m.seamcall(0, Regs(rax=Leaf.TDH_PHYMEM_PAMT_ADD, rcx=rng | 1, rdx=a, r8=b))
    assert out.rax == 0
    out = dp.m.seamcall(0, Regs(rax=Leaf.TDH_PHYMEM_PAMT_REMOVE, rcx=rng | 1))
    assert (out.rax, out.rdx, out.r8) == (0, a, b)


def test_pamt_add_needs_dynamic_pamt() -> None:
    e = Env(dpamt=False)
    rng = e.h.alloc.huge()
    e.fail(Leaf.TDH_PHYMEM_PAMT_ADD, st.TDX_OPERAND_INVALID + st.OPERAND_ID_RAX,
           rcx=rng | 1, rdx=e.page(), r8=e.page())


# -- lock contention: every BUSY names the operand the module reports -----------------------
def _paused_call(env: Env, lp: int, leaf: int, **regs: int):
    pause = env.w.control.pause(lp=lp, leaf=leaf, point="locked")
    res: list[Regs] = []
    t = threading.Thread(target=lambda: res.append(
        env.m.seamcall(lp, Regs(rax=int(leaf), **regs))))
    t.start()
    assert pause.wait_paused(5)
    return pause, t, res


def _busy_while_paused(env: Env, paused: tuple, leaf: int, status: int, lp: int = 1,
                       **regs: int) -> None:
    pause, t, res = paused
    out = env.m.seamcall(lp, Regs(rax=int(leaf), **regs))
    assert out.rax == status, f"{st.decode(out.rax)} != {st.decode(status)}"
    pause.resume()
    t.join(5)
    assert res[0].rax == 0
    assert len(env.m.locks) == 0
    assert not check_invariants(env.m)


def test_busy_sept_tree_tdr_epoch_septe_tdvpr(env: Env) -> None:
    h, td = env.h, env.td
    h.aug(td, 0x10_0000)
    # RANGE.BLOCK holds the S-EPT tree exclusive -> AUG gets BUSY | SEPT_TREE
    p = _paused_call(env, 0, Leaf.TDH_MEM_RANGE_BLOCK, rcx=0x10_0000, rdx=td.tdr)
    _busy_while_paused(env, p, Leaf.TDH_MEM_PAGE_AUG, busy(OP_SEPT_TREE), rcx=0x11_0000,
                       rdx=td.tdr, r8=env.page())
    # TRACK holds the epoch lock exclusive -> a second TRACK gets BUSY | TD_EPOCH
    p = _paused_call(env, 0, Leaf.TDH_MEM_TRACK, rcx=td.tdr)
    _busy_while_paused(env, p, Leaf.TDH_MEM_TRACK, busy(OP_TD_EPOCH), rcx=td.tdr)
    # PAGE.ADD holds the TDR exclusive -> SEPT.ADD (TDR shared, RDX) gets BUSY | RDX
    td2 = h.init_vm(env.hkid + 1)
    h.init_vcpu(td2, 2, 0)
    pause = env.w.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_ADD, point="locked")
    t = threading.Thread(target=h.add_page, args=(td2, 0x5000, b"y"))
    t.start()
    assert pause.wait_paused(5)
    _busy_while_paused(env, (pause, t, [Regs()]), Leaf.TDH_MEM_SEPT_ADD,
                       busy(st.OPERAND_ID_RDX), rcx=(1 << 30) | 2, rdx=td2.tdr, r8=env.page())
    assert 0x5000 in td2.private  # the paused PAGE.ADD (and its MR.EXTENDs) completed
    # AUG holds the host-side S-EPT entry lock -> AUG of the same GPA gets BUSY | RCX
    p = _paused_call(env, 0, Leaf.TDH_MEM_PAGE_AUG, rcx=0x13_0000, rdx=td.tdr, r8=env.page())
    _busy_while_paused(env, p, Leaf.TDH_MEM_PAGE_AUG, busy(st.OPERAND_ID_RCX), rcx=0x13_0000,
                       rdx=td.tdr, r8=env.page())
    # VP.FLUSH holds the TDVPR exclusive -> VP.RD (TDVPR shared) gets BUSY | RCX
    p = _paused_call(env, 0, Leaf.TDH_VP_FLUSH, rcx=env.vcpu.tdvpr)
    _busy_while_paused(env, p, Leaf.TDH_VP_RD, busy(st.OPERAND_ID_RCX), rcx=env.vcpu.tdvpr,
                       rdx=2)


# -- tdh_mem_sept_remove.c, tdh_vp_create.c, tdh_mng_rd_wr.c, tdh_phymem_page_wbinvd.c,
#    tdh_mem_range_unblock.c ----------------------------------------------------------------
def test_sept_remove_vp_create_rd_wr_wbinvd_unblock_checks(env: Env) -> None:
    h, td = env.h, env.td
    h.aug(td, 0x20_0000)  # PT page under the PD entry for 0x200000 now holds a leaf
    env.fail(Leaf.TDH_MEM_SEPT_REMOVE, st.TDX_GPA_RANGE_NOT_BLOCKED + st.OPERAND_ID_RCX,
             rcx=0x20_0000 | 1, rdx=td.tdr)
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MEM_RANGE_BLOCK, rcx=0x20_0000 | 1,
                                  rdx=td.tdr)).rax == 0
    assert env.m.seamcall(0, Regs(rax=Leaf.TDH_MEM_TRACK, rcx=td.tdr)).rax == 0
    env.fail(Leaf.TDH_MEM_SEPT_REMOVE, st.TDX_EPT_PAGE_NOT_FREE + st.OPERAND_ID_RCX,
             rcx=0x20_0000 | 1, rdx=td.tdr)
    env.fail(Leaf.TDH_MEM_RANGE_UNBLOCK, st.TDX_EPT_ENTRY_STATE_INCORRECT + st.OPERAND_ID_RCX,
             rcx=0x1000, rdx=td.tdr)
    # op_state is checked before the TDVPR page (tdh_vp_create.c): a runnable TD refuses
    env.fail(Leaf.TDH_VP_CREATE, st.TDX_OP_STATE_INCORRECT, rcx=td.tdcx[0], rdx=td.tdr)
    # metadata statuses are bare (metadata_td.c; tests/test_fidelity_metadata.py)
    env.fail(Leaf.TDH_MNG_RD, st.TDX_METADATA_FIELD_ID_INCORRECT,
             rcx=td.tdr, rdx=0x1234)
    env.fail(Leaf.TDH_MNG_WR, st.TDX_METADATA_FIELD_NOT_WRITABLE,
             rcx=td.tdr, rdx=0x110000000000000B, r8=1, r9=1)
    env.fail(Leaf.TDH_PHYMEM_PAGE_WBINVD, st.TDX_PAGE_METADATA_INCORRECT + st.OPERAND_ID_RCX,
             rcx=td.tdcx[0])
    # the CPUID field KVM_TDX_GET_CPUID reads (metadata_td.c 476-504): a leaf of the lookup
    # table reads, leaf 9 (not in it) is FIELD_ID_INCORRECT, faulting leaf 6 NOT_READABLE
    out = env.m.seamcall(0, Regs(rax=Leaf.TDH_MNG_RD, rcx=td.tdr,
                                 rdx=0x9410000300000000 | (0x7 << 9) | (0 << 1)))
    assert out.rax == 0
    env.fail(Leaf.TDH_MNG_RD, st.TDX_METADATA_FIELD_ID_INCORRECT,
             rcx=td.tdr, rdx=0x9410000300000000 | (0x9 << 9) | 0x1FE)
    env.fail(Leaf.TDH_MNG_RD, st.TDX_METADATA_FIELD_NOT_READABLE,
             rcx=td.tdr, rdx=0x9410000300000000 | (0x6 << 9) | 0x1FE)
