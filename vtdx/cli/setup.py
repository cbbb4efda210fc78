"""``vtdx setup``: provision the QEMU runtime, build the TCG plugin and the patched unicorn the
TD vCPU engine runs on, byte-compile vtdx itself (idempotent)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vtdx.host import qemu as qemu_runtime
from vtdx.host.bytecode import compile_package
from vtdx.host.unicorn import build_unicorn


def _log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    rt = qemu_runtime.setup(args.cache, _log, mirror=args.mirror,
                            use_system=not args.no_system_qemu)
    lib = build_unicorn(args.cache, _log)
    compile_package(_log)
    print(f"QEMU {rt.version_str} ({rt.root or rt.qemu}), plugin {rt.plugin_path}, "
          f"unicorn {lib}, {time.monotonic() - t0:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("setup", help="provision QEMU >= 11.1, build the TCG plugin and "
                              "the patched unicorn",
                              description=__doc__)
    p.add_argument("--cache", type=Path, default=None,
                   help="cache directory (default: $VTDX_CACHE or ~/.cache/vtdx)")
    p.add_argument("--mirror", default=None,
                   help="Debian mirror for the private root (default: from apt's sources)")
    p.add_argument("--no-system-qemu", action="store_true",
                   help="use the private root even if a suitable system QEMU exists")
    p.set_defaults(func=run)
