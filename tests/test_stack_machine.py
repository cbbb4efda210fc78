"""``vtdx.session.machine.Machine``: private run directory, QEMU's QMP socket, cleanup.

Real QEMU + plugin + daemon with the freestanding test guest (a long roundtrip run that
the test stops through QEMU's own QMP socket, as an inspection client would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

import pytest
from qemu.qmp import QMPClient, QMPError

from vtdx.errors import VtdxError
from vtdx.host.qemu import QemuRuntime
from vtdx.session.machine import Machine
from vtdx.testing import testguest
from vtdx.units import parse_size

pytestmark = pytest.mark.stack



def test_parse_size() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("4G") == 4 << 30
    assert parse_size("2048") == 2 << 30  # a bare number is MiB, as QEMU's -m reads it
    with pytest.raises(VtdxError):
        parse_size("lots")


def test_machine_run_dir_qmp_and_cleanup(runtime: QemuRuntime) -> None:
    elf = testguest.build()
    seen: list[str] = []

    async def run() -> tuple[Path, int, int]:
        async with Machine(elf, append="smp=2 test=roundtrip iters=100000000", smp=2,
                           mem="256M", backend="echo", runtime=runtime, on_console=seen.append,
                           extra_args=list(testguest.EXIT_DEVICE)) as m:
            run_dir = m.run_dir
            assert run_dir is not None
            assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
            assert m.ram_path.stat().st_size == 256 << 20
            while not (await asyncio.wait_for(m.console.get(), 30)).startswith("TG BOOT"):
                pass
            for _ in range(100):  # SEAMCALLs are flowing
                if sum(m.daemon.calls) > 0:
                    break
                await asyncio.sleep(0.05)
            qmp = QMPClient("vtdx-test")
            for _ in range(50):  # QEMU's QMP serves one client at a time; others may poll it
                try:
                    await qmp.connect(str(m.qmp_path))
                    break
                except (EOFError, OSError, QMPError):
                    await asyncio.sleep(0.1)
            status = await qmp.execute("query-status")
            assert status["status"] == "running"
            await qmp.execute("quit")
            with contextlib.suppress(EOFError, QMPError):  # QEMU hangs up as it quits
                await qmp.disconnect()
            rc = await m.wait(20)
            return run_dir, rc, sum(m.daemon.calls)

    run_dir, rc, calls = asyncio.run(run())
    assert calls > 0
    assert rc == 0  # quit through QMP, not the guest's debug exit
    assert seen and seen[0].startswith("TG BOOT")
    assert not run_dir.exists()


def test_missing_kernel_is_one_readable_error(runtime: QemuRuntime, tmp_path: Path) -> None:
    async def run() -> None:
        async with Machine(tmp_path / "nope", runtime=runtime):
            pass

    with pytest.raises(VtdxError, match="not found"):
        asyncio.run(run())
