"""Whole stack: a machine you can work in. `vtdx run --shell` (typed into through tmux),
`--keep` with the README's live-inspection commands from another terminal, `--gdb`,
`--qemu-arg`, a user's own --initrd, and QEMU's own error under pytest."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ctrl_c import sigint_default
from tmux_util import Tmux

from vtdx.host import kernel as kernel_build
from vtdx.host.initramfs import BUSYBOX, Cpio
from vtdx.observe.trace import read_trace

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
VTDX = f"{sys.executable} -m vtdx"

needs_kernel = pytest.mark.skipif(kernel_build.default_kernel() is None,
                                  reason="no default kernel (vtdx build-kernel)")
pytestmark = [pytest.mark.stack]


def vtdx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtdx", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _scrollback(t: Tmux) -> str:
    return subprocess.run([*t.tmux, "capture-pane", "-p", "-J", "-S", "-5000", "-t", t.name],
                          capture_output=True, text=True, check=True).stdout


def _run_dir(screen: str) -> Path:
    m = re.search(r"^vtdx: run directory (\S+)", screen, re.M)
    assert m, screen
    return Path(m[1])


@pytest.mark.kernel
@needs_kernel
def test_shell_in_the_guest_and_live_inspection_from_another_terminal(tmp_path: Path) -> None:
    (tmp_path / "note.txt").write_text("brought from the host\n")
    tools = tmp_path / "tools"
    (tools / "sub").mkdir(parents=True)
    (tools / "sub" / "hello.sh").write_text("#!/bin/sh\necho hello-from-tools\n")
    put = f"--put {tmp_path / 'note.txt'} --put {tools}=/opt/tools"
    t = Tmux(f"cd {tmp_path} && {VTDX} run --shell {put}; echo VTDX-EXIT=$?; sleep 300",
             env={"PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    try:
        t.wait_for("vtdx# ", timeout=240)
        run_dir = _run_dir(_scrollback(t))
        # Keyboard input reaches the guest's shell; its answer comes back (the typed line
        # itself does not contain the answers).
        t.type("echo tdx_lines=$(dmesg | grep -c 'TDX-Module initialized') answer=$((6*7))")
        t.send("Enter")
        t.wait_for("tdx_lines=1 answer=42", timeout=30)
        # --put: a file and a directory tree from the host are in the guest.
        t.type("cat /root/note.txt; /opt/tools/sub/hello.sh")
        t.send("Enter")
        t.wait_for("hello-from-tools", timeout=30)
        assert "brought from the host" in t.screen()
        # Ctrl-C interrupts the guest's command, not the machine.
        t.type("sleep 1000")
        t.send("Enter")
        time.sleep(1.0)
        t.send("C-c")
        t.type("echo still=up")
        t.send("Enter")
        t.wait_for("still=up", timeout=30)
        # The README's live-inspection commands, from another terminal, while it runs.
        r = vtdx("console", str(run_dir), "-c", "status; tdmrs")
        assert r.returncode == 0 and "SYS_READY" in r.stdout, r.stderr
        r = vtdx("trace", str(run_dir), "--leaf", "TDH.SYS.LP.INIT", "--lp", "1")
        assert r.returncode == 0 and " lp1 TDH.SYS.LP.INIT -> TDX_SUCCESS" in r.stdout
        t.type("exit")
        t.send("Enter")
        t.wait_for("VTDX-EXIT=", timeout=60)
        screen = _scrollback(t)
        assert "vtdx run: PASS: TDX-Module initialized" in screen
        assert "VTDX-EXIT=0" in screen
        assert not run_dir.exists()
    finally:
        t.kill()


@pytest.mark.kernel
@needs_kernel
def test_closing_the_terminal_of_a_shell_leaves_nothing(tmp_path: Path) -> None:
    """tmux kill-session hangs the terminal up (SIGHUP): QEMU and the run directory go."""
    t = Tmux(f"cd {tmp_path} && {VTDX} run --shell",
             env={"PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    try:
        t.wait_for("vtdx# ", timeout=240)
        run_dir = _run_dir(_scrollback(t))
        assert (run_dir / "ram").is_file()
    finally:
        t.kill()
    deadline = time.monotonic() + 20
    while run_dir.exists() or _qemu_of(run_dir):
        assert time.monotonic() < deadline, (list(tmp_path.iterdir()), _qemu_of(run_dir))
        time.sleep(0.1)


def _qemu_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run directory."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(run_dir).encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


@pytest.mark.kernel
@needs_kernel
def test_keep_stays_up_until_stopped_and_gdb_stub_answers(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = tmp_path / "saved-trace.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "vtdx", "run", "--keep", "--gdb", str(port),
                             "--quiet", "--save-trace", str(saved)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TMPDIR": str(tmp_path)}, preexec_fn=sigint_default)
    follow = None
    try:
        assert proc.stdout is not None
        lines = []
        while not any("machine kept up (--keep)" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines) + (proc.stderr.read() if proc.stderr else "")
            lines.append(line)
        text = "".join(lines)
        run_dir = _run_dir(text)
        assert f"vtdx: gdb stub on 127.0.0.1:{port}" in text
        time.sleep(2.0)
        assert proc.poll() is None and (run_dir / "ram").is_file()  # still up
        # GDB remote protocol: "?" asks why the target stopped; any stop reply will do.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as g:
            g.sendall(b"$?#3f")
            reply = b""
            while b"#" not in reply:
                reply += g.recv(4096)
            assert reply.startswith(b"+$") and reply[2:3] in b"STW", reply
            g.sendall(b"+$D#44")  # detach: the guest continues
        r = vtdx("console", str(run_dir), "-c", "status")
        assert r.returncode == 0 and "SYS_READY" in r.stdout
        # `vtdx trace -f` on the live run: everything so far, then the end of the run.
        follow = subprocess.Popen([sys.executable, "-m", "vtdx", "trace", str(run_dir), "-f",
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV)
        assert follow.stdout is not None
        first = follow.stdout.readline()  # the follower is attached
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        rest = follow.stdout.read()  # same buffered reader as the first line: nothing lost
        follow.wait(30)
        follow_err = follow.stderr.read() if follow.stderr else ""
        followed = first + rest
    finally:
        for p in (proc, follow):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 0, err
    assert "vtdx run: PASS: TDX-Module initialized" in out
    assert not run_dir.exists()
    # The follower ended with the run (exit 0) and missed no call, the last one included.
    assert follow.returncode == 0, follow_err
    seqs = [json.loads(ln)["seq"] for ln in followed.splitlines()]
    want = [rec["seq"] for rec in read_trace(saved)]  # the file's header line is no call
    assert seqs == want and len(want) > 500


def test_qemu_arg_reaches_qemu_and_its_error_is_the_verdict(tmp_path: Path) -> None:
    """A bad --qemu-arg: QEMU's own message, in one line, exit 1."""
    from vtdx.testing import testguest

    r = vtdx("run", "--kernel", str(testguest.build()), "--mem", "256M",
             "--qemu-arg=-no-such-option")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vtdx run: QEMU exited with status 1 before the guest's init")
    assert "-no-such-option" in last and "invalid option" in last


