"""Module bring-up: Linux 7.3's exact init sequence, and every way to get it wrong.

Expected statuses were read from intel/tdx-module (tag TDX_1.5.01), file named per test:
src/vmm_dispatcher/tdx_vmm_dispatcher.c (leaf/version/state gate), api_calls/tdh_sys_init.c,
tdh_sys_lp_init.c, tdh_sys_config.c, tdh_sys_key_config.c, tdh_sys_tdmr_init.c,
tdh_sys_rd.c, tdh_sys_rdall.c, tdh_sys_shutdown.c, tdh_phymem_page_rdmd.c,
tdh_phymem_cache_wb.c, src/common/metadata_handlers/metadata_generic.c.
Where this model and Intel's can differ it says so (TDH.SYS.DISABLE is not in the 1.5 source).
"""

from __future__ import annotations

import struct

import pytest
from linux_tdmr import (
    GiB,
    LinuxHost,
    SeamcallFailed,
    SysInfoTdmr,
    Tdmr,
    build_tdmrs,
    pamt_kb,
    q35_memblocks,
    tdmr_get_pamt_sz,
    write_tdmr_info,
)

from vtdx.abi import fields as fl
from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf, encode
from vtdx.abi.regs import Regs
from vtdx.module import SysState, TdxModule
from vtdx.module.events import CallObserved, CheckpointReached
from vtdx.module.locks import EXCLUSIVE, SYS_LOCK, tdmr_key
from vtdx.module.pamt import PT_NDA, PT_REG, PT_RSVD, pamt_key
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import Profile, Region

MiB = 1 << 20
INFO_PA = 0x100_0000
ARRAY_PA = 0x110_0000


def make(smp: int = 2, mem: int = 2 * GiB, **kw: object) -> TdxModule:
    p = Profile.from_vm(smp, mem, **kw)
    return TdxModule(p, SparseMemory(p.ram))


def call(m: TdxModule, lp: int, leaf: int, version: int = 0, **regs: int) -> Regs:
    return m.seamcall(lp, Regs(rax=encode(leaf, version), **regs))


def boot(m: TdxModule, mem: int = 2 * GiB):
    p = m.profile
    host = LinuxHost(m.seamcall, list(range(p.num_lps)), p.package_of)
    return host.tdx_enable(q35_memblocks(mem), m.memory, tdx_keyid_start=p.tdx_keyid_start,
                           info_pa=INFO_PA, array_pa=ARRAY_PA)


def lps_ready(m: TdxModule, lps: list[int] | None = None) -> None:
    assert call(m, 0, Leaf.TDH_SYS_INIT).rax == 0
    for lp in range(m.profile.num_lps) if lps is None else lps:
        assert call(m, lp, Leaf.TDH_SYS_LP_INIT).rax == 0


def tdmr(base: int, size: int, pamt_at: int, rsvd: tuple[tuple[int, int], ...] = (),
         shrink: tuple[int, int] = (0, 0)) -> Tdmr:
    """A TDMR with kernel-sized PAMTs at ``pamt_at`` (4K, 2M, 1G in a row)."""
    t = Tdmr(base, size)
    at = pamt_at
    for ps in (0, 1, 2):
        sz = tdmr_get_pamt_sz(t, ps, 16) - (PAGE if shrink == (ps, 1) else 0)
        t.pamt_base[ps], t.pamt_size[ps] = at, sz
        at += sz
    t.reserved = sorted(rsvd)
    return t


PAGE = 4096


def own_pamt_rsvd(t: Tdmr) -> tuple[int, int]:
    b, s = t.pamt_range()
    return b - t.base, s


def config(m: TdxModule, tdmrs: list[Tdmr], keyid: int | None = None, lp: int = 0) -> int:
    rcx, rdx = write_tdmr_info(m.memory, tdmrs, INFO_PA, ARRAY_PA, 16)
    r8 = m.profile.tdx_keyid_start if keyid is None else keyid
    return call(m, lp, Leaf.TDH_SYS_CONFIG, rcx=rcx, rdx=rdx, r8=r8).rax


