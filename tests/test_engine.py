"""The TD vCPU engine (vtdx.module.engine) driven in-process: mmap-backed host RAM, the
sandbox TD and the assembled test guest (vtdx/module/engine/td_test_guest.py).

Sources named per test are intel/tdx-module TDX 1.5 (tdx_1.5 branch) files and Linux 7.3
arch/x86/kvm/vmx/tdx.c.
"""

from __future__ import annotations

import threading
import time

import pytest

from vtdx.abi.regs import Regs
from vtdx.abi.status import (
    TDX_METADATA_FIELD_ID_INCORRECT,
    TDX_NO_VALID_VE_INFO,
    TDX_NON_RECOVERABLE_VCPU,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
)
from vtdx.module.engine import (
    EngineUnsupported,
    HostRam,
    TdConfig,
    Watchdog,
    unicorn_lib,
    vp_enter_outputs,
)
from vtdx.module.engine.exits import (
    EEQ_ACCEPT,
    EEQ_PENDING_EPT_VIOLATION,
    EXIT_EPT_VIOLATION,
    EXIT_TDCALL,
    EXIT_TIME_SLICE,
    EXIT_TRIPLE_FAULT,
    accept_eeq,
)
from vtdx.module.engine.interfaces import LEVEL_2M, LEVEL_4K, SEPT_FREE, SEPT_PENDING
from vtdx.platform.memory import GuestRam
from vtdx.platform.profile import Region
from vtdx.testing.td_sandbox import temp_host_ram
from vtdx.testing.td_test_guest import (
    ACCEPT_2M_GPA,
    ACCEPT_4K_GPA,
    MISMATCH_2M_GPA,
    PENDING_GPA,
    RTMR_DATA,
    SCRATCH,
    SHARED_GPA,
    T_ACCEPT_2M,
    T_ACCEPT_4K,
    T_ACCEPT_MISMATCH,
    T_BAD_TDCALLS,
    T_BOOT,
    T_CMPXCHG16B_LOOP,
    T_CPUID,
    T_EPT,
    T_HLT,
    T_INFO,
    T_LOCK_LOOP,
    T_LOOP,
    T_PAGE_FAULT,
    T_PENDING,
    T_RMW_FAULTS,
    T_RTMR_EXTEND,
    T_SHARED,
    T_SMC_ALIAS,
    T_TRIPLE,
    T_VM_RD_WR,
    UNMAPPED_GPA,
    GuestBuildError,
    GuestRig,
    build_guest,
    lock_loop_on_two_vcpus,
    run_on_two_vcpus,
)


@pytest.fixture(scope="module", autouse=True)
def _guest() -> None:
    try:
        build_guest()
    except GuestBuildError as e:
        pytest.fail(str(e))


@pytest.fixture
def ram():
    with temp_host_ram() as r:
        yield r


def test_boot_from_reset_vector_into_64bit_mode(ram) -> None:
    """tdh_vp_init.c init_vcpu_gprs_and_registers: RBX = 48 (MAX_PA_FOR_GPA_NOT_WIDE),
    RCX = R8 = TDH.VP.INIT's RCX, RDX = CPUID(1).EAX, RSI = VCPU_INDEX; td_vmcs_init.c:
    RIP 0xFFFFFFF0, CR0 0x21, EFER 0x901 (CR4 as the guest reads it: MCE). The guest reads
    them in 32-bit mode, then reaches its 64-bit code."""
    rig = GuestRig(ram, T_BOOT)
    r = rig.next_report()
    assert r.code == 0x100
    assert r.values == (48, 0x1234_5600, 0x806F8, 0)   # EBX, ECX, EDX, ESI (32-bit reads)
    r = rig.next_report()
    assert r.code == 0x101
    assert r.values == (0x901, 0x21, 0x40, 0x5A5A_0000_1234_5600)   # EFER, CR0, CR4, R8


def test_tdvmcall_exit_and_reentry_with_replies(ram) -> None:
    """tdg_vp_vmcall.c: exit reason 77, RCX = GPR_SELECT|XMM_SELECT, selected GPRs copied,
    the rest 0; tdh_vp_enter.c save_regs_after_tdvmcall: selected GPRs come back from
    KVM, RAX = TDX_SUCCESS, RCX unchanged. Linux tdx.c reads R10 (status) / R11 (value)."""
    rig = GuestRig(ram, T_BOOT)
    rig.next_report()
    rig.next_report()
    ex, out = rig.engine.enter(rig.vmm)
    assert ex.reason == EXIT_TDCALL
    assert out.rax == 77 and out.rcx == 0xFC00
    assert (out.r10, out.r11, out.r12) == (0, 0x1111, 0x2222)
    assert out.rdx == out.rbx == out.rsi == out.rdi == out.r8 == out.r9 == 0   # not selected
    rig.vmm = out.copy(r10=0, r11=0xAAAA, r12=0xBBBB, r13=0xCCCC, r14=0xDDDD, r15=0xEEEE,
                       rdx=0x5555)
    r = rig.next_report()
    assert r.code == 0x102 and r.values == (0, 0xAAAA, 0xBBBB, 0xCCCC)
    r = rig.next_report()
    assert r.code == 0x103 and r.values == (0xDDDD, 0xEEEE, 0, 0xFC00)   # R14 R15 RAX RCX
    assert rig.engine.get("rdx") != 0x5555          # RDX was not selected: not loaded


