"""The interactive ``vtdx console RUN_DIR``: an aioconsole CLI on qemu.qmp's async client.

readline line editing, history (kept in the vtdx cache) and tab completion of command
names, options, leaf and status names; VTDX_SEAMCALL_ERROR events are printed above the
prompt as they arrive. ``interact`` owns the connection and the event task, and ends
both (and saves the history) however the session ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import readline
import sys
import termios
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aioconsole  # type: ignore[import-untyped]
from aioconsole.stream import (  # type: ignore[import-untyped]
    NonFileStreamReader,
    NonFileStreamWriter,
)
from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

from vtdx.abi import leaves, status
from vtdx.errors import VtdxError
from vtdx.observe.answers import EVENT_SEAMCALL_ERROR, SeamcallErrorData
from vtdx.observe.console.commands import ConsoleCommands
from vtdx.observe.console.format import fmt_seamcall_error
from vtdx.observe.qmp.client import CLOSED, error_reason, socket_path
from vtdx.resources import cache_root

#: File name of the console's readline history in the vtdx cache.
HISTORY = "console_history"
BANNER = "`help` lists the commands; TAB completes; Ctrl-D leaves."
#: Options offered by tab completion after the command name.
_OPTIONS = ("leaf", "lp", "count", "errors", "pa", "probability")


def history_path() -> Path:
    return cache_root() / HISTORY


async def connect(sock: Path) -> QMPClient:
    client = QMPClient("vtdx-console")
    try:
        await asyncio.wait_for(client.connect(str(sock)), 10)
    except (OSError, QMPError, TimeoutError) as e:
        raise VtdxError(f"vtdx QMP socket {sock}: {error_reason(e)}") from None
    return client


async def interact(run_dir: str | os.PathLike[str], history: Path | None = None) -> int:
    """The interactive console (aioconsole CLI, readline when on a terminal)."""
    sys.ps1 = "vtdx> "
    sock = socket_path(run_dir)
    client = await connect(sock)
    cmds = ConsoleCommands()
    if sys.stdin.isatty():
        # readline reads the terminal itself; a stdin pipe reader would steal keystrokes.
        streams: Any = (NonFileStreamReader(sys.stdin), NonFileStreamWriter(sys.stdout))
    else:
        streams = aioconsole.get_standard_streams(use_stderr=False)
    cli = _Cli(cmds, client, history, streams=streams)
    watchers = [asyncio.ensure_future(_print_events(client, cli)),
                asyncio.ensure_future(_watch_connection(client, cli))]
    try:
        with _terminal_restored():
            await cli.interact(banner=f"vtdx console on {sock}\n{BANNER}", stop=False,
                               handle_sigint=False)
    except asyncio.CancelledError:  # Ctrl-C: leave the half-typed line before vtdx says so
        if sys.stdin.isatty():
            print(file=sys.stdout, flush=True)
        raise
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        cli.save_history()
        with contextlib.suppress(QMPError, OSError, EOFError):  # the endpoint may be gone
            await client.disconnect()
    return 0


async def _print_events(client: QMPClient, cli: _Cli) -> None:
    listener = EventListener(EVENT_SEAMCALL_ERROR)
    with client.listen(listener):
        async for ev in listener:
            cli.write(cli.above_prompt(fmt_seamcall_error(cast(SeamcallErrorData,
                                                               ev["data"]))))
            await cli.flush()


async def _watch_connection(client: QMPClient, cli: _Cli) -> None:
    """Say so at once when the endpoint hangs up (the machine stopped), not only at the
    next command."""
    while client.runstate is Runstate.RUNNING:
        await client.runstate_changed()
    cli.write(cli.above_prompt(f"! {CLOSED}; Ctrl-D leaves"))
    await cli.flush()


class _Cli(aioconsole.AsynchronousCli):
    """aioconsole's CLI with the console's commands and, on a terminal, readline input."""

    def __init__(self, cmds: ConsoleCommands, client: QMPClient, history: Path | None,
                 streams: Any) -> None:
        commands = {name: (self._wrap(name), c.parser) for name, c in cmds.commands.items()}
        super().__init__(commands, streams=streams, prog="vtdx console")
        self.cmds = cmds
        self.client = client
        self.history = history
        self._pending: asyncio.Future[str] | None = None
        self._tty = sys.stdin.isatty()
        if self._tty:
            self._setup_readline()

    def _wrap(self, name: str) -> Callable[..., Awaitable[str]]:
        async def run(reader: Any, writer: Any, **kw: Any) -> str:
            return await self.cmds.run_parsed(self.cmds.commands[name],
                                              argparse.Namespace(**kw), self.client)
        return run

    async def runsource(self, source: str, filename: str | None = None) -> bool:
        words = source.split()
        if words and words[0] == "quit":
            raise SystemExit
        if words and words[0] in ("help", "?"):
            self.write(self.cmds.help() + "\n")
            await self.flush()
            return False
        return bool(await super().runsource(source, filename))

    def _setup_readline(self) -> None:
        words = self.cmds.completions() + [f"--{o}" for o in _OPTIONS]
        words += _leaf_and_status_names()

        def complete(text: str, state: int) -> str | None:
            line = readline.get_line_buffer()
            first = not line[: readline.get_begidx()].strip()
            pool = self.cmds.completions() if first else words
            hits = [w + " " for w in pool if w.startswith(text)]
            return hits[state] if state < len(hits) else None

        readline.set_completer(complete)
        readline.set_completer_delims(" \t")
        readline.parse_and_bind("tab: complete")
        if self.history is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(self.history)

    def above_prompt(self, line: str) -> str:
        """Text that prints ``line`` and redraws the prompt with what is typed so far."""
        if not self._tty:
            return f"\n{line}\n"
        return f"\r\x1b[K{line}\n{sys.ps1}{readline.get_line_buffer()}"

    def save_history(self) -> None:
        if self._tty and self.history is not None:
            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(self.history)

    async def raw_input(self, prompt: str = "") -> str:
        if not self._tty:
            return str(await super().raw_input(prompt))
        await self.flush()
        if self._pending is None or self._pending.done():
            self._pending = _input_in_thread(prompt)
        try:
            return await self._pending
        finally:
            if self._pending.done():
                self._pending = None


def _input_in_thread(prompt: str) -> asyncio.Future[str]:
    """``input(prompt)`` (readline) on a daemon thread, as a future of the event loop.

    Not the loop's default executor: its threads are joined at exit, so Ctrl-C (which
    cancels the console) would wait for the user to press Enter before vtdx could leave.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def settle(line: str | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(line or "")

    def read() -> None:
        line, error = None, None
        try:
            line = input(prompt)
        except BaseException as e:  # EOFError (Ctrl-D) ends the console
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, line, error)

    threading.Thread(target=read, name="vtdx-console-input", daemon=True).start()
    return fut


@contextlib.contextmanager
def _terminal_restored() -> Iterator[None]:
    """Put the terminal back as it was: readline may be mid-line when the console ends."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if sys.stdin.isatty() else None
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _leaf_and_status_names() -> list[str]:
    return ([leaves.leaf_name(int(x)) for x in leaves.Leaf]
            + sorted(set(status.NAMES.values())))
