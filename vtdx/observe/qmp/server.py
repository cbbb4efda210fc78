"""The QMP server: a Unix socket, its connections, the command table and event broadcast.

The wire protocol follows QEMU's docs/interop/qmp-spec: a greeting, ``qmp_capabilities``
before anything else, one JSON object per command with an optional ``id`` echoed back,
``{"error": {"class", "desc"}}`` on failure, timestamped events. Nothing a client sends
ends its connection: malformed, oversized, too deeply nested or non-object input, a bad
command and even a bug in a handler each get an error reply, and the next message is read.

Lifetimes (each object is closed by the one that created it):

* ``QmpServer``: ``start()`` binds the socket (born 0600), ``close()`` stops accepting,
  cancels every connection and removes the socket file.
* ``Connection``: one per accepted client, owned by the server. ``serve()`` reads and
  answers until the client hangs up or the server closes; a single writer task sends
  replies and events in order, so they never interleave mid-message.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Iterable, Mapping

from vtdx import __version__
from vtdx.observe.answers import CommandHelp, VersionInfo
from vtdx.observe.qmp.errors import COMMAND_NOT_FOUND, QmpError
from vtdx.observe.qmp.events import Event, RateLimiter, event_message
from vtdx.observe.qmp.framing import MAX_MESSAGE, JsonSplitter, decode, encode
from vtdx.observe.qmp.schema import Arg, Command

log = logging.getLogger(__name__)

#: Messages waiting to be written to one client; events beyond it are dropped for that
#: client, replies wait (the client is not reading, so it is not sending either).
QUEUE_DEPTH = 1024
#: How long a closing connection may take to flush replies already queued.
FLUSH_SECONDS = 1.0
#: Members a command message may have (``exec-oob`` is refused with its own message).
_MEMBERS = frozenset({"execute", "arguments", "id"})


class Runstate(enum.Enum):
    """Where a server is in its life (named as in qemu.qmp's protocol.Runstate)."""

    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


def version() -> VersionInfo:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"vtdx {__version__}"}


def greeting() -> dict[str, object]:
    return {"QMP": {"version": version(), "capabilities": []}}