def test_tdg_vp_info(ram) -> None:
    """tdg_vp_info.c: RAX 0, RCX GPA width, RDX ATTRIBUTES, R8 NUM_VCPUS | MAX_VCPUS << 32,
    R9 VCPU_INDEX, R10 bit 0 (TDG.SYS.RD available), R11 0; no TD exit."""
    cfg = TdConfig(gpaw=False, attributes=1 << 28, max_vcpus=4)
    rig = GuestRig(ram, T_INFO, config=cfg)
    rig.td.vcpus = 3
    r = rig.next_report()
    assert r.code == 0x110 and r.values == (0, 48, 1 << 28, 3 | 4 << 32)
    assert rig.next_report().values == (0, 1, 0, 0)
    assert [e.reason for e in rig.exits if e.reason != EXIT_TIME_SLICE] == [EXIT_TDCALL,
                                                                        EXIT_TDCALL]
    rig = GuestRig(ram, T_INFO, config=TdConfig(gpaw=True, attributes=0))
    assert rig.next_report().values[1:3] == (52, 0)


def test_ept_violation_then_map_then_reexecute(ram) -> None:
    """td_other_exits.c tdx_ept_violation_exit_to_vmm: exit 48, qualification with the
    access type (bits 12:7 cleared), R8 = GPA with bits 11:0 cleared, RDX = 0 (EEQ NONE).
    After TDH.MEM.PAGE.AUG+ACCEPT-equivalent mapping the same store re-executes."""
    rig = GuestRig(ram, T_EPT)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION
    assert ex.gpa == UNMAPPED_GPA and ex.qualification == 2 and ex.ext_qualification == 0
    out = vp_enter_outputs(ex)
    assert (out.rax, out.rcx, out.rdx, out.r8, out.r9) == (48, 2, 0, UNMAPPED_GPA, 0)
    assert out.r10 == out.r11 == out.rbx == out.rsi == out.rdi == 0
    rip = ex.rip
    assert rig.enter().rip == rip                 # still unmapped: same instruction again
    rig.td.page_add(UNMAPPED_GPA)
    r = rig.next_report()
    assert r.code == 0x120 and r.values[0] == 0x1122334455667788


def test_accept_4k_zeroes_pending_page(ram) -> None:
    """tdg_mem_page_accept.c: ACCEPT of a GPA with no S-EPT leaf is an EPT-violation exit
    (EEQ type ACCEPT, accept level 0); after AUG the re-executed TDCALL succeeds and the page
    reads as zero (init_sept_4k_page); a second ACCEPT is TDX_PAGE_ALREADY_ACCEPTED with the
    level as operand."""
    rig = GuestRig(ram, T_ACCEPT_4K)
    ex = rig.enter()
    while ex.reason == EXIT_TIME_SLICE:     # a loaded host may end the first slice early
        ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == ACCEPT_4K_GPA
    assert ex.ext_qualification == accept_eeq(LEVEL_4K, LEVEL_4K, SEPT_FREE, False)
    assert ex.ext_qualification & 0xF == EEQ_ACCEPT and ex.qualification == 2
    hpa = rig.td.page_aug(ACCEPT_4K_GPA)
    assert ram.read(hpa, 8) == b"\xa5" * 8
    r = rig.next_report()
    assert r.code == 0x130
    assert r.values == (0, TDX_PAGE_ALREADY_ACCEPTED + LEVEL_4K, 0, 0)


def test_accept_2m(ram) -> None:
    """tdg_mem_page_accept.c: a 2 MB ACCEPT of a 2 MB PENDING leaf zeroes all 512 pages;
    a 4 KB ACCEPT inside the now MAPPED 2 MB leaf fails the walk on a guest-accessible leaf:
    TDX_PAGE_ALREADY_ACCEPTED with operand 1 (the 2 MB level)."""
    rig = GuestRig(ram, T_ACCEPT_2M)
    rig.td.page_aug(ACCEPT_2M_GPA, LEVEL_2M)
    r = rig.next_report()
    assert r.code == 0x140
    assert r.values == (0, TDX_PAGE_ALREADY_ACCEPTED + LEVEL_2M, 0, 0)


