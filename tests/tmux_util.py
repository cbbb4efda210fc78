"""Drive a terminal program in a detached tmux session (send-keys / capture-pane).

Each session runs on a tmux server of its own (``-L``): tests run in parallel workers, and
one test ending the last session of a shared server could stop it under another test's
``new-session``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest


class Tmux:
    def __init__(self, command: str, env: Mapping[str, str] | None = None,
                 width: int = 200, height: int = 50) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux not installed")
        self.name = f"vtdx-test-{uuid.uuid4().hex[:8]}"
        #: ``tmux`` on this session's own server; append a subcommand.
        self.tmux = ["tmux", "-L", self.name]
        args = [*self.tmux, "new-session", "-d", "-s", self.name, "-x", str(width), "-y",
                str(height)]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        subprocess.run([*args, command], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        """Literal text (no key-name lookup)."""
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, "-l", text], check=True)

    def screen(self) -> str:
        r = subprocess.run([*self.tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                           check=True, capture_output=True, text=True)
        return r.stdout

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear; screen:\n{screen}")
            time.sleep(0.1)

    def wait_for_prompt(self, prompt: str, timeout: float = 15.0) -> str:
        """Wait until the screen's last line is ``prompt`` and nothing typed after it.

        Keys sent before the program reads the terminal again (say, right after output
        shows) reach a cooked-mode tty, where a Ctrl-D on an empty line is lost."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            lines = screen.rstrip("\n").splitlines()
            if lines and lines[-1].rstrip() == prompt.rstrip():
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no bare {prompt!r} prompt; screen:\n{screen}")
            time.sleep(0.1)

    def wait_gone(self, timeout: float = 15.0) -> None:
        """Wait until the program has ended (and with it the session)."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; screen:\n{self.screen()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return subprocess.run([*self.tmux, "has-session", "-t", self.name],
                              capture_output=True).returncode == 0

    def kill(self) -> None:
        """End the session, its server, and the server's socket file (tmux leaves it)."""
        subprocess.run([*self.tmux, "kill-session", "-t", self.name], capture_output=True)
        sockets = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (sockets / self.name).unlink(missing_ok=True)
