"""``vtdx console RUN_DIR``: short commands over the daemon's QMP socket, readable tables.

The same queries as QMP (``pamt 0x1b090c`` is ``query-vtdx-pamt pfn=0x1b090c``), plus
pause/resume of the machine. Interactive use is an aioconsole CLI with readline line
editing, history and tab completion of command names, leaf and status names;
``-c "cmd; cmd"`` runs commands and exits, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aioconsole

from vtdx.errors import VtdxError
from vtdx.observe.qmp import EVENT_SEAMCALL_ERROR, QMP_SOCKET

HISTORY = "console_history"


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def hx(v: Any) -> str:
    return f"0x{v:x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned text table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _lock(lk: dict[str, Any] | None) -> str:
    if not lk:
        return "-"
    who = ", ".join(
        f"lp{h['lp']} {h['leaf']} @{h['point']}" if "lp" in h else f"call#{h['call']}"
        for h in lk["holders"])
    return f"{lk['mode']} by {who}"


# --------------------------------------------------------------------------- formatters


def fmt_status(s: dict[str, Any]) -> str:
    k = s["keyids"]
    lps = " ".join(f"lp{x['lp']}{'' if x['initialized'] else '(uninit)'}"
                   + ("*" if x["in-call"] else "") for x in s["lps"])
    lines = [
        f"module:     {s['state']}, {s['num-init-lps']}/{s['num-lps']} LPs initialized",
        f"LPs:        {lps}",
        f"keyids:     MKTME 1..{k['mktme']}, TDX [{k['tdx-start']}, "
        f"{k['tdx-start'] + k['tdx-count']}), global {k['global']}, "
        f"configured packages {k['configured-packages']}",
        f"memory:     {size(s['ram-bytes'])} RAM, {s['tdmrs']} TDMRs, PAMT "
        f"{s['pamt-bytes'] // 1024} KB, dynamic PAMT {'on' if s['dynamic-pamt'] else 'off'}",
        f"TDs:        {s['tds']}",
        f"locks held: {s['held-locks']}, fault rules: {s['fault-rules']}, "
        f"model errors: {s['internal-errors']}",
    ]
    if "seamcalls" in s:
        lines.append(f"SEAMCALLs:  {s['seamcalls']} ({s['seamcall-errors']} failed)")
    return "\n".join(lines)


def fmt_tdmrs(ts: list[dict[str, Any]]) -> str:
    rows = []
    for t in ts:
        pamt = " ".join(f"{p['level']}@{hx(p['base'])}+{size(p['size'])}" for p in t["pamt"])
        rows.append([t["index"], hx(t["base"]), hx(t["end"]), size(t["size"]), pamt,
                     len(t["reserved"]), "yes" if t["initialized"] else
                     f"up to {hx(t['initialized-up-to'])}"])
    return table(["#", "base", "end", "size", "PAMT (level@base+size)", "rsvd", "init"], rows)


def fmt_pamt_summary(s: dict[str, Any]) -> str:
    rows = []
    for t in s["tdmrs"]:
        for lv, d in t["levels"].items():
            types = " ".join(f"{k.removeprefix('PT_')}={v}" for k, v in d["types"].items())
            rows.append([t["index"], lv, d["pages"], types])
    head = (f"PAMT {s['pamt-bytes'] // 1024} KB ("
            + ", ".join(f"{k} {v // 1024} KB" for k, v in s["pamt-bytes-by-level"].items())
            + f"), {s['materialised-entries']} non-default entries, dynamic PAMT "
            + ("on" if s["dynamic-pamt"] else "off"))
    return head + "\n" + table(["tdmr", "level", "pages", "page types"], rows)


def fmt_pamt_page(p: dict[str, Any]) -> str:
    head = (f"pfn {hx(p['pfn'])} (PA {hx(p['pa'])}): TDMR {p['tdmr']}, "
            f"{'initialized' if p['initialized'] else 'NOT initialized'}"
            f"{', reserved' if p['reserved'] else ''}, walk stops at {p['walk-level']}")
    rows = [[lv["level"], hx(lv["base"]), lv["pt-name"], hx(lv["owner"]), lv["bepoch"],
             _lock(lv["lock"])] for lv in p["levels"]]
    out = head + "\n" + table(["level", "base", "type", "owner", "bepoch", "lock"], rows)
    if "dpamt" in p:
        d = p["dpamt"]
        pair = " ".join(hx(x) for x in d.get("pair", [])) or "none"
        out += f"\nDPAMT: 2M range {hx(d['range'])}, pair {pair}"
    return out


def fmt_pamt_rows(rows: list[dict[str, Any]]) -> str:
    return table(["pfn", "tdmr", "level", "type", "owner", "bepoch", "lock"],
                 [[hx(r["pfn"]), r["tdmr"] if r["tdmr"] is not None else "-",
                   r.get("level", "-"), r.get("pt-name", "(no TDMR)"),
                   hx(r.get("owner", 0)), r.get("bepoch", 0), _lock(r.get("lock"))]
                  for r in rows])


def fmt_tds(tds: list[dict[str, Any]]) -> str:
    if not tds:
        return "no TDs"
    rows = []
    for i, t in enumerate(tds):
        sept = t["sept"] or {}
        leaves = " ".join(f"{k}:{v}" for k, v in sept.get("leaves", {}).items()) or "-"
        rows.append([i, hx(t["tdr"]), t["hkid"], t["lifecycle"], t["op-state"],
                     f"{len(t['vcpus'])}/{t['max-vcpus']}", sept.get("pages", "-"), leaves,
                     "FATAL" if t["fatal"] else ("finalized" if t["finalized"] else "")])
    return table(["#", "TDR", "hkid", "lifecycle", "op-state", "vcpus", "sept pages",
                  "mapped", ""], rows)


def fmt_sept(s: dict[str, Any]) -> str:
    if "walk" in s:
        rows = [[w["level"], hx(w["sept-page"]), w["index"], w["state"], hx(w["hpa"]),
                 _lock(w.get("lock"))] for w in s["walk"]]
        return (f"TD {hx(s['tdr'])} GPA {hx(s['gpa'])}\n"
                + table(["level", "S-EPT page", "index", "state", "HPA", "lock"], rows))
    head = (f"TD {hx(s['tdr'])}: root level {s['root-level']}, {s['pages']} S-EPT pages, "
            f"{s['leaves']} leaf mappings")
    return head + "\n" + table(["GPA", "level", "state", "HPA"],
                               [[hx(m["gpa"]), m["level"], m["state"], hx(m["hpa"])]
                                for m in s["mappings"]])


def fmt_locks(d: dict[str, Any]) -> str:
    out = table(["lock", "mode", "held by"],
                [[h["key"], h["mode"], _lock(h).split(" by ", 1)[1]] for h in d["held"]])
    if d["waiting-calls"]:
        out += "\ncalls inside the module:\n" + table(
            ["call", "lp", "leaf", "point", "waiting s"],
            [[c["call"], c["lp"], c["leaf"], c["point"], c["waiting-s"]]
             for c in d["waiting-calls"]])
    return out


def fmt_trace(recs: list[dict[str, Any]]) -> str:
    from vtdx.observe.trace import format_record

    return "\n".join(format_record(r) for r in recs) or "no calls"


def fmt_stats(s: dict[str, Any]) -> str:
    rows = [[name, v["calls"], v.get("errors", ""), v.get("injected", ""),
             v.get("avg-us", ""), v.get("max-us", "")] for name, v in s["per-leaf"].items()]
    out = (f"{s['calls']} SEAMCALLs, {s.get('errors', 0)} failed\n"
           + table(["leaf", "calls", "errors", "injected", "avg us", "max us"], rows))
    if s.get("per-lp"):
        out += "\nper LP: " + " ".join(f"lp{k}:{v}" for k, v in s["per-lp"].items())
    if s.get("statuses"):
        out += "\nstatuses: " + ", ".join(f"{k}={v}" for k, v in s["statuses"].items())
    return out


def fmt_faults(rules: list[dict[str, Any]]) -> str:
    if not rules:
        return "no fault rules"
    return table(["id", "status", "leaf", "count", "prob", "lps", "fired"],
                 [[r["id"], r["status-name"], r.get("leaf-name", "any"),
                   r["count"] if r["count"] is not None else "inf", r["probability"],
                   r["lps"] if r["lps"] is not None else "any", r["fired"]] for r in rules])


# --------------------------------------------------------------------------- commands


Executor = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


class ConsoleCommands:
    """Console commands: argparse front ends that call QMP and format the answer."""

    def __init__(self, execute: Executor) -> None:
        self.execute = execute
        self.parsers: dict[str, argparse.ArgumentParser] = {}
        self.handlers: dict[str, Callable[..., Awaitable[str]]] = {}
        self._build()

    def _add(self, name: str, help_: str, handler: Callable[..., Awaitable[str]]
             ) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=name, description=help_, add_help=True)
        self.parsers[name] = p
        self.handlers[name] = handler
        return p

    def _build(self) -> None:
        x = self.execute
        self._add("status", "module state, LPs, keyids, TDMRs, counts", self._q(
            "query-vtdx-status", fmt_status))
        self._add("tdmrs", "TDMRs and their PAMT areas", self._q("query-vtdx-tdmrs", fmt_tdmrs))

        async def pamt(pfn: int | None, pa: int | None, count: int | None) -> str:
            args: dict[str, Any] = {}
            if pfn is not None:
                args["pfn"] = pfn
            if pa is not None:
                args["pa"] = pa
            if count is not None:
                args["count"] = count
            r = await x("query-vtdx-pamt", args)
            if "tdmrs" in r:
                return fmt_pamt_summary(r)
            return fmt_pamt_rows(r) if isinstance(r, list) else fmt_pamt_page(r)

        p = self._add("pamt", "PAMT of a page (every level, locks, DPAMT), a range with -n, "
                      "or a summary without arguments", pamt)
        p.add_argument("pfn", type=_int, nargs="?", help="page frame number")
        p.add_argument("--pa", type=_int, help="physical address instead of a pfn")
        p.add_argument("-n", "--count", type=_int, help="pages from there")
        self._add("tds", "TDs", self._q("query-vtdx-tds", fmt_tds))

        async def sept(td: int, gpa: int | None, count: int | None) -> str:
            args: dict[str, Any] = {"td": td}
            if gpa is not None:
                args["gpa"] = gpa
            if count is not None:
                args["count"] = count
            return fmt_sept(await x("query-vtdx-sept", args))

        p = self._add("sept", "S-EPT walk of a GPA, or a TD's mappings", sept)
        p.add_argument("td", type=_int, help="TDR address or index from `tds`")
        p.add_argument("gpa", type=_int, nargs="?", help="guest physical address")
        p.add_argument("-n", "--count", type=_int, help="mappings to list")
        self._add("locks", "TDX locks held and the calls holding them",
                  self._q("query-vtdx-locks", fmt_locks))

        async def trace(count: int, leaf: str | None, lp: int | None, errors: bool) -> str:
            args: dict[str, Any] = {"count": count, "errors": errors}
            if leaf is not None:
                args["leaf"] = leaf
            if lp is not None:
                args["lp"] = lp
            return fmt_trace(await x("query-vtdx-trace", args))

        p = self._add("trace", "the last SEAMCALLs", trace)
        p.add_argument("-n", "--count", type=_int, default=20)
        p.add_argument("--leaf", help="leaf name or number")
        p.add_argument("--lp", type=_int)
        p.add_argument("--errors", action="store_true", help="failed calls only")
        self._add("stats", "SEAMCALL statistics", self._q("query-vtdx-stats", fmt_stats))
        self._add("faults", "armed fault rules", self._q("query-vtdx-faults", fmt_faults))

        async def inject(status: str, leaf: str | None, count: int | None,
                         probability: float | None, lp: list[int] | None) -> str:
            args: dict[str, Any] = {"status": status}
            for k, v in (("leaf", leaf), ("count", count), ("probability", probability)):
                if v is not None:
                    args[k] = v
            if lp:
                args["lps"] = lp
            r = await x("vtdx-inject", args)
            return f"rule {r['id']}: inject {r['status-name']}"

        p = self._add("inject", "make SEAMCALLs fail with a status", inject)
        p.add_argument("status", help="e.g. TDX_SYS_BUSY, TDX_OPERAND_BUSY+RCX or a number")
        p.add_argument("--leaf", help="only this leaf (name or number)")
        p.add_argument("--count", type=_int, help="fire N times (default: until cleared)")
        p.add_argument("--probability", type=float, help="chance per matching call")
        p.add_argument("--lp", type=_int, action="append", help="only this LP (repeatable)")

        async def clear(rule_id: int | None) -> str:
            args = {"rule_id": rule_id} if rule_id is not None else {}
            r = await x("vtdx-inject-clear", args)
            return f"removed {r['removed']} rule(s)"

        p = self._add("clear", "remove a fault rule (or all)", clear)
        p.add_argument("rule_id", type=_int, nargs="?")

        async def pause() -> str:
            await x("stop", None)
            return "machine paused"

        async def resume() -> str:
            await x("cont", None)
            return "machine running"

        async def qstatus() -> str:
            r = await x("query-status", None)
            return f"QEMU: {r.get('status')} (running={r.get('running')})"

        self._add("pause", "pause the machine (QEMU stop): a consistent snapshot", pause)
        self._add("resume", "resume the machine (QEMU cont)", resume)
        self._add("qemu", "QEMU run state", qstatus)

    def _q(self, cmd: str, fmt: Callable[[Any], str]) -> Callable[..., Awaitable[str]]:
        async def run() -> str:
            return fmt(await self.execute(cmd, None))
        return run

    async def run_line(self, line: str) -> str:
        """Run one command line; errors come back as one ``error: ...`` line."""
        from qemu.qmp import ExecuteError, QMPError

        try:
            words = shlex.split(line)
        except ValueError as e:
            return f"error: {e}"
        if not words:
            return ""
        name, *rest = words
        if name in ("help", "?"):
            return self.help()
        parser = self.parsers.get(name)
        if parser is None:
            return f"error: unknown command {name!r} (try `help`)"
        try:
            ns = _parse(parser, rest)
        except _ParseError as e:
            return str(e)
        try:
            return await self.handlers[name](**vars(ns))
        except ExecuteError as e:
            return f"error: {e}"
        except QMPError as e:
            return f"error: connection: {e}"

    def help(self) -> str:
        rows = [[n, p.description or ""] for n, p in self.parsers.items()]
        rows += [["help", "this list (`CMD -h` for a command's options)"], ["exit", "leave"]]
        return table(["command", "what"], rows)

    def completions(self) -> list[str]:
        return [*self.parsers, "help", "exit", "quit"]


class _ParseError(Exception):
    pass


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """argparse that reports instead of exiting (usage errors and -h both come back)."""
    out: list[str] = []
    parser._print_message = lambda msg, file=None: out.append(msg)  # type: ignore[method-assign]
    try:
        return parser.parse_args(args)
    except SystemExit:
        raise _ParseError("".join(out).rstrip()) from None


# --------------------------------------------------------------------------- connection


def socket_of(run_dir: str | os.PathLike[str]) -> Path:
    p = Path(run_dir)
    sock = p if p.is_socket() else p / QMP_SOCKET
    if not sock.exists():
        raise VtdxError(f"no vtdx QMP socket at {sock} (is the run still going?)")
    return sock


async def connect(sock: Path) -> Any:
    from qemu.qmp import QMPClient, QMPError

    client = QMPClient("vtdx-console")
    try:
        await asyncio.wait_for(client.connect(str(sock)), 10)
    except (OSError, QMPError, TimeoutError) as e:
        raise VtdxError(f"cannot connect to {sock}: {e}") from None
    return client


async def run_commands(run_dir: str | os.PathLike[str], script: str,
                       out: Any = None) -> int:
    """Non-interactive: run ``;``-separated commands; exit status 1 if one failed."""
    out = out or sys.stdout
    client = await connect(socket_of(run_dir))
    cmds = ConsoleCommands(client.execute)
    rc = 0
    try:
        for line in script.split(";"):
            text = await cmds.run_line(line.strip())
            if text:
                print(text, file=out, flush=True)
            if text.startswith(("error:", "usage:")):
                rc = 1
    finally:
        await client.disconnect()
    return rc


async def interact(run_dir: str | os.PathLike[str], history: Path | None = None) -> int:
    """The interactive console (aioconsole CLI, readline when on a terminal)."""
    sys.ps1 = "vtdx> "
    sock = socket_of(run_dir)
    client = await connect(sock)
    cmds = ConsoleCommands(client.execute)
    if sys.stdin.isatty():
        # readline reads the terminal itself; a stdin pipe reader would steal keystrokes.
        from aioconsole.stream import NonFileStreamReader, NonFileStreamWriter

        streams: Any = (NonFileStreamReader(sys.stdin), NonFileStreamWriter(sys.stdout))
    else:
        streams = aioconsole.get_standard_streams(use_stderr=False)
    cli = _Cli(cmds, history, streams=streams)
    events = asyncio.ensure_future(_print_events(client, cli))
    try:
        await cli.interact(
            banner=f"vtdx console on {sock}\n`help` lists the commands; TAB completes; "
            "Ctrl-D leaves.",
            stop=False, handle_sigint=False)
    finally:
        events.cancel()
        with contextlib.suppress(BaseException):
            await events
        cli.save_history()
        await client.disconnect()
    return 0


async def _print_events(client: Any, cli: Any) -> None:
    from qemu.qmp import EventListener

    listener = EventListener(EVENT_SEAMCALL_ERROR)
    with client.listen(listener):
        async for ev in listener:
            d = ev["data"]
            mark = " [injected]" if d.get("injected") else ""
            line = (f"! lp{d.get('lp')} {d.get('name')} -> {d.get('status-name')}{mark}"
                    + (f" from {d['caller']}" if d.get("caller") else ""))
            cli.write(cli.above_prompt(line))
            await cli.flush()


class _Cli(aioconsole.AsynchronousCli):  # type: ignore[misc]
    """aioconsole's CLI with our dispatcher and, on a terminal, readline input."""

    def __init__(self, cmds: ConsoleCommands, history: Path | None, streams: Any) -> None:
        commands = {name: (self._wrap(name), parser) for name, parser in cmds.parsers.items()}
        super().__init__(commands, streams=streams, prog="vtdx console")
        self.cmds = cmds
        self.history = history
        self._pending: asyncio.Future[str] | None = None
        self._tty = sys.stdin.isatty()
        if self._tty:
            self._setup_readline()

    def _wrap(self, name: str) -> Callable[..., Awaitable[str]]:
        async def run(reader: Any, writer: Any, **kw: Any) -> str:
            from qemu.qmp import ExecuteError, QMPError

            try:
                return await self.cmds.handlers[name](**kw)
            except ExecuteError as e:
                return f"error: {e}"
            except QMPError as e:
                return f"error: connection: {e}"
        return run

    async def runsource(self, source: str, filename: str | None = None) -> bool:
        words = source.split()
        if words and words[0] == "quit":
            raise SystemExit
        if words and words[0] in ("help", "?"):
            self.write(self.cmds.help() + "\n")
            await self.flush()
            return False
        return await super().runsource(source, filename)

    def _setup_readline(self) -> None:
        import readline

        words = self.cmds.completions() + [f"--{o}" for o in
                                           ("leaf", "lp", "count", "errors", "pa",
                                            "probability")]
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
        import readline

        return f"\r\x1b[K{line}\n{sys.ps1}{readline.get_line_buffer()}"

    def save_history(self) -> None:
        if self._tty and self.history is not None:
            import readline

            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(self.history)

    async def raw_input(self, prompt: str = "") -> str:
        if not self._tty:
            return await super().raw_input(prompt)
        await self.flush()
        if self._pending is None or self._pending.done():
            loop = asyncio.get_running_loop()
            self._pending = loop.run_in_executor(None, input, prompt)
        try:
            return await self._pending
        finally:
            if self._pending.done():
                self._pending = None


def _leaf_and_status_names() -> list[str]:
    from vtdx.abi import leaves, status

    return ([leaves.leaf_name(int(x)) for x in leaves.Leaf]
            + sorted(set(status.NAMES.values())))


def history_path() -> Path:
    cache = Path(os.environ.get("VTDX_CACHE", Path.home() / ".cache" / "vtdx"))
    return cache / HISTORY
