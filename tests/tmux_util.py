"""Drive a terminal program in a detached tmux session (send-keys / capture-pane)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping

import pytest


class Tmux:
    def __init__(self, command: str, env: Mapping[str, str] | None = None,
                 width: int = 200, height: int = 50) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux not installed")
        self.name = f"vtdx-test-{uuid.uuid4().hex[:8]}"
        args = ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y",
                str(height)]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        subprocess.run([*args, command], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        """Literal text (no key-name lookup)."""
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)

    def screen(self) -> str:
        r = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
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

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name],
                              capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