def good_tdmr() -> Tdmr:
    t = tdmr(0, 2 * GiB, GiB)
    t.reserved = [own_pamt_rsvd(t)]
    return t


# --- the acceptance replay -----------------------------------------------------------------

def test_linux_7_3_init_sequence_2cpu_2gib() -> None:
    m = make(2, 2 * GiB)
    r = boot(m)
    assert m.state == SysState.SYS_READY
    # One TDMR [0, 2 GiB); PAMT 8 MiB + 16 KiB + 4 KiB: the kernel prints "8212 KB ...".
    assert [(t.base, t.size) for t in r.tdmrs] == [(0, 2 * GiB)]
    assert r.pamt_kb == 8212
    assert m.pamt.pamt_bytes_total() // 1024 == r.pamt_kb
    assert m.pamt.pamt_bytes_by_level() == {"4K": 8 * MiB, "2M": 16 * 1024, "1G": 4096}
    # SYS.INIT once, LP.INIT per CPU, KEY.CONFIG once (one package), 2 GiB / 4 MiB TDMR.INITs.
    assert r.count(Leaf.TDH_SYS_INIT) == 1
    assert [c.lp for c in r.calls if c.leaf == Leaf.TDH_SYS_LP_INIT] == [0, 1]
    assert r.count(Leaf.TDH_SYS_KEY_CONFIG) == 1
    assert r.count(Leaf.TDH_SYS_TDMR_INIT) == 512
    cfg = next(c for c in r.calls if c.leaf == Leaf.TDH_SYS_CONFIG)
    assert (cfg.regs_in.rcx, cfg.regs_in.rdx, cfg.regs_in.r8) == (ARRAY_PA, 1, 16)
    assert r.global_keyid == m.global_keyid == m.profile.tdx_keyid_start
    # What the module now holds is what the kernel built.
    held = m.pamt.tdmrs[0]
    assert held.reserved == tuple(r.tdmrs[0].reserved)
    assert held.done and held.initialized_end == 2 * GiB
    # Every field the kernel read came back, with the profile's values.
    assert r.sysinfo["TDX_FEATURES0"] == m.profile.features0
    assert r.sysinfo["MAX_VCPUS_PER_TD"] == m.profile.max_vcpus_per_td
    assert len(r.sysinfo["CPUID_CONFIG_VALUES"]) == 2 * r.sysinfo["NUM_CPUID_CONFIG"]
    # The sparse PAMT stores nothing after init.
    assert m.pamt.materialised == 0
    assert m.internal_errors == type(m.internal_errors)()


def test_linux_replay_16gib_two_tdmrs_cheap() -> None:
    m = make(2, 16 * GiB)
    r = boot(m, 16 * GiB)
    assert [(t.base, t.end) for t in r.tdmrs] == [(0, 2 * GiB), (4 * GiB, 18 * GiB)]
    assert m.pamt.pamt_bytes_total() // 1024 == r.pamt_kb == pamt_kb(r.tdmrs)
    assert m.state == SysState.SYS_READY and m.pamt.materialised == 0


def test_linux_replay_two_packages_configures_each_package_once() -> None:
    m = make(4, 2 * GiB, num_packages=2)
    r = boot(m)
    assert [c.lp for c in r.calls if c.leaf == Leaf.TDH_SYS_KEY_CONFIG] == [0, 2]
    assert m.pkg_config == {0, 1}


def test_build_tdmrs_reserved_areas_cover_holes_and_pamt() -> None:
    tdmrs = build_tdmrs(q35_memblocks(2 * GiB), SysInfoTdmr())
    (t,) = tdmrs
    pb, ps = t.pamt_range()
    assert t.reserved == sorted([(0, MiB), (pb, ps), (0x7FFE0000, 0x20000)])


# --- state machine and operand checks ------------------------------------------------------

