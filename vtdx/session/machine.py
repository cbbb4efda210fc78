"""One virtual TDX machine: QEMU + the vtdx plugin + the daemon, with shared guest RAM.

``Machine`` is an async context manager. On entry it creates a private run directory
(mode 0700) holding the guest RAM file, the daemon socket and QEMU's QMP socket, maps the
RAM, starts the daemon (in this process, or as a child process when the test must be able
to kill it) and starts QEMU with the plugin. The serial console is streamed line by line
to a callback and a queue. On exit everything is stopped and removed, whatever happened.

Nothing outlives its owner, even when the owner is killed without a chance to clean up:

- QEMU and a daemon child get PR_SET_PDEATHSIG(SIGKILL): the kernel kills them when the
  thread that started them dies (SIGKILL of ``vtdx run``, a pytest session killed by CI).
- A reaper (``sh``, its own session) holds the read end of a pipe only this process writes
  to; when the pipe closes (this process gone, however) it removes the run directory and the
  multi-GiB ``ram`` file in it.
- The run directory names its owner (``owner``: pid and start time); ``Machine.start`` first
  removes the run directories of owners that no longer exist (``remove_stale_runs``).
- ``on_signals`` turns SIGTERM/SIGHUP into a cancellation, so ``vtdx run`` unwinds through
  ``Machine.stop`` as it does for Ctrl-C.

    async with Machine(kernel=elf, append="test=roundtrip", smp=4, extra_args=[...]) as m:
        status = await m.wait(timeout=30)
        print(m.console_text())
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vtdx.errors import VtdxError
from vtdx.host.qemu import QemuRuntime
from vtdx.observe.answers import QMP_SOCKET
from vtdx.observe.trace import TRACE_FILE
from vtdx.platform.memory import GuestRam
from vtdx.platform.profile import Profile
from vtdx.runtime.daemon import BACKENDS, Backend, Daemon, make_backend
from vtdx.units import format_size, parse_size


def default_runtime() -> QemuRuntime:
    """The runtime ``vtdx setup`` recorded."""
    return QemuRuntime.find()


#: The kernel command line every vtdx boot starts with (``vtdx run``, the pytest harness):
#: the console on the serial port; no hibernation (the kernel refuses TDX while it is
#: possible); reboot at once on panic (QEMU runs with -no-reboot, so it exits); and
#: tsc=reliable. TCG derives every vCPU's TSC from the host's monotonic clock, so it is
#: synchronized and invariant, as on a TDX-capable host (where Linux trusts it from CPUID).
#: Without it the clocksource watchdog runs, and Linux 7.3's skew check
#: (kernel/time/clocksource.c, watchdog_check_skew) can deadlock a boot: CPU0 waits in it
#: for CPU1, which sits in the stop_machine of the clocksource switch with interrupts off,
#: and its timeout reads the jiffies clock that CPU1 no longer ticks (about 1 boot in 130 of
#: the default kernel, 2 vCPUs, QEMU 11.1 TCG).
KERNEL_APPEND = "console=ttyS0 nohibernate panic=-1 tsc=reliable"

#: Prefix of every run directory (in $TMPDIR or /tmp).
RUN_PREFIX = "vtdx-run-"
#: File in the run directory naming the process that owns it: "<pid> <start time>".
OWNER_FILE = "owner"

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child only calls it (no dlopen between fork and exec).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn for a child that must not outlive the thread that started it."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None
    when there is no such process: with the pid it names one process across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(run_dir: Path) -> bool | None:
    """True/False when the run directory names its owner, None when it does not (yet)."""
    try:
        pid_text, started = (run_dir / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return _start_time(pid) == started


def run_base(mem: int = 0) -> Path:
    """Where run directories go. Guest RAM is a MAP_SHARED file: on a disk filesystem every
    first touch of a guest page allocates a block and dirties a buffer (about 13% of QEMU's CPU
    for a default boot, measured with perf); on tmpfs it costs what anonymous RAM does. So
    /dev/shm when it has room for ``mem``; an explicit TMPDIR always wins."""
    if "TMPDIR" not in os.environ:
        shm = Path("/dev/shm")
        try:
            st = os.statvfs(shm)
            if os.access(shm, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= mem:
                return shm
        except OSError:
            pass
    return Path(tempfile.gettempdir())


def remove_stale_runs(tmp: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove run directories (this user's) whose owner process is gone; the removed ones.

    Without ``tmp``, both places a run directory may be (``run_base`` and the temp directory)
    are swept. A directory without an owner file is left alone: it is being created right
    now, or was made by a vtdx that predates the owner file.
    """
    bases = [Path(tmp)] if tmp else sorted({run_base(), Path(tempfile.gettempdir())})
    removed = []
    uid = os.getuid()
    for d in (d for base in bases for d in base.glob(RUN_PREFIX + "*")):
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != uid:
                continue
        except OSError:
            continue
        if _owner_alive(d) is False:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class Terminated(VtdxError):
    """The run was stopped by a signal (SIGTERM, SIGHUP); everything was cleaned up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; QEMU stopped, "
                         "run directory removed")


#: Signals that end a run the way Ctrl-C does: `timeout`/CI (TERM), a closed terminal (HUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def on_signals(task: asyncio.Task[object] | None = None) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGHUP cancel ``task`` (default: the current one); the list
    yielded holds the signals received, so the caller can raise ``Terminated`` after its
    cleanup ran. Outside the main thread (no signal handlers there) it does nothing."""
    loop = asyncio.get_running_loop()
    task = task or asyncio.current_task()
    got: list[int] = []

    def handle(signum: int) -> None:
        if not got and task is not None:
            task.cancel()
        got.append(signum)

    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, handle, int(sig))
            installed.append(sig)
        except (RuntimeError, ValueError):  # not the main thread
            break
    try:
        yield got
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


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
        console_input: bool = False,
        on_output: Callable[[bytes], None] | None = None,
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
        #: This process's stdin (a terminal) is the guest's ttyS0 input: ``vtdx run --shell``.
        self.console_input = console_input
        #: Raw console bytes as they arrive (a prompt has no newline yet); lines still go to
        #: ``on_console`` and the queue.
        self.on_output = on_output
        self.run_dir: Path | None = None
        self.ram: GuestRam | None = None
        self.daemon: Daemon | None = None
        self.daemon_proc: asyncio.subprocess.Process | None = None
        self.qemu: asyncio.subprocess.Process | None = None
        self.console: asyncio.Queue[str] = asyncio.Queue()
        self.console_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers: list[asyncio.Task[None]] = []
        self._reaper: subprocess.Popen[bytes] | None = None
        self._start_task: asyncio.Task[Any] | None = None
        #: Set by stop(): a start() still in progress (stop from another task) gives up.
        self._stopping = False
        #: QMP inspection endpoint (vtdx.observe.qmp) when the backend is a TDX module.
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
        """Create the run directory, start the daemon and QEMU. A ``stop()`` from another
        task meanwhile (Ctrl-C of a pytest session mid-boot) cancels this first."""
        self._start_task = asyncio.current_task()
        try:
            await self._start()
        finally:
            self._start_task = None

    async def _start(self) -> None:
        if not self.kernel.is_file():
            raise VtdxError(f"kernel {self.kernel} not found")
        rt = self.runtime or default_runtime()
        if rt.plugin_path is None:
            raise VtdxError("the vtdx TCG plugin is not built; run `vtdx setup`")
        remove_stale_runs()
        self._stopping = False
        self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=run_base(self.mem)))
        os.chmod(self.run_dir, 0o700)
        me = os.getpid()
        (self.run_dir / OWNER_FILE).write_text(f"{me} {_start_time(me)}\n")
        self._start_reaper(self.run_dir)
        self._check_ram_room(self.run_dir)
        # QEMU opens this existing file; making it first lets the daemon map it before boot.
        try:
            with open(self.ram_path, "wb") as f:
                f.truncate(self.mem)
        except OSError as e:
            raise VtdxError(f"cannot create the guest RAM file {self.ram_path} of "
                            f"{self.mem} bytes: {e.strerror}") from None
        self.ram = GuestRam(self.ram_path, self.profile.ram)
        # Listen, start QEMU, then build the backend: QEMU's start-up and the guest's early
        # boot (no SEAMCALL for a few hundred ms) overlap importing and building the module.
        await self._start_daemon()
        self._check_stopping()
        argv = [*rt.command(), *self.qemu_args(rt)]
        self.qemu = await asyncio.create_subprocess_exec(
            *argv, stdin=self.qemu_stdin(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **rt.env()},
            start_new_session=True, preexec_fn=_die_with_parent(me))
        self._readers.append(asyncio.create_task(self._read_console(self.qemu.stdout)))
        self._readers.append(asyncio.create_task(self._read_stderr(self.qemu.stderr)))
        self._attach_backend()

    def qemu_stdin(self) -> int | None:
        """QEMU's stdin (its ttyS0 input): nothing, or ours with ``console_input``."""
        return None if self.console_input else asyncio.subprocess.DEVNULL

    def _check_stopping(self) -> None:
        if self._stopping:
            raise VtdxError("the machine was stopped while it was starting")

    def _check_ram_room(self, run_dir: Path) -> None:
        """Refuse a RAM size the run directory's filesystem cannot back, in one line, instead
        of a SIGBUS in the daemon or QEMU when the guest first touches the missing page."""
        try:
            st = os.statvfs(run_dir)
        except OSError:
            return
        room = st.f_bavail * st.f_frsize
        if self.mem > room:
            raise VtdxError(f"guest RAM of {self.mem / (1 << 30):.1f} GiB does not fit in "
                            f"{run_dir.parent} ({room / (1 << 30):.1f} GiB free): use a smaller "
                            "--mem or point TMPDIR at a larger filesystem")

    def _start_reaper(self, run_dir: Path) -> None:
        """A process that removes ``run_dir`` once this one is gone, however it ended (see the
        module docstring); it learns of the end from EOF on its stdin."""
        self._reaper = subprocess.Popen(
            ["sh", "-c", 'cat >/dev/null; rm -rf -- "$1"', "vtdx-reaper", str(run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def _stop_reaper(self) -> None:
        if self._reaper is None:
            return
        with contextlib.suppress(OSError):
            assert self._reaper.stdin is not None
            self._reaper.stdin.close()
        try:
            self._reaper.wait(5)
        except subprocess.TimeoutExpired:
            self._reaper.kill()
            self._reaper.wait()
        self._reaper = None

    def failure_text(self) -> str:
        """QEMU's exit status and what it wrote to stderr: why the machine is gone."""
        rc = self.qemu.returncode if self.qemu is not None else None
        if rc is None:
            return ""
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        err = [ln for ln in self.stderr_lines if ln.strip()]
        return f"QEMU {how}" + (": " + " | ".join(err[-5:]) if err else "")

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
            # signal=off: with console input, Ctrl-C is a byte for the guest's shell, not
            # QEMU's exit.
            "-chardev", f"stdio,id=console,signal={'off' if self.console_input else 'on'}",
            "-serial", "chardev:console", "-monitor", "none",
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
                "--backend", spec, stdout=asyncio.subprocess.PIPE, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()))
            assert self.daemon_proc.stdout is not None
            try:
                line = await asyncio.wait_for(self.daemon_proc.stdout.readline(), 30)
            except TimeoutError:
                line = b""
            if b"ready" not in line:
                raise VtdxError("the vtdx daemon process did not start")
            return
        spec = self.backend_spec
        seam_module = spec != "none" if isinstance(spec, str) else spec is not None
        self.daemon = Daemon.pending(self.socket_path, self.profile, seam_module=seam_module)
        await self.daemon.start()

    def _attach_backend(self) -> None:
        """Build the backend, hand it to the listening in-process daemon and open the QMP
        endpoint on it (nothing to do for a daemon process)."""
        if self.daemon is None:
            return
        assert self.ram is not None
        spec = self.backend_spec
        if isinstance(spec, str):
            backend = make_backend(spec, self.profile, self.ram)
        elif callable(spec) and not hasattr(spec, "seamcall"):
            backend = spec(self.profile, self.ram)
        else:
            backend = spec
        self.daemon.attach(backend)
        from vtdx.observe.qmp.endpoint import start_inspect  # loads while QEMU starts

        self.inspect = start_inspect(backend, self._path("."), qemu_qmp=self.qmp_path,
                                     callers=self.daemon.callers,
                                     vmlinux=self.vmlinux)

    async def _read_console(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        buf = b""
        while chunk := await stream.read(65536):
            if self.on_output:
                self.on_output(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._console_line(line)
        if buf:
            self._console_line(buf)

    def _console_line(self, line: bytes) -> None:
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
        self._stopping = True
        starting = self._start_task
        if starting is not None and starting is not asyncio.current_task() \
                and not starting.done():
            # Let start() unwind first (asyncio kills a QEMU it was spawning), so everything
            # it made is in place below and no task of it outlives the loop.
            starting.cancel()
            await asyncio.wait({starting})
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
            try:
                if self.save_trace is not None and trace.is_file():
                    shutil.copyfile(trace, self.save_trace)
            finally:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
        self._stop_reaper()
