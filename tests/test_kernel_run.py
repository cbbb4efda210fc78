"""``vtdx run`` pieces that need no QEMU: sizes, console parsing, verdicts, the initramfs."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from vtdx.cli import main as cli
from vtdx.errors import VtdxError
from vtdx.host import initramfs
from vtdx.platform.profile import GiB, MiB
from vtdx.session.run import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TDX_REFUSED,
    ConsoleLog,
    RunOptions,
    judge,
)
from vtdx.units import format_size, parse_size

# Console lines as Linux 7.3 (arch/x86/virt/vmx/tdx/tdx.c) prints them.
OK_BOOT = """\
[    0.265993] virt/tdx: BIOS enabled: private KeyID range [16, 32)
[    0.900000] virt/tdx: 8236 KB allocated for PAMT
[    0.900100] virt/tdx: TDX-Module initialized
VTDX-RESULT tdx_initialized=1
VTDX-RESULT pamt_kb=8236
VTDX-RESULT done=1
[    1.621955] reboot: Power down
"""
KEYID_REFUSAL = """\
[    0.265993] virt/tdx: BIOS enabled: private KeyID range [16, 17)
[    0.265999] virt/tdx: initialization failed: too few private KeyIDs available.
[    0.600000] virt/tdx: TDX not supported by the host platform
VTDX-RESULT tdx_initialized=0
VTDX-RESULT done=1
"""
MOVDIR_REFUSAL = """\
[    0.265993] virt/tdx: BIOS enabled: private KeyID range [16, 32)
[    0.600000] virt/tdx: MOVDIR64B is required for TDX
VTDX-RESULT tdx_initialized=0
VTDX-RESULT done=1
"""
OOPS = """\
[    0.700000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    0.700001] Oops: Oops: 0002 [#1] SMP
[    0.710000] Kernel panic - not syncing: Fatal exception
"""


def feed(text: str) -> ConsoleLog:
    log = ConsoleLog()
    for line in text.splitlines(keepends=True):
        log.feed(line)
    return log


@pytest.mark.parametrize("text,want", [("2G", 2 * GiB), ("6144M", 6 * GiB), ("512MiB", 512 * MiB),
                                       ("2048", 2 * GiB), ("4g", 4 * GiB),
                                       ("3072", 3 * GiB), ("1T", 1 << 40)])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "two", "2X", "-1G", "1.5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(VtdxError, match="invalid memory size"):
        parse_size(text)


def test_console_success_and_pamt_equality() -> None:
    log = feed(OK_BOOT)
    assert log.tdx_initialized and log.pamt_kb == 8236 and log.keyid_range == (16, 32)
    assert log.done and log.powered_off and log.panic is None
    assert judge(log, 8236, False, 0) == (EXIT_OK, "TDX-Module initialized, PAMT 8236 KB "
                                          "matches vtdx")
    code, why = judge(log, 8240, False, 0)
    assert code == EXIT_FAILED and "kernel allocated 8236 KB, vtdx accounts 8240 KB" in why


@pytest.mark.parametrize("text,reason", [
    (KEYID_REFUSAL, "virt/tdx: initialization failed: too few private KeyIDs available."),
    (MOVDIR_REFUSAL, "virt/tdx: MOVDIR64B is required for TDX"),
])
def test_refusal_reports_the_kernels_first_reason(text: str, reason: str) -> None:
    code, why = judge(feed(text), None, False, 0)
    assert code == EXIT_TDX_REFUSED
    assert why == f"kernel refused TDX: {reason}"
    assert "\n" not in why


def test_panic_wins_over_everything() -> None:
    log = feed(OK_BOOT.replace("VTDX-RESULT done=1\n", "") + OOPS)
    code, why = judge(log, 8236, False, None)
    assert code == EXIT_FAILED
    assert why == "kernel crashed: BUG: kernel NULL pointer dereference, address: 0000000000000008"


def test_incomplete_boot_and_timeout_fail() -> None:
    half = feed("[    0.1] Linux version 7.3.4\n")
    assert judge(half, None, True, None)[0] == EXIT_FAILED
    assert "before the guest's init finished" in judge(half, None, False, 1)[1]


def test_failed_hotplug_check_fails_the_run() -> None:
    ok = "VTDX-RESULT hotplug_offline=ok\nVTDX-RESULT hotplug_tdx_errors=0\nVTDX-RESULT done=1"
    assert judge(feed(OK_BOOT.replace("VTDX-RESULT done=1", ok)), 8236, False, 0)[0] == EXIT_OK
    log = feed(OK_BOOT.replace("VTDX-RESULT done=1", "VTDX-RESULT hotplug_online=failed\n"
                                                     "VTDX-RESULT done=1"))
    code, why = judge(log, 8236, False, 0)
    assert code == EXIT_FAILED and "hotplug_online" in why


def test_options_validate_and_profile(tmp_path: Path) -> None:
    k = tmp_path / "bzImage"
    with pytest.raises(VtdxError, match="not found"):
        RunOptions(kernel=k).validate()
    k.write_bytes(b"x")
    with pytest.raises(VtdxError, match="--smp 0"):
        RunOptions(kernel=k, smp=0).validate()
    opts = RunOptions(kernel=k, smp=4, mem=6 * GiB, tdx_keyids=1, movdir64b=False)
    opts.validate()
    prof = opts.profile()
    assert prof.num_lps == 4 and prof.ram_bytes == 6 * GiB
    assert prof.tdx_keyids == 1 and not prof.movdir64b
    assert len(prof.ram) == 2 and prof.ram[1].base == 4 * GiB  # RAM above 4 GiB
    assert "nokaslr" not in opts.cmdline() and "vtdx.checks=tdx" in opts.cmdline()
    assert RunOptions(kernel=k, append="vtdx.checks=hotplug").cmdline().count("vtdx.checks") == 1


def test_cli_bad_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = tmp_path / "bzImage"
    k.write_bytes(b"x")
    rc = cli.main(["run", "--kernel", str(k), "--mem", "lots"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().count("\n") == 0 and "invalid memory size 'lots'" in err
    rc = cli.main(["run", "--kernel", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().count("\n") == 0 and "not found" in err


def test_initramfs_is_a_valid_newc_archive(tmp_path: Path) -> None:
    if not initramfs.BUSYBOX.is_file():
        pytest.skip("busybox-static not installed")
    path = initramfs.ensure_initramfs(tmp_path)
    assert initramfs.ensure_initramfs(tmp_path) == path  # cached by content
    raw = gzip.decompress(path.read_bytes())
    assert raw.startswith(b"070701") and b"TRAILER!!!" in raw
    if shutil.which("cpio") is None:
        pytest.skip("no cpio tool to cross-check")
    listing = subprocess.run(["cpio", "-itv"], input=raw, capture_output=True, check=True)
    out = listing.stdout.decode()
    assert "crw-------" in out and "dev/console" in out
    names = out.split()
    for name in ("init", "bin/busybox", "bin/sh", "sbin/poweroff", "bin/mount"):
        assert name in names, name


def test_is_static_detects_dynamic_binaries() -> None:
    assert not initramfs._is_static(Path("/bin/sh").resolve().read_bytes())
    if initramfs.BUSYBOX.is_file():
        assert initramfs._is_static(initramfs.BUSYBOX.read_bytes())


def test_recorder_keeps_the_state_from_before_the_kernels_sys_disable() -> None:
    """Linux 7.3's syscore shutdown hook runs TDH.SYS.DISABLE at poweroff and the module
    resets; the run summary must still show what the booted kernel set up."""
    from vtdx.abi.leaves import Leaf
    from vtdx.abi.regs import Regs
    from vtdx.module import TdxModule
    from vtdx.platform.memory import SparseMemory
    from vtdx.platform.profile import Profile
    from vtdx.session.run import _Recorder

    prof = Profile.from_vm(2, 2 * GiB)
    module = TdxModule(prof, SparseMemory(prof.ram))
    stats = module.stats
    rec = _Recorder(module)
    assert rec.seamcall(0, Regs(rax=Leaf.TDH_SYS_INIT)).rax == 0
    for lp in (0, 1):
        assert rec.seamcall(lp, Regs(rax=Leaf.TDH_SYS_LP_INIT)).rax == 0
    assert rec.at_disable is None and rec.state()[0]["num_init_lps"] == 2
    assert rec.seamcall(0, Regs(rax=Leaf.TDH_SYS_DISABLE)).rax == 0
    assert module.snapshot()["num_init_lps"] == 0  # the module itself was reset ...
    snap, _ = rec.state()
    assert snap["num_init_lps"] == 2 and snap["state"] == "SYSINIT_DONE"  # ... the record not
    assert stats.per_leaf() == {Leaf.TDH_SYS_INIT: {0: 1}, Leaf.TDH_SYS_LP_INIT: {0: 1, 1: 1},
                                Leaf.TDH_SYS_DISABLE: {0: 1}}
    assert list(stats.per_leaf()) == [Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT,
                                      Leaf.TDH_SYS_DISABLE]


def test_run_command_options(tmp_path: Path) -> None:
    from vtdx.cli import run as run_cmd

    parser = cli.build_parser()
    k = tmp_path / "bzImage"
    k.write_bytes(b"x")
    (tmp_path / "vmlinux").write_bytes(b"x")

    def opts(*argv: str) -> RunOptions:
        return run_cmd.options(parser.parse_args(["run", "--cache", str(tmp_path), *argv]))

    o = opts("--kernel", str(k), "--mem", "6144M", "--smp", "4", "--profile", "one-keyid")
    assert (o.mem, o.smp, o.tdx_keyids, o.movdir64b) == (6 * GiB, 4, 1, True)
    assert o.vmlinux == tmp_path / "vmlinux"  # found next to the image
    o = opts("--kernel", str(k), "--no-movdir64b", "--tdx-keyids", "3")
    assert (o.tdx_keyids, o.movdir64b) == (3, False)
    with pytest.raises(VtdxError, match="none built"):
        opts()  # empty cache: no default kernel
    with pytest.raises(VtdxError, match="no vmlinux there"):
        other = tmp_path / "k2"
        other.mkdir()
        (other / "bzImage").write_bytes(b"x")
        opts("--kernel", str(other / "bzImage"), "--kernel-src", str(tmp_path / "nosuch"))


@pytest.mark.parametrize("n", [4096, 3 * GiB, 1536 * MiB, 12345, 1 << 40])
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n