def test_sys_config_before_all_lp_inits() -> None:  # tdh_sys_config.c
    m = make(2)
    lps_ready(m, [0])
    assert config(m, [good_tdmr()]) == st.TDX_SYS_CONFIG_NOT_PENDING == 0xC000050C00000000
    assert call(m, 1, Leaf.TDH_SYS_LP_INIT).rax == 0
    assert config(m, [good_tdmr()]) == 0
    assert m.state == SysState.SYSCONFIG_DONE


def test_tdmr_not_1gb_aligned() -> None:  # tdh_sys_config.c check_tdmr_area_addresses_and_size
    m = make(2)
    lps_ready(m)
    t0 = tdmr(0, GiB, 0x3000_0000)
    t0.reserved = [own_pamt_rsvd(t0)]
    t1 = tdmr(GiB + 2 * MiB, GiB - 2 * MiB, 0x3100_0000)
    status = config(m, [t0, t1])
    assert status == st.with_info(st.TDX_INVALID_TDMR, 1) == 0xC0000A0000000001
    bad = good_tdmr()
    bad.size = 2 * GiB - 4096
    assert config(m, [bad]) == 0xC0000A0000000000


def test_overlapping_pamts_between_tdmrs() -> None:  # tdh_sys_config.c check_all_pamt_overlap
    m = make(2)
    lps_ready(m)
    t0 = tdmr(0, GiB, 0x3000_0000)
    t0.reserved = [own_pamt_rsvd(t0)]
    t1 = tdmr(GiB, GiB, 0x3000_1000)  # overlaps TDMR 0's PAMT
    # TDMR 1's 4K PAMT overlaps TDMR 0's PAMTs: info = (1, PT_4KB, 0)
    assert config(m, [t0, t1]) == 0xC0000A1200000001
    assert st.decode(config(m, [t0, t1])) == "TDX_PAMT_OVERLAP[info=01 00 00 00]"


def test_overlapping_pamts_within_a_tdmr() -> None:
    m = make(2)
    lps_ready(m)
    t = good_tdmr()
    t.pamt_base[1] = t.pamt_base[0] + 4096  # 2M PAMT inside the 4K PAMT
    assert config(m, [t]) == st.with_info(st.TDX_PAMT_OVERLAP, 0, 0, 0)


def test_pamt_over_available_memory() -> None:  # check_pamt_overlaps_available_areas
    m = make(2)
    lps_ready(m)
    t = tdmr(0, 2 * GiB, GiB)  # PAMT not covered by a reserved area
    assert config(m, [t]) == st.with_info(st.TDX_PAMT_OVERLAP, 0, 0, 0)


