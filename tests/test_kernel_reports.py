"""Kernel reports (WARNING/BUG/lockdep/oops) fail a run unless expected; a user's own
initramfs is judged by the kernel's TDX lines; --inject rules parse like the pytest marker's
Fault. In-process: vtdx.session.run's console parser, judge and option parsing."""

from __future__ import annotations

import pytest

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.abi.status import TDX_OPERAND_INVALID, TDX_SYS_BUSY
from vtdx.errors import VtdxError
from vtdx.module import TdxModule
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import GiB, Profile
from vtdx.session.run import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TDX_REFUSED,
    ConsoleLog,
    InjectRule,
    RunOptions,
    judge,
    split_splats,
)

#: A WARN_ON_ONCE report (kernel/panic.c __warn, "end trace") as Linux 7.3 printed it on vtdx
#: for KVM's TDX_BUG_ON after a failed TDH.MNG.CREATE (arch/x86/kvm/vmx/tdx.c:2559).
WARN = """\
[    3.804000] ------------[ cut here ]------------
[    3.804828] WARNING: arch/x86/kvm/vmx/tdx.c:2559 at tdx_vm_ioctl+0x703/0xc3d, CPU#1: kvm-tdx/58
[    3.806066] Modules linked in:
[    3.806395] CPU: 1 UID: 0 PID: 58 Comm: kvm-tdx Not tainted 7.3.4 #1 PREEMPTLAZY
[    3.806762] RIP: 0010:tdx_vm_ioctl+0x703/0xc3d
[    3.808517] Call Trace:
[    3.808936]  <TASK>
[    3.809999]  kvm_arch_vm_ioctl+0x70f/0x837
[    3.810000]  </TASK>
[    3.810100] ---[ end trace 0000000000000000 ]---
[    3.810200] kvm_intel: SEAMCALL TDH_MNG_CREATE failed: 0xc000010000000000
"""
#: kernel/locking/lockdep.c print_circular_bug's banner.
LOCKDEP = """\
[    3.100000] ======================================================
[    3.100001] WARNING: possible circular locking dependency detected
[    3.100002] 7.3.4 #1 Not tainted
[    3.100003] ------------------------------------------------------
[    3.100004] kvm-tdx/71 is trying to acquire lock:
"""
ATOMIC_SLEEP = "[    4.0] BUG: sleeping function called from invalid context at mm/slub.c:4190\n"
OK_BOOT = """\
[    0.265993] virt/tdx: BIOS enabled: private KeyID range [16, 32)
[    1.720000] virt/tdx: 8212 KB allocated for PAMT
[    1.720001] virt/tdx: TDX-Module initialized
VTDX-RESULT tdx_initialized=1
VTDX-RESULT pamt_kb=8212
VTDX-RESULT done=1
[    2.900000] reboot: Power down
"""


def feed(text: str, expect: tuple[str, ...] = ()) -> ConsoleLog:
    log = ConsoleLog(expect=expect)
    for line in text.splitlines():
        log.feed(line)
    return log


def test_a_warning_fails_an_otherwise_good_run() -> None:
    log = feed(OK_BOOT.replace("VTDX-RESULT done=1\n", WARN + "VTDX-RESULT done=1\n"))
    assert log.panic is None  # a WARN does not end the run
    (splat,) = log.splats
    assert splat.header.startswith("WARNING: arch/x86/kvm/vmx/tdx.c:2559 at tdx_vm_ioctl")
    assert splat.closed and splat.lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert "kvm_arch_vm_ioctl+0x70f/0x837" in splat.text
    code, why = judge(log, 8212, False, 0)
    assert code == EXIT_FAILED
    assert why == ("kernel reported a bug: WARNING: arch/x86/kvm/vmx/tdx.c:2559 at "
                   "tdx_vm_ioctl+0x703/0xc3d, CPU#1: kvm-tdx/58")


def test_an_expected_warning_does_not_fail_the_run() -> None:
    log = feed(OK_BOOT + WARN, expect=(r"tdx\.c:2559",))
    assert log.splats[0].expected and log.unexpected_splats == []
    assert judge(log, 8212, False, 0)[0] == EXIT_OK
    log = feed(OK_BOOT + WARN, expect=("some_other_function",))
    assert judge(log, 8212, False, 0)[0] == EXIT_FAILED


@pytest.mark.parametrize("text,header", [
    (LOCKDEP, "WARNING: possible circular locking dependency detected"),
    (ATOMIC_SLEEP, "BUG: sleeping function called from invalid context at mm/slub.c:4190"),
    ("[ 5.0] UBSAN: array-index-out-of-bounds in arch/x86/virt/vmx/tdx/tdx.c:600:3\n",
     "UBSAN: array-index-out-of-bounds in arch/x86/virt/vmx/tdx/tdx.c:600:3"),
])
def test_lockdep_atomic_sleep_and_ubsan_reports_fail_the_run(text: str, header: str) -> None:
    log = feed(OK_BOOT + text)
    assert [s.header for s in log.splats] == [header]
    code, why = judge(log, 8212, False, 0)
    assert (code, why) == (EXIT_FAILED, f"kernel reported a bug: {header}")