def test_accept_2m_over_4k_mapping_is_size_mismatch(ram) -> None:
    """tdg_mem_page_accept.c case 3: a 2 MB ACCEPT where the S-EPT has a 4 KB-level page
    (non-leaf, non-FREE entry at the requested level): TDX_PAGE_SIZE_MISMATCH, operand 1."""
    rig = GuestRig(ram, T_ACCEPT_2M)
    rig.td.sept_add(ACCEPT_2M_GPA)
    for off in range(0, 1 << 21, 4096):
        rig.td.page_aug(ACCEPT_2M_GPA + off)
    # The guest then ACCEPTs 0x205000 at 4 KB (fine) and reads the still PENDING 0x200000.
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == ACCEPT_2M_GPA
    assert int.from_bytes(rig.engine.vread(SCRATCH, 8), "little") == \
        TDX_PAGE_SIZE_MISMATCH + LEVEL_2M
    assert rig.engine.get("rax") == 0                    # the 4 KB ACCEPT succeeded


def test_accept_level_mismatch_exits_with_accept_level(ram) -> None:
    """tdg_mem_page_accept.c case 1.2 + td_other_exits.c async_tdexit_ept_violation: a 4 KB
    ACCEPT of a GPA mapped PENDING at 2 MB is an EPT-violation exit whose extended
    qualification has type ACCEPT (1), requested level 0 in bits 34:32 and the 2 MB level
    in bits 37:35: what makes KVM demote. After the host splits the mapping into 4 KB
    PENDING pages the TDCALL re-executes and succeeds."""
    rig = GuestRig(ram, T_ACCEPT_MISMATCH)
    rig.td.page_aug(MISMATCH_2M_GPA, LEVEL_2M)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == MISMATCH_2M_GPA + 0x7000
    eeq = ex.ext_qualification
    assert eeq & 0xF == EEQ_ACCEPT
    assert (eeq >> 32) & 7 == LEVEL_4K and (eeq >> 35) & 7 == LEVEL_2M
    assert (eeq >> 38) & 0xFF == SEPT_PENDING and eeq >> 46 & 1
    assert ex.qualification == 2                          # write, RWX 0
    # The host demotes: 512 PENDING 4 KB pages (what TDH.MEM.PAGE.DEMOTE leaves).
    _, big_hpa = rig.td.leaves.pop((LEVEL_2M, MISMATCH_2M_GPA))
    rig.td.sept_add(MISMATCH_2M_GPA)
    for i in range(512):
        rig.td.leaves[(LEVEL_4K, MISMATCH_2M_GPA + i * 4096)] = (SEPT_PENDING,
                                                                 big_hpa + i * 4096)
    rig.td.engines.sept_changed("DEMOTE", MISMATCH_2M_GPA, LEVEL_2M)
    r = rig.next_report()
    assert r.code == 0x150 and r.values[:2] == (0, 0)


def test_shared_gpa_through_kvm_shared_ept(ram) -> None:
    """A PTE with the shared bit (47 under GPAW 48) is translated through KVM's shared EPT
    (the EPTP written with TDH.VP.WR 0x203C), walked in host memory: the host sees the
    guest's store in its own page, and the guest sees the host's bytes."""
    rig = GuestRig(ram, T_SHARED)
    ram.write_u64(rig.shared_hpa + 0x10, 0x600DF00D)
    r = rig.next_report()
    assert r.values[:2] == (0xC0FFEE, 0x600DF00D)
    assert ram.read_u64(rig.shared_hpa + 8) == 0xC0FFEE


def test_shared_gpa_missing_in_shared_ept_exits(ram) -> None:
    """A shared GPA whose shared-EPT leaf is non-present with suppress-#VE set is an
    EPT-violation exit with the shared GPA (KVM then maps it through kvm_mmu_page_fault)."""
    rig = GuestRig(ram, T_SHARED)
    shared_gpa = rig.td.config.shared_bit | SHARED_GPA
    rig.shared_ept.unmap(shared_gpa)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == shared_gpa and ex.qualification == 2
    rig.shared_ept.map(shared_gpa, rig.shared_hpa)
    rig.td.engines.sept_changed("UNBLOCK", shared_gpa)
    assert rig.next_report().values[0] == 0xC0FFEE