def test_pamt_outside_cmr() -> None:  # tdh_sys_config.c check_pamt_in_cmr
    ram = (Region(0, 2 * GiB),)
    m = make(2, cmrs=(Region(0, 3 * GiB // 2),), ram=ram)
    lps_ready(m)
    t = tdmr(0, 2 * GiB, 0x7000_0000, rsvd=((3 * GiB // 2, GiB // 2),))
    # Checked 1G, 2M, 4K: the 1G PAMT is reported first -> info (0, PT_1GB)
    assert config(m, [t]) == st.with_info(st.TDX_PAMT_OUTSIDE_CMRS, 0, 2) == 0xC0000A1100000200


def test_tdmr_outside_cmr() -> None:
    m = make(2, cmrs=(Region(0, 3 * GiB // 2),), ram=(Region(0, 2 * GiB),))
    lps_ready(m)
    t = tdmr(0, 2 * GiB, GiB)
    t.reserved = [own_pamt_rsvd(t)]
    assert config(m, [t]) == st.with_info(st.TDX_TDMR_OUTSIDE_CMRS, 0)


def test_pamt_too_small() -> None:  # tdh_sys_config.c check_pamt_addresses_and_size
    m = make(2)
    lps_ready(m)
    t = tdmr(0, 2 * GiB, GiB, shrink=(1, 1))  # 2M PAMT one page short
    t.reserved = [own_pamt_rsvd(t)]
    assert config(m, [t]) == st.with_info(st.TDX_INVALID_PAMT, 0, 1) == 0xC0000A1000000100


def test_reserved_areas_out_of_order() -> None:  # check_tdmr_reserved_areas
    m = make(2)
    lps_ready(m)
    t = good_tdmr()
    t.reserved = [own_pamt_rsvd(t), (0, MiB)]
    assert config(m, [t]) == st.with_info(st.TDX_NON_ORDERED_RESERVED_IN_TDMR, 0, 1)


def test_sys_config_operands() -> None:  # tdh_sys_config.c
    m = make(2)
    lps_ready(m)
    assert config(m, [good_tdmr()], keyid=0) == st.TDX_OPERAND_INVALID + st.OPERAND_ID_R8
    assert config(m, [good_tdmr()], keyid=m.profile.tdx_keyid_end) == 0xC000010000000008
    dpamt_bit = m.profile.tdx_keyid_start | (1 << 16)  # only valid with Dynamic PAMT
    assert config(m, [good_tdmr()], keyid=dpamt_bit) == 0xC000010000000008
    assert call(m, 0, Leaf.TDH_SYS_CONFIG, rcx=ARRAY_PA + 8, rdx=1, r8=16).rax == 0xC000010000000001
    assert call(m, 0, Leaf.TDH_SYS_CONFIG, rcx=ARRAY_PA, rdx=0, r8=16).rax == 0xC000010000000002
    assert call(m, 0, Leaf.TDH_SYS_CONFIG, rcx=ARRAY_PA, rdx=65, r8=16).rax == 0xC000010000000002
    assert m.state == SysState.SYSINIT_DONE


def test_dynamic_pamt_profile_accepts_bitmap_sized_4k_pamt() -> None:
    m = make(2, dynamic_pamt=True)
    assert m.profile.features0 & fl.FEATURES0_DYNAMIC_PAMT
    lps_ready(m)
    t = tdmr(0, 2 * GiB, GiB)
    t.pamt_size[0] = (2 * GiB >> 12) * 4 // 8  # 4 bits per 4K page
    t.pamt_base[1] = t.pamt_base[0] + t.pamt_size[0]
    t.pamt_base[2] = t.pamt_base[1] + t.pamt_size[1]
    t.reserved = [own_pamt_rsvd(t)]
    assert config(m, [t], keyid=m.profile.tdx_keyid_start) == st.with_info(
        st.TDX_INVALID_PAMT, 0, 0)
    assert config(m, [t], keyid=m.profile.tdx_keyid_start | (1 << 16)) == 0
    assert m.dynamic_pamt_enabled


def test_key_config_twice_on_one_package() -> None:  # tdh_sys_key_config.c
    m = make(4, num_packages=2)
    lps_ready(m)
    assert config(m, [good_tdmr()]) == 0
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == 0
    assert call(m, 1, Leaf.TDH_SYS_KEY_CONFIG).rax == st.TDX_KEY_CONFIGURED == 0x0000081500000000
    assert m.state == SysState.SYSCONFIG_DONE
    assert call(m, 3, Leaf.TDH_SYS_KEY_CONFIG).rax == 0
    assert m.state == SysState.SYS_READY
    # Once ready, KEY.CONFIG is no longer pending at all.
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == st.TDX_SYS_KEY_CONFIG_NOT_PENDING


def test_key_config_before_sys_config() -> None:
    m = make(2)
    lps_ready(m)
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == 0xC000050700000000


def test_tdmr_init_before_key_config() -> None:  # tdx_vmm_dispatcher.c state gate
    m = make(2)
    lps_ready(m)
    assert config(m, [good_tdmr()]) == 0
    assert call(m, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0).rax == st.TDX_SYS_NOT_READY
    assert st.TDX_SYS_NOT_READY == 0xC000050500000000


def test_tdmr_init_operands_and_completion() -> None:  # tdh_sys_tdmr_init.c
    m = make(2)
    boot(m)
    assert call(m, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=2 * MiB).rax == 0xC000010000000001
    assert call(m, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=GiB).rax == 0xC000010000000001
    out = call(m, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0)
    assert out.rax == st.TDX_TDMR_ALREADY_INITIALIZED and out.rdx == 0


def test_tdmr_init_is_resumable_and_reports_1gb_granules() -> None:
    m = make(2)
    lps_ready(m)
    assert config(m, [good_tdmr()]) == 0
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == 0
    seen = []
    while True:
        out = call(m, 1, Leaf.TDH_SYS_TDMR_INIT, rcx=0)
        assert out.rax == 0
        seen.append(out.rdx)
        # Until a 1 GB block is done, RDMD finds no initialised PAMT block there.
        if out.rdx >= 2 * GiB:
            break
    assert seen[:255] == [0] * 255 and seen[255] == GiB and len(seen) == 512


def test_unknown_leaf() -> None:  # tdx_vmm_dispatcher.c default case / state gate
    m = make(2)
    assert call(m, 0, 99).rax == st.TDX_SYS_NOT_READY  # gate comes before the leaf switch
    boot(m)
    assert call(m, 0, 99).rax == st.TDX_OPERAND_INVALID + st.OPERAND_ID_RAX
    assert call(m, 0, 99).rax == 0xC000010000000000


def test_unsupported_leaf_version_and_reserved_rax() -> None:  # tdx_vmm_dispatcher.c
    m = make(2)
    assert call(m, 0, Leaf.TDH_SYS_INIT, version=1).rax == 0xC000010000000000
    assert m.state == SysState.SYSINIT_PENDING
    assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT | (1 << 24))).rax == 0xC000010000000000
    assert m.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT | (1 << 40))).rax == 0xC000010000000000
    assert call(m, 0, Leaf.TDH_SYS_INIT).rax == 0


def test_sys_init_and_lp_init_order() -> None:  # tdh_sys_init.c, tdh_sys_lp_init.c
    m = make(2)
    assert call(m, 0, Leaf.TDH_SYS_LP_INIT).rax == st.TDX_SYS_LP_INIT_NOT_PENDING
    assert call(m, 0, Leaf.TDH_SYS_INIT, rcx=1).rax == 0xC000010000000001  # attributes reserved
    out = call(m, 0, Leaf.TDH_SYS_INIT, rdx=5, r8=6, r10=7, r11=8)
    assert out.rax == 0 and (out.rdx, out.r8, out.r10, out.r11) == (0, 0, 0, 8)
    assert call(m, 1, Leaf.TDH_SYS_INIT).rax == st.TDX_SYS_INIT_NOT_PENDING
    assert call(m, 1, Leaf.TDH_SYS_LP_INIT).rax == 0
    assert call(m, 1, Leaf.TDH_SYS_LP_INIT).rax == st.TDX_SYS_LP_INIT_DONE
    assert m.num_init_lps == 1


def test_sys_rd() -> None:  # tdh_sys_rd.c, metadata_generic.c
    m = make(2)
    assert call(m, 0, Leaf.TDH_SYS_RD, rdx=0x0800000100000004).rax == st.TDX_SYS_LP_INIT_NOT_DONE
    lps_ready(m, [0])
    assert call(m, 1, Leaf.TDH_SYS_RD, rdx=0x0800000100000004).rax == st.TDX_SYS_LP_INIT_NOT_DONE
    out = call(m, 0, Leaf.TDH_SYS_RD, rdx=0x0800000100000004)
    assert (out.rax, out.r8, out.rdx) == (0, 1, 0x0800000100000005)
    first = call(m, 0, Leaf.TDH_SYS_RD, rdx=fl.FIELD_ID_NA)
    assert first.rax == st.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT
    assert first.rdx == fl.GLOBAL_FIELDS[0].field_id
    bad = call(m, 0, Leaf.TDH_SYS_RD, rdx=0x0800000100000004 | (1 << 34))  # last-element bits
    assert (bad.rax, bad.rdx, bad.r8) == (st.TDX_METADATA_FIELD_ID_INCORRECT, fl.FIELD_ID_NA, 0)
    assert call(m, 0, Leaf.TDH_SYS_RD, rdx=0x0800000100000077).rax == 0xC0000C0000000000
    # Walking the context with the returned next-field id visits every readable element.
    fid, n = first.rdx, 0
    while fid != fl.FIELD_ID_NA:
        out = call(m, 0, Leaf.TDH_SYS_RD, rdx=fid)
        assert out.rax == 0
        fid, n = out.rdx, n + 1
    assert n > 100
    # DPAMT's bitmap-bits field exists only on a Dynamic PAMT profile.
    assert call(m, 0, Leaf.TDH_SYS_RD, rdx=0x9100000000000013).rax == 0xC0000C0000000000
    m2 = make(2, dynamic_pamt=True)
    lps_ready(m2, [0])
    assert call(m2, 0, Leaf.TDH_SYS_RD, rdx=0x9100000000000013).r8 == 4


def test_sys_rdall_writes_a_metadata_list() -> None:  # tdh_sys_rdall.c
    m = make(2)
    lps_ready(m)
    misaligned = call(m, 0, Leaf.TDH_SYS_RDALL, rdx=0x2000_0010, r8=fl.FIELD_ID_NA)
    assert misaligned.rax == 0xC000010000000002
    out = call(m, 0, Leaf.TDH_SYS_RDALL, rdx=0x2000_0000, r8=fl.FIELD_ID_NA)
    assert out.rax == 0 and out.r8 == fl.FIELD_ID_NA
    size, nseq, _ = struct.unpack("<HHI", m.memory.read(0x2000_0000, 8))
    # consecutive rows share a sequence (md_dump_sequence; tests/test_fidelity_metadata.py)
    assert 0 < nseq < len(fl.GLOBAL_FIELDS) - 1
    first_hdr = struct.unpack("<Q", m.memory.read(0x2000_0008, 8))[0]
    counts = (0xF << 34) | (0x1FF << 38)
    assert first_hdr & ~counts == fl.GLOBAL_FIELDS[0].field_id and size > 8


def test_rdmd_page_types() -> None:  # tdh_phymem_page_rdmd.c
    m = make(2)
    r = boot(m)
    pamt_base = r.tdmrs[0].pamt_base[0]
    out = call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=pamt_base, r9=5, r11=9)
    assert (out.rax, out.rcx, out.rdx, out.r8, out.r9, out.r11) == (0, PT_RSVD, 0, 0, 0, 0)
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * MiB).rcx == PT_NDA
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * MiB + 8).rax == 0xC000010000000001
    hkid_pa = 16 * MiB | (1 << m.profile.hkid_start_bit)
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=hkid_pa).rax == 0xC000010000000001
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=3 * GiB).rax == 0xC000010100000001
    # A 2M leaf is reported at its level with its owner and BEPOCH.
    m.pamt.set(64 * MiB, 1, PT_REG, owner=0x5000, bepoch=7)
    out = call(m, 1, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=64 * MiB + 4096)
    assert (out.rax, out.rcx, out.rdx, out.r8, out.r9) == (0, PT_REG, 0x5000, 1, 7)
    # An exclusively locked 4K entry makes RDMD busy on RCX.
    m.locks.try_acquire(pamt_key(0, 16 * MiB), EXCLUSIVE, owner=10**9)
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * MiB).rax == 0x8000020000000001


