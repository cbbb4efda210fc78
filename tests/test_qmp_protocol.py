"""The QMP wire protocol of vtdx.observe.qmp over a real Unix socket: greeting, negotiation,
id echo, argument checking, error classes, events, streaming input and survival of bad input."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from vtdx.observe.qmp.errors import QmpError
from vtdx.observe.qmp.framing import JsonSplitter
from vtdx.observe.qmp.schema import Arg, Command
from vtdx.observe.qmp.server import QmpServer
from vtdx.observe.qmp.thread import QmpServerThread


def toy_commands() -> list[Command]:
    def add(a: int, b: int = 0) -> dict[str, int]:
        return {"sum": a + b}

    async def fail(cls: str = "GenericError") -> None:
        raise QmpError("it failed on purpose", cls)

    def boom() -> None:
        raise RuntimeError("bug")

    return [
        Command("x-add", add, "Add.", (Arg("a", "int"), Arg("b", "int", optional=True))),
        Command("x-fail", fail, "Fail.", (Arg("cls", "str", optional=True),)),
        Command("x-boom", boom, "Raise."),
        Command("x-prob", lambda p: {"p": p}, "", (Arg("p", "number", minimum=0, maximum=1),)),
        Command("x-mode", lambda m: {"m": m}, "", (Arg("m", "str", choices=("a", "b")),)),
    ]


class RawClient:
    """A byte-level client, to see exactly what the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        return cls(*await asyncio.open_unix_connection(path))

    async def recv(self) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line, "server closed the connection"
        return json.loads(line)

    async def send(self, data: bytes | dict) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode())
        await self.writer.drain()

    async def ask(self, data: bytes | dict) -> dict:
        await self.send(data)
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "vtdx-qmp.sock")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_greeting_negotiation_and_ids(sock: str):
    async def main():
        srv = QmpServer(sock, toy_commands())
        await srv.start()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        c = await RawClient.connect(sock)
        greet = await c.recv()
        assert greet["QMP"]["capabilities"] == []
        assert set(greet["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
        # Nothing but qmp_capabilities before negotiation.
        r = await c.ask({"execute": "x-add", "arguments": {"a": 1}, "id": 7})
        assert r == {"error": {"class": "CommandNotFound", "desc":
                     "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7}
        assert await c.ask({"execute": "qmp_capabilities", "id": "n"}) == {"return": {},
                                                                            "id": "n"}
        r = await c.ask({"execute": "qmp_capabilities"})
        assert r["error"]["class"] == "CommandNotFound"
        # Any JSON value is a valid id and comes back unchanged.
        r = await c.ask({"execute": "x-add", "arguments": {"a": 2, "b": "0x10"},
                         "id": {"k": [1, 2]}})
        assert r == {"return": {"sum": 18}, "id": {"k": [1, 2]}}
        names = [x["name"] for x in (await c.ask({"execute": "query-commands"}))["return"]]
        assert {"qmp_capabilities", "query-commands", "x-add", "x-fail"} <= set(names)
        await c.close()
        await srv.close()
        assert not os.path.exists(sock)

    run(main())


BAD_INPUTS = [
    ({"execute": "x-add"}, "GenericError", "Parameter 'a' is missing"),
    ({"execute": "x-add", "arguments": {"a": "z"}}, "GenericError",
     "Invalid parameter type for 'a', expected: integer"),
    ({"execute": "x-add", "arguments": {"a": True}}, "GenericError", "expected: integer"),
    ({"execute": "x-add", "arguments": {"a": 1, "c": 2}}, "GenericError",
     "Parameter 'c' is unexpected"),
    ({"execute": "x-add", "arguments": [1]}, "GenericError", "must be an object"),
    ({"execute": 5}, "GenericError", "must be a string"),
    ({"arguments": {}}, "GenericError", "lacks member 'execute'"),
    ({"execute": "x-add", "foo": 1}, "GenericError", "member 'foo' is unexpected"),
    ({"exec-oob": "x-add"}, "GenericError", "out-of-band"),
    ({"execute": "nope"}, "CommandNotFound", "The command nope has not been found"),
    ({"execute": "x-fail", "arguments": {"cls": "DeviceNotFound"}}, "DeviceNotFound",
     "on purpose"),
    ({"execute": "x-boom"}, "GenericError", "internal error"),
    ({"execute": "x-prob", "arguments": {"p": 1.5}}, "GenericError", "must be <= 1"),
    ({"execute": "x-mode", "arguments": {"m": "c"}}, "GenericError", "does not accept"),
    (b"[1, 2]", "GenericError", "must be a JSON object"),
    (b'{"execute": }', "GenericError", "JSON parse error"),
]


def test_bad_input_gets_errors_and_the_connection_survives(sock: str):
    async def main():
        srv = QmpServer(sock, toy_commands())
        await srv.start()
        c = await RawClient.connect(sock)
        await c.recv()
        await c.ask({"execute": "qmp_capabilities"})
        for msg, cls, desc in BAD_INPUTS:
            r = await c.ask(msg)
            assert r["error"]["class"] == cls, (msg, r)
            assert desc in r["error"]["desc"], (msg, r)
        # A bare scalar, then a good command on the same connection.
        await c.send(b"42 ")
        assert "JSON object" in (await c.recv())["error"]["desc"]
        assert (await c.ask({"execute": "x-add", "arguments": {"a": 1}, "id": 1}))[
            "return"] == {"sum": 1}
        await c.close()
        await srv.close()

    run(main())


def test_stream_split_across_writes_and_batched(sock: str):
    async def main():
        srv = QmpServer(sock, toy_commands())
        await srv.start()
        c = await RawClient.connect(sock)
        await c.recv()
        raw = b'{"execute":"qmp_capabilities"}{"execute":"x-add","arguments":{"a":"}{\\"","b":1}}'
        # Two messages in one write, the second split mid-string: the string holds braces.
        await c.send(raw[:40])
        await asyncio.sleep(0.05)
        await c.send(raw[40:] + b'\n{"execute":"x-add","arguments":{"a":3},"id":2}')
        assert await c.recv() == {"return": {}}
        r = await c.recv()
        assert "expected: integer" in r["error"]["desc"]
        assert await c.recv() == {"return": {"sum": 3}, "id": 2}
        await c.close()
        await srv.close()

    run(main())


def test_splitter_resyncs_after_garbage():
    sp = JsonSplitter(limit=64)
    out = list(sp.feed(b'nonsense {"a": "x"} ' + b"[" * 100 + b' {"b":1}'))
    assert out[0] == (None, "QMP input must be a JSON object")
    assert out[1] == (b'{"a": "x"}', None)
    assert out[2][1] and "exceeds" in out[2][1]


def test_events_reach_negotiated_clients_only_with_timestamps(sock: str):
    async def main():
        srv = QmpServer(sock, toy_commands())
        await srv.start()
        a = await RawClient.connect(sock)
        b = await RawClient.connect(sock)
        await a.recv()
        await b.recv()
        await a.ask({"execute": "qmp_capabilities"})
        srv.emit("VTDX_TEST", {"n": 1})
        ev = await a.recv()
        assert ev["event"] == "VTDX_TEST" and ev["data"] == {"n": 1}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        # b never negotiated: its next message is the reply to its own command.
        assert (await b.ask({"execute": "qmp_capabilities"})) == {"return": {}}
        await a.close()
        await b.close()
        await srv.close()

    run(main())


def test_qemu_qmp_client_and_thread_server(sock: str):
    """qemu.qmp's QMPClient against the server running on its own thread (daemon style)."""
    t = QmpServerThread(QmpServer(sock, toy_commands())).start()

    async def main():
        qmp = QMPClient("test")
        await qmp.connect(sock)
        assert qmp.greeting is not None
        assert await qmp.execute("x-add", {"a": 40, "b": 2}) == {"sum": 42}
        with pytest.raises(ExecuteError) as ei:
            await qmp.execute("x-add", {"a": "nope"})
        assert ei.value.error_class == "GenericError"
        # Still connected after the error; events arrive through the client's listener.
        listener = EventListener()
        with qmp.listen(listener):
            t.server.emit("VTDX_TEST", {"x": 1})
            ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["event"] == "VTDX_TEST"
        assert await qmp.execute("x-add", {"a": 1}) == {"sum": 1}
        help_ = await qmp.execute("query-vtdx-help")
        add = next(c for c in help_ if c["name"] == "x-add")
        assert [a["name"] for a in add["args"]] == ["a", "b"]
        await qmp.disconnect()

    try:
        run(main())
    finally:
        t.stop()
    assert not os.path.exists(sock)
