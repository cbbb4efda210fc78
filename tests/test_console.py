"""``vtdx console``: -c mode as a subprocess and an interactive session in tmux, both
against a live QMP endpoint over a module brought up the Linux way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_qmp_inspect import booted  # noqa: F401  (fixture)
from tmux_util import Tmux

from vtdx.observe.console.format import table


def vtdx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtdx", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_table_layout():
    assert table(["a", "bb"], [[1, "x"], ["long", 2]]).splitlines() == [
        "a     bb", "----  --", "1     x", "long  2"]


def test_console_c_runs_queries(booted):  # noqa: F811
    ep, host, boot = booted
    run_dir = str(ep.run_dir)
    r = vtdx("console", run_dir, "-c", "status; pamt 0x1b090c; pamt; tdmrs; stats")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "module:     SYS_READY, 2/2 LPs initialized" in out
    assert f"global {boot.global_keyid}" in out
    assert "pfn 0x1b090c (PA 0x1b090c000): TDMR 1, initialized" in out
    assert f"PAMT {boot.pamt_kb} KB" in out  # summary header, same number the kernel prints
    for t in boot.tdmrs:
        assert f"{t.base:#x}" in out
    assert f"{len(boot.calls)} SEAMCALLs, 0 failed" in out

    r = vtdx("console", run_dir, "-c",
             "inject TDX_SYS_BUSY --leaf TDH.SYS.LP.INIT --count 2 --lp 1; faults; clear; "
             "faults; trace -n 2 --leaf sys.lp.init; pamt --pa 0x1000 -n 2; tds; locks")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rule 1: inject TDX_SYS_BUSY" in out
    assert "TDX_SYS_BUSY  TDH.SYS.LP.INIT  2" in out
    assert "removed 1 rule(s)" in out and "no fault rules" in out
    assert "lp0 TDH.SYS.LP.INIT -> TDX_SUCCESS" in out
    assert "lp1 TDH.SYS.LP.INIT -> TDX_SUCCESS" in out
    assert "0x1  0" in out and "0x2  0" in out  # pfns 1 and 2 in TDMR 0
    assert "no TDs" in out


def test_console_c_reports_errors(booted):  # noqa: F811
    ep, host, boot = booted
    r = vtdx("console", str(ep.run_dir), "-c", "pamt 0x7fffffffff; nope; pamt zz; status")
    assert r.returncode == 1
    assert "error: page 0x7fffffffff" in r.stdout
    assert "error: unknown command 'nope'" in r.stdout
    assert "not a number: 'zz'" in r.stdout
    assert "SYS_READY" in r.stdout  # later commands still ran
    r = vtdx("console", str(ep.run_dir / "nowhere"), "-c", "status")
    assert r.returncode == 1 and "no vtdx QMP socket" in r.stderr


def test_console_interactive_in_tmux(booted, tmp_path: Path):  # noqa: F811
    ep, host, boot = booted
    cache = tmp_path / "cache"
    term = Tmux(f"{sys.executable} -m vtdx console {ep.run_dir}",
                env={"VTDX_CACHE": str(cache)})
    try:
        term.wait_for("vtdx console on")
        term.wait_for("vtdx> ")
        term.type("pam")
        term.send("Tab")  # completes the command name
        term.type("0x1b090c")
        term.send("Enter")
        screen = term.wait_for("walk stops at 4K")
        assert "pamt 0x1b090c" in screen
        term.wait_for_prompt("vtdx> ")
        term.type("trace -n 1 --leaf TDH.SYS.TD")
        term.send("Tab")  # completes a leaf name
        term.send("Enter")
        term.wait_for("TDH.SYS.TDMR.INIT -> TDX_SUCCESS")
        term.wait_for_prompt("vtdx> ")
        # An injected failure shows up as an event while the console waits for input.
        term.type("inject TDX_SYS_BUSY --leaf sys.lp.init --count 1")
        term.send("Enter")
        term.wait_for("rule 1:")
        try:
            host.call(1, 35)
        except Exception:
            pass
        term.wait_for("! lp1 TDH.SYS.LP.INIT -> TDX_SYS_BUSY [injected]")
        term.send("Up")  # history: the previous line comes back
        term.wait_for("vtdx> inject TDX_SYS_BUSY --leaf sys.lp.init --count 1")
        term.send("C-u")
        term.type("pamt -h")
        term.send("Enter")
        term.wait_for("usage: pamt")
        term.wait_for_prompt("vtdx> ")  # readline reads again: Ctrl-D now means end of input
        term.send("C-d")
        term.wait_gone()
        assert (cache / "console_history").read_text().count("pamt 0x1b090c") == 1
    finally:
        term.kill()


def stale_run_dir(tmp_path: Path) -> Path:
    """A run directory whose machine died: the socket file is left, nobody listens."""
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "vtdx-qmp.sock"))
    s.close()
    return run_dir


def test_console_on_a_dead_machine_is_one_line(tmp_path: Path):
    run_dir = stale_run_dir(tmp_path)
    for args in (["-c", "status"], []):  # scripted, then interactive (stdin not a tty)
        r = subprocess.run([sys.executable, "-m", "vtdx", "console", str(run_dir), *args],
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr == (f"vtdx: error: vtdx QMP socket {run_dir}/vtdx-qmp.sock: "
                            "Connection refused\n"), args
        assert r.stdout == ""


def test_console_when_the_machine_stops_and_on_ctrl_c(tmp_path: Path):
    """The endpoint goes away under an interactive console: it says so at once, commands
    answer one error line; Ctrl-C then leaves at once (no waiting for Enter), rc 130."""
    from test_qmp_protocol import toy_commands

    from vtdx.observe.qmp.server import QmpServer
    from vtdx.observe.qmp.thread import QmpServerThread

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = QmpServerThread(QmpServer(run_dir / "vtdx-qmp.sock", toy_commands())).start()
    term = Tmux(f"{sys.executable} -m vtdx console {run_dir}; echo RC=$?; sleep 60",
                env={"VTDX_CACHE": str(tmp_path / "cache")})
    try:
        term.wait_for("vtdx> ")
        server.stop()
        term.wait_for("! the endpoint closed the connection (has the machine stopped?)")
        term.wait_for_prompt("vtdx> ")
        term.type("status")
        term.send("Enter")
        term.wait_for("error: connection: the endpoint closed the connection")
        term.wait_for_prompt("vtdx> ")
        term.type("tds")
        term.wait_for("vtdx> tds")  # readline has it: a Ctrl-C sooner discards it unread
        term.send("C-c")
        screen = term.wait_for("RC=130", timeout=5)
        assert "vtdx> tds\nvtdx: interrupted\nRC=130" in screen
        assert "Traceback" not in screen
    finally:
        term.kill()
        server.stop()
