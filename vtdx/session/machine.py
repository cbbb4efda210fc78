"""One virtual TDX machine: QEMU + the vtdx plugin + the daemon, with shared guest RAM.

``Machine`` is an async context manager. On entry it creates a private run directory
(mode 0700) holding the guest RAM file, the daemon socket and QEMU's QMP socket, maps the
RAM, starts the daemon (in this process, or as a child process when the test must be able
to kill it) and starts QEMU with the plugin. The serial console is streamed line by line
to a callback and a queue. On exit everything is stopped and removed, whatever happened.

    async with Machine(kernel=elf, append="test=roundtrip", smp=4, extra_args=[...]) as m:
        status = await m.wait(timeout=30)
        print(m.console_text())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vtdx.errors import VtdxError
from vtdx.host.qemu import QemuRuntime
from vtdx.observe.trace import TRACE_FILE
from vtdx.platform.memory import GuestRam
from vtdx.platform.profile import Profile
from vtdx.runtime.daemon import BACKENDS, Backend, Daemon, make_backend
from vtdx.units import format_size, parse_size


def default_runtime() -> QemuRuntime:
    """The runtime ``vtdx setup`` recorded."""
    return QemuRuntime.find()


#: A TDX host is an Intel machine. TCG's "max" model reports AMD, and Linux only honours
#: IA32_FEAT_CTL (so only loads kvm_intel) on Intel, Centaur and Zhaoxin CPUs.
INTEL_CPU = "max,vendor=GenuineIntel"


class Machine:
    """QEMU + plugin + daemon for one guest run (see the module docstring)."""

    def __init__(
        self,
        kernel: str | Path,
        *,
        initrd: str | Path | None = None,
        append: str | None = None,
        smp: int = 2,
        mem: int | str = "2G",
        profile: Profile | None = None,
        backend: str | Backend | Callable[[Profile, GuestRam], Backend | None] = "module",
        extra_args: Sequence[str] = (),
        on_console: Callable[[str], None] | None = None,
        runtime: QemuRuntime | None = None,
        daemon_process: bool = False,
        reply_timeout: float = 60.0,
        plugin_options: Sequence[str] = (),
        stats: bool = False,
        cpu: str = INTEL_CPU,
        vmlinux: str | Path | None = None,
        save_trace: str | Path | None = None,
    ) -> None:
        self.kernel = Path(kernel)
        self.initrd = Path(initrd) if initrd else None
        self.append = append
        self.smp = smp
        self.mem = mem if isinstance(mem, int) else parse_size(mem)
        self.profile = profile or Profile.from_vm(smp, self.mem)
        self.backend_spec = backend
        self.extra_args = list(extra_args)
        self.on_console = on_console
        self.runtime = runtime
        self.daemon_process = daemon_process
        self.reply_timeout = reply_timeout
        self.plugin_options = list(plugin_options)
        self.stats = stats
        self.cpu = cpu
        #: vmlinux (or System.map) of the guest kernel: trace records name the calling function.
        self.vmlinux = Path(vmlinux) if vmlinux else None
        #: Copy the run's SEAMCALL trace here before the run directory is removed.
        self.save_trace = Path(save_trace) if save_trace else None
        self.run_dir: Path | None = None
        self.ram: GuestRam | None = None
        self.daemon: Daemon | None = None
        self.daemon_proc: asyncio.subprocess.Process | None = None
        self.qemu: asyncio.subprocess.Process | None = None
        self.console: asyncio.Queue[str] = asyncio.Queue()
        self.console_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers: list[asyncio.Task[None]] = []
        #: QMP inspection endpoint (vtdx.observe.qmp, issue 6) when the backend is a TDX module.
        self.inspect: Any = None

    # ---------------------------------------------------------------- paths

    def _path(self, name: str) -> Path:
        if self.run_dir is None:
            raise VtdxError("machine is not running")
        return self.run_dir / name

    @property
    def ram_path(self) -> Path:
        return self._path("ram")

    @property
    def socket_path(self) -> Path:
        return self._path("vtdx.sock")

    @property
    def qmp_path(self) -> Path:
        """QEMU's own QMP socket (for qemu.qmp's QMPClient)."""
        return self._path("qemu-qmp.sock")

    @property
    def vtdx_qmp_path(self) -> Path:
        """vtdx's own QMP socket: PAMT, TDs, S-EPT, locks, trace (``vtdx console``)."""
        from vtdx.observe.answers import QMP_SOCKET

        return self._path(QMP_SOCKET)

    @property
    def stats_path(self) -> Path:
        return self._path("plugin-stats.txt")

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Machine:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if not self.kernel.is_file():
            raise VtdxError(f"kernel {self.kernel} not found")
        rt = self.runtime or default_runtime()
        if rt.plugin_path is None:
            raise VtdxError("the vtdx TCG plugin is not built; run `vtdx setup`")
        self.run_dir = Path(tempfile.mkdtemp(prefix="vtdx-run-"))
        os.chmod(self.run_dir, 0o700)
        # QEMU opens this existing file; making it first lets the daemon map it before boot.
        with open(self.ram_path, "wb") as f:
            f.truncate(self.mem)
        self.ram = GuestRam(self.ram_path, self.profile.ram)
        await self._start_daemon()
        argv = [*rt.command(), *self.qemu_args(rt)]
        self.qemu = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **rt.env()},
            start_new_session=True)
        self._readers.append(asyncio.create_task(self._read_console(self.qemu.stdout)))
        self._readers.append(asyncio.create_task(self._read_stderr(self.qemu.stderr)))

    def qemu_args(self, rt: QemuRuntime) -> list[str]:
        """QEMU arguments after the runtime's command prefix."""
        opts = [f"sock={self.socket_path}", f"timeout={self.reply_timeout:g}",
                *self.plugin_options]
        if self.stats:  # per-call latencies, written when QEMU exits (scripts/bench)
            opts.append(f"stats={self.stats_path}")
        args = [
            "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-machine", "q35,memory-backend=ram",
            "-object", f"memory-backend-file,id=ram,size={self.mem},"
                       f"mem-path={self.ram_path},share=on",
            "-cpu", self.cpu, "-smp", str(self.smp), "-m", f"{self.mem >> 10}K",
            "-display", "none", "-vga", "none", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *rt.plugin_args(*opts),
            "-kernel", str(self.kernel),
        ]
        if self.initrd:
            args += ["-initrd", str(self.initrd)]
        if self.append is not None:
            args += ["-append", self.append]
        return args + self.extra_args

    async def _start_daemon(self) -> None:
        assert self.ram is not None
        if self.daemon_process:
            spec = self.backend_spec
            if not isinstance(spec, str) or spec not in BACKENDS:
                raise VtdxError("a daemon process needs a backend name: " + ", ".join(BACKENDS))
            self.daemon_proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vtdx.runtime.daemon", "--socket", str(self.socket_path),
                "--ram", str(self.ram_path), "--smp", str(self.smp), "--mem", format_size(self.mem),
                "--backend", spec, stdout=asyncio.subprocess.PIPE, start_new_session=True)
            assert self.daemon_proc.stdout is not None
            try:
                line = await asyncio.wait_for(self.daemon_proc.stdout.readline(), 30)
            except TimeoutError:
                line = b""
            if b"ready" not in line:
                raise VtdxError("the vtdx daemon process did not start")
            return
        spec = self.backend_spec
        if isinstance(spec, str):
            backend = make_backend(spec, self.profile, self.ram)
        elif callable(spec) and not hasattr(spec, "seamcall"):
            backend = spec(self.profile, self.ram)
        else:
            backend = spec  # type: ignore[assignment]
        self.daemon = Daemon(self.socket_path, self.profile, backend)
        await self.daemon.start()
        from vtdx.observe.qmp.endpoint import start_inspect

        self.inspect = start_inspect(backend, self._path("."), qemu_qmp=self.qmp_path,
                                     callers=self.daemon.callers,
                                     vmlinux=self.vmlinux)

    async def _read_console(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\r\n")
            self.console_lines.append(text)
            self.console.put_nowait(text)
            if self.on_console:
                self.on_console(text)

    async def _read_stderr(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            self.stderr_lines.append(line.decode(errors="replace").rstrip("\n"))

    async def wait(self, timeout: float | None = None) -> int:
        """QEMU's exit status; on timeout QEMU is killed and VtdxError raised."""
        if self.qemu is None:
            raise VtdxError("machine is not running")
        try:
            status = await asyncio.wait_for(self.qemu.wait(), timeout)
        except TimeoutError:
            await self._kill(self.qemu)
            raise VtdxError(f"QEMU did not finish within {timeout:g} s; last console lines: "
                            f"{self.console_lines[-5:]}") from None
        for t in self._readers:  # drain what QEMU wrote before it exited
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(t, 5)
        return status

    def kill_daemon(self) -> None:
        """SIGKILL the daemon process (daemon_process=True): the 'daemon died' scenario."""
        if self.daemon_proc is None:
            raise VtdxError("kill_daemon needs daemon_process=True")
        with contextlib.suppress(ProcessLookupError):
            self.daemon_proc.send_signal(signal.SIGKILL)

    def console_text(self) -> str:
        return "\n".join(self.console_lines)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop QEMU and the daemon and remove the run directory (idempotent)."""
        if self.qemu is not None:
            await self._kill(self.qemu)
        for t in self._readers:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._readers.clear()
        if self.inspect is not None:
            self.inspect.stop()
            self.inspect = None
        if self.daemon is not None:
            await self.daemon.close()
            self.daemon = None
        if self.daemon_proc is not None:
            await self._kill(self.daemon_proc)
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self.run_dir is not None:
            trace = self.run_dir / TRACE_FILE
            if self.save_trace is not None and trace.is_file():
                shutil.copyfile(trace, self.save_trace)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