def test_time_slice_exit_of_endless_loop(ram) -> None:
    """An endless loop never holds the host vCPU: the instruction budget, the wall-clock
    watchdog and an external kick each end the slice with OTHER_SMI (6), which Linux 7.3
    tdx.c __tdx_handle_exit re-enters on without a host interrupt handler (lines
    2130-2150); RAX = 6, RCX = R9 = 0. The loop resumes where it was."""
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.02, precise_stops=True)
    ex = rig.enter(budget=100_000)
    assert ex.reason == EXIT_TIME_SLICE
    assert vp_enter_outputs(ex) == Regs(rax=6)
    t = time.monotonic()
    ex = rig.enter()                                       # no budget: the watchdog
    assert ex.reason == EXIT_TIME_SLICE and time.monotonic() - t < 5
    rig.engine.slice_seconds = 60.0
    threading.Timer(0.05, rig.engine.kick).start()
    assert rig.enter().reason == EXIT_TIME_SLICE
    assert rig.engine.exit_counts[EXIT_TIME_SLICE] == 3


def test_watchdog_idles_between_entries_and_wakes_for_the_next(ram) -> None:
    """The watchdog sleeps to the nearest deadline and, after ``linger`` with nothing armed,
    waits for an arm instead of polling (engine.py Watchdog): a slice armed after it went
    idle still ends."""
    wd = Watchdog(linger=0.02)
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.01, watchdog=wd)
    assert rig.enter().reason == EXIT_TIME_SLICE
    deadline = time.monotonic() + 5
    while not wd._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wd._idle                                       # nothing armed: no polling
    rescue = threading.Timer(8, rig.engine.kick)          # a broken wake fails, not hangs
    rescue.start()
    t = time.monotonic()
    try:
        assert rig.enter().reason == EXIT_TIME_SLICE      # the arm woke it
    finally:
        rescue.cancel()
    assert time.monotonic() - t < 5 and rig.engine.exit_counts[EXIT_TIME_SLICE] == 2


def test_without_precise_stops(ram) -> None:
    """Without count mode (the default) the watchdog still ends the slice (same exit) and a
    budget is refused."""
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.01)
    assert not rig.engine.precise_stops
    assert rig.enter().reason == EXIT_TIME_SLICE
    with pytest.raises(ValueError):
        rig.enter(budget=1000)


# mov $2, %eax; cpuid; inc %rdi; jmp . -- CPUID(2) is always a #VE (td_cpuid.c).
_CPUID_VE_THEN_INC = bytes.fromhex("b802000000" "0fa2" "48ffc7" "ebfe")


def _patch_unexecuted_code(ram: HostRam, rig: GuestRig) -> int:
    """Run the loop once (its code page is then scanned and translated), write
    _CPUID_VE_THEN_INC on a part of that page never executed, and point RIP at it."""
    assert rig.enter().reason == EXIT_TIME_SLICE
    eng = rig.engine
    page = eng.rip & ~0xFFF
    at = page + (0x800 if eng.rip & 0xFFF < 0x800 else 0x100)
    hpa, _ = eng.translate(at, 4)
    ram.write(hpa + (at & 0xFFF), _CPUID_VE_THEN_INC)
    eng.rip = at
    eng.set("rdi", 0)
    return at


def test_cpuid_ve_stops_right_after_the_cpuid_without_count_mode(ram) -> None:
    """A CPUID #VE is fault-like: RIP stays on the CPUID and nothing after it runs. Without
    count mode the stop site the engine hooks after each CPUID of a scanned page makes
    that so (here the #VE meets no IDT, so RIP is reported with the triple fault); code
    whose page changed after the scan gets a new scan once memory_written() says so."""
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.01)
    at = _patch_unexecuted_code(ram, rig)
    rig.td.engines.memory_written()
    ex = rig.enter()
    assert ex.reason == EXIT_TRIPLE_FAULT
    assert ex.rip == at + 5 and rig.engine.get("rdi") == 0


def test_cpuid_ve_written_after_the_scan_is_refused(ram) -> None:
    """A CPUID that appeared after its page was scanned has no stop site: unicorn (out of count
    mode) would run the next instruction before the #VE, so the engine refuses it."""
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.01)
    _patch_unexecuted_code(ram, rig)
    with pytest.raises(EngineUnsupported, match="written after its page was scanned"):
        rig.enter()
    assert rig.engine.get("rdi") == 1         # the block ran on: why it cannot be a #VE


def test_cpuid_ve_in_count_mode(ram) -> None:
    """Count mode checks for a stop before every instruction, so the same CPUID #VE needs
    no stop site there."""
    rig = GuestRig(ram, T_LOOP, slice_seconds=0.01, precise_stops=True)
    at = _patch_unexecuted_code(ram, rig)
    ex = rig.enter()
    assert ex.reason == EXIT_TRIPLE_FAULT
    assert ex.rip == at + 5 and rig.engine.get("rdi") == 0


