"""Host side of the guest command channel: run shell commands in a booted vtdx guest.

Tests must not scrape the serial console to learn what a command printed: the kernel writes
there at any moment. The guest therefore runs a small agent (guest/initramfs/agent) on a
second serial port that carries nothing else; commands and results travel as framed lines
with base64 payloads, so binary output and kernel chatter cannot corrupt a reply.

``GuestAgent`` speaks that protocol over any connected stream socket (QEMU's chardev socket
in a machine; a pty or socketpair in the tests). ``agent_initramfs`` appends the agent and
the in-guest payloads to vtdx's busybox initramfs, and ``AgentMachine`` is the
``Machine`` with the agent's serial port wired to a socket in its run directory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import os
import re
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtdx.errors import VtdxError
from vtdx.host.initramfs import Cpio, ensure_initramfs
from vtdx.host.qemu import QemuRuntime, cache_dir
from vtdx.resources import asset
from vtdx.session.machine import Machine

AGENT = asset("guest", "initramfs", "agent")
#: Where the payload binaries live in the guest (on the agent's PATH).
GUEST_BIN = "vtdx/bin"
#: Kernel command line that makes /init exec the agent instead of powering off.
AGENT_APPEND = "vtdx.agent=1 vtdx.checks=none"
AGENT_SOCKET = "agent.sock"


class AgentError(VtdxError):
    """The channel failed (no answer, closed socket); the command result is unknown."""


@dataclass
class CommandResult:
    """What a guest command did. Unpacks as ``rc, stdout = vm.run(...)``."""

    cmd: str
    rc: int
    stdout: str
    stderr: str = ""
    seconds: float = 0.0

    def __iter__(self) -> Iterator[object]:
        return iter((self.rc, self.stdout))

    @property
    def timed_out(self) -> bool:
        return self.rc == 137  # the agent's `timeout -s KILL`

    def describe(self) -> str:
        text = f"$ {self.cmd}\n(exit status {self.rc}, {self.seconds:.1f} s)\n{self.stdout}"
        if self.stderr:
            text += f"\n[stderr]\n{self.stderr}"
        return text.rstrip() + "\n"


class CommandFailed(AssertionError):
    """``run(check=True)`` got a non-zero exit status: an assertion, so pytest shows it."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"guest command failed\n{result.describe()}")
        self.result = result


_FRAME = re.compile(rb"^VTDX-(OUT|ERR|RC|PONG|AGENT|GOT|BAD) ?(\S*) ?(\S*)")
#: Times a command frame is sent before the channel is declared broken.
SEND_ATTEMPTS = 4


