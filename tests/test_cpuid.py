"""The TD's virtual CPUID: TDH.SYS.RD of the configurable leaves, TDH.MNG.INIT's values,
TDH.MNG.RD of CPUID_VALUES and CPUID executed in the TD all agree.

Sources: intel/tdx-module 1.5.06 (commit 1e636985) include/auto_gen/cpuid_configurations.c
(cpuid_lookup, cpuid_configurable, MAX_NUM_CPUID_CONFIG 18 in cpuid_configurations_defines.h)
and metadata_sys.c md_sys_get_elements (CPUID_CONFIG_VALUES = CONFIG_DIRECT | ALLOW_DIRECT
& platform); line numbers below are the TDX_1.5.01 tag's where the code is the same:
tdh_sys_init.c 336 (cpuid_last_base_leaf = CPUID_LAST_BASE_LEAF 0x23), 356-367 (a leaf
above the CPU's maximum samples as all-0), 411-423 (CPUID(1).EAX = platform F/M/S);
helpers.c 1127-1139 (get_cpuid_lookup_entry), 2189-2205 (complete_cpuid_handling);
tdh_mng_init.c 215-310 (read_and_set_cpuid_configurations, the F/M/S check at 280-309);
metadata_td.c 476-504 (CPUID_VALUES: not in the table -> FIELD_ID_INCORRECT, faulting or not
CPUID_VALID -> FIELD_NOT_READABLE); td_cpuid.c 66-102 (the guest's CPUID: range clamp,
lookup, #VE for a missing or faulting leaf, the TDCS values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fidelity_support import fixture
from test_td_support import make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.cpuid import CONFIGURABLE, LOOKUP, NA, lookup_slot, platform_cpuid
from vtdx.module.metadata import cpuid_field_code
from vtdx.module.td_engine import ModuleTdView
from vtdx.platform.cpuid import native_cpuid
from vtdx.platform.profile import GiB
from vtdx.testing import td_test_guest as tg
from vtdx.testing.td_host import SharedEpt, Vcpu, td_params

SHARED_BIT = 1 << 47

CPUID_VALUES = 0x9410000300000000
NUM_CPUID_CONFIG = 0x9900000100000004
CPUID_CONFIG_LEAVES = 0x9900000300000400
CPUID_CONFIG_VALUES = 0x9900000300000500
NUM_CPUID_VALUES = 0x911000010000000E
GENUINE_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)


def rd_cpuid(fx, leaf: int, sub: int = NA) -> tuple[int, int, int, int] | int:  # noqa: ANN001
    """TDH.MNG.RD of both CPUID_VALUES elements as (EAX, EBX, ECX, EDX), or the failing status."""
    lo = fx.mng_rd(CPUID_VALUES | cpuid_field_code(leaf, sub, 0))
    if lo.rax:
        return lo.rax
    hi = fx.mng_rd(CPUID_VALUES | cpuid_field_code(leaf, sub, 1))
    assert hi.rax == 0
    return (lo.r8 & 0xFFFFFFFF, lo.r8 >> 32, hi.r8 & 0xFFFFFFFF, hi.r8 >> 32)


@pytest.mark.parametrize("gen", ["1.5", "dpamt"])
def test_mng_rd_of_leaf_0(gen: str) -> None:
    """Leaf 0 (slot 10): EAX = FIXED1 0x23 (the virtual maximum, whatever the CPU's), the
    vendor string from the CPU - the read KVM_TDX_GET_CPUID starts with."""
    fx = fixture(gen)
    assert rd_cpuid(fx, 0) == (0x23, *GENUINE_INTEL)
    # get_cpuid_lookup_entry: a subleaf-less entry answers every subleaf
    assert rd_cpuid(fx, 0, 5) == (0x23, *GENUINE_INTEL)


def test_mng_rd_of_configurable_leaves() -> None:
    """Leaf 1 (configurable 0): CONFIG_DIRECT EAX 0 -> the platform F/M/S (the host's CPUID(1)
    EAX), ALLOW_DIRECT ECX bits configured 0 are cleared, FIXED1 ECX bit 31 set. Leaf
    0x80000008: PA bits are the platform's MAXPA (TD_PARAMS' value is ignored without
    CONFIG_FLAGS.MAXPA_VIRT), LA bits follow the TD's LA57."""
    w = make_world(dpamt=False)
    p = w.module.profile
    pc = platform_cpuid(p)
    cfg = [pc.config_values(i) for i in range(len(CONFIGURABLE))]
    cfg[0] = (0, cfg[0][1], cfg[0][2] & ~(1 << 3), cfg[0][3])   # MONITOR (allow-direct) off
    cfg[9] = (0x24, cfg[9][1], 0, 0)
    cfg[12:18] = [(0, 0, 0, 0)] * 6    # all-0 CPUID(0x1F): the platform's topology
    h = w.host
    td = h.init_vm(p.tdx_keyid_start + 1, td_params(cpuid_values=cfg))
    fx = type("F", (), {"mng_rd": lambda self, fid: h.call(0, Leaf.TDH_MNG_RD, rcx=td.tdr,
                                                           rdx=fid)})()
    eax, _ebx, ecx, _edx = rd_cpuid(fx, 1)  # type: ignore[misc]
    native1 = native_cpuid(p, 1, 0)
    assert eax == p.cpu_fms == native1[0]
    assert not ecx & (1 << 3) and native1[2] & (1 << 3)
    assert ecx & (1 << 31)                      # FIXED1: hypervisor present
    assert rd_cpuid(fx, 5) == (0, 0, 0, 0)      # leaf 5 follows MONITOR (tdh_mng_init.c)
    eax, *_ = rd_cpuid(fx, 0x8000_0008)  # type: ignore[misc]
    assert eax & 0xFF == p.phys_bits and (eax >> 8) & 0xFF == 57   # the CPU has LA57
    # CPUID(0xB) is derived from the platform's CPUID(0x1F): SMT at 0, CORE at 1, then 0s
    assert rd_cpuid(fx, 0xB, 0)[2] >> 8 & 0xFF == 1  # type: ignore[index]
    assert rd_cpuid(fx, 0xB, 1)[2] == 0x201          # type: ignore[index]
    assert rd_cpuid(fx, 0xB, 2) == (0, 0, 0, 0)