def test_self_modifying_code_through_an_alias(ram) -> None:
    """Data TLB entries carry no execute permission (fast stores), so a store through a
    data-only alias skips unicorn's self-modifying-code check once the entry is dirty. The
    engine therefore flushes the TLB when a page it saw data fills for becomes code: the
    guest's second write through the alias must reach the code it then calls again."""
    rig = GuestRig(ram, T_SMC_ALIAS)
    r = rig.next_report()
    assert r.code == 0x200 and r.values[:2] == (1, 2)


def test_hlt_is_a_ve_with_veinfo(ram) -> None:
    """HLT in a TD is a #VE (tdx_td_dispatcher.c: HLT exits go to td_generic_ve_exit /
    tdx_inject_ve): VE_INFO exit reason 12, instruction length 1, RIP on the HLT; the
    guest's handler reads it with TDG.VP.VEINFO.GET (tdg_vp_veinfo_get.c) and steps over."""
    rig = GuestRig(ram, T_HLT)
    r = rig.next_report()
    assert r.code == 0x180
    reason, length, status, rip = r.values
    assert (reason, length & 0xFFFF_FFFF, status) == (12, 1, 0)
    assert rig.engine.vread(rip, 1) == b"\xf4"
    assert rig.engine.ve_info == {"valid": 0}             # VEINFO.GET freed it


def test_triple_fault(ram) -> None:
    """#UD with an empty IDT escalates to #DF, then to a triple fault: tdx_td_dispatcher.c
    async exit with TDX_NON_RECOVERABLE_VCPU and reason 2; the vCPU cannot run again. Linux
    tdx.c turns exit reason 2 into KVM_EXIT_SHUTDOWN."""
    rig = GuestRig(ram, T_TRIPLE)
    ex = rig.enter()
    assert ex.reason == EXIT_TRIPLE_FAULT and ex.status == TDX_NON_RECOVERABLE_VCPU
    assert vp_enter_outputs(ex).rax == TDX_NON_RECOVERABLE_VCPU | 2
    with pytest.raises(EngineUnsupported):
        rig.enter()


def test_cpuid_from_td_configuration_and_cpuidve(ram) -> None:
    """td_cpuid.c: CPUID(1) from the TD's configuration with INITIAL_APIC_ID = VCPU_INDEX
    and OSXSAVE from CR4; after TDG.VP.CPUIDVE.SET(supervisor) (tdg_vp_cpuidve_set.c)
    CPUID is a #VE with exit reason 10 and instruction length 2."""
    rig = GuestRig(ram, T_CPUID)
    rig.td.cpuid[(1, -1)] = (0x806F8, 0xFF00_0800, 1 << 27, 0x1234)
    rig.td.cpuid[(0, -1)] = (0x23, 1, 2, 3)
    r = rig.next_report()
    assert r.values == (0x806F8, 0x0000_0800, 0, 0x1234)
    r = rig.next_report()
    status, reason, length, rip = r.values
    assert (status, reason, length & 0xFFFF_FFFF) == (0, 10, 2)
    assert rig.engine.vread(rip, 2) == b"\x0f\xa2"


def test_access_to_pending_page_exits_type_6(ram) -> None:
    """td_ept_violation.c: a guest access to a PENDING page under SEPT_VE_DISABLE is an EPT
    violation exit with EEQ type PENDING_EPT_VIOLATION (6) and no RWX in the qualification:
    Linux tdx.c tdx_is_sept_violation_unexpected_pending() kills the VM on it."""
    rig = GuestRig(ram, T_PENDING)
    rig.td.page_aug(PENDING_GPA)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == PENDING_GPA
    assert ex.ext_qualification == EEQ_PENDING_EPT_VIOLATION
    assert ex.qualification & 0x38 == 0 and ex.qualification & 1


def test_access_to_pending_page_without_sept_ve_disable_is_a_ve(ram) -> None:
    """td_ept_violation.c: without SEPT_VE_DISABLE the same access injects #VE (exit reason
    48 in VE_INFO); with no #VE gate the guest ends in a triple fault."""
    rig = GuestRig(ram, T_PENDING, config=TdConfig(attributes=0))
    rig.td.page_aug(PENDING_GPA)
    ex = rig.enter()
    assert ex.reason == EXIT_TRIPLE_FAULT
    assert rig.engine.ve_info["exit_reason"] == 48
    assert rig.engine.ve_info["gpa"] == PENDING_GPA


