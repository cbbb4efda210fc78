"""``vtdx trace RUN_DIR``: read and filter the SEAMCALL trace of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.observe.trace import (
    filter_trace,
    follow_trace,
    format_record,
    read_trace,
    trace_path,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="show the SEAMCALL trace of a run",
        description="Print the SEAMCALLs a run recorded (RUN_DIR/trace.jsonl), filtered. "
        "Filters combine; a repeated --leaf/--lp means any of them.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a trace.jsonl file)")
    p.add_argument("--leaf", action="append", default=[],
                   help="leaf name or number, e.g. TDH.SYS.LP.INIT, sys.lp.init or 35")
    p.add_argument("--lp", action="append", type=int, default=[], help="logical processor")
    p.add_argument("--errors", action="store_true", help="only calls that failed")
    p.add_argument("--status", help="status name contains this, e.g. BUSY")
    p.add_argument("--caller", help="kernel caller contains this, e.g. init_tdx_module")
    p.add_argument("--last", type=int, metavar="N", help="only the last N matching calls")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new calls as the run makes them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = trace_path(args.run_dir)
    if args.last is not None and args.last < 1:
        raise VtdxError("--last must be at least 1")
    filters = dict(leaves_=args.leaf, lps=args.lp, errors=args.errors,
                   status_name=args.status, caller=args.caller)
    if args.follow:
        _follow(path, args, filters)
        return 0
    if not path.exists():
        raise VtdxError(f"no trace at {path} (is {args.run_dir} a vtdx run directory?)")
    if path.is_dir():
        raise VtdxError(f"{path} is a directory, not a trace")
    recs = filter_trace(read_trace(path), last=args.last, **filters)
    for rec in recs:
        _print(rec, args.json)
    return 0


def _print(rec: dict, as_json: bool) -> None:
    print(json.dumps(rec) if as_json else format_record(rec), flush=True)


def _follow(path: Path, args: argparse.Namespace, filters: dict) -> None:
    """Print the matching calls already made (the last N with --last), then each new one,
    until the run ends (its directory goes away: the calls made last are printed too) or
    Ctrl-C."""

    def waiting() -> None:
        print(f"vtdx trace: waiting for {path}", file=sys.stderr, flush=True)

    backlog: list[dict] | None = []  # None once the records written before are printed
    try:
        for rec in follow_trace(path, on_wait=waiting):
            if rec is None:
                for r in filter_trace(backlog or [], last=args.last, **filters):
                    _print(r, args.json)
                backlog = None
            elif backlog is not None:
                backlog.append(rec)
            else:
                for r in filter_trace([rec], **filters):
                    _print(r, args.json)
    except KeyboardInterrupt:
        pass
