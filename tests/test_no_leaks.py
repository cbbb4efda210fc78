"""Nothing outlives a run: SIGTERM, SIGHUP and SIGKILL of `vtdx run` and of a pytest session
that uses the vtdx plugin leave no QEMU, no daemon and no run directory (with its ``ram``
file) behind (vtdx.session.machine: parent-death signal, reaper, signal handlers, sweep of
stale run directories).

`vtdx run` boots the freestanding test guest (vtdx.testing.testguest) in a loop of SEAMCALLs
that outlasts the test, so QEMU is certainly running when the signal arrives. The pytest
session boots the default kernel (its tests are also marked ``kernel``).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ctrl_c import sigint_default

from vtdx.session.machine import OWNER_FILE, RUN_PREFIX, remove_stale_runs
from vtdx.testing import testguest

REPO = Path(__file__).resolve().parent.parent


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1"}


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, argv) of live processes whose command line contains ``text``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in argv and state != "Z":
            out.append((int(d.name), argv))
    return out


def _assert_clean(tmp: Path, run_dir: Path, timeout: float = 10.0) -> None:
    """Within ``timeout`` (the reaper and the parent-death signal act asynchronously):
    no process refers to the run directory and nothing is left in TMPDIR."""
    deadline = time.monotonic() + timeout
    while True:
        procs = _processes_mentioning(str(run_dir))
        left = list(tmp.glob(RUN_PREFIX + "*"))
        if not procs and not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leftovers: processes {procs}, run directories {left}")
        time.sleep(0.1)


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines of the child's stdout up to and including the first one containing marker."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        chunk = os.read(fd, 65536) if ready else b""
        if chunk:
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [d.decode(errors="replace") for d in done]
            if any(marker in ln for ln in lines):
                return lines
        elif ready or proc.poll() is not None:
            break
    raise AssertionError(f"{marker!r} not seen (rc={proc.poll()}); output:\n" + "\n".join(lines))


def _run_dir_of(lines: list[str]) -> Path:
    for ln in lines:
        if ln.startswith("vtdx: run directory "):
            return Path(ln.split("vtdx: run directory ", 1)[1].strip())
    raise AssertionError("vtdx run printed no run directory:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- unit


def test_stale_run_directories_of_dead_owners_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{RUN_PREFIX}dead"
    dead.mkdir()
    (dead / "ram").write_bytes(b"\0" * 4096)
    # pid 1's start time is not 0: an owner that is gone (or a reused pid) reads as dead.
    (dead / OWNER_FILE).write_text("1 0\n")
    live = tmp_path / f"{RUN_PREFIX}live"
    live.mkdir()
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / OWNER_FILE).write_text(f"{os.getpid()} {start}\n")
    unnamed = tmp_path / f"{RUN_PREFIX}being-created"
    unnamed.mkdir()
    assert remove_stale_runs(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and unnamed.is_dir()


# --------------------------------------------------------------------------- vtdx run


def _start_vtdx_run(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    elf = testguest.build()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtdx", "run", "--kernel", str(elf), "--smp", "1",
         "--mem", "256M", "--timeout", "120", "--append", "test=roundtrip iters=100000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp),
        start_new_session=True)
    lines = _read_until(proc, "TG BOOT", timeout=60)  # QEMU runs the guest now
    run_dir = _run_dir_of(lines)
    assert (run_dir / "ram").is_file()
    assert _processes_mentioning(str(run_dir)), "QEMU is not running"
    return proc, run_dir


@pytest.mark.stack
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["TERM", "HUP", "KILL"])
def test_vtdx_run_killed_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    proc, run_dir = _start_vtdx_run(tmp_path)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"vtdx: error: stopped by {sig.name}; QEMU stopped, run directory removed")
    _assert_clean(tmp_path, run_dir)


# --------------------------------------------------------------------------- pytest session

_SESSION_TEST = textwrap.dedent("""
    import time

    def test_hold_machine(vtdx_vm):
        print("VTDX-UP", vtdx_vm.machine.run_dir, flush=True)
        time.sleep(600)