def test_rdmd_before_tdmr_block_initialised() -> None:
    m = make(2)
    lps_ready(m)
    assert config(m, [good_tdmr()]) == 0
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == 0
    assert call(m, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * MiB).rax == 0xC000010100000001


def test_busy_statuses_from_held_locks() -> None:  # tdh_sys_init.c, tdh_sys_tdmr_init.c
    m = make(2)
    m.locks.try_acquire(SYS_LOCK, EXCLUSIVE, owner=10**9)
    assert call(m, 0, Leaf.TDH_SYS_INIT).rax == st.TDX_SYS_BUSY
    m.locks.release(SYS_LOCK, 10**9)
    lps_ready(m)
    assert config(m, [good_tdmr()]) == 0
    assert call(m, 0, Leaf.TDH_SYS_KEY_CONFIG).rax == 0
    m.locks.try_acquire(tdmr_key(0), EXCLUSIVE, owner=10**9)
    assert call(m, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0).rax == st.TDX_OPERAND_BUSY + 1
    assert len(m.locks) == 1  # the failed call released everything it took


def test_cache_wb() -> None:  # tdh_phymem_cache_wb.c
    m = make(2)
    boot(m)
    assert call(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, rcx=2).rax == 0xC000010000000001
    assert call(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, rcx=0).rax == st.TDX_NO_HKID_READY_TO_WBCACHE
    assert call(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, rcx=1).rax == st.TDX_WBCACHE_RESUME_ERROR
    m.kot[20] = 2  # KOT_FLUSHED
    m.gd.kot_wbinvd[20] = {0}
    assert call(m, 0, Leaf.TDH_PHYMEM_CACHE_WB, rcx=0).rax == 0
    assert m.gd.kot_wbinvd[20] == set()