def test_mng_init_refuses_a_foreign_fms_and_bits_outside_the_masks() -> None:
    """tdh_mng_init.c 250-259 (a bit neither CONFIG_DIRECT nor ALLOW_DIRECT) and 303-308 (a
    non-migratable TD's F/M/S must be 0 or the platform's): OPERAND_INVALID with operand
    CPUID_CONFIG, RCX = the leaf/subleaf."""
    for cfg0 in [(0x000806F8, 0, 0, 0), (0, 0, 0, 1 << 0)]:
        w = make_world(dpamt=False)
        assert w.module.profile.cpu_fms != 0x000806F8
        h = w.host
        tdr = h.control_page()
        h.call(0, Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=w.module.profile.tdx_keyid_start + 1)
        for _ in range(h.num_packages):
            h.call(0, Leaf.TDH_MNG_KEY_CONFIG, rcx=tdr)
        for _ in range(h.tdcs_pages):
            h.call(0, Leaf.TDH_MNG_ADDCX, rcx=h.control_page(), rdx=tdr)
        params = h.alloc.page()
        w.module.memory.write(params, td_params(cpuid_values=[cfg0]))
        out = h.call(0, Leaf.TDH_MNG_INIT, rcx=tdr, rdx=params, expect=None)
        assert out.rax == st.TDX_OPERAND_INVALID + st.OPERAND_ID_CPUID_CONFIG
        assert out.rcx == 1 | NA << 32


