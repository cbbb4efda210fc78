"""The SEAMCALL transport: the daemon's side of the plugin's Unix sockets.

asyncio owns the lifecycle (accept, the HELLO/WELCOME handshake, shutdown). After the
handshake each vCPU connection is served by its own thread with blocking ``recv_into`` into
a preallocated buffer and one ``struct.unpack_from`` per frame: measured at ~1.0x the
socket floor (asyncio.Protocol 1.1-1.2x, streams 1.8-4.7x), and a SEAMCALL held at a
control point must stall only its own vCPU. Frames: docs/protocol.md.

A server can listen before its handler can serve (``serving=False``): the plugin's control
connection gets the facade rows and the vCPUs their WELCOME, so QEMU starts, and the vCPU
threads begin at ``serve()``; a SEAMCALL sent meanwhile waits in its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.runtime.protocol import (
    CALL,
    CONTROL_VCPU,
    HELLO,
    MAGIC,
    NREGS,
    RET,
    VERSION,
    Hello,
    Kind,
    ProtocolError,
    Result,
    Row,
    Welcome,
    pack_welcome,
)

log = logging.getLogger(__name__)

#: prctl(2) PR_SET_TIMERSLACK.
_PR_SET_TIMERSLACK = 29


def precise_timers() -> None:
    """Let the calling thread's timed waits end on time: Linux's default timer slack
    (50 us) would stretch every overlap hold and exploration delay of the module (see
    vtdx.module.timing) by up to that much. Best effort: nothing happens where prctl is
    not there."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass

#: Seconds a new connection gets to send its HELLO.
HELLO_TIMEOUT = 10.0

#: Serves one SEAMCALL: (vcpu, 14 registers in wire order, (rflags, rip, rsp, cr3)) ->
#: (result, 14 registers). Called on the vCPU's own thread; must be thread-safe.
Handler = Callable[[int, tuple[int, ...], tuple[int, ...]], tuple[Result, tuple[int, ...]]]


class Server:
    """Listens on a Unix socket; every vCPU connection gets its own serving thread."""

    def __init__(self, socket_path: str | Path, num_lps: int, rows: Sequence[Row],
                 handler: Handler, *, serving: bool = True) -> None:
        self.socket_path = Path(socket_path)
        self.num_lps = num_lps
        self.rows = list(rows)
        self.handler = handler
        self.calls = [0] * num_lps
        self.errors: list[str] = []
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Set once vCPU connections may be served (see the module docstring).
        self._serving = asyncio.Event()
        if serving:
            self._serving.set()

    def serve(self) -> None:
        """Start serving the vCPU connections made so far and every later one."""
        self._serving.set()

    async def start(self) -> None:
        """Bind and start accepting (returns once the socket exists)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(self.socket_path))
        except OSError as e:
            s.close()
            raise VtdxError(f"cannot listen on {self.socket_path}: {e}") from None
        s.listen(64)
        s.setblocking(False)
        self._listener = s
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except (OSError, asyncio.CancelledError):
                return
            loop.create_task(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(_recv_exact(loop, conn, HELLO.size), HELLO_TIMEOUT)
            hello = Hello.unpack(data)
            status = self._check_hello(hello)
            control = hello.vcpu == CONTROL_VCPU
            rows = self.rows if control and status == Welcome.OK else []
            await loop.sock_sendall(conn, pack_welcome(status, rows))
        except (OSError, TimeoutError, ProtocolError, ValueError) as e:
            self._error(f"handshake failed: {e}")
            conn.close()
            return
        if status != Welcome.OK or control:
            conn.close()
            return
        await self._serving.wait()
        conn.setblocking(True)
        t = threading.Thread(target=self._serve_vcpu, args=(conn, hello.vcpu),
                             name=f"vtdx-vcpu{hello.vcpu}", daemon=True)
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
            self._threads.append(t)
        t.start()

    def _check_hello(self, h: Hello) -> Welcome:
        if h.magic != MAGIC or h.version != VERSION:
            self._error(f"plugin speaks protocol {h.version} (magic {h.magic:#x}), "
                        f"daemon {VERSION}")
            return Welcome.BAD_VERSION
        if h.vcpu != CONTROL_VCPU and h.vcpu >= self.num_lps:
            self._error(f"vCPU {h.vcpu} outside the profile's {self.num_lps} LPs")
            return Welcome.BAD_VCPU
        if h.vcpu == CONTROL_VCPU and h.nvcpus != self.num_lps:
            log.warning("QEMU has %d vCPUs, the platform profile %d LPs", h.nvcpus,
                        self.num_lps)
        return Welcome.OK

    def _error(self, msg: str) -> None:
        log.warning("%s", msg)
        self.errors.append(msg)

    def _serve_vcpu(self, conn: socket.socket, vcpu: int) -> None:
        """Hot loop of one vCPU: frame in, handler, frame out. Ends when the peer closes."""
        precise_timers()
        size = CALL.size
        buf = bytearray(size)
        view = memoryview(buf)
        out = bytearray(RET.size)
        unpack_from, pack_into = CALL.unpack_from, RET.pack_into
        handler, calls = self.handler, self.calls
        recv_into, send = conn.recv_into, conn.sendall
        try:
            while True:
                got = recv_into(buf)  # a frame nearly always arrives whole
                if got == 0:
                    return
                while got < size:
                    n = recv_into(view[got:], size - got)
                    if n == 0:
                        return
                    got += n
                v = unpack_from(buf)
                kind, seq = v[0], v[2]
                if kind == Kind.CALL:
                    result, regs_out = handler(vcpu, v[3:3 + NREGS], v[3 + NREGS:])
                    pack_into(out, 0, Kind.RET, result, seq, *regs_out)
                    calls[vcpu] += 1
                elif kind == Kind.ECHO:
                    pack_into(out, 0, Kind.ECHO_RET, Result.VMSUCCEED, seq, *v[3:3 + NREGS])
                else:
                    self._error(f"vCPU {vcpu}: unexpected frame kind {kind}; closing")
                    return
                send(out)
        except OSError as e:
            if not self._closed:
                self._error(f"vCPU {vcpu}: connection error: {e}")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    async def close(self) -> None:
        """Stop accepting, drop every vCPU connection, join the threads."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        self._serving.set()  # a connection waiting to be served is closed instead
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            await asyncio.to_thread(t.join, 5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


async def _recv_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(conn, n - len(data))
        if not chunk:
            raise ProtocolError("peer closed during the handshake")
        data += chunk
    return data