def test_two_reports_are_two_splats_and_the_first_is_named() -> None:
    splats = split_splats((WARN + LOCKDEP).splitlines())
    assert len(splats) == 2
    code, why = judge(feed(OK_BOOT + WARN + LOCKDEP), 8212, False, 0)
    assert why.endswith("(and 1 more report(s))")


def test_a_crash_is_still_a_crash() -> None:
    oops = ("[ 0.7] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
            "[ 0.7] Oops: Oops: 0002 [#1] SMP\n"
            "[ 0.71] Kernel panic - not syncing: Fatal exception\n")
    log = feed(oops)
    assert log.panic == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    assert len(log.splats) == 1  # the oops belongs to the BUG: line that explains it
    assert judge(log, None, False, None)[1].startswith("kernel crashed: BUG: kernel NULL")


# --------------------------------------------------------------------------- own initramfs


def test_own_initramfs_is_judged_by_the_kernels_tdx_lines() -> None:
    """No vtdx init (no VTDX-RESULT lines): TDX-Module initialized + PAMT decide."""
    kernel_only = "".join(ln + "\n" for ln in OK_BOOT.splitlines()
                          if "VTDX-RESULT" not in ln)
    log = feed(kernel_only)
    assert judge(log, 8212, False, 0, own_initrd=True) == (
        EXIT_OK, "TDX-Module initialized, PAMT 8212 KB matches vtdx")
    # vtdx's own initramfs would have printed done=1: without it the run is a failure.
    assert judge(log, 8212, False, 0)[0] == EXIT_FAILED
    refusal = feed("[ 0.6] virt/tdx: MOVDIR64B is required for TDX\n")
    assert judge(refusal, None, False, 0, own_initrd=True) == (
        EXIT_TDX_REFUSED, "kernel refused TDX: virt/tdx: MOVDIR64B is required for TDX")
    silent = feed("[ 0.1] Linux version 7.3.4\n")
    assert judge(silent, None, True, None, own_initrd=True) == (
        EXIT_FAILED, "timed out before the kernel printed a TDX line")


# --------------------------------------------------------------------------- --inject


def test_inject_rule_syntax() -> None:
    r = InjectRule.parse("TDX_SYS_BUSY:TDH.SYS.LP.INIT:lp=1:count=2:after=1")
    assert (r.status, r.leaf, r.lp, r.count, r.after) == (
        TDX_SYS_BUSY, Leaf.TDH_SYS_LP_INIT, 1, 2, 1)
    r = InjectRule.parse("0xC000010000000000:tdh.mng.create:count=all")
    assert (r.status, r.leaf, r.count) == (TDX_OPERAND_INVALID, Leaf.TDH_MNG_CREATE, None)
    assert InjectRule.parse("TDX_SYS_BUSY").leaf is None


@pytest.mark.parametrize("text", ["NOPE", "TDX_SYS_BUSY:TDH.NOPE", "TDX_SYS_BUSY:lp=x",
                                  "TDX_SYS_BUSY:TDH.SYS.INIT:color=red",
                                  "TDX_SYS_BUSY:TDH.SYS.INIT:count=0"])
def test_inject_rule_errors_are_one_line(text: str) -> None:
    with pytest.raises(VtdxError) as e:
        InjectRule.parse(text)
    assert str(e.value).startswith(f"--inject {text!r}: ") and "\n" not in str(e.value)


def test_inject_rule_strikes_the_call_after_n() -> None:
    """after=1: the first SYS.INIT succeeds (module ready for LP.INIT), the second fails."""
    profile = Profile.from_vm(2, 2 * GiB)
    module = TdxModule(profile, SparseMemory(profile.ram))
    InjectRule.parse("TDX_SYS_BUSY:TDH.SYS.LP.INIT:after=1").arm(module)
    assert module.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT)).rax == 0
    assert module.seamcall(0, Regs(rax=Leaf.TDH_SYS_LP_INIT)).rax == 0
    assert module.seamcall(1, Regs(rax=Leaf.TDH_SYS_LP_INIT)).rax == TDX_SYS_BUSY


def test_options_put_keep_gdb_and_kvm_on_the_command_lines(tmp_path) -> None:
    k = tmp_path / "bzImage"
    k.write_bytes(b"x")
    opts = RunOptions(kernel=k, keep=True, gdb=1234, qemu_args=("-d", "int"),
                      checks="tdx,kvm")
    opts.validate()
    assert "vtdx.keep=1" in opts.cmdline() and "kvm_intel.tdx=1" in opts.cmdline()
    assert opts.extra_qemu_args() == ["-gdb", "tcp:127.0.0.1:1234", "-d", "int"]