def test_mng_rd_outside_the_lookup_table_and_faulting() -> None:
    """metadata_td.c 485-502: leaf 9 / leaf 0x80000002 / leaf 4 without a subleaf are not
    in cpuid_lookup (FIELD_ID_INCORRECT); leaf 6 and 0x80000006 are faulting
    (FIELD_NOT_READABLE); NUM_CPUID_VALUES reads MAX_NUM_CPUID_LOOKUP (73)."""
    fx = fixture()
    for leaf, sub in [(9, NA), (0x8000_0002, NA), (4, NA), (0x24, 0), (0x7, 3)]:
        assert rd_cpuid(fx, leaf, sub) == st.TDX_METADATA_FIELD_ID_INCORRECT, hex(leaf)
    for leaf in (6, 0x8000_0006):
        assert rd_cpuid(fx, leaf) == st.TDX_METADATA_FIELD_NOT_READABLE
    assert isinstance(rd_cpuid(fx, 4, 4), tuple) and isinstance(rd_cpuid(fx, 0xD, 0x12), tuple)
    out = fx.mng_rd(NUM_CPUID_VALUES)
    assert (out.rax, out.r8) == (0, 73)


def test_sys_rd_cpuid_config_list() -> None:
    """NUM_CPUID_CONFIG is MAX_NUM_CPUID_CONFIG (18, the 1.5.06 table; 12 in 1.5.01); the
    leaves in cpuid_configurable's order; values = CONFIG_DIRECT | (ALLOW_DIRECT & the
    platform's value); the slot after the last reads leaf ~0, values 0."""
    fx = fixture()
    out = fx.sys_rd(NUM_CPUID_CONFIG)
    assert (out.rax, out.r8) == (0, 18)
    leaves = [fx.sys_rd(CPUID_CONFIG_LEAVES + i).r8 for i in range(19)]
    assert leaves[:18] == [c.leaf | c.sub << 32 for c in CONFIGURABLE]
    assert leaves[0] == 1 | NA << 32 and leaves[9] == 0x8000_0008 | NA << 32
    assert leaves[12:18] == [0x1F | n << 32 for n in range(6)]
    assert leaves[18] == (1 << 64) - 1
    p = fx.m.profile
    native1 = native_cpuid(p, 1, 0)
    lo, hi = (fx.sys_rd(CPUID_CONFIG_VALUES + i).r8 for i in (0, 1))
    assert lo == 0x0FFF3FFF | 0x00FF0000 << 32   # leaf 1 EAX/EBX: CONFIG_DIRECT
    assert hi & 0xFFFFFFFF == 0x31044D88 & native1[2] & ~0x08010060   # ECX: allowed & CPU
    assert fx.sys_rd(CPUID_CONFIG_VALUES + 36).r8 == 0


def test_td_engine_cpuid_matches_mng_rd() -> None:
    """The TD vCPU engine's lookup (td_cpuid.c 77-102) gives what TDH.MNG.RD gives for every
    readable slot, and a #VE (None) for a missing or faulting leaf."""
    fx = fixture()
    view = ModuleTdView(fx.m, fx.m.gd.tds[fx.td.tdr])
    for i, e in LOOKUP.items():
        sub = 0 if e.sub == NA else e.sub
        if e.faulting:
            assert view.cpuid_lookup(e.leaf, sub) is None
        elif e.leaf != 0xD or sub > 1:      # 0xD.0/1 EBX is the CPU's live value
            assert view.cpuid_lookup(e.leaf, sub) == rd_cpuid(fx, e.leaf, e.sub), hex(e.leaf)
        assert lookup_slot(e.leaf, sub) == i or e.sub == NA
    assert view.cpuid_lookup(9, 0) is None
    assert (view.last_base_leaf, view.last_extended_leaf) == (0x23, 0x8000_0021)