def test_tdg_vm_rd_wr(ram) -> None:
    """tdg_vm_rd_wr.c: RD returns the value in R8; WR writes under the R9 mask and returns
    the old value; an unknown field's status comes from the metadata interface with R8 = 0;
    a non-zero VM index is TDX_OPERAND_INVALID, operand RCX."""
    rig = GuestRig(ram, T_VM_RD_WR)
    rig.td.metadata[0x77] = 0x1234
    rig.td.writable.add(0x77)
    assert rig.next_report().values[:2] == (0, 0x1234)
    assert rig.next_report().values[:2] == (0, 0x1234)
    assert rig.td.metadata[0x77] == 0xAB34
    assert rig.next_report().values[:2] == (TDX_METADATA_FIELD_ID_INCORRECT, 0)
    assert rig.next_report().values[0] == TDX_OPERAND_INVALID + 1


def test_bad_tdcalls_status_codes(ram) -> None:
    """tdx_td_dispatcher.c td_call: unknown leaf and non-zero version (other than
    TDG.VM.RD) are TDX_OPERAND_INVALID with operand RAX (0); tdg_vp_veinfo_get.c: no valid
    VE_INFO is TDX_NO_VALID_VE_INFO; tdg_vp_cpuidve_set.c: reserved RCX bits are
    TDX_OPERAND_INVALID operand RCX (1); tdg_vp_vmcall.c: GPR_SELECT with RSP (bit 4) is
    TDX_OPERAND_INVALID operand RCX and no TD exit."""
    rig = GuestRig(ram, T_BAD_TDCALLS)
    r = rig.next_report()
    assert r.values == (TDX_NO_VALID_VE_INFO, TDX_OPERAND_INVALID + 1,
                        TDX_OPERAND_INVALID + 0, TDX_OPERAND_INVALID + 0)
    assert rig.next_report().values[0] == TDX_OPERAND_INVALID + 1
    assert [e.reason for e in rig.exits if e.reason != EXIT_TIME_SLICE] == [EXIT_TDCALL,
                                                                        EXIT_TDCALL]


def test_blocked_page_invalidates_cached_translation(ram) -> None:
    """After TDH.MEM.RANGE.BLOCK the module calls TdEngines.sept_changed("BLOCK"): the
    engine drops its cached translation before it next runs, so the guest's next read of
    the page is an EPT violation (BLOCKED entries have RWX 0), not a stale hit."""
    rig = GuestRig(ram, T_EPT)
    rig.td.page_add(UNMAPPED_GPA)
    assert rig.next_report().values[0] == 0x1122334455667788
    rig.td.range_block(UNMAPPED_GPA)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == UNMAPPED_GPA
    assert ex.qualification == 1                          # a read, RWX 0


def test_host_write_to_code_needs_invalidate_code(ram) -> None:
    """Host writes to guest memory (PAGE.ADD into a reused page, the daemon patching a
    page) bypass unicorn's translated-code cache; TdEngines.memory_written() drops it, so
    the next entry runs the new bytes: here a ud2 over the loop's jmp, which with no IDT
    ends in a triple fault."""
    rig = GuestRig(ram, T_LOOP, precise_stops=True)
    ex = rig.enter(budget=10_000)
    assert ex.reason == EXIT_TIME_SLICE
    hpa, _ = rig.engine.translate(ex.rip, 4)
    assert ram.read(hpa + (ex.rip & 0xFFF), 2) == b"\xeb\xfe"
    ram.write(hpa + (ex.rip & 0xFFF), b"\x0f\x0b")
    rig.td.engines.memory_written()
    assert rig.enter(budget=10_000).reason == EXIT_TRIPLE_FAULT


