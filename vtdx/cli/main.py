"""The ``vtdx`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from vtdx import __version__
from vtdx.errors import VtdxError

#: Subcommand modules under vtdx.cli, in the order ``vtdx --help`` lists them; each exposes
#: ``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code).
COMMANDS: tuple[str, ...] = ("setup", "build_kernel", "run", "console", "trace", "daemon")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one readable line (argparse prints usage + error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line, only its command's module is imported.

    A command module imports what its command runs (``run`` the session stack, ~90 ms; the
    module model follows once QEMU has started): `vtdx console`, `vtdx trace` and
    `--version` need none of the others.
    ``vtdx --help``, no command or an unknown one registers them all."""
    parser = _Parser(prog="vtdx", description="Virtual Intel TDX platform for QEMU")
    parser.add_argument("--version", action="version", version=f"vtdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _commands_for(argv):
        importlib.import_module(f"vtdx.cli.{name}").register(sub)
    return parser


#: Command name on the command line -> its module under vtdx.cli.
_MODULE_OF = {name.replace("_", "-"): name for name in COMMANDS}


def _commands_for(argv: list[str] | None) -> tuple[str, ...]:
    if argv and argv[0] == "--version":
        return ()
    module = _MODULE_OF.get(argv[0]) if argv else None
    return (module,) if module else COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default: this program's arguments) and return its exit
    status. As the program itself (no ``argv``), a command that sets ``quick_exit`` ends the
    process here (see ``_quick_exit``)."""
    as_program = argv is None
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = _dispatch(args)
    if as_program and getattr(args, "quick_exit", False):
        _quick_exit(rc)
    return rc


def _quick_exit(rc: int) -> NoReturn:
    """End the process without the interpreter's teardown.

    For a command that has released everything itself when it returns: `vtdx run` has
    stopped QEMU, the daemon's threads and the QMP endpoint and removed its run directory by
    then, so tearing down the ~270 modules it imported only adds 35-40 ms to every run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except VtdxError as e:
        _say(f"vtdx: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("vtdx: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`vtdx trace | head`): stop quietly, as cat does. Python
        # would report the failed flush of stdout at exit, so stdout goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _say(line: str) -> None:
    """One line on stderr; nothing when stderr is gone (terminal closed, SIGHUP)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
