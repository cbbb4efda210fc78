"""``vtdx console RUN_DIR -c "cmd; cmd"``: run commands and exit, for scripts.

Synchronous: one ``VtdxClient`` session for all the commands, closed before returning.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from vtdx.observe.console.commands import ConsoleCommands
from vtdx.observe.qmp.client import VtdxClient, socket_path


def run_commands(run_dir: str | os.PathLike[str], script: str,
                 out: TextIO | None = None) -> int:
    """Run ``;``-separated commands, printing each answer; exit status 1 if one failed."""
    out = out or sys.stdout
    cmds = ConsoleCommands()
    rc = 0
    with VtdxClient(socket_path(run_dir)) as client:
        for line in script.split(";"):
            text = cmds.run_line(line.strip(), client)
            if text:
                print(text, file=out, flush=True)
            if text.startswith(("error:", "usage:")):
                rc = 1
    return rc
