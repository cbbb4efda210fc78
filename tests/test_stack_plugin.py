"""Whole stack: real QEMU + the vtdx plugin + the daemon + the freestanding test guest.

The guest (guest/testguest) checks every SEAMCALL result itself and reports per CPU; these
tests boot it through ``vtdx.session.machine.Machine`` with the echo backend (its contract is in
vtdx.runtime.daemon.EchoBackend) and check the reports, the fault vectors/RIPs against the guest
image, and what QEMU prints. Each run takes well under a second of guest time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vtdx.host.qemu import QemuRuntime
from vtdx.session.machine import Machine
from vtdx.testing import testguest

pytestmark = pytest.mark.stack

SEAMCALL = bytes.fromhex("660f01cf")



@pytest.fixture(scope="module")
def elf() -> Path:
    return testguest.build()


def _seamcall_at_or_after(elf: Path, symbol: str) -> int:
    """Address of the first SEAMCALL instruction at or after ``symbol`` in the guest image."""
    with elf.open("rb") as f:
        e = ELFFile(f)
        (sym,) = e.get_section_by_name(".symtab").get_symbol_by_name(symbol)
        addr = sym["st_value"]
        for seg in e.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + \
                    seg["p_filesz"]:
                data = seg.data()[addr - seg["p_vaddr"]:][:64]
                return addr + data.index(SEAMCALL)
    raise AssertionError(f"{symbol} not in a loaded segment")


def _boot(runtime: QemuRuntime, elf: Path, append: str, *, smp: int, mem: str = "256M",
          backend: str = "echo", timeout: float = 60) -> tuple[testguest.TgResult, int, Machine]:
    async def run() -> tuple[testguest.TgResult, int, Machine]:
        async with Machine(elf, append=f"smp={smp} {append}", smp=smp, mem=mem,
                           backend=backend, runtime=runtime, extra_args=testguest.EXIT_DEVICE) as m:
            status = await m.wait(timeout)
            return testguest.parse_output(m.console_text()), status, m
    return asyncio.run(run())


def test_registers_round_trip_on_4_vcpus_at_once(runtime: QemuRuntime, elf: Path) -> None:
    res, status, m = _boot(runtime, elf, "test=roundtrip iters=2000", smp=4)
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    per_cpu = res.results("roundtrip")
    assert sorted(per_cpu) == [0, 1, 2, 3]
    for cpu, line in per_cpu.items():
        assert (line.num("ok"), line.num("fail")) == (2000, 0), (cpu, line)
    assert not res.exceptions()
    assert not m.stderr_lines


def test_memory_shared_both_ways_below_and_above_4g(runtime: QemuRuntime, elf: Path) -> None:
    # 4 GiB of RAM on q35: 2 GiB below the PCI hole, 2 GiB from 4 GiB up.
    addrs = "0x1234000,0x7fff0000,0x100002000,0x17fff0000"
    res, status, m = _boot(runtime, elf, f"test=memory addrs={addrs}", smp=4, mem="4G")
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    for cpu, line in res.results("memory").items():
        assert (line.num("ok"), line.num("fail")) == (4, 0), (cpu, line)
    assert len(res.results("memory")) == 4


def test_memory_outside_ram_is_a_status_not_a_crash(runtime: QemuRuntime, elf: Path) -> None:
    # 0xC0000000 is in the q35 PCI hole (no RAM): the backend answers a TDX status code.
    res, status, m = _boot(runtime, elf, "test=memory addrs=0xc0000000", smp=1, mem="4G")
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    (line,) = res.results("memory").values()
    assert (line.num("ok"), line.num("fail")) == (0, 1)


def test_seamcall_from_ring3_raises_gp0_at_its_rip(runtime: QemuRuntime, elf: Path) -> None:
    res, status, m = _boot(runtime, elf, "test=ring3", smp=2)
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    rip = _seamcall_at_or_after(elf, "user_seamcall")
    for cpu, line in res.results("ring3").items():
        assert (line.num("ok"), line.num("vec"), line.num("err")) == (1, 13, 0), (cpu, line)
        assert line.num("rip") == rip


def test_seamcall_outside_vmx_operation_raises_ud(runtime: QemuRuntime, elf: Path) -> None:
    res, status, m = _boot(runtime, elf, "test=novmx", smp=2)
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    rip = _seamcall_at_or_after(elf, "seamcall_insn")
    for cpu, line in res.results("novmx").items():
        assert (line.num("ok"), line.num("vec")) == (1, 6), (cpu, line)
        assert line.num("rip") == rip


def test_no_module_gives_vmfailinvalid(runtime: QemuRuntime, elf: Path) -> None:
    res, status, m = _boot(runtime, elf, "test=nomodule", smp=2, backend="none")
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    for cpu, line in res.results("nomodule").items():
        # the very first SEAMCALL fails with CF=1, ZF=0, RAX untouched
        assert (line.num("ok"), line.num("fail"), line.num("cf"), line.num("zf")) == \
            (0, 0, 1, 0), (cpu, line)
        assert line.num("rax") == 0xE000


def test_killed_daemon_fails_next_seamcall_and_names_cause(runtime: QemuRuntime,
                                                           elf: Path) -> None:
    async def run() -> tuple[testguest.TgResult, int, list[str], float]:
        async with Machine(elf, append="smp=2 test=nomodule", smp=2, mem="256M",
                           backend="echo", runtime=runtime, daemon_process=True,
                           extra_args=testguest.EXIT_DEVICE) as m:
            while not (await asyncio.wait_for(m.console.get(), 30)).startswith("TG BOOT"):
                pass
            await asyncio.sleep(0.2)  # SEAMCALLs are succeeding now
            t0 = time.monotonic()
            m.kill_daemon()
            status = await m.wait(20)
            return (testguest.parse_output(m.console_text()), status, m.stderr_lines,
                    time.monotonic() - t0)

    res, status, stderr, seconds = asyncio.run(run())
    assert status == testguest.EXIT_STATUS_DONE and res.done
    assert seconds < 10
    for cpu, line in res.results("nomodule").items():
        assert line.num("ok") > 0, (cpu, line)  # calls went through before the kill
        assert (line.num("fail"), line.num("cf"), line.num("zf")) == (0, 1, 0), (cpu, line)
    lost = [ln for ln in stderr if "daemon connection lost" in ln]
    assert len(lost) == 1, stderr
    assert "VMfailInvalid" in lost[0]


class _Hung:
    """A backend that never answers until released: a wedged daemon."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def seamcall(self, lp: int, regs: object) -> object:
        self.release.wait(60)
        return regs


