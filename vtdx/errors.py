"""Errors meant for the user: the CLI prints them as one line, never a traceback."""


class VtdxError(Exception):
    """A user-facing failure (bad flag, missing QEMU, build step failed...)."""

    exit_code = 1
