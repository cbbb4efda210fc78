"""A QMP server for the daemon, so QEMU's own tools (qemu.qmp, qmp-shell) can inspect vtdx.

The wire protocol follows QEMU's docs/interop/qmp-spec: a greeting, ``qmp_capabilities``
before anything else, one JSON object per command with an optional ``id`` echoed back,
``{"error": {"class", "desc"}}`` on failure and timestamped events. Input is a JSON *stream*
(qemu.qmp sends objects without a newline), so the splitter tracks nesting instead of
reading lines. Bad input always gets an error reply; the connection stays up.

The commands themselves live in one table (``Command`` entries); ``query-commands`` and the
argument checks are generated from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vtdx import __version__

log = logging.getLogger(__name__)

#: Upper bound of one incoming message; larger input is answered with an error and dropped.
MAX_MESSAGE = 1 << 20
#: Events of one name allowed per second before they are dropped (and counted).
EVENT_RATE = 50


class QmpError(Exception):
    """A command failure reported to the client with a QMP error class."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True, slots=True)
class Arg:
    """One command argument: its JSON type and how to check it.

    ``int`` also accepts a string such as ``"0x1b090c"`` because qmp-shell passes anything
    that is not a decimal literal as a string, and addresses are written in hex.
    """

    name: str
    type: str  # "int" | "str" | "bool" | "number" | "any"
    doc: str = ""
    optional: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    #: Custom conversion for domain types (leaf names, status names); raises QmpError.
    convert: Callable[[Any], Any] | None = None

    def check(self, value: Any) -> Any:
        kind = self.type
        if self.convert is not None:
            return self.convert(value)
        if kind == "int":
            value = _as_int(self.name, value)
        elif kind == "number":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise _type_error(self.name, "number") from None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _type_error(self.name, "number")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise _type_error(self.name, "boolean")
        elif kind == "str":
            if not isinstance(value, str):
                raise _type_error(self.name, "string")
            if self.choices and value not in self.choices:
                raise QmpError(
                    f"Parameter '{self.name}' does not accept value '{value}'"
                    f" (one of: {', '.join(self.choices)})"
                )
        if self.minimum is not None and value < self.minimum:
            raise QmpError(f"Parameter '{self.name}' must be >= {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise QmpError(f"Parameter '{self.name}' must be <= {self.maximum:g}")
        return value

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "optional": self.optional}
        if self.doc:
            d["doc"] = self.doc
        if self.choices:
            d["choices"] = list(self.choices)
        return d


def _type_error(name: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{name}', expected: {expected}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _type_error(name, "integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""), 0)
        except ValueError:
            pass
    raise _type_error(name, "integer")


Handler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Command:
    """A QMP command: name, argument spec and the function that answers it.

    Synchronous handlers run in a worker thread: they take the module mutex, which a
    SEAMCALL in flight may hold for a moment, and the event loop must keep serving.
    """

    name: str
    handler: Handler
    doc: str = ""
    args: tuple[Arg, ...] = ()

    def bind(self, arguments: dict[str, Any]) -> dict[str, Any]:
        known = {a.name: a for a in self.args}
        for key in arguments:
            if key not in known:
                raise QmpError(f"Parameter '{key}' is unexpected")
        out: dict[str, Any] = {}
        for a in self.args:
            if a.name in arguments:
                out[a.name] = a.check(arguments[a.name])
            elif not a.optional:
                raise QmpError(f"Parameter '{a.name}' is missing")
        return out

    async def run(self, arguments: dict[str, Any]) -> Any:
        kwargs = self.bind(arguments)
        if inspect.iscoroutinefunction(self.handler):
            result = await self.handler(**kwargs)
        else:
            result = await asyncio.to_thread(self.handler, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return {} if result is None else result


# --------------------------------------------------------------------------- framing


class JsonSplitter:
    """Cut a byte stream into top-level JSON texts, as QEMU's json-streamer does.

    Yields ``(text, None)`` for each complete object or array and ``(None, error)`` for
    input that can never become one (a bare scalar, a stray closing brace, an oversized
    message); after an error it resynchronises at the next top-level boundary.
    """

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._junk = False  # inside a bad top-level token

    def feed(self, data: bytes) -> Iterator[tuple[bytes | None, str | None]]:
        for b in data:
            ch = chr(b)
            if self._depth == 0 and not self._buf:
                if ch in " \t\r\n":
                    self._junk = False
                    continue
                if ch in "{[":
                    self._junk = False
                    self._buf.append(b)
                    self._depth = 1
                    continue
                if not self._junk:
                    self._junk = True
                    yield None, "QMP input must be a JSON object"
                continue
            self._buf.append(b)
            if len(self._buf) > self.limit:
                self._reset()
                self._junk = True
                yield None, f"JSON message exceeds {self.limit} bytes"
                continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                continue
            if ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    text = bytes(self._buf)
                    self._reset()
                    yield text, None

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_str = False
        self._esc = False


# --------------------------------------------------------------------------- server


def _timestamp() -> dict[str, int]:
    now = time.time()
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}


@dataclass
class _RateLimit:
    """Per-event-name budget so an error storm cannot flood every client."""

    window_start: float = 0.0
    sent: int = 0
    dropped: int = 0


@dataclass(eq=False)
class _Client:
    writer: asyncio.StreamWriter
    negotiated: bool = False
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=1024))


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