def test_two_vcpu_engines_run_in_parallel_and_kick_all(ram) -> None:
    """Two engines of one TD on two threads (KVM's vCPU threads): both run guest code at
    once, and TdEngines.kick_all() (the TDH.MEM.TRACK IPI) ends both slices."""
    a = GuestRig(ram, T_LOOP, slice_seconds=60.0)
    b_engine = type(a.engine)(ram, a.td, vcpu_index=1, init_rcx=T_LOOP, slice_seconds=60.0)
    a.td.engines.add(b_engine)
    results: dict[int, int] = {}

    def run(i, eng) -> None:
        results[i] = eng.run().reason

    threads = [threading.Thread(target=run, args=(0, a.engine)),
               threading.Thread(target=run, args=(1, b_engine))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    kicked = 0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
        kicked += a.td.engines.kick_all()
    for t in threads:
        t.join(10)
    assert results == {0: EXIT_TIME_SLICE, 1: EXIT_TIME_SLICE}
    assert kicked == 2                               # each ended by exactly one kick
    assert b_engine.get("rsi") == 1                  # its own VCPU_INDEX from VP.INIT


def test_event_delivery_hitting_ept_violation_is_redelivered(ram) -> None:
    """The #VE for HLT needs the stack; if the host has not mapped the stack page, the
    delivery takes an EPT-violation TD exit (GPA of the stack page) and the event is
    delivered again on the next entry, as the module re-injects it from the IDT-vectoring
    information; the guest's handler then sees the HLT's VE_INFO."""
    rig = GuestRig(ram, T_HLT, precise_stops=True)
    eng = rig.engine
    for _ in range(10_000):                      # step to the HLT
        rig.enter(budget=1)
        if eng.rip > 0x10000 and eng.vread(eng.rip, 1) == b"\xf4":
            break
    stack_page = (eng.get("rsp") - 8) & ~0xFFF
    rig.td.page_remove(stack_page)
    ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == stack_page
    assert ex.qualification & 2                 # the frame write
    rig.td.page_add(stack_page)
    r = rig.next_report()
    assert r.code == 0x180 and r.values[0] == 12 and r.values[1] & 0xFFFF_FFFF == 1


def test_host_ram_maps_the_guest_ram_file_coherently(tmp_path) -> None:
    """HostRam.for_guest_ram maps the file behind the module's GuestRam (q35 layout: low RAM
    at 0, the rest at 4 GiB) a second time, MAP_SHARED: a write through either is seen by
    the other, at the same host-physical address."""
    regions = (Region(0, 1 << 20), Region(1 << 32, 1 << 20))
    path = tmp_path / "ram"
    path.write_bytes(bytes(2 << 20))
    guest_ram = GuestRam(path, regions)
    host = HostRam.for_guest_ram(guest_ram)
    try:
        guest_ram.write((1 << 32) + 0x1230, b"vtdx")
        assert host.read((1 << 32) + 0x1230, 4) == b"vtdx"
        host.write_u64(0x8000, 0x1122334455667788)
        assert guest_ram.read_u64(0x8000) == 0x1122334455667788
        assert not host.contains(2 << 20) and host.contains((1 << 32) + 4095)
    finally:
        host.close()
        guest_ram.close()


def test_guest_page_fault_goes_to_the_guest_idt(ram) -> None:
    """The engine's own walk of the guest page tables raises #PF (PDE not present) and
    delivers it through the guest's 64-bit IDT with CR2 and the error code (0: read,
    supervisor, not present); the handler maps a 2 MB page and the load re-executes."""
    rig = GuestRig(ram, T_PAGE_FAULT)
    r = rig.next_report()
    assert r.code == 0x190
    cr2, err, value, _ = r.values
    assert (cr2, err) == (0x610008, 0)           # the whole address (patched unicorn)
    assert value.to_bytes(8, "little") == build_guest()[0][8:16]  # GPA 0x10008, 2 MB page


def test_faulting_read_of_a_read_modify_write_is_reported_as_a_write(ram) -> None:
    """Intel SDM Vol. 3C, exit qualification for EPT violations: one caused by a
    read-modify-write sets bit 1 (data write). TCG does `addl $5, (gpa)` as a load and a
    store, so the first fault the engine sees is the load's; it decodes the instruction
    (vtdx/module/engine/decode.py) and reports read|write (KVM takes bit 1 as a write
    fault). The same for the guest's own #PF: `incl` through a not-present PDE has W/R set
    in the error code (2: write, supervisor, not present)."""
    rig = GuestRig(ram, T_RMW_FAULTS)
    ex = rig.enter()
    while ex.reason == EXIT_TIME_SLICE:
        ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == UNMAPPED_GPA
    assert ex.qualification == 3                          # read | write, RWX 0
    assert vp_enter_outputs(ex).rcx == 3
    rig.td.page_add(UNMAPPED_GPA)
    r = rig.next_report()
    assert r.code == 0x220
    cr2, err, added, counted = r.values
    assert (cr2, err) == (0x622200, 2)
    assert (added, counted) == (5, 1)                     # each ran once, after its fault


def test_rtmr_extend_checks_then_extends(ram) -> None:
    """tdg_mr_rtmr_extend.c (intel/tdx-module, TDX 1.5), in its order: a GPA not 64-byte
    aligned and a shared GPA are TDX_OPERAND_INVALID with operand RCX, an index past the 4
    RTMRs the same with operand RDX; RTMR[i] becomes SHA-384(RTMR[i] || 48 bytes at the
    GPA). The GPA walk is a guest read: an unmapped GPA ends the TDCALL in an EPT-violation
    exit (qualification 1: data read, RWX 0) and the TDCALL runs again once KVM mapped it."""
    import hashlib

    rig = GuestRig(ram, T_RTMR_EXTEND)
    data = bytes(range(1, 49))
    ram.write(rig.scratch_hpa(RTMR_DATA), data)
    ex = rig.enter()
    while ex.reason == EXIT_TIME_SLICE:
        ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == UNMAPPED_GPA
    assert (ex.qualification, ex.ext_qualification) == (1, 0)
    assert rig.engine.vread(ex.rip, 4) == b"\x66\x0f\x01\xcc"   # on the TDCALL
    second = bytes(range(100, 148))
    rig.td.page_add(UNMAPPED_GPA, second)
    r = rig.next_report()
    invalid = 0xC000_0100_0000_0000
    assert r.code == 0x230
    assert r.values == (invalid | 1, invalid | 2, invalid | 1, 0)
    r = rig.next_report()
    assert (r.code, r.values[0]) == (0x231, 0)
    zero = bytes(48)
    assert rig.td.rtmr == [zero, hashlib.sha384(zero + second).digest(),
                           hashlib.sha384(zero + data).digest(), zero]


def test_rtmr_extend_from_a_pending_page(ram) -> None:
    """check_walk_and_map_guest_side_gpa on a PENDING page: with SEPT_VE_DISABLE (the rig's
    default) an EPT-violation exit of EEQ type PENDING_EPT_VIOLATION; without it a #VE
    (tdx_inject_ve with GLA 0: the module's own access has no guest-linear address), which
    ends in a triple fault here as the routine installs no #VE gate."""
    rig = GuestRig(ram, T_RTMR_EXTEND)
    rig.td.page_aug(UNMAPPED_GPA)
    ex = rig.enter()
    while ex.reason == EXIT_TIME_SLICE:
        ex = rig.enter()
    assert ex.reason == EXIT_EPT_VIOLATION and ex.gpa == UNMAPPED_GPA
    assert ex.ext_qualification == EEQ_PENDING_EPT_VIOLATION and ex.qualification == 1
    rig = GuestRig(ram, T_RTMR_EXTEND, config=TdConfig(attributes=0))
    rig.td.page_aug(UNMAPPED_GPA)
    ex = rig.enter()
    while ex.reason == EXIT_TIME_SLICE:
        ex = rig.enter()
    assert ex.reason == EXIT_TRIPLE_FAULT
    ve = rig.engine.ve_info
    assert (ve["exit_reason"], ve["gpa"], ve["gla"], ve["exit_qualification"]) == (
        48, UNMAPPED_GPA, 0, 1)


def test_the_engine_runs_on_the_patched_unicorn(ram) -> None:
    """`vtdx setup` (scripts/bootstrap) builds unicorn with vtdx/unicorn's patch and the
    engine loads it; the two tests below fail on the stock wheel."""
    rig = GuestRig(ram, T_LOOP)
    assert rig.engine.patched_library, (
        f"the stock unicorn is loaded ({unicorn_lib.library()}); `vtdx setup` builds the "
        "patched one")


def test_kicks_never_repeat_a_store(ram) -> None:
    """Time slices and kicks stop the guest from another thread. Stock unicorn leaves
    after the store of `lock incl` with RIP back on that instruction, so it ran twice
    (vtdx/unicorn/README.md); the patched build stops at the next block start. Kicked every
    0.2 ms, 5 million increments stay 5 million."""
    n = 5_000_000
    rig = GuestRig(ram, T_LOCK_LOOP, loop_count=n, slice_seconds=60.0)
    done = threading.Event()

    def kicker() -> None:
        while not done.is_set():
            rig.engine.kick()
            time.sleep(0.0002)

    t = threading.Thread(target=kicker)
    t.start()
    slices = 0
    try:
        while rig.engine.run().reason == EXIT_TIME_SLICE:
            slices += 1
    finally:
        done.set()
        t.join()
    assert rig.lock_counter() == n
    assert slices >= 20                   # enough stops to have caught the stock fault


def test_lock_is_atomic_across_engines(ram) -> None:
    """Two vCPU engines of one TD on two threads each do n `lock incl` on one counter: the
    patched unicorn translates LOCK into host atomics (CF_PARALLEL), so none is lost."""
    n = 1_000_000
    assert lock_loop_on_two_vcpus(ram, n) == 2 * n


def test_cmpxchg16b_is_atomic_across_engines(ram) -> None:
    """The same for a 128-bit compare-exchange (what Linux's SLUB and lockless lists use):
    under CF_PARALLEL unicorn must do `lock cmpxchg16b` as one host atomic (or stop the world
    for it), not as two 64-bit halves. Two engines each add n to a counter that starts n
    below 2^64, so the carry into the high half happens while both run. On stock unicorn
    (no CF_PARALLEL) this lost over a third of the increments."""
    n = 300_000
    rig = GuestRig(ram, T_CMPXCHG16B_LOOP, loop_count=n)
    rig.set_wide_counter((1 << 64) - n)
    run_on_two_vcpus(rig)
    assert rig.wide_counter() == (1 << 64) + n
