"""``vtdx console RUN_DIR``: inspect a running vtdx machine (PAMT, TDs, S-EPT, locks...)."""

from __future__ import annotations

import argparse
import asyncio

from vtdx.observe.console.script import run_commands


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "console",
        help="inspect a running machine (interactive, or -c for scripts)",
        description="Attach to a running vtdx machine through its QMP socket "
        "(RUN_DIR/vtdx-qmp.sock) and query the TDX module: status, tdmrs, pamt PFN, tds, "
        "sept TD GPA, locks, trace, stats, inject, pause/resume. `help` inside lists all.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of the machine")
    p.add_argument("-c", "--command", metavar="CMDS",
                   help='run these commands (";"-separated) and exit, e.g. "pamt 0x1b090c"')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.command is not None:
        return run_commands(args.run_dir, args.command)
    # Imported here, not at the top: aioconsole and readline take ~0.2 s to import, which
    # only the interactive console should pay, not every vtdx command (main imports this).
    from vtdx.observe.console import interactive

    return asyncio.run(interactive.interact(args.run_dir, interactive.history_path()))
