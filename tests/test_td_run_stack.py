"""Whole stack: unmodified Linux 7.3 (``kvm_intel.tdx=1``) runs the kvm-td payload's TD to
its PASS on the module's TDH.VP.ENTER, with 1 and 2 TD vCPUs.

What the trace must show (Linux arch/x86/kvm/vmx/tdx.c): TDH.VP.ENTER from KVM_RUN
(tdx_vcpu_enter_exit <- tdx_vcpu_run <- kvm_arch_vcpu_ioctl_run); TDH.MEM.PAGE.AUG from the
EPT-violation path (tdx_mem_page_aug <- tdx_sept_set_private_spte, KVM's TDP MMU fault-in);
the private page of MapGPA-to-shared zapped with RANGE.BLOCK, TRACK, PAGE.REMOVE; teardown
leaving no TD, and a clean kernel log. The failures KVM provokes and tolerates are the only
ones allowed: KVM_TDX_GET_CPUID's reads past the module's CPUID lookup table, with exactly
the status the table gives (tests/kvm_cpuid.py; leaf 0 and every readable leaf must
succeed), and TDH.VP.FLUSH -> TDX_VCPU_NOT_ASSOCIATED (tdx_flush_vp accepts it: a vCPU that
has moved on is not associated with the LP it is flushed on).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
from kvm_tolerated import passing_td_life

pytestmark = [pytest.mark.kernel, pytest.mark.stack]

TROUBLE = re.compile(r"WARNING:|BUG:|Oops|Call Trace:|Kernel panic")


@pytest.fixture(scope="module")
def tdx_vm():  # noqa: ANN201 (a started Vm)
    from vtdx.harness.vm import BootSpec, Vm
    from vtdx.host import kernel as kernel_build

    art = kernel_build.default_kernel(None)
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, append="kvm_intel.tdx=1", smp=2,
                    kernel_src=Path(str(art.info()["path"])))
    vm = Vm(spec).start()
    try:
        yield vm
    finally:
        vm.stop()


def _callers(recs: list[dict], leaf: str) -> list[str]:
    return [" ".join(s.split("+")[0] for s in r.get("stack") or [])
            for r in recs if r["name"] == leaf]


@pytest.mark.parametrize("nr_vcpus", [1, 2])
def test_kvm_td_payload_runs_its_td_to_pass(tdx_vm, nr_vcpus: int) -> None:
    vm = tdx_vm
    _, recs = passing_td_life(vm, nr_vcpus, ("td_run", "td_console", "td_mmio", "td_map_gpa",
                                             "td_shared_report", "teardown"), timeout=600)
    names = collections.Counter(r["name"] for r in recs)
    enters = [r for r in recs if r["name"] == "TDH.VP.ENTER"]
    assert enters and all("kvm_arch_vcpu_ioctl_run" in c
                          for c in _callers(recs, "TDH.VP.ENTER"))
    reasons = collections.Counter(r.get("exit-reason") for r in enters)
    assert reasons["TDCALL"] > 0 and reasons["EPT_VIOLATION"] > 0, reasons
    assert {r["lp"] for r in enters} <= set(range(2))
    # KVM's EPT-violation path maps memory at run time: SEPT.ADD for the missing S-EPT
    # levels and PAGE.AUG, after the first VP.ENTER (INIT_MEM_REGION's SEPT.ADDs came before).
    first_enter = enters[0]["seq"]
    late_sept = [r for r in recs if r["name"] == "TDH.MEM.SEPT.ADD" and r["seq"] > first_enter]
    assert late_sept and all("tdx_sept" in " ".join(r.get("stack") or []) for r in late_sept)
    augs = _callers(recs, "TDH.MEM.PAGE.AUG")
    assert augs and all("tdx_sept_set_private_spte" in c for c in augs), augs[:3]
    # MapGPA to shared zaps the private page: BLOCK, TRACK, REMOVE.
    assert names["TDH.MEM.RANGE.BLOCK"] >= 1 and names["TDH.MEM.PAGE.REMOVE"] >= 1
    assert names["TDH.MEM.TRACK"] >= 1
    assert names["TDH.MNG.KEY.FREEID"] == 1
    assert vm.vtdx.tds() == []
    # Teardown reclaimed every page: the live module's PAMT has no page but free (PT_NDA)
    # and reserved ones, and the state invariants hold with no TDX lock left held.
    from vtdx.testing.invariants import check_invariants, pamt_owned

    with vm.module.cond:
        left = pamt_owned(vm.module)
        problems = check_invariants(vm.module, expect_no_locks=True)
    assert left == {} and problems == [], (list(left.items())[:10], problems[:10])


def test_td_exit_round_trips_timed_by_the_vmm(tdx_vm) -> None:
    """``kvm-td --bench-exits N`` (what scripts/bench-td --stack runs): the guest's N
    TDVMCALL<CPUID> exits are answered by KVM in the kernel (tdx_emulate_cpuid) and entered
    again -- N TDCALL exits with no return to the VMM in between -- and the VMM prints the
    rate of the loop it timed."""
    vm = tdx_vm
    mark = vm.trace.mark()
    ktap = vm.payload("kvm-td", "--vcpus", "1", "--bench-exits", "300", timeout=600)
    ktap.assert_ok()
    m = re.fullmatch(r"300 exits in (\d+) us, (\d+)/s", ktap.diag["td_exit_round_trip"])
    assert m and int(m[1]) > 0 and int(m[2]) > 0, ktap.diag
    enters = [r for r in vm.trace.since(mark) if r["name"] == "TDH.VP.ENTER"]
    tdcalls = [r for r in enters if r.get("exit-reason") == "TDCALL"]
    assert len(tdcalls) >= 300
    # The IO exits the guest makes reach the VMM (userspace); the CPUID ones do not.
    io_exits = int(re.search(r"(\d+) IO", ktap.diag["vcpu0"])[1])  # type: ignore[index]
    assert len(tdcalls) - io_exits >= 300, (len(tdcalls), io_exits)


def test_kernel_log_clean_after_td_runs(tdx_vm) -> None:
    """After the runs above (module-scoped machine), no WARNING/BUG in the kernel log. In
    particular KVM_PROVE_MMU's count of TDP MMU pages is 0 at VM destruction
    (kvm_mmu_uninit_tdp_mmu, arch/x86/kvm/mmu/tdp_mmu.c): the shared EPT pages the TD's
    shared GPAs (bit 47) needed were freed, which takes a MAXPHYADDR of 48 or more."""
    assert [ln for ln in tdx_vm.dmesg().splitlines() if TROUBLE.search(ln)] == []


def test_vtdx_run_checks_kvm_td(tmp_path: Path) -> None:
    """`vtdx run --checks tdx,kvm-td` boots the default kernel with kvm_intel.tdx=1, runs the
    kvm-td payload with 1 and 2 TD vCPUs from the initramfs and passes only when both TDs
    passed; the summary counts TD exits per reason. No kernel report is declared: any
    WARNING fails the run. A failure also shows the vCPU-level SEAMCALLs around the failed
    calls, from the saved trace."""
    import subprocess
    import sys

    from vtdx.harness.vm import TraceView
    from vtdx.host import kernel as kernel_build
    from vtdx.observe.trace import read_trace

    if kernel_build.default_kernel(None) is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    saved = tmp_path / "trace.jsonl"
    r = subprocess.run([sys.executable, "-m", "vtdx", "run", "--checks", "tdx,kvm-td",
                        "--quiet", "--save-trace", str(saved)],
                       capture_output=True, text=True, timeout=600, check=False)
    out = r.stdout + r.stderr
    if r.returncode != 0 and saved.is_file():
        recs = [rec for rec in read_trace(saved) if rec["name"].startswith(("TDH.VP.", "TDH.MNG."))
                and rec["name"] not in ("TDH.VP.ENTER", "TDH.MNG.RD")]
        out += "\nvCPU and TD calls:\n" + TraceView.format(recs)
    assert r.returncode == 0, out
    assert "kvm_td_1vcpu=ok" in out and "kvm_td_2vcpu=ok" in out, out
    exits = next(ln for ln in out.splitlines() if ln.strip().startswith("TD exits:"))
    assert "TDCALL" in exits and "EPT_VIOLATION" in exits, exits