class Connection:
    """One client of a ``QmpServer`` (see the module docstring for its lifetime)."""

    def __init__(self, server: QmpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        #: Commands other than qmp_capabilities are refused until it succeeded.
        self.negotiated = False
        self._out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_DEPTH)

    # -- lifetime

    async def serve(self) -> None:
        writer_task = asyncio.create_task(self._write_loop(), name="vtdx-qmp-writer")
        try:
            self._out.put_nowait(encode(greeting()))
            await self._read_loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception:  # never the server's problem: close this client, say why once
            log.error("QMP connection failed", exc_info=True)
        finally:
            await self._close(writer_task)

    async def _close(self, writer_task: asyncio.Task[None]) -> None:
        """Flush replies already queued (a client may send and hang up at once), close."""
        try:
            self._out.put_nowait(b"")  # the writer's end marker
            await asyncio.wait_for(writer_task, FLUSH_SECONDS)
        except BaseException:  # full queue, timeout, or the server cancelling us
            writer_task.cancel()
        self.writer.close()

    async def _read_loop(self) -> None:
        splitter = JsonSplitter()
        while data := await self.reader.read(65536):
            for text, err in splitter.feed(data):
                if text is None:
                    reply: dict[str, object] = {"error": QmpError(err or "").reply()}
                else:
                    reply = await self._answer(text)
                await self._out.put(self._encode_reply(reply))

    async def _write_loop(self) -> None:
        while raw := await self._out.get():
            self.writer.write(raw)
            await self.writer.drain()

    def send_event(self, raw: bytes) -> None:
        if self.negotiated:
            with contextlib.suppress(asyncio.QueueFull):  # a stuck client loses events
                self._out.put_nowait(raw)

    # -- one message

    async def _answer(self, text: bytes) -> dict[str, object]:
        msg: Mapping[str, object] = {}
        reply: dict[str, object]
        try:
            msg = decode(text)
            reply = {"return": await self._execute(msg)}
        except QmpError as e:
            reply = {"error": e.reply()}
        except Exception as e:  # a bug in a handler must not take the connection down
            log.error("QMP command %r failed", msg.get("execute"), exc_info=True)
            reply = {"error": QmpError(f"internal error: {e!r}").reply()}
        if "id" in msg:
            reply["id"] = msg["id"]
        return reply

    @staticmethod
    def _encode_reply(reply: dict[str, object]) -> bytes:
        try:
            return encode(reply)
        except (TypeError, ValueError, RecursionError) as e:  # a handler's unencodable answer
            bad = {"error": QmpError(f"internal error: reply not encodable: {e}").reply()}
            if "id" in reply:
                with contextlib.suppress(TypeError, ValueError, RecursionError):
                    return encode({**bad, "id": reply["id"]})
            return encode(bad)

    async def _execute(self, msg: Mapping[str, object]) -> object:
        if "exec-oob" in msg:
            raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band "
                           "execution is not supported")
        for key in msg:
            if key not in _MEMBERS:
                raise QmpError(f"QMP input member '{key}' is unexpected")
        name = msg.get("execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if not self.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           COMMAND_NOT_FOUND)
        if self.negotiated and name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
        cmd = self.server.commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        result = await cmd.run(args)
        if name == "qmp_capabilities":
            self.negotiated = True
        return result


class QmpServer:
    """Serve ``commands`` on a Unix socket (mode 0600) to any number of clients."""

    def __init__(self, path: str | os.PathLike[str], commands: Iterable[Command]) -> None:
        self.path = os.fspath(path)
        self.commands: dict[str, Command] = {}
        self.runstate = Runstate.IDLE
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter = RateLimiter()
        for cmd in [*self._builtin_commands(), *commands]:
            if cmd.name in self.commands:
                raise ValueError(f"duplicate QMP command {cmd.name}")
            self.commands[cmd.name] = cmd

    # -- lifetime

    async def start(self) -> None:
        if self.runstate is not Runstate.IDLE:
            raise RuntimeError(f"QMP server {self.path} is {self.runstate.value}")
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=self.path, limit=MAX_MESSAGE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.runstate = Runstate.RUNNING

    async def close(self) -> None:
        self.runstate = Runstate.CLOSING
        if self._server is not None:
            self._server.close()
            tasks = list(self._connections.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.runstate = Runstate.CLOSED

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        try:
            await conn.serve()
        except asyncio.CancelledError:
            # close() cancelled it: end normally, or asyncio's stream callback reports the
            # cancelled task as an error with a traceback.
            if self.runstate not in (Runstate.CLOSING, Runstate.CLOSED):
                raise
        finally:
            self._connections.pop(conn, None)

    # -- events

    def emit(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every negotiated client; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        event = event_message(name, data)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._broadcast(event)
        else:
            with contextlib.suppress(RuntimeError):  # loop shutting down
                loop.call_soon_threadsafe(self._broadcast, event)

    def _broadcast(self, event: Event) -> None:
        admitted = self._limiter.admit(event)
        if admitted is None:
            return
        raw = encode(admitted)
        for conn in self._connections:
            conn.send_event(raw)

    # -- built-in commands

    def _builtin_commands(self) -> list[Command]:
        return [
            Command("qmp_capabilities", self._qmp_capabilities,
                    "Leave capabilities negotiation mode.",
                    (Arg("enable", "any", optional=True),)),
            Command("query-commands", self._query_commands, "List the commands."),
            Command("query-version", self._query_version, "Version of vtdx."),
            Command("query-vtdx-help", self._query_help,
                    "Commands with their arguments and descriptions (for consoles)."),
        ]

    async def _qmp_capabilities(self, enable: object = None) -> dict[str, object]:
        if enable:
            first = enable[0] if isinstance(enable, list) else enable
            raise QmpError(f"Capability '{first}' not available")
        return {}

    async def _query_commands(self) -> list[dict[str, str]]:
        return [{"name": n} for n in self.commands]

    async def _query_version(self) -> VersionInfo:
        return version()

    async def _query_help(self) -> list[CommandHelp]:
        return [{"name": c.name, "doc": c.doc, "args": [a.describe() for a in c.args]}
                for c in self.commands.values()]