class GuestAgent:
    """One agent connection. Thread-safe: commands are serialised by a lock."""

    def __init__(self, sock: socket.socket | int, machine: Any = None) -> None:
        #: A connected socket (QEMU's chardev) or any stream fd, e.g. a pty master.
        self.sock = sock
        #: The Machine behind the socket, if known: a closed channel is explained by QEMU's
        #: exit status and stderr (a bad kernel image, a bad option), not "connection reset".
        self.machine = machine
        self.fd = sock if isinstance(sock, int) else sock.fileno()
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        #: Seconds to wait for a frame's acknowledgement (plus its length at 2 KB/s).
        self.ack_timeout = 10.0
        #: Frames sent again because the guest did not acknowledge them (diagnostics).
        self.resends = 0

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> GuestAgent:
        """Connect to QEMU's chardev socket (it appears a moment after QEMU starts)."""
        deadline = time.monotonic() + timeout
        machine = _MACHINES.get(os.fspath(path))
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.fspath(path))
                return cls(s, machine)
            except OSError as e:
                s.close()
                qemu = getattr(machine, "qemu", None)
                if time.monotonic() > deadline or (qemu is not None
                                                   and qemu.returncode is not None):
                    msg = f"agent socket {path}: {e.strerror}"
                    raise AgentError(cls(-1, machine)._explain(msg)) from None
                time.sleep(0.05)

    def close(self) -> None:
        if isinstance(self.sock, int):
            os.close(self.sock)
        else:
            self.sock.close()

    # -- framing

    def _send(self, line: str) -> None:
        data = memoryview(line.encode() + b"\n")
        try:
            while data:
                select.select([], [self.fd], [], 30.0)
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise AgentError(self._explain(f"agent channel closed: {e}")) from None

    def _explain(self, msg: str) -> str:
        """Why QEMU is gone when it is (its exit status and stderr), else ``msg``."""
        m = self.machine
        if m is None or getattr(m, "qemu", None) is None:
            return msg
        deadline = time.monotonic() + 3.0  # the channel closes a moment before QEMU is reaped
        while m.qemu.returncode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        why = m.failure_text() if hasattr(m, "failure_text") else ""
        return why or msg

    def _line(self, deadline: float) -> bytes | None:
        """Next line, or None when the deadline passes first."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).rstrip(b"\r")
                del self._buf[:nl + 1]
                return line
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ready, _, _ = select.select([self.fd], [], [], left)
                if not ready:
                    return None
                data = os.read(self.fd, 65536)
            except OSError as e:
                raise AgentError(self._explain(f"agent channel closed: {e}")) from None
            if not data:
                raise AgentError(self._explain("agent channel closed (the guest or QEMU went "
                                               "away)"))
            self._buf += data

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the agent answers within ``timeout`` seconds."""
        with self._lock:
            tag = str(next(self._ids))
            self._send(f"VTDX-PING {tag}")
            deadline = time.monotonic() + timeout
            while (line := self._line(deadline)) is not None:
                m = _FRAME.match(line)
                if m and m[1] == b"PONG" and m[2].decode() == tag:
                    return True
            return False

    def wait_ready(self, timeout: float, alive: object = None) -> float:
        """Ping until the agent answers; seconds waited. ``alive()`` False aborts early."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if callable(alive) and not alive():
                raise AgentError(self._explain("the machine stopped before the guest agent "
                                               "came up"))
            if self.ping(timeout=0.25):
                return time.monotonic() - t0
        raise AgentError(f"the guest agent did not answer within {timeout:g} s")

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        """Run ``cmd`` with the guest's busybox sh; the guest kills it after ``timeout`` s.

        A frame can lose bytes on the way in (the guest tty drops input it cannot take), so
        the agent acknowledges each intact frame (GOT, checked against its length) and the
        frame is sent again when no acknowledgement comes; the agent ignores a repeat of the
        command it already ran.
        """
        script = base64.b64encode(cmd.encode()).decode()
        limit = max(1, int(timeout + 0.999))
        with self._lock:
            tag = str(next(self._ids))
            frame = f"VTDX-CMD {tag} {limit} {len(script)} {script}"
            # The guest reads a frame byte by byte under TCG: allow it a slow pace.
            ack_wait = self.ack_timeout + len(frame) / 2000
            t0 = time.monotonic()
            attempts = 1
            self._send(frame)
            deadline, acked = time.monotonic() + ack_wait, False
            parts: dict[str, list[bytes]] = {"OUT": [], "ERR": []}
            section: str | None = None
            while True:
                line = self._line(deadline)
                m = _FRAME.match(line) if line is not None else None
                kind, rid = (m[1].decode(), m[2].decode()) if m else ("", "")
                if line is None or (kind == "BAD" and rid == tag):
                    if acked:
                        raise AgentError(f"no reply from the guest agent for {cmd[:200]!r} "
                                         f"within {limit + 30} s (guest hung?)")
                    if attempts >= SEND_ATTEMPTS:
                        raise AgentError(f"the guest agent did not take the command after "
                                         f"{attempts} attempts (channel losing data?)")
                    attempts += 1
                    self.resends += 1
                    self._send("")  # end a torn line before the frame is sent again
                    self._send(frame)
                    deadline = time.monotonic() + ack_wait
                    continue
                if m is None:
                    if section is not None:
                        parts[section].append(line.strip())
                    continue
                if rid != tag:
                    section = None  # a stale reply (an earlier command's): skip it
                    continue
                if kind == "GOT":
                    # Grace on top of the guest's own limit: the reply must cross the port.
                    acked, deadline = True, time.monotonic() + limit + 30.0
                elif kind in parts:
                    section = kind
                elif kind == "RC":
                    out, err = (_decode(parts[k]) for k in ("OUT", "ERR"))
                    return CommandResult(cmd, int(m[3] or 255), out, err,
                                         time.monotonic() - t0)


def _decode(lines: list[bytes]) -> str:
    try:
        return base64.b64decode(b"".join(lines)).decode(errors="replace")
    except ValueError:
        raise AgentError("garbled reply from the guest agent") from None


# --------------------------------------------------------------------------- initramfs


@dataclass
class PayloadSet:
    """Static in-guest programs to place in ``/vtdx/bin``: name -> ELF bytes."""

    binaries: dict[str, bytes] = field(default_factory=dict)


def agent_initramfs(cache: Path | None = None, payloads: PayloadSet | None = None,
                    agent: Path = AGENT) -> Path:
    """vtdx's initramfs with the agent and payloads appended (cached by content).

    Linux unpacks concatenated cpio archives one after the other into the same rootfs, so
    appending a second archive adds files without rebuilding or changing the first.
    """
    base = ensure_initramfs(cache)
    try:
        agent_text = agent.read_bytes()
    except OSError as e:
        raise VtdxError(f"guest agent: {e}") from None
    bins = (payloads or PayloadSet()).binaries
    h = hashlib.sha256(base.name.encode() + agent_text)
    for name in sorted(bins):
        h.update(name.encode() + hashlib.sha256(bins[name]).digest())
    out = cache_dir(cache) / "initramfs" / f"agent-{h.hexdigest()[:16]}.cpio.gz"
    if out.is_file():
        return out
    arc = Cpio()
    arc.dir("vtdx")
    arc.dir(GUEST_BIN)
    arc.file("agent", agent_text, 0o755)
    for name, data in sorted(bins.items()):
        arc.file(f"{GUEST_BIN}/{name}", data, 0o755)
    first = base.read_bytes()
    first += b"\0" * (-len(first) % 4)  # the unpacker skips zero padding between archives
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(first + gzip.compress(arc.to_bytes(), compresslevel=6, mtime=0))
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- machine


#: Agent socket path -> the machine serving it (GuestAgent.connect finds its machine here).
_MACHINES: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def agent_machine_class() -> type:
    """``Machine`` plus the agent's serial port."""
    class AgentMachine(Machine):
        """A Machine whose ttyS1 is a socket in the run directory, for ``GuestAgent``."""

        @property
        def agent_path(self) -> Path:
            return self._path(AGENT_SOCKET)

        def qemu_args(self, rt: QemuRuntime) -> list[str]:
            _MACHINES[os.fspath(self.agent_path)] = self
            # -serial order is port order: Machine's `-serial stdio` is ttyS0, this is ttyS1.
            return [*super().qemu_args(rt),
                    "-chardev", f"socket,id=vtdxagent,path={self.agent_path},"
                                "server=on,wait=off",
                    "-serial", "chardev:vtdxagent"]

    return AgentMachine
