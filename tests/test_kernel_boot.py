"""Whole stack with the real Linux 7.3 TDX-host kernel: QEMU + plugin + daemon + TdxModule.

What the kernel prints is checked against arch/x86/virt/vmx/tdx/tdx.c (Linux 7.3): tdx_enable()
"TDX-Module initialized" and init_tdx_module() "%lu KB allocated for PAMT"; tdx_init()
"initialization failed: too few private KeyIDs available." when the BIOS (here: MSR 0x87 from
the facade) gives fewer than 2 TDX keyids; tdx_enable() "MOVDIR64B is required for TDX".
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vtdx.abi.leaves import Leaf
from vtdx.host import kernel as kernel_build
from vtdx.platform.profile import GiB
from vtdx.session.run import EXIT_OK, EXIT_TDX_REFUSED, RunOptions, RunResult, run

ART = kernel_build.default_kernel()
pytestmark = [
    pytest.mark.kernel,
    pytest.mark.stack,
    pytest.mark.skipif(ART is None, reason="Linux TDX-host kernel not built "
                       "(run `vtdx build-kernel`)"),
]
FOUR_GIB = 4 * GiB


def boot(smp: int, mem: int, **kw: object) -> RunResult:
    assert ART is not None
    opts = RunOptions(kernel=ART.bzimage, vmlinux=ART.vmlinux, smp=smp, mem=mem, stream=False,
                      timeout=240, **kw)  # type: ignore[arg-type]
    res = run(opts)
    print(res.summary)
    return res


def assert_tdx_up(res: RunResult, smp: int) -> None:
    assert res.exit_code == EXIT_OK, res.verdict + "\n" + "\n".join(res.console.lines[-30:])
    assert res.console.tdx_initialized
    assert any("virt/tdx: TDX-Module initialized" in ln for ln in res.console.lines)
    # The kernel's own PAMT figure equals vtdx's accounting of what the kernel donated.
    assert res.console.pamt_kb is not None and res.console.pamt_kb == res.pamt_module_kb
    assert res.console.results["pamt_kb"] == str(res.pamt_module_kb)
    assert res.snapshot["state"] == "SYS_READY"
    assert res.snapshot["num_init_lps"] == smp
    for lp in range(smp):
        assert res.stats.count(Leaf.TDH_SYS_LP_INIT, lp) == 1
    assert res.stats.count(Leaf.TDH_SYS_INIT) == 1
    assert res.stats.count(Leaf.TDH_SYS_KEY_CONFIG) >= 1
    assert res.stats.count(Leaf.TDH_SYS_TDMR_INIT) >= 1
    assert not res.diagnostics, res.diagnostics
    # kvm_intel (built in) loads on the Intel-vendor vCPU: it prints only when it refuses.
    assert not [ln for ln in res.console.lines if "kvm_intel:" in ln]


def test_boot_smp2_2g(tmp_path: Path) -> None:
    saved = tmp_path / "trace.jsonl"
    before = set(threading.enumerate())
    res = boot(2, 2 * GiB, save_trace=saved)
    assert_tdx_up(res, 2)
    # The kernel trusts the TSC as on a TDX host, so the clocksource watchdog, whose skew
    # check can deadlock a TCG boot (vtdx/session/machine.py, KERNEL_APPEND), never runs.
    assert any("Kernel command line:" in ln and " tsc=reliable" in ln
               for ln in res.console.lines)
    # A run releases every thread it started (the daemon's vCPU threads, the trace writer,
    # the QMP endpoint): `vtdx run` skips interpreter teardown on that ground (vtdx/cli/main.py).
    assert not [t.name for t in set(threading.enumerate()) - before]
    assert res.console.keyid_range == (16, 32)
    # The trace outlives the run directory and `vtdx trace FILE` reads it: one LP.INIT per
    # CPU, each issued by the kernel's tdx_cpu_enable (arch/x86/virt/vmx/tdx/tdx.c).
    out = subprocess.run([sys.executable, "-m", "vtdx", "trace", str(saved), "--json",
                          "--leaf", "TDH.SYS.LP.INIT"], capture_output=True, text=True,
                         check=True).stdout
    recs = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["lp"] for r in recs) == [0, 1]
    assert all(r["caller"].startswith("tdx_cpu_enable+") for r in recs), recs


def test_boot_smp4_6g_ram_above_4g() -> None:
    res = boot(4, 6 * GiB)
    assert_tdx_up(res, 4)
    tdmrs = res.snapshot["tdmrs"]
    assert any(t["base"] + t["size"] > FOUR_GIB for t in tdmrs), tdmrs
    # q35 puts 2 GiB below 4 GiB and 4 GiB above: the kernel must cover both.
    covered_high = sum(min(t["base"] + t["size"], 8 * GiB) - max(t["base"], FOUR_GIB)
                       for t in tdmrs if t["base"] + t["size"] > FOUR_GIB)
    assert covered_high >= 4 * GiB


@pytest.mark.parametrize("kw,reason", [
    ({"tdx_keyids": 1}, "virt/tdx: initialization failed: too few private KeyIDs available."),
    ({"movdir64b": False}, "virt/tdx: MOVDIR64B is required for TDX"),
])
def test_kernel_refuses_tdx_on_a_lacking_platform(kw: dict[str, object], reason: str) -> None:
    res = boot(2, 2 * GiB, **kw)
    assert res.exit_code == EXIT_TDX_REFUSED, res.verdict
    assert res.verdict == f"kernel refused TDX: {reason}"
    assert not res.console.tdx_initialized and res.console.done
    # The kernel gives up before its first SEAMCALL, as on such hardware.
    assert res.stats.per_leaf() == {}
    assert res.snapshot["state"] == "SYSINIT_PENDING"


def test_cli_reports_refusal_in_one_line() -> None:
    assert ART is not None
    r = subprocess.run([sys.executable, "-m", "vtdx", "run", "--quiet", "--kernel",
                        str(ART.bzimage), "--tdx-keyids", "1", "--timeout", "240"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_TDX_REFUSED, r.stdout + r.stderr
    assert r.stderr == ("vtdx run: kernel refused TDX: virt/tdx: initialization failed: "
                        "too few private KeyIDs available.\n")
    assert "Traceback" not in r.stdout + r.stderr


def test_cpu_offline_online() -> None:
    """Offline/online CPU1 through sysfs with TDX up: the kernel's cpuhp "virt/tdx:online"
    callback runs (VMXOFF on the way down, VMXON + tdx_cpu_enable() on the way up).

    Linux 7.3 issues TDH.SYS.LP.INIT once per CPU for the module's lifetime: tdx_cpu_enable()
    returns early when the per-CPU tdx_lp_initialized flag is set (arch/x86/virt/vmx/tdx/tdx.c,
    only cleared by tdx_module_shutdown()). The module would refuse one anyway: LP.INIT is only
    accepted while the module is in SYSINIT_DONE, before TDH.SYS.CONFIG (vtdx/module/sys_lp.py,
    after tdh_sys_lp_init.c). So the faithful observation is exactly one LP.INIT for CPU1.
    """
    res = boot(2, 2 * GiB, checks="tdx,hotplug")
    assert_tdx_up(res, 2)
    r = res.console.results
    assert r["hotplug_offline"] == "ok" and r["hotplug_online_after_offline"] == "0"
    assert r["hotplug_online"] == "ok" and r["hotplug_cpus_online"] == "0-1"
    assert r["hotplug_tdx_errors"] == "0"
    assert res.stats.count(Leaf.TDH_SYS_LP_INIT, 1) == 1


def _tracking_factory(seen: list[object]):  # noqa: ANN202
    from vtdx.session.machine import Machine

    def factory(*a: object, **kw: object) -> Machine:
        m = Machine(*a, **kw)  # type: ignore[arg-type]
        seen.append(m)
        return m

    return factory


def _assert_cleaned_up(m: object, run_dir: object) -> None:
    from pathlib import Path

    assert m.run_dir is None and not Path(str(run_dir)).exists()  # type: ignore[attr-defined]
    assert m.qemu.returncode is not None  # type: ignore[attr-defined]


def test_panic_is_detected_and_everything_cleaned_up() -> None:
    """init exiting panics the kernel ("Attempted to kill init!"): one-line verdict, exit 1."""
    import asyncio

    from vtdx.session.run import EXIT_FAILED, run_async

    assert ART is not None
    seen: list[object] = []
    dirs: list[object] = []
    opts = RunOptions(kernel=ART.bzimage, smp=1, mem=1 * GiB, stream=False, timeout=240,
                      append="rdinit=/bin/false")

    async def go() -> RunResult:
        task = asyncio.ensure_future(run_async(opts, None, _tracking_factory(seen)))
        while not seen or getattr(seen[0], "run_dir", None) is None:
            await asyncio.sleep(0.05)
        dirs.append(seen[0].run_dir)  # type: ignore[attr-defined]
        return await task

    res = asyncio.run(go())
    assert res.exit_code == EXIT_FAILED
    assert res.verdict.startswith(
        "kernel crashed: Kernel panic - not syncing: Attempted to kill init")
    _assert_cleaned_up(seen[0], dirs[0])


@pytest.mark.slow
def test_timeout_kills_qemu_and_cleans_up() -> None:
    """A guest that never finishes (init waits on console input) hits --timeout."""
    import asyncio

    from vtdx.session.run import EXIT_FAILED, run_async

    assert ART is not None
    seen: list[object] = []
    opts = RunOptions(kernel=ART.bzimage, smp=1, mem=1 * GiB, stream=False, timeout=8,
                      append="rdinit=/bin/cat")
    res = asyncio.run(run_async(opts, None, _tracking_factory(seen)))
    assert res.exit_code == EXIT_FAILED
    assert res.verdict == "timed out before the guest powered off"
    assert res.console.lines  # it did boot
    assert seen[0].run_dir is None  # type: ignore[attr-defined]
    assert seen[0].qemu.returncode is not None  # type: ignore[attr-defined]
