"""Whole stack: the Linux 7.3 TDX host kernel boots on QEMU + plugin + daemon, and a
QMPClient on vtdx's QMP socket inspects it. Answers are checked against what the kernel
printed and against the trace; the trace must name real kernel functions (KASLR on)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from tmux_util import Tmux

from vtdx.abi import status as st
from vtdx.host import kernel as kernel_build
from vtdx.observe.answers import EVENT_SEAMCALL_ERROR
from vtdx.observe.trace import read_trace
from vtdx.session.machine import KERNEL_APPEND

pytestmark = [pytest.mark.kernel, pytest.mark.stack]

APPEND = f"{KERNEL_APPEND} vtdx.checks=tdx"
#: Keep the guest up after boot (init is a long sleep): the module is inspected live, since
#: the kernel's shutdown path (TDH.SYS.DISABLE) resets it.
APPEND_HOLD = f"{KERNEL_APPEND} rdinit=/bin/sleep -- 100000"
#: Leaves init_tdx_module() issues (after the per-CPU SYS.INIT / LP.INIT).
INIT_LEAVES = {"TDH.SYS.RD", "TDH.SYS.CONFIG", "TDH.SYS.KEY.CONFIG", "TDH.SYS.TDMR.INIT"}


@pytest.fixture(scope="module")
def kernel():
    art = kernel_build.default_kernel()
    if art is None:
        pytest.skip("no kernel built (scripts/test runs `vtdx build-kernel` first)")
    from vtdx.host import initramfs

    return art, initramfs.ensure_initramfs()


def tdx_functions(art) -> set[str]:
    """Functions defined in arch/x86/virt/vmx/tdx/ of this build (from its objects, or the
    sources when the build tree is gone)."""
    key = str(art.info()["key"])
    objdir = kernel_build.cache_dir() / "build" / key / "arch/x86/virt/vmx/tdx"
    names: set[str] = set()
    objs = sorted(objdir.glob("*.o")) if objdir.is_dir() else []
    if objs and shutil.which("nm"):
        for o in objs:
            out = subprocess.run(["nm", "--defined-only", str(o)], capture_output=True,
                                 text=True, check=True).stdout
            names |= {ln.split()[2] for ln in out.splitlines()
                      if len(ln.split()) == 3 and ln.split()[1] in "tTwW"}
    else:
        src = Path(str(art.info()["path"])) / "arch/x86/virt/vmx/tdx"
        for f in src.glob("*.[cS]"):
            text = f.read_text(errors="replace")
            names |= set(re.findall(r"^\w[\w\s\*]*?\b(\w+)\(", text, re.M))
            names |= set(re.findall(r"SYM_FUNC_START\((\w+)\)", text))
    return names


def fn(symbolic: str | None) -> str:
    """``tdx_cpu_enable+0x58/0xd9`` -> ``tdx_cpu_enable`` (compiler suffixes kept)."""
    assert symbolic, "caller not resolved"
    return symbolic.split("+")[0]


def boot(kernel, body, append: str = APPEND, mem: str = "2G"):
    from vtdx.session.machine import Machine

    art, initrd = kernel

    async def main():
        m = Machine(kernel=art.bzimage, initrd=initrd, append=append, smp=2, mem=mem,
                    extra_args=["-S"])  # start paused: queries and injections before boot
        m.vmlinux = art.vmlinux
        async with m:
            qmp = QMPClient("test")
            await qmp.connect(str(m.vtdx_qmp_path))
            try:
                return await body(m, qmp)
            finally:
                await qmp.disconnect()

    return asyncio.run(asyncio.wait_for(main(), 300))


async def wait_trace(qmp: QMPClient, n: int, timeout: float = 60) -> None:
    for _ in range(int(timeout * 20)):
        if (await qmp.execute("query-vtdx-stats"))["calls"] >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} SEAMCALLs within {timeout} s")


def console(m) -> str:
    return "\n".join(m.console_lines)


async def wait_console(m, pattern: str, timeout: float = 120) -> re.Match[str]:
    for _ in range(int(timeout * 20)):
        hit = re.search(pattern, console(m))
        if hit:
            return hit
        if m.qemu is not None and m.qemu.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pattern!r} not on the console:\n{console(m)}")


def test_queries_match_the_booted_kernel(kernel):
    art, _ = kernel

    async def body(m, qmp: QMPClient):
        # Paused before the first instruction: nothing has happened yet.
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        s0 = await qmp.execute("query-vtdx-status")
        assert s0["state"] == "SYSINIT_PENDING" and s0["seamcalls"] == 0
        await qmp.execute("cont")
        # Pause mid-boot, once TDX calls flow: a stopped machine is a still snapshot.
        await wait_trace(qmp, 1)
        await qmp.execute("stop")
        a = await qmp.execute("query-vtdx-stats")
        await asyncio.sleep(0.5)
        b = await qmp.execute("query-vtdx-stats")
        assert a["calls"] == b["calls"] and (await qmp.execute("query-status"))[
            "running"] is False
        await qmp.execute("cont")
        await wait_console(m, r"virt/tdx: (\d+ KB allocated for PAMT|.*failed.*)")
        await qmp.execute("stop")
        text = console(m)

        # keyids: the kernel's "private KeyID range [a, b)" line.
        km = re.search(r"virt/tdx: BIOS enabled: private KeyID range \[(\d+), (\d+)\)", text)
        assert km, text
        status = await qmp.execute("query-vtdx-status")
        k = status["keyids"]
        assert (k["tdx-start"], k["tdx-start"] + k["tdx-count"]) == (int(km[1]), int(km[2]))
        assert status["num-init-lps"] == 2
        # PAMT: the kernel's "N KB allocated for PAMT" equals the module's TDMR accounting.
        pm = re.search(r"virt/tdx: (\d+) KB allocated for PAMT", text)
        assert pm, f"TDX init did not complete:\n{text}"
        summary = await qmp.execute("query-vtdx-pamt")
        assert summary["pamt-bytes"] // 1024 == int(pm[1])
        assert status["state"] == "SYS_READY" and k["global"] == int(km[1])
        tdmrs = await qmp.execute("query-vtdx-tdmrs")
        assert tdmrs and all(t["initialized"] for t in tdmrs)
        page = await qmp.execute("query-vtdx-pamt", {"pa": tdmrs[0]["pamt"][0]["base"]})
        assert page["reserved"] and page["levels"][2]["pt-name"] == "PT_RSVD"

        # The trace: every call, symbolised, in the file and over QMP.
        stats = await qmp.execute("query-vtdx-stats")
        m.inspect.recorder.flush()
        recs = list(read_trace(m.inspect.recorder.path))
        assert len(recs) == stats["calls"] > 0
        lp_init = [r for r in recs if r["name"] == "TDH.SYS.LP.INIT"]
        assert sorted(r["lp"] for r in lp_init) == [0, 1]
        tdx_fns = tdx_functions(art)
        for r in recs:
            assert fn(r["site"]) in ("__seamcall", "__seamcall_ret", "__seamcall_saved_ret")
            if r["name"] in INIT_LEAVES:  # init_tdx_module()'s SEAMCALLs
                assert fn(r["caller"]) in tdx_fns, r
        assert all(fn(r["caller"]) == "tdx_cpu_enable" for r in lp_init)
        assert int(recs[0]["kaslr"], 16) % 0x200000 == 0
        # The console on the same machine: pause state, queries, resume.
        r = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "vtdx", "console", str(m.run_dir), "-c",
                             "qemu; status; pamt; resume; qemu; pause"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "QEMU: paused (running=False)" in r.stdout
        assert f"PAMT {pm[1]} KB" in r.stdout and "machine running" in r.stdout
        assert "QEMU: running (running=True)" in r.stdout
        # qemu.qmp's qmp-shell, unchanged, on the same socket (a second client).
        shell = Path(sys.executable).parent / "qmp-shell"
        if shell.exists():
            term = Tmux(f"{shell} -p {m.vtdx_qmp_path}", env={"HOME": str(m.run_dir)})
            try:
                term.wait_for("(QEMU)")
                term.type(f"query-vtdx-pamt pa={tdmrs[0]['pamt'][0]['base']:#x}")
                term.send("Enter")
                screen = await asyncio.to_thread(term.wait_for, '"walk-level"')
                assert '"pt-name": "PT_RSVD"' in screen
            finally:
                term.kill()
        # A bad argument gets an error; the session goes on.
        with pytest.raises(ExecuteError):
            await qmp.execute("query-vtdx-pamt", {"pfn": "bogus"})
        assert (await qmp.execute("query-vtdx-trace", {"count": 1}))[0]["seq"] == len(recs)

    boot(kernel, body, APPEND_HOLD)


def test_injected_busy_on_lp_init_fails_the_cpu_online(kernel):
    """TDX_SYS_BUSY for CPU 1's TDH.SYS.LP.INIT: the kernel's cpuhp online callback for it
    (tdx_online_cpu -> tdx_cpu_enable) fails, the kernel prints the SEAMCALL error and gives
    up on TDX; the trace and an event show the injected call."""

    async def body(m, qmp: QMPClient):
        rule = await qmp.execute("vtdx-inject", {"status": "TDX_SYS_BUSY",
                                                 "leaf": "TDH.SYS.LP.INIT", "lp": 1,
                                                 "count": 1})
        assert rule["id"] >= 1
        listener = EventListener(EVENT_SEAMCALL_ERROR)
        with qmp.listen(listener):
            await qmp.execute("cont")
            ev = await asyncio.wait_for(listener.get(), 120)
        assert ev["data"]["injected"] and ev["data"]["lp"] == 1
        assert ev["data"]["name"] == "TDH.SYS.LP.INIT"
        assert fn(ev["data"]["caller"]) == "tdx_cpu_enable"
        assert await m.wait(240) == 0
        text = console(m)
        want = f"SEAMCALL (0x{0x23:016x}) failed: 0x{st.TDX_SYS_BUSY:016x}"
        assert want in text, text
        assert "TDX-Module initialized" not in text
        errs = await qmp.execute("query-vtdx-trace", {"errors": True})
        assert [(e["lp"], e["status-name"], e.get("injected")) for e in errs] == [
            (1, "TDX_SYS_BUSY", True)]
        assert await qmp.execute("query-vtdx-faults") == []

    boot(kernel, body)