def test_shutdown_blocks_everything_but_lp_shutdown() -> None:  # tdh_sys_shutdown.c
    m = make(2)
    boot(m)
    assert call(m, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=1).rax == 0xC000010000000001
    assert call(m, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=0).rax == 0
    assert call(m, 1, Leaf.TDH_SYS_RD, rdx=0x0800000100000004).rax == st.TDX_SYS_SHUTDOWN
    assert call(m, 1, Leaf.TDH_SYS_LP_SHUTDOWN).rax == 0


def test_sys_disable_resets_for_a_fresh_boot() -> None:
    # Not in the 1.5 source: modelled on Linux 7.3 tdx_sys_disable() and its commit message.
    m = make(2)
    boot(m)
    assert call(m, 1, Leaf.TDH_SYS_DISABLE).rax == 0
    assert m.state == SysState.SYSINIT_PENDING and m.pamt.tdmrs == []
    r = boot(m)  # the kexec'd kernel initialises from scratch
    assert m.state == SysState.SYS_READY and r.pamt_kb == 8212
    m2 = make(2, sys_disable=False)
    assert call(m2, 0, Leaf.TDH_SYS_DISABLE).rax == 0xC000010000000000


def test_fault_injection_reaches_the_kernels_error_path() -> None:
    m = make(2)
    m.faults.add(st.TDX_SYS_BUSY, Leaf.TDH_SYS_TDMR_INIT, count=1)
    with pytest.raises(SeamcallFailed) as e:
        boot(m)
    assert e.value.status == st.TDX_SYS_BUSY and e.value.leaf == Leaf.TDH_SYS_TDMR_INIT
    assert not m.faults.active  # count exhausted
    m.faults.add(st.TDX_OPERAND_BUSY + 1, Leaf.TDH_SYS_RD, lps={1})
    assert call(m, 0, Leaf.TDH_SYS_RD, rdx=0x0800000100000004).rax == 0
    assert call(m, 1, Leaf.TDH_SYS_RD, rdx=0x0800000100000004).rax == 0x8000020000000001


