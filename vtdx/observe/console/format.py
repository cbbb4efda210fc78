"""Text for people: each vtdx QMP answer as the console prints it (tables, one-liners).

Pure functions of the answer types in ``vtdx.observe.answers``, so they can be tested and
reused without a connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from vtdx.observe.answers import (
    ContentionAnswer,
    FaultRuleInfo,
    LockHolder,
    LocksAnswer,
    LockState,
    PamtAnswer,
    PamtPage,
    PamtRow,
    PamtSummary,
    PauseInfo,
    QemuStatus,
    ResumeAnswer,
    SeamcallErrorData,
    SeptAnswer,
    SeptWalk,
    TdInfo,
    TdmrInfo,
    TimingInfo,
    TraceRecord,
    VtdxStats,
    VtdxStatus,
)
from vtdx.observe.trace import format_record
from vtdx.units import format_size


def hx(v: object) -> str:
    return f"0x{v:x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned text table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _holders(holders: list[LockHolder]) -> str:
    return ", ".join(
        f"lp{h['lp']} {h['leaf']} @{h['point']}" if "lp" in h else f"call#{h['call']}"
        for h in holders)


def _lock(lk: LockState | None) -> str:
    if not lk:
        return "-"
    return f"{lk['mode']} by {_holders(lk['holders'])}"


def fmt_status(s: VtdxStatus) -> str:
    k = s["keyids"]
    lps = " ".join(f"lp{x['lp']}{'' if x['initialized'] else '(uninit)'}"
                   + ("*" if x["in-call"] else "") for x in s["lps"])
    lines = [
        f"module:     {s['state']}, {s['num-init-lps']}/{s['num-lps']} LPs initialized",
        f"LPs:        {lps}",
        f"keyids:     MKTME 1..{k['mktme']}, TDX [{k['tdx-start']}, "
        f"{k['tdx-start'] + k['tdx-count']}), global {k['global']}, "
        f"configured packages {k['configured-packages']}",
        f"memory:     {format_size(s['ram-bytes'])} RAM, {s['tdmrs']} TDMRs, PAMT "
        f"{s['pamt-bytes'] // 1024} KB, dynamic PAMT {'on' if s['dynamic-pamt'] else 'off'}",
        f"TDs:        {s['tds']}",
        f"locks held: {s['held-locks']}, fault rules: {s['fault-rules']}, "
        f"model errors: {s['internal-errors']}",
    ]
    if "seamcalls" in s:
        lines.append(f"SEAMCALLs:  {s['seamcalls']} ({s.get('seamcall-errors', 0)} failed)")
    return "\n".join(lines)


def fmt_tdmrs(ts: list[TdmrInfo]) -> str:
    rows = []
    for t in ts:
        pamt = " ".join(f"{p['level']}@{hx(p['base'])}+{format_size(p['size'])}" for p in t["pamt"])
        rows.append([t["index"], hx(t["base"]), hx(t["end"]), format_size(t["size"]), pamt,
                     len(t["reserved"]), "yes" if t["initialized"] else
                     f"up to {hx(t['initialized-up-to'])}"])
    return table(["#", "base", "end", "size", "PAMT (level@base+size)", "rsvd", "init"], rows)


def fmt_pamt(answer: PamtAnswer) -> str:
    """Any answer of query-vtdx-pamt: rows of a range, a summary, or one page."""
    if isinstance(answer, list):
        return fmt_pamt_rows(answer)
    if "tdmrs" in answer:
        return fmt_pamt_summary(cast(PamtSummary, answer))
    return fmt_pamt_page(answer)


def fmt_pamt_summary(s: PamtSummary) -> str:
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


def fmt_pamt_page(p: PamtPage) -> str:
    head = (f"pfn {hx(p['pfn'])} (PA {hx(p['pa'])}): TDMR {p['tdmr']}, "
            f"{'initialized' if p['initialized'] else 'NOT initialized'}"
            f"{', reserved' if p['reserved'] else ''}, walk stops at {p['walk-level']}")
    rows = [[lv["level"], hx(lv["base"]), lv["pt-name"], hx(lv["owner"]), lv["bepoch"],
             _lock(lv["lock"])] for lv in p["levels"]]
    out = head + "\n" + table(["level", "base", "type", "owner", "bepoch", "lock"], rows)
    if "dpamt" in p:
        d = p["dpamt"]
        pair = " ".join(hx(x) for x in d["pair"]) or "none"
        out += f"\nDPAMT: 2M range {hx(d['range'])}, pair {pair}"
    return out


def fmt_pamt_rows(rows: list[PamtRow]) -> str:
    return table(["pfn", "tdmr", "level", "type", "owner", "bepoch", "lock"],
                 [[hx(r["pfn"]), r["tdmr"] if r["tdmr"] is not None else "-",
                   r.get("level", "-"), r.get("pt-name", "(no TDMR)"),
                   hx(r.get("owner", 0)), r.get("bepoch", 0), _lock(r.get("lock"))]
                  for r in rows])


def fmt_tds(tds: list[TdInfo]) -> str:
    if not tds:
        return "no TDs"
    rows = []
    for i, t in enumerate(tds):
        sept = t["sept"]
        leaves = " ".join(f"{k}:{v}" for k, v in sept["leaves"].items()) if sept else ""
        rows.append([i, hx(t["tdr"]), t["hkid"], t["lifecycle"], t["op-state"],
                     f"{len(t['vcpus'])}/{t['max-vcpus']}",
                     sept["pages"] if sept else "-", leaves or "-",
                     "FATAL" if t["fatal"] else ("finalized" if t["finalized"] else "")])
    out = table(["#", "TDR", "hkid", "lifecycle", "op-state", "vcpus", "sept pages",
                 "mapped", ""], rows)
    vrows = [[i, v["index"], hx(v["tdvpr"]), v["state"],
              v["running-lp"] if v["running-lp"] is not None else "-",
              v["associated-lp"] if v["associated-lp"] is not None else "-",
              hx(v["rip"]) if v["rip"] is not None else "-",
              " ".join(f"{k}:{n}" for k, n in v["exits"].items()) or "-"]
             for i, t in enumerate(tds) for v in t["vcpus"]]
    if vrows:
        out += "\n" + table(["TD", "vcpu", "TDVPR", "state", "runs on", "assoc LP",
                              "guest RIP", "TD exits"], vrows)
    return out


def fmt_sept(answer: SeptAnswer) -> str:
    if "walk" in answer:
        s = cast(SeptWalk, answer)
        rows = [[w["level"], hx(w["sept-page"]), w["index"], w["state"], hx(w["hpa"]),
                 _lock(w.get("lock"))] for w in s["walk"]]
        return (f"TD {hx(s['tdr'])} GPA {hx(s['gpa'])}\n"
                + table(["level", "S-EPT page", "index", "state", "HPA", "lock"], rows))
    m = answer
    head = (f"TD {hx(m['tdr'])}: root level {m['root-level']}, {m['pages']} S-EPT pages, "
            f"{m['leaves']} leaf mappings")
    return head + "\n" + table(["GPA", "level", "state", "HPA"],
                               [[hx(x["gpa"]), x["level"], x["state"], hx(x["hpa"])]
                                for x in m["mappings"]])


def fmt_locks(d: LocksAnswer) -> str:
    out = table(["lock", "mode", "held by"],
                [[h["key"], h["mode"], _holders(h["holders"])] for h in d["held"]])
    if d["waiting-calls"]:
        out += "\ncalls inside the module:\n" + table(
            ["call", "lp", "leaf", "point", "waiting s"],
            [[c["call"], c["lp"], c["leaf"], c["point"], c["waiting-s"]]
             for c in d["waiting-calls"]])
    return out


def fmt_trace(recs: list[TraceRecord]) -> str:
    # format_record reads any record dict (trace files hold older shapes too).
    return "\n".join(format_record(cast(dict[str, Any], r)) for r in recs) or "no calls"


def fmt_stats(s: VtdxStats) -> str:
    rows = [[name, v["calls"], v.get("errors", ""), v.get("injected", ""),
             v.get("avg-us", ""), v.get("max-us", "")] for name, v in s["per-leaf"].items()]
    out = (f"{s['calls']} SEAMCALLs, {s.get('errors', 0)} failed\n"
           + table(["leaf", "calls", "errors", "injected", "avg us", "max us"], rows))
    if s.get("per-lp"):
        out += "\nper LP: " + " ".join(f"lp{k}:{v}" for k, v in s.get("per-lp", {}).items())
    if s.get("statuses"):
        out += "\nstatuses: " + ", ".join(f"{k}={v}" for k, v in s["statuses"].items())
    return out


def fmt_faults(rules: list[FaultRuleInfo]) -> str:
    if not rules:
        return "no fault rules"
    return table(["id", "status", "leaf", "count", "prob", "lps", "fired"],
                 [[r["id"], r["status-name"], r.get("leaf-name", "any"),
                   r["count"] if r["count"] is not None else "inf", r["probability"],
                   r["lps"] if r["lps"] is not None else "any", r["fired"]] for r in rules])


def fmt_qemu_status(r: QemuStatus) -> str:
    return f"QEMU: {r.get('status')} (running={r.get('running')})"


def fmt_seamcall_error(d: SeamcallErrorData) -> str:
    """A VTDX_SEAMCALL_ERROR event as one line (shown above the prompt)."""
    mark = " [injected]" if d.get("injected") else ""
    return (f"! lp{d.get('lp')} {d.get('name')} -> {d.get('status-name')}{mark}"
            + (f" from {d['caller']}" if d.get("caller") else ""))


# --------------------------------------------------------------------------- races


def _filters(p: PauseInfo) -> str:
    parts = [p["point"]]
    for k in ("leaf", "lp", "td", "until-leaf", "timeout-s"):
        v = p.get(k)
        if v is not None:
            parts.append(f"{k}={hex(v) if k == 'td' and isinstance(v, int) else v}")
    for k, rng in (("gpa", p["gpa"]), ("hpa", p["hpa"])):
        if rng:
            parts.append(f"{k}=0x{rng[0]:x}..0x{rng[1]:x}")
    if p["nth"] != 1:
        parts.append(f"nth={p['nth']}")
    if not p["once"]:
        parts.append("persistent")
    return " ".join(parts)


def fmt_pause(p: PauseInfo) -> str:
    return f"pause {p['id']}: {_filters(p)}"


def fmt_pauses(ps: list[PauseInfo]) -> str:
    rows = []
    for p in ps:
        state = "armed" if p["armed"] else ""
        if p["paused"]:
            state = (f"holding call {p.get('call')} (LP{p.get('call-lp')} "
                     f"{p.get('call-leaf')}) {p.get('waiting-s')} s")
            if p.get("locks"):
                state += "; locks: " + ", ".join(p.get("locks", []))
        rows.append([p["id"], _filters(p), f"{p['hits']}/{p['seen']}", state])
    return table(["id", "pause", "hits/seen", "state"], rows) if rows else "no pauses"


def fmt_resume(r: ResumeAnswer) -> str:
    return f"{r['resumed']} call(s) resumed, {r['removed']} pause(s) removed"


def fmt_timing(t: TimingInfo) -> str:
    return "timing: " + " ".join(f"{k}={v}" for k, v in t.items())


def fmt_contention(c: ContentionAnswer) -> str:
    """The summary table, then the newest BUSY records one per line."""
    out = [fmt_timing(c["timing"]), f"{c['total']} BUSY from held locks"
           + (f" ({c['dropped']} not kept)" if c["dropped"] else "")]
    if c["summary"]:
        out.append(table(
            ["leaf", "status", "lock", "held by", "count", "retried", "moved on", "callers"],
            [[r["leaf"], r["status-name"], r["lock"], r["holder-leaf"], r["count"],
              r["retried"], r["moved-on"], ", ".join(r["callers"])] for r in c["summary"]]))
    for b in c["busy"]:
        hs = "; ".join(f"LP{h['lp']} {h['leaf']}@{h.get('point')}"
                       + (f" <- {h.get('caller')}" if h.get("caller") else "")
                       for h in b["holders"])
        nxt = b["next"]
        then = f"{nxt['action']} {nxt['leaf']} -> {nxt['status']}" if nxt else "(no next call)"
        who = f" <- {b.get('caller')}" if b.get("caller") else ""
        out.append(f"#{b['index']} LP{b['lp']} {b['leaf']}{who}: {b['status-name']} "
                   f"operand={b.get('operand', '-')} lock '{b['lock']}' held by {hs}; {then}")
    return "\n".join(out)