""")


def _start_pytest(tmp: Path) -> subprocess.Popen[str]:
    from vtdx.host import kernel as kernel_build

    if kernel_build.default_kernel() is None:
        pytest.skip("no default kernel built (vtdx build-kernel)")
    (tmp / "suite").mkdir()
    (tmp / "suite" / "test_hold.py").write_text(_SESSION_TEST)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest",
         "-p", "no:cacheprovider", "-s", "-q", "--vtdx-kernel=default",
         str(tmp / "suite" / "test_hold.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp),
        cwd=tmp, start_new_session=True, preexec_fn=sigint_default)


@pytest.mark.stack
@pytest.mark.kernel
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["TERM", "HUP", "KILL"])
def test_pytest_session_killed_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start_pytest(tmp_path)
    try:
        lines = _read_until(proc, "VTDX-UP", timeout=240)
        run_dir = Path(next(ln for ln in lines if "VTDX-UP" in ln).split()[-1])
        assert (run_dir / "ram").is_file()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 2, out  # pytest: interrupted
        assert "KeyboardInterrupt" in out and "Exception in thread" not in out
    _assert_clean(tmp_path, run_dir)


@pytest.mark.stack
@pytest.mark.kernel
@pytest.mark.parametrize("delay", [0.0, 1.0], ids=["while-starting", "while-booting"])
def test_pytest_ctrl_c_mid_boot_is_clean(tmp_path: Path, delay: float) -> None:
    """Ctrl-C (SIGINT to pytest) while the machine starts (run directory just made: daemon
    and QEMU being started) or while the kernel boots: pytest's own interrupted summary,
    no thread or asyncio noise, nothing left behind."""
    proc = _start_pytest(tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not any((d / "ram").is_file() for d in tmp_path.glob(RUN_PREFIX + "*")):
            assert time.monotonic() < deadline and proc.poll() is None, "no machine started"
            time.sleep(0.01)
        run_dir = next(tmp_path.glob(RUN_PREFIX + "*"))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, out
    assert "KeyboardInterrupt" in out
    for noise in ("Exception in thread", "Task was destroyed", "Exception ignored",
                  "RuntimeError", "ResourceWarning"):
        assert noise not in out, out
    _assert_clean(tmp_path, run_dir)


# --------------------------------------------------------------------------- vtdx daemon


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["TERM", "HUP", "INT"])
def test_vtdx_daemon_stops_cleanly_on_signals(tmp_path: Path, sig: signal.Signals) -> None:
    """The standalone daemon (for a QEMU started by hand) ends on TERM/HUP/INT: exit 0,
    its socket removed, no traceback."""
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(256 << 20)
    sock = tmp_path / "vtdx.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vtdx", "daemon", "--socket", str(sock),
                             "--ram", str(ram), "--smp", "1", "--mem", "256M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True)
    try:
        _read_until(proc, "ready", timeout=60)
        assert sock.exists()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not sock.exists()


@pytest.mark.stack
def test_next_start_sweeps_run_directories_of_dead_owners(tmp_path: Path) -> None:
    """A run whose reaper was killed too (kill of the whole session) leaves its directory;
    the next machine start removes it, and leaves a live owner's alone."""
    stale = tmp_path / f"{RUN_PREFIX}stale"
    stale.mkdir()
    with open(stale / "ram", "wb") as f:
        f.truncate(1 << 30)
    (stale / OWNER_FILE).write_text("1 0\n")  # pid 1 did not start at tick 0: gone
    live = tmp_path / f"{RUN_PREFIX}live"
    live.mkdir()
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / OWNER_FILE).write_text(f"{os.getpid()} {start}\n")
    r = subprocess.run([sys.executable, "-m", "vtdx", "run", "--kernel", str(testguest.build()),
                        "--smp", "1", "--mem", "256M", "--timeout", "60", "--append",
                        "test=roundtrip iters=1",
                        # the guest's last `out` to this device ends QEMU (testguest)
                        *(f"--qemu-arg={a}" for a in testguest.EXIT_DEVICE)],
                       capture_output=True, text=True,
                       env=_env(tmp_path), timeout=120)
    assert "Traceback" not in r.stderr
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.glob(RUN_PREFIX + "*")) == [live.name]
