"""The ``vtdx`` command line."""

from __future__ import annotations

import argparse
import importlib
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
        print(f"vtdx: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vtdx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