class QmpServer:
    """Serve ``commands`` on a Unix socket (mode 0600) to any number of clients."""

    def __init__(self, path: str | os.PathLike[str], commands: Iterable[Command]) -> None:
        self.path = os.fspath(path)
        self.commands: dict[str, Command] = {}
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rates: dict[str, _RateLimit] = {}
        builtin = [
            Command("qmp_capabilities", self._qmp_capabilities, "Leave capabilities "
                    "negotiation mode.", (Arg("enable", "any", optional=True),)),
            Command("query-commands", self._query_commands, "List the commands."),
            Command("query-version", self._query_version, "Version of vtdx."),
            Command("query-vtdx-help", self._query_help,
                    "Commands with their arguments and descriptions (for consoles)."),
        ]
        for cmd in [*builtin, *commands]:
            if cmd.name in self.commands:
                raise ValueError(f"duplicate QMP command {cmd.name}")
            self.commands[cmd.name] = cmd

    # -- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.path, limit=MAX_MESSAGE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- events

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        msg: dict[str, Any] = {"event": event, "data": data or {}, "timestamp": _timestamp()}
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._broadcast(msg)
        else:
            with contextlib.suppress(RuntimeError):  # loop shutting down
                loop.call_soon_threadsafe(self._broadcast, msg)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        rate = self._rates.setdefault(msg["event"], _RateLimit())
        now = time.monotonic()
        if now - rate.window_start >= 1.0:
            rate.window_start, rate.sent = now, 0
        if rate.sent >= EVENT_RATE:
            rate.dropped += 1
            return
        rate.sent += 1
        if rate.dropped:
            msg["data"] = {**msg["data"], "dropped-before": rate.dropped}
            rate.dropped = 0
        raw = _encode(msg)
        for c in self._clients:
            if c.negotiated:
                with contextlib.suppress(asyncio.QueueFull):  # a stuck client loses events
                    c.queue.put_nowait(raw)

    # -- connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        task = asyncio.current_task()
        self._tasks.add(task)  # type: ignore[arg-type]
        pump = asyncio.create_task(self._pump(client))
        try:
            client.queue.put_nowait(_encode(self._greeting()))
            splitter = JsonSplitter()
            while data := await reader.read(65536):
                for text, err in splitter.feed(data):
                    reply = self._parse_error(err) if err else await self._handle(client, text)
                    await client.queue.put(_encode(reply))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            try:  # flush replies already queued (a client may send and hang up at once)
                client.queue.put_nowait(b"")
                await asyncio.wait_for(pump, 1.0)
            except BaseException:
                pump.cancel()
            writer.close()

    async def _pump(self, client: _Client) -> None:
        """Single writer per client, so replies and events never interleave mid-message."""
        while raw := await client.queue.get():
            client.writer.write(raw)
            await client.writer.drain()

    @staticmethod
    def _parse_error(desc: str | None) -> dict[str, Any]:
        return {"error": {"class": "GenericError", "desc": desc or "JSON parse error"}}

    def _greeting(self) -> dict[str, Any]:
        major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
        return {
            "QMP": {
                "version": {
                    "qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": f"vtdx {__version__}",
                },
                "capabilities": [],
            }
        }

    async def _handle(self, client: _Client, text: bytes | None) -> dict[str, Any]:
        try:
            msg = json.loads(text or b"")
        except (ValueError, UnicodeDecodeError) as e:
            return self._parse_error(f"JSON parse error, {e}")
        if not isinstance(msg, dict):
            return self._parse_error("QMP input must be a JSON object")
        reply: dict[str, Any]
        try:
            reply = {"return": await self._dispatch(client, msg)}
        except QmpError as e:
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        except Exception as e:  # a bug in a query must not take the connection down
            log.exception("QMP command failed")
            reply = {"error": {"class": "GenericError", "desc": f"internal error: {e!r}"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        return reply

    async def _dispatch(self, client: _Client, msg: dict[str, Any]) -> Any:
        if "exec-oob" in msg:
            raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band "
                           "execution is not supported")
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                raise QmpError(f"QMP input member '{key}' is unexpected")
        name = msg.get("execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if not client.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if client.negotiated and name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        cmd = self.commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        result = await cmd.run(args)
        if name == "qmp_capabilities":
            client.negotiated = True
        return result

    # -- built-in commands

    async def _qmp_capabilities(self, enable: Any = None) -> dict[str, Any]:
        if enable:
            raise QmpError(f"Capability '{enable[0] if isinstance(enable, list) else enable}'"
                           " not available")
        return {}

    async def _query_commands(self) -> list[dict[str, str]]:
        return [{"name": n} for n in self.commands]

    async def _query_version(self) -> dict[str, Any]:
        return self._greeting()["QMP"]["version"]

    async def _query_help(self) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "doc": c.doc, "args": [a.describe() for a in c.args]}
            for c in self.commands.values()
        ]


