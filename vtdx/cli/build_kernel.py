"""``vtdx build-kernel``: build (or reuse) the Linux TDX-host kernel and the initramfs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtdx.host import initramfs
from vtdx.host import kernel as kernel_build


def _log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of jobs, 1..1024")
    return n


def run(args: argparse.Namespace) -> int:
    art = kernel_build.build_kernel(args.source, force=args.force, refresh=args.refresh,
                                    cache=args.cache, log=_log, debug=args.debug,
                                    jobs=args.jobs)
    rd = initramfs.ensure_initramfs(args.cache, log=_log)
    info = art.info()
    print(f"kernel {info.get('release', '?')}: {art.bzimage}")
    print(f"vmlinux: {art.vmlinux}")
    print(f"initramfs: {rd}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-kernel", help="build the slim Linux TDX-host kernel (cached)",
        description=__doc__ + "\n\nDefault source: Debian's linux-source-7.3 from the apt "
        "mirror; the result lands in $VTDX_CACHE/kernels/<key>/.")
    p.add_argument("--source", type=Path, default=None, metavar="DIR",
                   help="build this kernel tree instead of Debian's linux-source-7.3")
    p.add_argument("--force", action="store_true",
                   help="rebuild from a clean build directory even if a cached kernel exists")
    p.add_argument("--refresh", action="store_true",
                   help="look for a newer linux-source-7.3 in the archive first")
    p.add_argument("--debug", action="store_true",
                   help="debug flavour: also lockdep (PROVE_LOCKING), DEBUG_ATOMIC_SLEEP and "
                   "DEBUG_LIST (guest/kernel/tdx-host-debug.config); a kernel of its own, "
                   "run it with `vtdx run --kernel`")
    p.add_argument("--jobs", type=_jobs, default=kernel_build.JOBS, metavar="N",
                   help=f"parallel compile jobs (default: the CPUs available, "
                   f"{kernel_build.JOBS} here)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache directory (default: $VTDX_CACHE or ~/.cache/vtdx)")
    p.set_defaults(func=run)