def test_hung_daemon_times_out_to_vmfailinvalid(runtime: QemuRuntime, elf: Path) -> None:
    hung = _Hung()

    async def run() -> tuple[testguest.TgResult, int, list[str], float]:
        t0 = time.monotonic()
        async with Machine(elf, append="smp=2 test=nomodule", smp=2, mem="256M",
                           backend=hung, runtime=runtime, reply_timeout=1.0,
                           extra_args=testguest.EXIT_DEVICE) as m:
            try:
                status = await m.wait(30)
            finally:
                hung.release.set()
            return (testguest.parse_output(m.console_text()), status, m.stderr_lines,
                    time.monotonic() - t0)

    res, status, stderr, seconds = asyncio.run(run())
    assert status == testguest.EXIT_STATUS_DONE and res.done
    assert seconds < 15
    for cpu, line in res.results("nomodule").items():
        assert (line.num("ok"), line.num("fail"), line.num("cf")) == (0, 0, 1), (cpu, line)
    lost = [ln for ln in stderr if "daemon connection lost" in ln]
    assert len(lost) == 1 and "no reply within the timeout" in lost[0], stderr


def _guest_has(test: str) -> bool:
    return f'"{test}"' in (testguest.SOURCE_DIR / "main.c").read_text()


def test_vmxon_vmxoff_checks(runtime: QemuRuntime, elf: Path) -> None:
    """VMXON twice / bad revision / misaligned -> VMfailInvalid; VMXOFF -> VMsucceed, then
    VMXOFF and SEAMCALL outside VMX operation -> #UD, also at an already converted site."""
    if not _guest_has("vmxcheck"):
        pytest.skip("the test guest has no vmxcheck test yet")
    res, status, m = _boot(runtime, elf, "test=roundtrip,vmxcheck,roundtrip iters=200", smp=4)
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    assert len(res.results("vmxcheck")) == 4
    for cpu, line in res.results("vmxcheck").items():
        assert line.num("fail") == 0 and line.num("ok") > 0, (cpu, line)
    assert not res.exceptions()


def test_movdir64b_emulated(runtime: QemuRuntime, elf: Path) -> None:
    """64 bytes stored exactly; a destination not 64-byte aligned raises #GP(0)."""
    if not _guest_has("movdir64b"):
        pytest.skip("the test guest has no movdir64b test yet")
    res, status, m = _boot(runtime, elf, "test=movdir64b", smp=2)
    assert status == testguest.EXIT_STATUS_DONE and res.done, m.console_lines
    for cpu, line in res.results("movdir64b").items():
        assert line.num("fail") == 0 and line.num("ok") > 0, (cpu, line)
