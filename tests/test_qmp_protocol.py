"""The QMP wire protocol of vtdx.observe.qmp over a real Unix socket: greeting, negotiation,
id echo, argument checking, error classes, events, streaming input and survival of bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient, Runstate

from vtdx.observe.qmp.errors import QmpError
from vtdx.observe.qmp.framing import MAX_MESSAGE, MAX_NESTING, JsonSplitter
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
    """A byte-level client, on purpose not qemu.qmp: these tests send what no well-behaved
    client would (broken JSON, split writes, garbage) and read exactly what comes back."""

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


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def nested_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


#: Input no client should send, and the error each gets (issue 15: a deeply nested object
#: used to raise RecursionError in the server and drop the connection without a reply).
GARBAGE = [
    (nested_object(100_000), ["nesting depth limit exceeded"]),
    (b'{"execute": "x-add", "arguments": {"a": ' + nested_array(5_000) + b"}}",
     ["nesting depth limit exceeded"]),
    (b'{"execute": "x-add", "arguments": {"a": "' + b"A" * (2 * MAX_MESSAGE) + b'"}}',
     [f"JSON message exceeds {MAX_MESSAGE} bytes"]),
    (b'{"execute": "x-add\xff\xfe"}', ["JSON parse error, invalid UTF-8 at byte 18"]),
    # UTF-16: the object's NULs fail to parse, the NUL after its "}" is a stray token.
    ('{"execute": "x-add"}'.encode("utf-16-le"),
     ["JSON parse error", "must be a JSON object"]),
    (b'"a string { with ] brackets"', ["must be a JSON object"]),
    (b"42 true null -1.5e3", ["must be a JSON object"] * 4),
    (b"[1, 2]", ["must be a JSON object"]),
    (b"}", ["must be a JSON object"]),
    (b'{"execute": "x-add", "arguments": {"a": 1e999999999}}', ["expected: integer"]),
    (b'{"execute": "x-add", "arguments": {"a": ' + b"9" * 5000 + b"}}", ["JSON parse error"]),
    (b"\x00\x01\x7f\xc0\xff", ["must be a JSON object"]),
    (b"x" * MAX_MESSAGE * 2, ["must be a JSON object"]),  # one token, one error
    (b" \r\n\t" * MAX_MESSAGE, []),  # whitespace between messages is no error
]


def test_garbage_gets_errors_and_the_server_survives(sock: str, caplog):
    """Each bad input gets its GenericError reply(ies), then a command on the same
    connection still works; nothing is logged and asyncio sees no failed task."""
    loop_errors: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        srv = QmpServer(sock, toy_commands())
        await srv.start()
        c = await RawClient.connect(sock)
        await c.recv()
        await c.ask({"execute": "qmp_capabilities"})
        for n, (data, descs) in enumerate(GARBAGE):
            await c.send(data + b"\n")
            for desc in descs:
                r = await c.recv()
                assert r["error"]["class"] == "GenericError", (data[:60], r)
                assert desc in r["error"]["desc"], (data[:60], r)
            r = await c.ask({"execute": "x-add", "arguments": {"a": n}, "id": n})
            assert r == {"return": {"sum": n}, "id": n}, (data[:60], r)
        # Nesting up to the limit is fine, and the id comes back whole.
        deep_id = json.loads(nested_array(MAX_NESTING - 1))
        r = await c.ask({"execute": "x-add", "arguments": {"a": 1}, "id": deep_id})
        assert r == {"return": {"sum": 1}, "id": deep_id}
        # A second client is served as usual.
        d = await RawClient.connect(sock)
        assert "QMP" in await d.recv()
        assert await d.ask({"execute": "qmp_capabilities"}) == {"return": {}}
        await d.close()
        await c.close()
        await srv.close()

    with caplog.at_level(logging.WARNING):
        run(main())
    assert loop_errors == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_nested_json_against_the_thread_server_and_qemu_qmp(sock: str):
    """The daemon's setup: after a raw client's too-deep message, qemu.qmp still works."""
    t = QmpServerThread(QmpServer(sock, toy_commands())).start()

    async def main():
        c = await RawClient.connect(sock)
        await c.recv()
        await c.ask({"execute": "qmp_capabilities"})
        r = await c.ask(nested_object(50_000))
        assert r == {"error": {"class": "GenericError", "desc":
                               f"JSON nesting depth limit exceeded (at most {MAX_NESTING} "
                               "levels)"}}
        assert (await c.ask({"execute": "x-add", "arguments": {"a": 2}}))["return"] == {
            "sum": 2}
        await c.close()
        qmp = QMPClient("test")
        await qmp.connect(sock)
        assert await qmp.execute("x-add", {"a": 1, "b": 1}) == {"sum": 2}
        await qmp.disconnect()

    try:
        run(main())
    finally:
        t.stop()


def test_splitter_any_chunking_gives_the_same_messages():
    stream = (b'  {"execute": "a", "arguments": {"s": "}{\\"\\\\", "l": [1, {"x": []}]}}'
              b'\n"junk string" [1,2]{"id":"\\u007b"} 7 {}')
    whole = list(JsonSplitter().feed(stream))
    assert whole == [
        (b'{"execute": "a", "arguments": {"s": "}{\\"\\\\", "l": [1, {"x": []}]}}', None),
        (None, "QMP input must be a JSON object"),
        (b"[1,2]", None),
        (b'{"id":"\\u007b"}', None),
        (None, "QMP input must be a JSON object"),
        (b"{}", None),
    ]
    for size in (1, 2, 3, 7):
        sp = JsonSplitter()
        got = [f for i in range(0, len(stream), size) for f in sp.feed(stream[i:i + size])]
        assert got == whole, size


def test_splitter_limits_nesting_and_resumes_after_the_message():
    sp = JsonSplitter(max_nesting=4)
    out = list(sp.feed(nested_array(4) + b" " + nested_array(5) + b'{"ok": "]]]"}'))
    assert out == [(nested_array(4), None),
                   (None, "JSON nesting depth limit exceeded (at most 256 levels)"),
                   (b'{"ok": "]]]"}', None)]


def test_server_stop_with_clients_attached_is_quiet(sock: str, capfd, caplog):
    """``vtdx run`` ending (Ctrl-C) while consoles are attached: the clients see the
    connection close, and nothing (no cancelled-task traceback) is printed."""
    t = QmpServerThread(QmpServer(sock, toy_commands())).start()

    async def main():
        qmp = QMPClient("attached")
        await qmp.connect(sock)
        raw = await RawClient.connect(sock)
        await raw.recv()
        await raw.send(b'{"execute": "qmp_capabilities"')  # half a message, pending
        await asyncio.sleep(0.1)
        await asyncio.to_thread(t.stop)
        assert await asyncio.wait_for(raw.reader.read(), 5) == b""
        for _ in range(100):
            if qmp.runstate is not Runstate.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert qmp.runstate is Runstate.DISCONNECTING
        with pytest.raises((EOFError, ConnectionResetError)):  # the server went away
            await qmp.disconnect()

    with caplog.at_level(logging.WARNING):
        run(main())
    assert not os.path.exists(sock)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