def _own_initramfs(path: Path) -> Path:
    """A user's initramfs: busybox, an init that prints nothing of vtdx's and powers off."""
    arc = Cpio()
    for d in ("bin", "dev", "proc"):
        arc.dir(d)
    arc.chardev("dev/console", 5, 1)
    arc.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    arc.symlink("bin/sh", "busybox")
    arc.file("init", b"#!/bin/sh\n/bin/busybox echo my own init\n"
                     b"/bin/busybox sleep 1000\n", 0o755)
    path.write_bytes(gzip.compress(arc.to_bytes()))
    return path


@pytest.mark.kernel
@needs_kernel
def test_own_initrd_is_judged_by_the_kernels_tdx_lines(tmp_path: Path) -> None:
    if not BUSYBOX.is_file():
        pytest.skip("needs busybox-static")
    rd = _own_initramfs(tmp_path / "mine.cpio.gz")
    r = vtdx("run", "--initrd", str(rd), "--timeout", "200", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "vtdx run: PASS: TDX-Module initialized, PAMT" in r.stdout


GARBAGE_SUITE = textwrap.dedent("""
    def test_boot(vtdx_vm):
        pass
""")


def test_garbage_kernel_under_pytest_shows_qemus_error(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(os.urandom(300_000))
    (tmp_path / "test_g.py").write_text(GARBAGE_SUITE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        f"--vtdx-kernel={kernel}", str(tmp_path / "test_g.py")],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert "VtdxError: QEMU exited with status 1: qemu" in out, out[-3000:]
    assert "reset by peer" not in out and "Connection refused" not in out
