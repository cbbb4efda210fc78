"""TDX host checks on one machine, booted once and shared by every test here.

Run:  pytest examples/ci --vtdx-kernel=path/to/bzImage [--vtdx-vmlinux=vmlinux]
"""

import re

import pytest

from vtdx.harness.vm import Vm

#: Kernel log lines that mean the kernel hit a bug, whatever the subsystem.
KERNEL_TROUBLE = re.compile(r"WARNING:|BUG:|Oops|Call Trace:|Kernel panic")


def test_tdx_module_initialized(vtdx_vm: Vm) -> None:
    ktap = vtdx_vm.payload("tdx-state", "--expect", "initialized").assert_ok()
    status = vtdx_vm.vtdx.status()
    # The PAMT size the kernel reports is the one the TDX module was configured with.
    assert int(ktap.diag["pamt_kb"]) * 1024 == status["pamt-bytes"]
    assert status["state"] == "SYS_READY"
    assert status["num-init-lps"] == vtdx_vm.spec.smp
    assert status["keyids"]["global"] is not None


def test_each_cpu_ran_lp_init_once(vtdx_vm: Vm) -> None:
    for lp in range(vtdx_vm.spec.smp):
        calls = vtdx_vm.trace.since(0, leaf="TDH.SYS.LP.INIT", lp=lp)
        assert [c["status-name"] for c in calls] == ["TDX_SUCCESS"], f"LP {lp}"


def test_no_failed_seamcall(vtdx_vm: Vm) -> None:
    failed = vtdx_vm.trace.since(0, ok=False)
    assert failed == [], vtdx_vm.trace.format(failed)
    assert not [ln for ln in vtdx_vm.tdx_log() if "SEAMCALL" in ln]


def test_pamt_pages_held_by_tdx(vtdx_vm: Vm) -> None:
    ranges = vtdx_vm.pamt_ranges()
    assert ranges
    for pfn, pages in ranges:
        vtdx_vm.payload("pfn-state", pfn, pages, "--expect", "held").assert_ok()


def test_cpu_hotplug_loop(vtdx_vm: Vm) -> None:
    mark = vtdx_vm.trace.mark()
    vtdx_vm.payload("cpu-hotplug", "-n", "5").assert_ok()
    # tdx.c keeps tdx_lp_initialized set across offline, so onlining a CPU again makes no
    # SEAMCALL: a change that re-ran TDH.SYS.LP.INIT would show up here.
    assert vtdx_vm.trace.since(mark) == []
    assert vtdx_vm.vtdx.status()["num-init-lps"] == vtdx_vm.spec.smp


def test_kernel_log_clean(vtdx_vm: Vm) -> None:
    trouble = [ln for ln in vtdx_vm.dmesg().splitlines() if KERNEL_TROUBLE.search(ln)]
    assert trouble == []


def test_runtime_fault_rule_is_visible_and_cleared(vtdx_vm: Vm) -> None:
    # Rules armed over QMP while the machine runs (here for a leaf this idle host never
    # calls) show up in query-vtdx-faults and are gone after the block.
    with vtdx_vm.vtdx.injecting("TDX_OPERAND_BUSY+RCX", "TDH.MNG.CREATE", count=1) as rid:
        rules = vtdx_vm.vtdx.faults()
        assert [r["id"] for r in rules] == [rid]
        assert rules[0]["leaf-name"] == "TDH.MNG.CREATE"
    assert vtdx_vm.vtdx.faults() == []


@pytest.mark.vtdx(append="kvm_intel.tdx=1", scope="module")
def test_kvm_creates_a_td(vtdx_vm: Vm) -> None:
    # A machine of its own (KVM's TDX support is opt-in). The payload is built against the
    # booted kernel's UAPI headers (--vtdx-kernel-src); where the platform or the kernel
    # cannot offer TDX VMs, it says SKIP and so does pytest.
    mark = vtdx_vm.trace.mark()
    ktap = vtdx_vm.payload("kvm-tdx")
    ktap.assert_ok()
    skipped = [c for c in ktap.cases if c.skipped]
    if skipped:
        pytest.skip(f"kvm-tdx: {skipped[0].name}: {skipped[0].directive}")
    # KVM_TDX_INIT_VM made the TD in the module (TDH.MNG.*); closing the VM reclaimed it.
    calls = [c["name"] for c in vtdx_vm.trace.since(mark)]
    for leaf in ("TDH.MNG.CREATE", "TDH.MNG.KEY.CONFIG", "TDH.MNG.ADDCX", "TDH.MNG.INIT"):
        assert leaf in calls
    assert vtdx_vm.trace.since(mark, ok=False) == []
    assert vtdx_vm.vtdx.tds() == []


def test_bring_your_own_script(vtdx_vm: Vm) -> None:
    # Files of your own (scripts, static binaries) go in through the agent channel.
    vtdx_vm.put("/tmp/online-cpus.sh", b"#!/bin/sh\ncat /sys/devices/system/cpu/online\n")
    rc, out = vtdx_vm.run("/tmp/online-cpus.sh")
    assert (rc, out.strip()) == (0, f"0-{vtdx_vm.spec.smp - 1}" if vtdx_vm.spec.smp > 1 else "0")


def test_four_cpus_each_run_lp_init(vtdx_boot) -> None:
    # vtdx_boot: machines of your own, booted when and as the test says, stopped after it.
    vm = vtdx_boot(smp=4)
    assert vm.vtdx.status()["num-init-lps"] == 4
    assert [vm.trace.count("TDH.SYS.LP.INIT", lp=lp, ok=True) for lp in range(4)] == [1] * 4
    vm.payload("tdx-state", "--expect", "initialized").assert_ok()
