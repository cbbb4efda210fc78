"""The ``vtdx`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vtdx import __version__
from vtdx.errors import VtdxError

#: Subcommand modules under vtdx.cli, in the order ``vtdx --help`` lists them; each exposes
#: ``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code).
COMMANDS: tuple[str, ...] = ("setup", "build_kernel", "run", "console", "trace", "daemon")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one readable line (argparse prints usage + error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vtdx", description="Virtual Intel TDX platform for QEMU")
    parser.add_argument("--version", action="version", version=f"vtdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"vtdx.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