class QmpServerThread:
    """Run a ``QmpServer`` on its own event loop thread.

    The daemon serves vCPUs on plain threads; this keeps the QMP socket responsive without
    making the daemon asyncio-based.
    """

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="vtdx-qmp", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        # Connections accepted while closing never registered: cancel whatever is left.
        pending = asyncio.all_tasks(self._loop)
        for t in pending:
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> QmpServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------- QEMU control


class QemuControl:
    """stop / cont / query-status / quit on QEMU's own QMP socket, through qemu.qmp.

    Connects per request and disconnects again: QEMU's QMP chardev serves one client at a
    time, and the machine runner or a developer may want it in between.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:
        from qemu.qmp import ExecuteError, QMPClient, QMPError

        client = QMPClient("vtdx-control")
        deadline = time.monotonic() + timeout
        while True:  # QEMU may still be starting: its socket appears a moment later
            try:
                await asyncio.wait_for(client.connect(self.path), timeout)
                break
            except (TimeoutError, OSError, QMPError) as e:
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {self.path} is not available: {e}"
                                   ) from e
                await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        except ExecuteError as e:
            raise QmpError(f"QEMU: {e}", e.error_class) from e
        except (TimeoutError, QMPError) as e:
            if cmd == "quit":  # QEMU may hang up before answering
                return {}
            raise QmpError(f"QEMU did not answer {cmd}: {e!r}") from e
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def stop(self) -> Any:
        return await self.execute("stop")

    async def cont(self) -> Any:
        return await self.execute("cont")

    async def status(self) -> Any:
        return await self.execute("query-status")

    async def quit(self) -> Any:
        return await self.execute("quit")


# --------------------------------------------------------------------------- vtdx commands

EVENT_SEAMCALL_ERROR = "VTDX_SEAMCALL_ERROR"


def _leaf_arg(value: Any) -> int:
    from vtdx.errors import VtdxError
    from vtdx.observe.trace import parse_leaf

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _type_error("leaf", "leaf number or name")
    try:
        return parse_leaf(value)
    except VtdxError as e:
        raise QmpError(str(e)) from None


def _status_arg(value: Any) -> int:
    """A status as a number or a name, optionally with an operand: ``TDX_OPERAND_BUSY+RCX``."""
    from vtdx.abi import status as st

    if isinstance(value, bool):
        raise _type_error("status", "status number or name")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise _type_error("status", "status number or name")
    text = value.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    name, _, operand = text.upper().replace("|", "+").partition("+")
    if not name.startswith(("TDX_", "TD_")):
        name = "TDX_" + name
    by_name = {v: k for k, v in st.NAMES.items()}
    if name not in by_name:
        raise QmpError(f"unknown TDX status {value!r} (e.g. TDX_SYS_BUSY, "
                       "TDX_OPERAND_BUSY+RCX or 0x8000020200000000)")
    op = 0
    if operand:
        ids = {v: k for k, v in st.OPERAND_IDS.items()}
        try:
            op = ids[operand] if operand in ids else int(operand, 0)
        except ValueError:
            raise QmpError(f"unknown operand {operand!r} (RCX, R8, TDR... or a number)") from None
    return by_name[name] + op


def _int_list(value: Any) -> list[int]:
    if isinstance(value, list):
        return [_as_int("lps", v) for v in value]
    if isinstance(value, str):  # qmp-shell: lps=0,1
        return [_as_int("lps", v) for v in value.split(",") if v.strip()]
    return [_as_int("lps", value)]


def vtdx_commands(inspector: Any, qemu: QemuControl | None = None) -> list[Command]:
    """The vtdx QMP command table over an ``vtdx.observe.inspect.Inspector``."""
    from vtdx.observe.inspect import InspectError

    def q(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(**kw: Any) -> Any:
            try:
                return fn(**kw)
            except InspectError as e:
                raise QmpError(str(e), e.cls) from None
        return run

    def pamt(pfn: int | None = None, pa: int | None = None, count: int | None = None,
             summary: bool = False) -> Any:
        if pfn is not None and pa is not None:
            raise QmpError("give either 'pfn' or 'pa', not both")
        if pfn is None and pa is None:
            if count is not None:
                raise QmpError("'count' needs 'pfn' or 'pa'")
            return inspector.pamt_summary()
        if summary:
            raise QmpError("'summary' takes no 'pfn' or 'pa'")
        addr = pa if pa is not None else pfn << 12  # type: ignore[operator]
        if count is None:
            return inspector.pamt_page(addr)
        return inspector.pamt_range(addr, count)

    def trace(count: int = 20, leaf: int | None = None, lp: int | None = None,
              errors: bool = False) -> Any:
        return inspector.trace(count, leaf, lp, errors)

    def inject(status: int, leaf: int | None = None, count: int | None = None,
               probability: float = 1.0, lp: int | None = None,
               lps: list[int] | None = None) -> Any:
        if lp is not None and lps is not None:
            raise QmpError("give either 'lp' or 'lps', not both")
        if lp is not None:
            lps = [lp]
        return inspector.inject(status, leaf, count, probability, lps)

    addr = dict(minimum=0, maximum=(1 << 52) - 1)
    cmds = [
        Command("query-vtdx-status", q(inspector.status),
                "Module state, LPs, keyids, TDMR/TD counts, SEAMCALL totals."),
        Command("query-vtdx-tdmrs", q(inspector.tdmrs),
                "TDMRs with PAMT areas, reserved areas and init progress."),
        Command("query-vtdx-pamt", q(pamt),
                "PAMT: one page at every level with lock holders and DPAMT pair (pfn or "
                "pa), a range of pages (with count), or without arguments a summary by "
                "level and page type.",
                (Arg("pfn", "int", "page frame number", optional=True, **addr),
                 Arg("pa", "int", "physical address", optional=True, **addr),
                 Arg("count", "int", "pages in a range", optional=True, minimum=1,
                     maximum=4096),
                 Arg("summary", "bool", "summary (the default without pfn/pa)",
                     optional=True))),
        Command("query-vtdx-tds", q(inspector.tds), "TDs: TDR, HKID, state, vCPUs, S-EPT."),
        Command("query-vtdx-sept", q(inspector.sept),
                "S-EPT of a TD: the walk for one GPA, or its leaf mappings.",
                (Arg("td", "int", "TDR physical address or index in query-vtdx-tds",
                     minimum=0),
                 Arg("gpa", "int", "guest physical address", optional=True, **addr),
                 Arg("count", "int", "mappings listed without gpa", optional=True,
                     minimum=1, maximum=4096))),
        Command("query-vtdx-locks", q(inspector.locks),
                "TDX locks held right now, with the calls (LP, leaf) holding them."),
        Command("query-vtdx-trace", q(trace), "The last SEAMCALLs (newest last).",
                (Arg("count", "int", "how many", optional=True, minimum=1, maximum=4096),
                 Arg("leaf", "leaf", "leaf number or name", optional=True,
                     convert=_leaf_arg),
                 Arg("lp", "int", "logical processor", optional=True, minimum=0),
                 Arg("errors", "bool", "only failed calls", optional=True))),
        Command("query-vtdx-stats", q(inspector.stats),
                "SEAMCALL counts, errors and module time per leaf and LP."),
        Command("query-vtdx-faults", q(inspector.faults), "Armed fault-injection rules."),
        Command("vtdx-inject", q(inject),
                "Make matching SEAMCALLs return a status (registers as the module leaves "
                "them on that error).",
                (Arg("status", "status", "status number or name, e.g. TDX_SYS_BUSY or "
                     "TDX_OPERAND_BUSY+RCX", convert=_status_arg),
                 Arg("leaf", "leaf", "leaf number or name (default: any)", optional=True,
                     convert=_leaf_arg),
                 Arg("count", "int", "fire this many times (default: unlimited)",
                     optional=True, minimum=1),
                 Arg("probability", "number", "chance per matching call", optional=True,
                     minimum=0.0, maximum=1.0),
                 Arg("lp", "int", "only this LP", optional=True, minimum=0),
                 Arg("lps", "int-list", "only these LPs", optional=True,
                     convert=_int_list))),
        Command("vtdx-inject-clear", q(inspector.inject_clear),
                "Remove one fault rule (id) or all.",
                (Arg("rule_id", "int", "rule id from vtdx-inject", optional=True,
                     minimum=1),)),
    ]
    if qemu is not None:
        cmds += [
            Command("stop", qemu.stop, "Pause the machine (QEMU stop)."),
            Command("cont", qemu.cont, "Resume the machine (QEMU cont)."),
            Command("query-status", qemu.status, "QEMU run state."),
            Command("quit", qemu.quit, "Quit QEMU."),
        ]
    return cmds


def seamcall_error_event(server: QmpServer) -> Callable[[dict[str, Any]], None]:
    """A TraceRecorder ``on_error`` callback that emits VTDX_SEAMCALL_ERROR events."""

    def emit(rec: dict[str, Any]) -> None:
        data = {k: rec[k] for k in ("seq", "lp", "leaf", "name", "status", "status-name")
                if k in rec}
        for k in ("caller", "injected"):
            if rec.get(k) is not None:
                data[k] = rec[k]
        server.emit(EVENT_SEAMCALL_ERROR, data)

    return emit


# --------------------------------------------------------------------------- daemon wiring

#: File names inside a run directory.
QMP_SOCKET = "vtdx-qmp.sock"


class InspectEndpoint:
    """What the daemon runs for inspection: trace recorder, inspector and QMP server.

    ``context(lp)`` gives the (RIP, RSP, CR3) of the vCPU whose SEAMCALL is being observed
    (the daemon knows it from the wire frame); with ``vmlinux`` (a vmlinux or System.map,
    or a directory with one), trace records then name the kernel function that made the call.
    """

    def __init__(
        self,
        module: Any,
        run_dir: str | os.PathLike[str],
        *,
        qemu_qmp: str | os.PathLike[str] | None = None,
        context: Callable[[int], tuple[int, int, int] | None] | None = None,
        vmlinux: str | os.PathLike[str] | None = None,
        trace: bool = True,
    ) -> None:
        from pathlib import Path

        from vtdx.observe.inspect import Inspector
        from vtdx.observe.trace import TRACE_FILE, TraceRecorder

        self.run_dir = Path(run_dir)
        self.socket_path = self.run_dir / QMP_SOCKET
        symbolise = None
        self.symbols = None
        if vmlinux is not None and context is not None:
            from vtdx.observe.symbols import CallerResolver, GuestVirt, SymbolTable

            self.symbols = SymbolTable.load(vmlinux)
            symbolise = CallerResolver(self.symbols, GuestVirt(module.memory)).describe
        self.recorder = TraceRecorder(
            self.run_dir / TRACE_FILE if trace else None, context=context, symbolise=symbolise
        )
        self.inspector = Inspector.attach(module, self.recorder)
        self.qemu = QemuControl(qemu_qmp) if qemu_qmp is not None else None
        self.server = QmpServer(self.socket_path, vtdx_commands(self.inspector, self.qemu))
        self.recorder.on_error.append(seamcall_error_event(self.server))
        self._thread: QmpServerThread | None = None

    def start(self) -> InspectEndpoint:
        self._thread = QmpServerThread(self.server).start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        self.inspector.module.remove_observer(self.recorder)
        self.recorder.close()

    def __enter__(self) -> InspectEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_inspect(
    backend: Any,
    run_dir: str | os.PathLike[str],
    *,
    qemu_qmp: str | os.PathLike[str] | None = None,
    callers: dict[int, tuple[int, ...]] | None = None,
    vmlinux: str | os.PathLike[str] | None = None,
) -> InspectEndpoint | None:
    """Start inspection for a daemon backend; None if it has no TDX module (echo/none).

    ``callers`` is the daemon's per-vCPU (RFLAGS, RIP, RSP, CR3) of the call in flight.
    """
    module = backend
    if module is not None and not hasattr(module, "pamt"):
        module = getattr(backend, "delegate", None)  # EchoBackend in front of the module
    if module is None or not hasattr(module, "pamt"):
        return None

    def context(lp: int) -> tuple[int, int, int] | None:
        c = callers.get(lp) if callers is not None else None
        return (c[1], c[2], c[3]) if c is not None else None

    return InspectEndpoint(module, run_dir, qemu_qmp=qemu_qmp,
                           context=context if callers is not None else None,
                           vmlinux=vmlinux).start()
