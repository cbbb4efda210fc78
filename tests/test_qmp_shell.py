"""qemu.qmp's own qmp-shell, unchanged, in a terminal (tmux) against the vtdx QMP socket."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_qmp_inspect import booted  # noqa: F401  (fixture)
from tmux_util import Tmux


def qmp_shell() -> Path:
    exe = Path(sys.executable).parent / "qmp-shell"
    if not exe.exists():
        pytest.skip("qmp-shell (qemu.qmp) not installed next to this Python")
    return exe


def test_qmp_shell_runs_query_vtdx_pamt(booted, tmp_path: Path):  # noqa: F811
    ep, host, boot = booted
    term = Tmux(f"{qmp_shell()} -p {ep.socket_path}", env={"HOME": str(tmp_path)})
    try:
        term.wait_for("Welcome to the QMP low-level shell")
        term.wait_for("(QEMU)")
        term.type("query-vtdx-pamt pfn=0x1b090c")
        term.send("Enter")
        screen = term.wait_for('"walk-level"')
        assert '"pfn": 1771788' in screen and '"pt-name": "PT_NDA"' in screen
        # Tab completion comes from query-commands.
        term.type("query-vtdx-tdm")
        term.send("Tab")
        term.wait_for("query-vtdx-tdmrs")
        term.send("Enter")
        term.wait_for('"initialized-up-to"')
        # A bad argument: an error reply, and the shell stays connected.
        term.type("query-vtdx-pamt pfn=0x7fffffffff")
        term.send("Enter")
        screen = term.wait_for("not in any TDMR")
        term.type("query-vtdx-stats")
        term.send("Enter")
        term.wait_for('"per-leaf"')
        assert term.alive()
    finally:
        term.kill()
