"""Fault injection at boot: each test boots its own machine with a fault armed in the TDX
module and checks that the kernel reacts the way arch/x86/virt/vmx/tdx/tdx.c (Linux 7.3)
says it must. Copy one of these to pin down a TDX error path of your kernel.

How 7.3 reports a failed SEAMCALL (seamcall_internal.h, sc_retry_prerr): it retries only
TDX_RND_NO_ENTROPY (RDRAND_RETRY_LOOPS times), prints
"virt/tdx: SEAMCALL (0x<leaf>) failed: 0x<status>" (plus RCX..R11 for the *_ret variants,
e.g. TDH.SYS.TDMR.INIT) and returns -EIO.
"""

import pytest

from vtdx.abi import status as st
from vtdx.harness.vm import Fault, Vm


def seamcall_failed(leaf: int, status: int) -> str:
    return f"virt/tdx: SEAMCALL (0x{leaf:016x}) failed: 0x{status:016x}"


@pytest.mark.vtdx(smp=2, scope="function",
                  faults=[Fault("TDX_SYS_BUSY", "TDH.SYS.LP.INIT", lp=1)])
def test_lp_init_busy_while_onlining_cpu1(vtdx_vm: Vm) -> None:
    """tdx_enable() installs the "virt/tdx:online" cpuhp state, whose callback runs
    TDH.SYS.LP.INIT on each online CPU. BUSY on CPU 1 fails cpuhp_setup_state(), which
    unwinds CPU 0 and makes tdx_enable() return before init_tdx_module(): the SEAMCALL error
    is the only message, no "TDX-Module initialization failed" line, no retry."""
    log = vtdx_vm.tdx_log()
    assert seamcall_failed(35, st.TDX_SYS_BUSY) in log
    assert not [ln for ln in log if "TDX-Module initializ" in ln]
    calls = vtdx_vm.trace.since(0, leaf="TDH.SYS.LP.INIT", lp=1)
    assert [c["status-name"] for c in calls] == ["TDX_SYS_BUSY"]  # no retry
    assert vtdx_vm.trace.count("TDH.SYS.CONFIG") == 0
    status = vtdx_vm.vtdx.status()
    assert status["state"] == "SYSINIT_DONE" and status["num-init-lps"] == 1
    vtdx_vm.payload("tdx-state", "--expect", "failed").assert_ok()
    # The state was removed again, so CPU hotplug no longer runs TDX callbacks at all.
    mark = vtdx_vm.trace.mark()
    vtdx_vm.payload("cpu-hotplug", "-n", "2", "1").assert_ok()
    assert vtdx_vm.trace.since(mark) == []


@pytest.mark.vtdx(scope="function",
                  faults=[Fault("TDX_OPERAND_BUSY+RCX", "TDH.SYS.TDMR.INIT", after=100)])
def test_tdmr_init_fails_halfway_and_pamt_is_freed(vtdx_vm: Vm) -> None:
    """The 101st TDH.SYS.TDMR.INIT fails: init_tdmrs() returns -EIO, init_tdx_module() goes
    to err_reset_pamts (tdmrs_quirk_reset_pamt_all, tdmrs_free_pamt_all) and tdx_enable()
    prints "TDX-Module initialization failed (-5)". The PAMT must go back to the kernel."""
    log = vtdx_vm.tdx_log()
    assert seamcall_failed(36, st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX) in log
    assert any(ln.startswith("virt/tdx: RCX 0x") for ln in log)  # seamcall_err_ret
    assert "virt/tdx: TDX-Module initialization failed (-5)" in log
    assert not [ln for ln in log if "allocated for PAMT" in ln]
    assert vtdx_vm.trace.count("TDH.SYS.TDMR.INIT") == 101
    tdmr = vtdx_vm.vtdx.tdmrs()[0]
    assert not tdmr["initialized"] and tdmr["initialized-up-to"] < tdmr["end"]
    for pfn, pages in vtdx_vm.pamt_ranges():
        vtdx_vm.payload("pfn-state", pfn, pages, "--expect", "released").assert_ok()
    vtdx_vm.payload("tdx-state", "--expect", "failed").assert_ok()


@pytest.mark.vtdx(scope="function",
                  faults=[Fault("TDX_KEY_GENERATION_FAILED", "TDH.SYS.KEY.CONFIG")])
def test_key_config_error_aborts_init(vtdx_vm: Vm) -> None:
    """config_global_keyid() gets -EIO from smp_call_on_cpu(do_global_key_config): no
    TDMR is initialized, the PAMT is reset and freed (err_reset_pamts)."""
    log = vtdx_vm.tdx_log()
    assert seamcall_failed(31, st.TDX_KEY_GENERATION_FAILED) in log
    assert "virt/tdx: TDX-Module initialization failed (-5)" in log
    assert vtdx_vm.trace.count("TDH.SYS.KEY.CONFIG") == 1
    assert vtdx_vm.trace.count("TDH.SYS.TDMR.INIT") == 0
    status = vtdx_vm.vtdx.status()
    assert status["state"] == "SYSCONFIG_DONE"
    assert status["keyids"]["configured-packages"] == []
    for pfn, pages in vtdx_vm.pamt_ranges():
        vtdx_vm.payload("pfn-state", pfn, pages, "--expect", "released").assert_ok()


@pytest.mark.vtdx(scope="function",
                  faults=[Fault("TDX_RND_NO_ENTROPY", "TDH.SYS.KEY.CONFIG", count=3)])
def test_key_config_no_entropy_is_retried(vtdx_vm: Vm) -> None:
    """TDX_RND_NO_ENTROPY is the one status sc_retry() retries: three of them are absorbed
    silently and TDX comes up."""
    calls = vtdx_vm.trace.since(0, leaf="TDH.SYS.KEY.CONFIG")
    assert [c["status-name"] for c in calls] == ["TDX_RND_NO_ENTROPY"] * 3 + ["TDX_SUCCESS"]
    assert not [ln for ln in vtdx_vm.tdx_log() if "SEAMCALL" in ln]
    vtdx_vm.payload("tdx-state", "--expect", "initialized").assert_ok()