def test_cpuid_leaf_0_inside_a_td(tmp_path: Path) -> None:
    """CPUID executed by the TD (the test guest's routine 19 on the module's TD vCPU engine,
    entered with TDH.VP.ENTER the way KVM does): leaves 0, 0x80000000 and 0x80000008 answer
    what TDH.MNG.RD reports for them (td_cpuid.c 77-102, 136-140: none has dynamic bits)."""
    w = make_world(dpamt=False, mem=12 * GiB, ram_file=tmp_path / "ram")
    h = w.host
    td = h.init_vm(w.module.profile.tdx_keyid_start + 1,
                   td_params(max_vcpus=1, attributes=1 << 28, xfam=0x3))
    v = h.init_vcpu(td, 0, 0, tg.T_CPUID_LEAVES)
    for gpa, data in tg.guest_pages(SHARED_BIT).items():
        h.add_page(td, gpa, data, measure=False)
    h.finalize(td)
    h.set_shared_eptp(v, SharedEpt(w.module.memory, h.alloc).eptp)
    reports: dict[int, tuple[int, int, int, int]] = {}

    def vmcall(_v: Vcpu, out: Regs) -> Regs | None:
        if out.r11 == 0x1FF:
            return None
        reports[out.r11] = (out.r12 & 0xFFFFFFFF, out.r13 & 0xFFFFFFFF,
                            out.r14 & 0xFFFFFFFF, out.r15 & 0xFFFFFFFF)
        return Regs(r10=0, r11=0)

    r = h.run(td, v, vmcall, max_exits=1000)
    assert r.stop == "vmm", (r.stop, r.out)
    fx = type("F", (), {"mng_rd": lambda self, fid: h.call(0, Leaf.TDH_MNG_RD, rcx=td.tdr,
                                                           rdx=fid)})()
    assert reports[0x1A2] == rd_cpuid(fx, 0) == (0x23, *GENUINE_INTEL)
    assert reports[0x1A3] == rd_cpuid(fx, 0x8000_0000) == (0x8000_0008, 0, 0, 0)
    assert reports[0x1A4] == rd_cpuid(fx, 0x8000_0008)
    h.teardown(td)


@pytest.mark.kernel
@pytest.mark.stack
def test_the_hosts_cpuid_is_the_native_table_the_module_samples() -> None:
    """For every (leaf, subleaf) of the module's CPUID lookup table -- what TDH.SYS.INIT
    samples (tdh_sys_init.c check_cpuid_configurations) -- the default kernel's CPU 0, on
    QEMU with the plugin's rows, answers exactly vtdx.platform.cpuid.native_cpuid: the
    module derives every TD's CPUID from that table, so a QEMU whose CPU model moved would
    otherwise go unnoticed until a TD's CPUID or TDH.MNG.INIT disagreed."""
    import re

    from vtdx.harness.vm import BootSpec, Vm
    from vtdx.host import kernel as kernel_build

    art = kernel_build.default_kernel(None)
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, smp=2)
    profile = spec.platform()
    vm = Vm(spec).start()
    try:
        ktap = vm.payload("cpuid-dump")
    finally:
        vm.stop()
    ktap.assert_ok()
    seen: dict[tuple[int, int], tuple[int, ...]] = {}
    for line in ktap.text.splitlines():
        if m := re.match(r"# cpuid\.(0x[0-9a-f]+|0)\.(0x[0-9a-f]+|0): (.*)$", line):
            seen[(int(m[1], 0), int(m[2], 0))] = tuple(int(v, 0) for v in m[3].split())
    assert len(seen) == int(ktap.diag["leaves"]) and seen, ktap.describe()
    sampled = {(e.leaf, 0 if e.sub == NA else e.sub) for e in LOOKUP.values()}
    wrong = {f"{leaf:#x}.{sub:#x}": ([f"{v:#x}" for v in seen.get((leaf, sub), (0,) * 4)],
                                     [f"{v:#x}" for v in native_cpuid(profile, leaf, sub)])
             for leaf, sub in sorted(sampled)
             if seen.get((leaf, sub), (0, 0, 0, 0)) != native_cpuid(profile, leaf, sub)}
    assert wrong == {}, wrong
