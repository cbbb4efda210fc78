"""``vtdx console RUN_DIR``: inspect a running vtdx machine (PAMT, TDs, S-EPT, locks...)."""

from __future__ import annotations

import argparse
import asyncio


def register(sub: argparse._SubParsersAction) -> None:
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
    from vtdx.observe import console

    if args.command is not None:
        return asyncio.run(console.run_commands(args.run_dir, args.command))
    return asyncio.run(console.interact(args.run_dir, console.history_path()))
