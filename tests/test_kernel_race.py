"""A real SEAMCALL of the default Linux 7.3 kernel paused at ``locked`` through QMP while the
other CPU's KVM creates a second TD: what the stock kernel does about the lock it would meet.

Scenario (docs/races.md): two processes each create a TD through KVM (the kvm-td payload,
``--stop-after init-vm``), one pinned to CPU0, one to CPU1. TDH.MNG.CREATE takes the key
ownership table exclusively (intel/tdx-module tdh_mng_create.c; vtdx/module/leaves/
td_mng.py: TDX_OPERAND_BUSY | OPERAND_ID_KOT when it is held). CPU0's TDH.MNG.CREATE is
held at its ``locked`` control point (vtdx-pause, bounded by a timeout) while CPU1's
process starts. Linux's KVM takes its global ``tdx_lock`` mutex around tdh_mng_create()
(arch/x86/kvm/vmx/tdx.c, __tdx_td_init), so CPU1 sleeps on the mutex and never reaches
the module while CPU0 holds the KOT: no BUSY, and CPU1's TDH.MNG.CREATE runs only after
CPU0's returned. The test asserts exactly that -- the kernel's serialisation, observed
from outside -- and that both TDs are created and torn down.

``tsc=unstable``: a call held on CPU0 stalls kernel work that needs every CPU
(stop_machine, e.g. the switch to the TSC clocksource about a second after boot).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vtdx.harness.vm import BootSpec, Pause, Vm
from vtdx.host import kernel as kernel_build

pytestmark = [pytest.mark.kernel, pytest.mark.stack]

HOLD_S = 4.0


@pytest.fixture(scope="module")
def vm():  # noqa: ANN201 (a started Vm)
    art = kernel_build.default_kernel(None)
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, smp=2,
                    append="kvm_intel.tdx=1 tsc=unstable",
                    kernel_src=Path(str(art.info()["path"])))
    machine = Vm(spec).start()
    try:
        yield machine
    finally:
        machine.stop()


def test_mng_create_held_on_cpu0_cpu1_waits_on_kvm_tdx_lock(vm) -> None:  # noqa: ANN001
    assert vm.run("taskset -c 1 true").rc == 0, "busybox taskset is needed to pin CPUs"
    assert vm.vtdx.timing()["mode"] == "overlap"
    mark = vm.trace.mark()
    pause = vm.vtdx.pause("TDH.MNG.CREATE", lp=0, point="locked", timeout=30)
    cmd = ("taskset -c 1 sh -c '"
           "taskset -c 0 kvm-td --stop-after init-vm > /tmp/a.log 2>&1 & "
           "sleep 2; kvm-td --stop-after init-vm > /tmp/b.log 2>&1; wait; "
           "cat /tmp/a.log; echo =====; cat /tmp/b.log'")
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(vm.run(cmd, timeout=120)))
    runner.start()
    try:
        held = vm.vtdx.wait_paused(pause["id"], timeout=60)
        assert (held["call-lp"], held["call-leaf"]) == (0, "TDH.MNG.CREATE")
        assert "kot" in held["locks"]
        locks = {h["key"]: h for h in vm.vtdx.locks()["held"]}
        holder = locks["kot"]["holders"][0]
        assert (holder["lp"], holder["leaf"], holder["point"]) == (0, "TDH.MNG.CREATE",
                                                                   "locked")
        time.sleep(HOLD_S)  # CPU1's process started 2 s after CPU0's and is in KVM by now
        during = vm.trace.since(mark)
        assert [r for r in during if r["name"] == "TDH.MNG.CREATE"] == []  # none returned
        assert vm.vtdx.contention()["total"] == 0
        assert vm.vtdx.resume(pause["id"]) == 1
    finally:
        runner.join(150)
        vm.vtdx.pause_clear()
    (res,) = result
    out = res.stdout  # type: ignore[attr-defined]
    a, _, b = out.partition("=====")
    assert "not ok" not in out and a.count("ok ") >= 2 and b.count("ok ") >= 2, out
    recs = vm.trace.since(mark)
    creates = [r for r in recs if r["name"] == "TDH.MNG.CREATE"]
    assert [(r["lp"], r["ok"]) for r in creates] == [(0, True), (1, True)], \
        vm.trace.format(creates)
    # CPU1's TDH.MNG.CREATE ran only after CPU0's returned: KVM's tdx_lock serialised them
    assert creates[0]["seq"] < creates[1]["seq"]
    assert creates[1]["t"] - creates[0]["t"] < 30
    gap = creates[1]["t"] - creates[0]["t"]
    print(f"held {held['locks']}; CPU1's TDH.MNG.CREATE {gap:.2f} s after CPU0's")
    busy = [r for r in recs if "BUSY" in r["status-name"]]
    assert busy == [] and vm.vtdx.contention()["total"] == 0
    assert vm.vtdx.tds() == []  # both torn down
    assert not [ln for ln in vm.console_tail(200).splitlines() if "WARNING" in ln]


def test_pause_armed_before_boot_holds_a_boot_time_call() -> None:
    """BootSpec(pauses=...) (the marker's ``pauses=``, ``vtdx run --pause``): the 100th
    TDH.SYS.TDMR.INIT of tdx_enable() is held 1 s at ``locked``; the kernel waits it out and
    initialises TDX as usual, and the trace shows that one call's time inside the module."""
    art = kernel_build.default_kernel(None)
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, smp=2, append="tsc=unstable",
                    pauses=(Pause("TDH.SYS.TDMR.INIT", nth=100, timeout=1.0),), serial=True)
    vm = Vm(spec).start()
    try:
        assert vm.vtdx.timing()["mode"] == "serial"
        inits = vm.trace.since(0, leaf="TDH.SYS.TDMR.INIT")
        slow = [i for i, r in enumerate(inits) if r["duration-us"] >= 1e6]
        assert slow == [99], [r["duration-us"] for r in inits[95:105]]
        assert all(r["ok"] for r in inits) and vm.vtdx.status()["state"] == "SYS_READY"
        assert vm.vtdx.pauses() == []  # one-shot: gone after it fired
        assert any("TDX-Module initialized" in ln for ln in vm.tdx_log())
    finally:
        vm.stop()
