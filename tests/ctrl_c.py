"""Ctrl-C for a child process the way a terminal delivers it."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """``preexec_fn`` of a child a test will send SIGINT: a shell without job control starts
    background jobs with SIGINT ignored (so does CI under some runners), a child inherits
    that, and Python leaves an ignored SIGINT ignored -- the child would never see the
    Ctrl-C the test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