def test_fault_probability_is_deterministic_per_seed() -> None:
    def run(seed: int) -> list[int]:
        m = make(2)
        m.faults.reseed(seed)
        m.faults.add(st.TDX_SYS_BUSY, Leaf.TDH_SYS_LP_SHUTDOWN, probability=0.5)
        return [call(m, 0, Leaf.TDH_SYS_LP_SHUTDOWN).rax for _ in range(64)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 0 < run(7).count(st.TDX_SYS_BUSY) < 64


def test_observers_and_queries() -> None:
    m = make(2)
    seen = []
    m.events.subscribe(CallObserved,
                       lambda ev: seen.append((ev.lp, ev.leaf, ev.out.rax, ev.seconds >= 0)))
    call(m, 1, Leaf.TDH_SYS_INIT)
    assert seen == [(1, Leaf.TDH_SYS_INIT, 0, True)]
    snap = m.snapshot()
    assert snap["state"] == "SYSINIT_DONE" and snap["call_counts"] == {"TDH.SYS.INIT": 1}
    assert m.lp_states()[1] == {"lp": 1, "package": 0, "initialized": False, "busy": False}
    assert m.keyids()["tdx_start"] == 16
    assert call(m, 5, Leaf.TDH_SYS_LP_INIT).rax == 0xC000010000000000  # no such LP


class _PauseAt:
    """Minimal controller: hold the first call reaching (leaf, point) until released."""

    def __init__(self, m: TdxModule, leaf: int, point: str = "locked") -> None:
        self.m, self.leaf, self.point = m, leaf, point
        self.paused = False
        self.release = False

    def checkpoint(self, ev: CheckpointReached) -> None:
        if ev.leaf == self.leaf and ev.point == self.point and not self.release:
            self.paused = True
            self.m.cond.notify_all()
            self.m.cond.wait_for(lambda: self.release, timeout=10)


def test_checkpoint_pause_makes_another_lp_see_the_lock() -> None:
    """The concurrency design: a paused SYS.INIT holds the global lock exclusively, so LP 1's
    LP.INIT gets TDX_SYS_BUSY (tdh_sys_lp_init.c) while LP 0 is inside the module."""
    import threading

    m = make(2)
    ctl = _PauseAt(m, Leaf.TDH_SYS_INIT)
    m.events.subscribe(CheckpointReached, ctl.checkpoint)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(call(m, 0, Leaf.TDH_SYS_INIT).rax))
    t.start()
    with m.cond:
        assert m.cond.wait_for(lambda: ctl.paused, timeout=10)
    assert m.lps[0].busy and m.locks.mode_of(SYS_LOCK) == EXCLUSIVE
    assert call(m, 1, Leaf.TDH_SYS_LP_INIT).rax == st.TDX_SYS_BUSY
    with m.cond:
        ctl.release = True
        m.cond.notify_all()
    t.join(10)
    assert result == [0] and len(m.locks) == 0
    assert call(m, 1, Leaf.TDH_SYS_LP_INIT).rax == 0


