"""``vtdx daemon``: run the SEAMCALL daemon on its own, for a QEMU started by hand.

Normally ``vtdx.session.machine.Machine`` runs the daemon in-process; a separate daemon is for
debugging the plugin, or for killing it to see what the guest gets.
"""

from __future__ import annotations

import argparse
import asyncio

from vtdx.runtime import daemon


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon",
        help="serve SEAMCALLs from the vtdx QEMU plugin",
        description="Listen on SOCKET for the vtdx plugin (-plugin vtdx-plugin.so,sock=SOCKET) "
        "and serve SEAMCALLs with the chosen backend; guest RAM is the memory-backend-file "
        "given by --ram (QEMU: -object memory-backend-file,mem-path=RAM,share=on). Runs until "
        "SIGINT/SIGTERM.",
    )
    daemon.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    asyncio.run(daemon.serve(args))
    return 0
