"""``vtdx run``: boot a Linux TDX-host kernel on vtdx, stream its console, judge and summarise.

Exit status: 0 TDX initialised (and the kernel's PAMT size equals vtdx's accounting),
3 the kernel booted but refused TDX (its reason is printed in one line), 1 anything else
(panic/oops, a WARNING/BUG report not declared with --expect-warn, timeout, QEMU died,
failed in-guest check), 130 Ctrl-C, 128+N stopped by signal N (SIGTERM, SIGHUP). QEMU, the
daemon and the run directory are removed in every case, SIGKILL included.

The run directory is printed first; --keep leaves the machine up for `vtdx console`,
`vtdx trace -f` and qmp-shell until Ctrl-C; --shell gives a shell in the guest on this
terminal; with your own --initrd the kernel's TDX lines are the verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import termios
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host import kernel as kernel_build
from vtdx.platform.profile import PROFILES
from vtdx.session.run import CHECKS, InjectRule, PauseRule, RunOptions
from vtdx.session.run import run as run_vm
from vtdx.units import parse_size

#: Profiles that lack what Linux needs: the CLI maps them onto RunOptions' own switches
#: (--no-movdir64b, --tdx-keyids 1) over the default platform.
LACKING = ("no-movdir64b", "one-keyid")


def options(args: argparse.Namespace) -> RunOptions:
    kernel, vmlinux = args.kernel, args.vmlinux
    if kernel is None:
        art = kernel_build.default_kernel(args.cache)
        if art is None:
            raise VtdxError("no kernel given and none built from the current "
                            "guest/kernel/tdx-host.config: run `vtdx build-kernel` "
                            "or pass --kernel BZIMAGE")
        kernel, vmlinux = art.bzimage, vmlinux or art.vmlinux
        src = art.info().get("path")
        if args.kernel_src is None and isinstance(src, str) and Path(src).is_dir():
            args.kernel_src = Path(src)
    elif vmlinux is None and (kernel.parent / "vmlinux").is_file():
        vmlinux = kernel.parent / "vmlinux"
    if vmlinux is None and args.kernel_src is not None:
        if not (args.kernel_src / "vmlinux").is_file():
            raise VtdxError(f"--kernel-src {args.kernel_src}: no vmlinux there "
                            "(pass --vmlinux for an out-of-tree build)")
        vmlinux = args.kernel_src / "vmlinux"
    tdx_keyids = args.tdx_keyids
    movdir64b = not args.no_movdir64b
    if args.profile == "no-movdir64b":
        movdir64b = False
    elif args.profile == "one-keyid":
        tdx_keyids = 1 if tdx_keyids is None else tdx_keyids
    return RunOptions(kernel=kernel, vmlinux=vmlinux, initrd=args.initrd, smp=args.smp,
                      mem=parse_size(args.mem), append=args.append or "",
                      kernel_src=args.kernel_src, tdx_keyids=tdx_keyids, movdir64b=movdir64b,
                      checks=args.checks, timeout=args.timeout, stream=not args.quiet,
                      save_trace=args.save_trace, expect_warn=tuple(args.expect_warn),
                      inject=tuple(InjectRule.parse(t) for t in args.inject),
                      qemu_args=tuple(args.qemu_arg), gdb=args.gdb, keep=args.keep,
                      shell=args.shell, put=tuple(_put(p) for p in args.put),
                      platform="default" if args.profile in LACKING else args.profile,
                      features=args.features or "",
                      pauses=tuple(PauseRule.parse(t) for t in args.pause),
                      contend=args.contend, serial=args.serial)


def _seed(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _put(text: str) -> tuple[Path, str]:
    """``SRC[=DEST]``: DEST defaults to /root/<name of SRC>."""
    src, eq, dest = text.partition("=")
    return Path(src).expanduser(), dest if eq else f"/root/{Path(src).name}"


def _save_terminal() -> list | None:
    """The terminal's settings: QEMU switches it to raw mode for --shell and restores it when
    it exits normally; a killed QEMU would leave it raw."""
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        return None


def _restore_terminal(saved: list | None) -> None:
    if saved is not None:
        with contextlib.suppress(termios.error, OSError, ValueError):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _check_config(opts: RunOptions, kernel_src: Path | None) -> None:
    """Name what a kernel built elsewhere lacks of what vtdx relies on (one line)."""
    cfg = kernel_build.find_config(kernel_src, opts.vmlinux, opts.kernel)
    if cfg is None:
        return
    try:
        missing = kernel_build.missing_for_vtdx(cfg.read_text(errors="replace"))
    except OSError:
        return
    if missing:
        print(f"vtdx run: warning: {cfg} lacks {'; '.join(missing)}", file=sys.stderr,
              flush=True)


def run(args: argparse.Namespace) -> int:
    opts = options(args)
    opts.validate()
    if args.kernel is not None:
        _check_config(opts, args.kernel_src)
    if opts.shell and not sys.stdin.isatty():
        raise VtdxError("--shell needs a terminal on stdin")
    saved = _save_terminal() if opts.shell else None
    try:
        res = run_vm(opts, out=sys.stdout)
    finally:
        _restore_terminal(saved)
    print(res.summary, flush=True)
    if res.exit_code:
        print(f"vtdx run: {res.verdict}", file=sys.stderr)
    return res.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="boot a Linux TDX-host kernel on vtdx",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", type=Path, default=None, metavar="BZIMAGE",
                   help="kernel image (default: the one `vtdx build-kernel` built)")
    p.add_argument("--vmlinux", type=Path, default=None, metavar="F",
                   help="matching vmlinux, for symbolising SEAMCALL callers")
    p.add_argument("--initrd", type=Path, default=None, metavar="F",
                   help="initramfs (default: vtdx's busybox initramfs with the checks)")
    p.add_argument("--smp", type=int, default=2, metavar="N", help="vCPUs (default 2)")
    p.add_argument("--mem", default="2G", metavar="SIZE", help="RAM, e.g. 2G or 6144M")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    p.add_argument("--kernel-src", type=Path, default=None, metavar="DIR",
                   help="the kernel's (in-tree) build directory: its vmlinux names "
                   "SEAMCALL callers when --vmlinux is not given")
    p.add_argument("--checks", default="tdx", metavar="LIST",
                   help=f"in-guest checks, comma separated: {', '.join(CHECKS)} (default: tdx)")
    p.add_argument("--profile", choices=PROFILES, default="default",
                   help="platform profile: dpamt = Dynamic PAMT module; no-movdir64b / "
                   "one-keyid lack what Linux needs")
    p.add_argument("--features", default="", metavar="SPEC",
                   help="module features on/off, e.g. +dynamic-pamt,-no-rbp-mod")
    p.add_argument("--pause", action="append", default=[], metavar="RULE",
                   help="arm a SEAMCALL pause before boot: LEAF[:lp=N][:point=locked]"
                   "[:nth=N][:until=LEAF][:timeout=S]... (docs/races.md); repeatable")
    p.add_argument("--contend", type=_seed, default=None, metavar="SEED",
                   help="contention exploration: seeded varied lock holds; the summary "
                   "lists every BUSY the kernel got from a held lock")
    p.add_argument("--serial", action="store_true",
                   help="no overlap between LPs' SEAMCALLs (deterministic)")
    p.add_argument("--tdx-keyids", type=int, default=None, metavar="N",
                   help="number of TDX private keyids the platform reports (default 16)")
    p.add_argument("--no-movdir64b", action="store_true",
                   help="hide MOVDIR64B from CPUID (the kernel then refuses TDX)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up after S seconds (default 300)")
    p.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    p.add_argument("--save-trace", type=Path, default=None, metavar="FILE",
                   help="keep the SEAMCALL trace (JSON lines) in FILE; `vtdx trace FILE` reads it")
    p.add_argument("--keep", action="store_true",
                   help="stay up after boot until stopped (Ctrl-C, SIGTERM): inspect it with "
                   "`vtdx console`, `vtdx trace -f`, qmp-shell")
    p.add_argument("--shell", action="store_true",
                   help="an interactive shell in the guest on this terminal once TDX is up "
                   "(QMP, `vtdx console` and `vtdx trace -f` work from another terminal); "
                   "`exit` powers the machine off")
    p.add_argument("--put", action="append", default=[], metavar="SRC[=DEST]",
                   help="put a host file or directory into the guest (packed into the "
                   "initramfs; default DEST /root/NAME), e.g. your tools or a TD payload")
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="arm a module fault before boot: STATUS[:LEAF][:lp=N][:count=N|all]"
                   "[:after=N], e.g. TDX_SYS_BUSY:TDH.SYS.LP.INIT:lp=1 (repeatable)")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument, appended last (repeatable: --qemu-arg=-d "
                   "--qemu-arg=int)")
    p.add_argument("--gdb", type=int, nargs="?", const=1234, default=None, metavar="PORT",
                   help="QEMU gdbstub on 127.0.0.1:PORT (default 1234)")
    p.add_argument("--expect-warn", action="append", default=[], metavar="REGEX",
                   help="a kernel WARNING/BUG report matching REGEX does not fail the run "
                   "(repeatable); any other report does")
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    # Everything a run makes is gone when it returns (vtdx.cli.main._quick_exit).
    p.set_defaults(func=run, quick_exit=True)