def test_pamt_is_sparse_and_walks_like_pamt_walk() -> None:  # pamt_manager.c
    import tracemalloc

    tracemalloc.start()
    m = make(2, 16 * GiB)
    boot(m, 16 * GiB)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * MiB  # a dense PAMT for 16 GiB would be 64 MiB
    pamt = m.pamt
    assert pamt.materialised == 0
    pa = 5 * GiB + 6 * MiB
    pamt.set(pa, 0, PT_REG, owner=0x1234_5000)
    assert pamt.materialised == 1 and pamt.get(pa, 0).owner == 0x1234_5000
    pamt.set(pa, 0, PT_NDA)
    assert pamt.materialised == 0
    # A PT_REG 2M parent ends the walk at 2M; the leaf lock is promoted when exclusive.
    pamt.set(pa, 1, PT_REG, owner=0x7000)

    class Ctx:
        def __init__(self, owner: int) -> None:
            self.id, self.keys = owner, []

        def lock(self, key, exclusive, busy):  # type: ignore[no-untyped-def]
            mode = EXCLUSIVE if exclusive else 1
            if not m.locks.try_acquire(key, mode, self.id):
                raise TdxErrorForTest(busy)
            self.keys.append(key)

        def promote(self, key, busy):  # type: ignore[no-untyped-def]
            if not m.locks.try_promote(key, self.id):
                raise TdxErrorForTest(busy)

    from vtdx.module.errors import TdxError as TdxErrorForTest

    a, b = Ctx(1), Ctx(2)
    level, entry = pamt.walk(a, pa, False, 1)  # type: ignore[arg-type]
    assert (level, entry.pt) == (1, PT_REG)
    with pytest.raises(TdxErrorForTest) as e:
        pamt.walk(b, pa, True, 1)  # type: ignore[arg-type]
    assert e.value.status == st.TDX_OPERAND_BUSY + 1
    assert pamt.walk(b, pa, False, 1)[0] == 1  # type: ignore[arg-type]
