"""The console's commands: short argparse front ends over the vtdx QMP commands.

A console command turns its words into one QMP request and its answer into text; it does
no I/O itself, so the same table serves ``-c`` (the synchronous ``VtdxClient``) and the
interactive console (qemu.qmp's async ``QMPClient``). ``pamt 0x1b090c`` is
``query-vtdx-pamt pfn=0x1b090c``; ``pause``/``resume`` are QEMU's ``stop``/``cont``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vtdx.errors import VtdxError
from vtdx.observe.answers import InjectAnswer, InjectClearAnswer
from vtdx.observe.console import format as F
from vtdx.observe.qmp.client import QmpCommandError, VtdxClient, error_reason


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that collects what it would print (usage errors, ``-h``) for the caller.

    It still raises SystemExit on those, as aioconsole's CLI expects of its parsers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.printed: list[str] = []

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            self.printed.append(message)


@dataclass(frozen=True)
class Request:
    """One QMP command with its arguments."""

    command: str
    arguments: dict[str, object] = field(default_factory=dict)


#: Renders a command's answer (one of the vtdx.observe.answers types) as text.
Render = Callable[[Any], str]


@dataclass(frozen=True)
class ConsoleCommand:
    name: str
    parser: _Parser
    request: Callable[[argparse.Namespace], Request]
    render: Render


def _given(**kw: object) -> dict[str, object]:
    return {k: v for k, v in kw.items() if v is not None}


def _inject_text(r: InjectAnswer) -> str:
    return f"rule {r['id']}: inject {r['status-name']}"


def _clear_text(r: InjectClearAnswer) -> str:
    return f"removed {r['removed']} rule(s)"


class ConsoleCommands:
    """The command table, and running one command line against a client."""

    def __init__(self) -> None:
        self.commands: dict[str, ConsoleCommand] = {}
        self._build()

    def _add(self, name: str, help_: str, request: Callable[[argparse.Namespace], Request],
             render: Render) -> _Parser:
        p = _Parser(prog=name, description=help_, add_help=True)
        self.commands[name] = ConsoleCommand(name, p, request, render)
        return p

    def _query(self, name: str, help_: str, command: str, render: Render) -> None:
        self._add(name, help_, lambda ns: Request(command), render)

    def _build(self) -> None:
        self._query("status", "module state, LPs, keyids, TDMRs, counts", "query-vtdx-status",
                    F.fmt_status)
        self._query("tdmrs", "TDMRs and their PAMT areas", "query-vtdx-tdmrs", F.fmt_tdmrs)

        p = self._add("pamt", "PAMT of a page (every level, locks, DPAMT), a range with -n, "
                      "or a summary without arguments",
                      lambda ns: Request("query-vtdx-pamt",
                                         _given(pfn=ns.pfn, pa=ns.pa, count=ns.count)),
                      F.fmt_pamt)
        p.add_argument("pfn", type=_int, nargs="?", help="page frame number")
        p.add_argument("--pa", type=_int, help="physical address instead of a pfn")
        p.add_argument("-n", "--count", type=_int, help="pages from there")

        self._query("tds", "TDs", "query-vtdx-tds", F.fmt_tds)

        p = self._add("sept", "S-EPT walk of a GPA, or a TD's mappings",
                      lambda ns: Request("query-vtdx-sept",
                                         _given(td=ns.td, gpa=ns.gpa, count=ns.count)),
                      F.fmt_sept)
        p.add_argument("td", type=_int, help="TDR address or index from `tds`")
        p.add_argument("gpa", type=_int, nargs="?", help="guest physical address")
        p.add_argument("-n", "--count", type=_int, help="mappings to list")

        self._query("locks", "TDX locks held and the calls holding them", "query-vtdx-locks",
                    F.fmt_locks)

        p = self._add("trace", "the last SEAMCALLs",
                      lambda ns: Request("query-vtdx-trace", {
                          "count": ns.count, "errors": ns.errors,
                          **_given(leaf=ns.leaf, lp=ns.lp)}),
                      F.fmt_trace)
        p.add_argument("-n", "--count", type=_int, default=20)
        p.add_argument("--leaf", help="leaf name or number")
        p.add_argument("--lp", type=_int)
        p.add_argument("--errors", action="store_true", help="failed calls only")

        self._query("stats", "SEAMCALL statistics", "query-vtdx-stats", F.fmt_stats)
        self._query("faults", "armed fault rules", "query-vtdx-faults", F.fmt_faults)

        p = self._add("inject", "make SEAMCALLs fail with a status",
                      lambda ns: Request("vtdx-inject", {
                          "status": ns.status,
                          **_given(leaf=ns.leaf, count=ns.count, probability=ns.probability,
                                   lps=ns.lp or None)}),
                      _inject_text)
        p.add_argument("status", help="e.g. TDX_SYS_BUSY, TDX_OPERAND_BUSY+RCX or a number")
        p.add_argument("--leaf", help="only this leaf (name or number)")
        p.add_argument("--count", type=_int, help="fire N times (default: until cleared)")
        p.add_argument("--probability", type=float, help="chance per matching call")
        p.add_argument("--lp", type=_int, action="append", help="only this LP (repeatable)")

        p = self._add("clear", "remove a fault rule (or all)",
                      lambda ns: Request("vtdx-inject-clear", _given(rule_id=ns.rule_id)),
                      _clear_text)
        p.add_argument("rule_id", type=_int, nargs="?")

        p = self._add("pause-call", "arm a SEAMCALL pause at a control point (vtdx-pause)",
                      lambda ns: Request("vtdx-pause", _given(
                          leaf=ns.leaf, lp=ns.lp, point=ns.point, td=ns.td, gpa=ns.gpa,
                          hpa=ns.hpa, nth=ns.nth, timeout=ns.timeout,
                          persistent=ns.persistent or None,
                          **{"gpa-size": ns.gpa_size, "hpa-size": ns.hpa_size,
                             "until-leaf": ns.until})),
                      F.fmt_pause)
        p.add_argument("leaf", nargs="?", help="leaf name or number (default: any)")
        p.add_argument("--lp", type=_int)
        p.add_argument("--point", choices=("entry", "locked", "done"))
        p.add_argument("--td", type=_int, help="TDR physical address")
        p.add_argument("--gpa", type=_int)
        p.add_argument("--gpa-size", type=_int)
        p.add_argument("--hpa", type=_int)
        p.add_argument("--hpa-size", type=_int)
        p.add_argument("--nth", type=_int)
        p.add_argument("--until", help="go on when this leaf returned on another LP")
        p.add_argument("--timeout", type=float, help="go on after this many seconds")
        p.add_argument("--persistent", action="store_true", help="stay armed after a hit")
        self._query("pauses", "armed pauses and the calls they hold", "query-vtdx-pauses",
                    F.fmt_pauses)
        p = self._add("resume-call", "let a paused SEAMCALL (or all) go on",
                      lambda ns: Request("vtdx-resume", _given(id=ns.id)), F.fmt_resume)
        p.add_argument("id", type=_int, nargs="?")
        p = self._add("unpause", "remove a pause (or all), releasing its call",
                      lambda ns: Request("vtdx-pause-clear", _given(id=ns.id)), F.fmt_resume)
        p.add_argument("id", type=_int, nargs="?")
        p = self._add("timing", "show or set the timing: serial, overlap, explore SEED",
                      lambda ns: Request("vtdx-timing", _given(
                          mode=ns.mode, seed=ns.seed, slowdown=ns.slowdown))
                      if ns.mode else Request("query-vtdx-timing"), F.fmt_timing)
        p.add_argument("mode", nargs="?", choices=("serial", "overlap", "explore"))
        p.add_argument("seed", type=_int, nargs="?")
        p.add_argument("--slowdown", type=float)
        p = self._add("contention", "BUSY from held locks: summary and newest records",
                      lambda ns: Request("query-vtdx-contention", _given(count=ns.count)),
                      F.fmt_contention)
        p.add_argument("-n", "--count", type=_int, default=None)

        self._query("pause", "pause the machine (QEMU stop): a consistent snapshot", "stop",
                    lambda _: "machine paused")
        self._query("resume", "resume the machine (QEMU cont)", "cont",
                    lambda _: "machine running")
        self._query("qemu", "QEMU run state", "query-status", F.fmt_qemu_status)

    # -- one line

    def parse(self, line: str) -> tuple[ConsoleCommand, argparse.Namespace] | str:
        """The command and its arguments, or the text to show instead (help, an error)."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            return f"error: {e}"
        if not words:
            return ""
        name, *rest = words
        if name in ("help", "?"):
            return self.help()
        cmd = self.commands.get(name)
        if cmd is None:
            return f"error: unknown command {name!r} (try `help`)"
        cmd.parser.printed = []
        try:
            return cmd, cmd.parser.parse_args(rest)
        except SystemExit:  # a usage error or -h: what argparse printed
            return "".join(cmd.parser.printed).rstrip()

    def run_line(self, line: str, client: VtdxClient) -> str:
        """Run one command line synchronously; errors come back as one ``error: ...`` line."""
        parsed = self.parse(line)
        if isinstance(parsed, str):
            return parsed
        cmd, ns = parsed
        req = cmd.request(ns)
        try:
            answer = client.execute(req.command, **req.arguments)
        except QmpCommandError as e:
            return f"error: {e.desc}"
        except VtdxError as e:
            return f"error: connection: {e}"
        return cmd.render(answer)

    async def run_parsed(self, cmd: ConsoleCommand, ns: argparse.Namespace,
                         client: QMPClient) -> str:
        """Run a parsed command on an async client (the interactive console)."""
        req = cmd.request(ns)
        try:
            answer = await client.execute(req.command, req.arguments or None)
        except ExecuteError as e:
            return f"error: {e}"
        except (QMPError, OSError, EOFError) as e:
            return f"error: connection: {error_reason(e)}"
        return cmd.render(answer)

    def help(self) -> str:
        rows = [[n, c.parser.description or ""] for n, c in self.commands.items()]
        rows += [["help", "this list (`CMD -h` for a command's options)"], ["exit", "leave"]]
        return F.table(["command", "what"], rows)

    def completions(self) -> list[str]:
        return [*self.commands, "help", "exit", "quit"]
