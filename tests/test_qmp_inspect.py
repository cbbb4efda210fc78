"""The vtdx QMP commands over a real socket against a real module model brought up the way
Linux 7.3 does it (tests/linux_tdmr.py replays tdx_enable()): every query's answer is
checked against what the kernel side computed and against the SEAMCALLs it issued."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from linux_tdmr import LinuxHost, SeamcallFailed, q35_memblocks
from qemu.qmp import EventListener, ExecuteError, QMPClient

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import TdxModule
from vtdx.observe.answers import EVENT_SEAMCALL_ERROR
from vtdx.observe.qmp.endpoint import InspectEndpoint
from vtdx.observe.trace import read_trace, reg_in, reg_out
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import GiB, Profile

MEM = 6 * GiB


@pytest.fixture
def booted(tmp_path: Path):
    """A 2-LP, 6 GiB platform after tdx_enable(), observed by a running endpoint."""
    profile = Profile.from_vm(2, MEM)
    mem = SparseMemory(profile.ram)
    module = TdxModule(profile, mem)
    ep = InspectEndpoint(module, tmp_path).start()
    host = LinuxHost(module.seamcall, [0, 1], profile.package_of)
    boot = host.tdx_enable(q35_memblocks(MEM), mem, tdx_keyid_start=profile.tdx_keyid_start,
                           info_pa=0x100000, array_pa=0x101000)
    try:
        yield ep, host, boot
    finally:
        ep.stop()


def qmp_session(ep: InspectEndpoint, body):
    async def main():
        qmp = QMPClient("test")
        await qmp.connect(str(ep.socket_path))
        try:
            return await body(qmp)
        finally:
            await qmp.disconnect()

    return asyncio.run(asyncio.wait_for(main(), 30))


async def error_of(qmp: QMPClient, cmd: str, args: dict | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as ei:
        await qmp.execute(cmd, args)
    return ei.value.error_class, str(ei.value)


def test_status_tdmrs_and_pamt_match_the_kernel_view(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        status = await qmp.execute("query-vtdx-status")
        assert status["state"] == "SYS_READY"
        assert status["num-init-lps"] == 2
        assert status["keyids"]["global"] == boot.global_keyid
        assert status["seamcalls"] == len(boot.calls)
        assert status["pamt-bytes"] == boot.pamt_kb * 1024  # "%lu KB allocated for PAMT"

        tdmrs = await qmp.execute("query-vtdx-tdmrs")
        assert [(t["base"], t["size"]) for t in tdmrs] == [(t.base, t.size) for t in boot.tdmrs]
        for got, want in zip(tdmrs, boot.tdmrs, strict=True):
            assert [p["base"] for p in got["pamt"]] == want.pamt_base
            assert [p["size"] for p in got["pamt"]] == want.pamt_size
            assert [(r["base"] - want.base, r["size"]) for r in got["reserved"]] == want.reserved
            assert got["initialized"]

        summary = await qmp.execute("query-vtdx-pamt")
        assert summary["pamt-bytes"] == boot.pamt_kb * 1024
        covered = sum(t.size for t in boot.tdmrs)
        assert sum(summary["totals"]["4K"].values()) == covered >> 12
        assert sum(summary["totals"]["2M"].values()) == covered >> 21
        rsvd = sum(s for t in boot.tdmrs for _, s in t.reserved) >> 12
        assert summary["totals"]["4K"]["PT_RSVD"] == rsvd

        page = await qmp.execute("query-vtdx-pamt", {"pfn": "0x1b090c"})
        assert page["pa"] == 0x1B090C000 and page["tdmr"] == 1
        assert [lv["level"] for lv in page["levels"]] == ["1G", "2M", "4K"]
        assert all(lv["pt-name"] == "PT_NDA" and lv["lock"] is None for lv in page["levels"])
        # The PAMT pages themselves are reserved areas of their TDMR.
        pamt_pa = boot.tdmrs[1].pamt_base[0]
        page = await qmp.execute("query-vtdx-pamt", {"pa": pamt_pa})
        assert page["reserved"] and page["levels"][2]["pt-name"] == "PT_RSVD"
        rows = await qmp.execute("query-vtdx-pamt", {"pa": pamt_pa - 0x2000, "count": 4})
        assert [r["pt-name"] for r in rows][-2:] == ["PT_RSVD", "PT_RSVD"]
        assert [r["pfn"] for r in rows] == [(pamt_pa >> 12) - 2 + i for i in range(4)]

        assert await qmp.execute("query-vtdx-tds") == []
        assert (await qmp.execute("query-vtdx-locks"))["held"] == []

    qmp_session(ep, body)


def test_trace_and_stats_match_the_calls(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        last = await qmp.execute("query-vtdx-trace", {"count": 5})
        assert [r["leaf"] for r in last] == [c.leaf for c in boot.calls[-5:]]
        assert all(r["name"] == "TDH.SYS.TDMR.INIT" for r in last)
        lp_init = await qmp.execute("query-vtdx-trace", {"leaf": "TDH.SYS.LP.INIT"})
        assert [r["lp"] for r in lp_init] == [0, 1]
        assert all(r["status-name"] == "TDX_SUCCESS" and r["ok"] for r in lp_init)
        rd = await qmp.execute("query-vtdx-trace", {"leaf": 34, "count": 1})
        want = next(c for c in reversed(boot.calls) if c.leaf == Leaf.TDH_SYS_RD)
        assert reg_in(rd[0], "rdx") == want.regs_in.rdx
        assert reg_out(rd[0], "r8") == want.regs_out.r8

        stats = await qmp.execute("query-vtdx-stats")
        assert stats["calls"] == len(boot.calls) and stats["errors"] == 0
        assert stats["per-leaf"]["TDH.SYS.RD"]["calls"] == boot.count(Leaf.TDH_SYS_RD)
        assert stats["per-lp"] == {"0": len(boot.calls) - 1, "1": 1}

    qmp_session(ep, body)
    # The JSON lines file holds the same calls, in order.
    ep.recorder.flush()
    recs = list(read_trace(ep.recorder.path))
    assert [r["seq"] for r in recs] == list(range(1, len(boot.calls) + 1))
    assert [r["leaf"] for r in recs] == [c.leaf for c in boot.calls]


def test_injected_busy_reaches_the_caller_trace_and_event(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        rule = await qmp.execute("vtdx-inject", {"status": "TDX_SYS_BUSY",
                                                 "leaf": "TDH.SYS.LP.INIT", "count": 1,
                                                 "lp": 1})
        assert rule["status-name"] == "TDX_SYS_BUSY"
        faults = await qmp.execute("query-vtdx-faults")
        assert faults[0]["leaf-name"] == "TDH.SYS.LP.INIT" and faults[0]["lps"] == [1]
        listener = EventListener(EVENT_SEAMCALL_ERROR)
        # LP 0 does not match the rule (its call fails for real: LP.INIT after READY).
        await asyncio.to_thread(module_call, 0)
        with qmp.listen(listener):
            with pytest.raises(SeamcallFailed) as ei:
                await asyncio.to_thread(module_call, 1)
            assert ei.value.status == st.TDX_SYS_BUSY
            ev = await asyncio.wait_for(listener.get(), 5)
            while ev["data"]["lp"] != 1:  # LP 0's real failure may still be in flight
                ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["data"]["status-name"] == "TDX_SYS_BUSY" and ev["data"]["injected"]
        assert ev["data"]["lp"] == 1 and ev["data"]["name"] == "TDH.SYS.LP.INIT"
        # count=1: the rule is gone, the next call runs the real leaf again.
        assert await qmp.execute("query-vtdx-faults") == []
        errs = await qmp.execute("query-vtdx-trace", {"errors": True})
        assert [(e["lp"], e["status-name"], e.get("injected", False)) for e in errs] == [
            (0, "TDX_SYS_LP_INIT_NOT_PENDING", False), (1, "TDX_SYS_BUSY", True)]
        # Registers other than RAX come back as they went in.
        assert errs[1]["out"] == {"rax": hex(st.TDX_SYS_BUSY)}

    def module_call(lp: int) -> None:
        # LP.INIT after SYS_READY: TDX_SYS_LP_INIT_NOT_PENDING unless injected first.
        try:
            host.call(lp, Leaf.TDH_SYS_LP_INIT)
        except SeamcallFailed as e:
            if e.status != st.TDX_SYS_LP_INIT_NOT_PENDING:
                raise

    qmp_session(ep, body)


def test_probability_and_clear(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        a = await qmp.execute("vtdx-inject", {"status": "TDX_OPERAND_BUSY+RCX",
                                              "leaf": "sys.rd", "probability": 0.0})
        b = await qmp.execute("vtdx-inject", {"status": hex(st.TDX_SYS_BUSY), "lps": "0,1"})
        assert a["status-name"] == "TDX_OPERAND_BUSY(RCX)"
        # probability 0 never fires; the rule stays armed.
        out = await asyncio.to_thread(ep.inspector.module.seamcall, 0,
                                      Regs(rax=Leaf.TDH_SYS_RD, rdx=boot_field(boot)))
        assert out.rax == st.TDX_SYS_BUSY  # the second rule matched instead
        assert await qmp.execute("vtdx-inject-clear", {"rule_id": b["id"]}) == {"removed": 1}
        cls, desc = await error_of(qmp, "vtdx-inject-clear", {"rule_id": b["id"]})
        assert cls == "GenericError" and "no fault rule" in desc
        assert await qmp.execute("vtdx-inject-clear") == {"removed": 1}

    qmp_session(ep, body)


def boot_field(boot) -> int:
    rd = next(c for c in boot.calls if c.leaf == Leaf.TDH_SYS_RD)
    return rd.regs_in.rdx


BAD = [
    ("query-vtdx-pamt", {"pfn": "zz"}, "expected: integer"),
    ("query-vtdx-pamt", {"pfn": 1, "pa": 4096}, "either 'pfn' or 'pa'"),
    ("query-vtdx-pamt", {"pfn": 0x300000}, "not in any TDMR"),
    ("query-vtdx-pamt", {"pfn": 1, "count": 0}, "must be >= 1"),
    ("query-vtdx-pamt", {"count": 3}, "needs 'pfn' or 'pa'"),
    ("query-vtdx-pamt", {"pfn": -1}, "must be >= 0"),
    ("query-vtdx-sept", {"td": 0}, "no TD exists"),
    ("query-vtdx-sept", {}, "Parameter 'td' is missing"),
    ("query-vtdx-trace", {"leaf": "TDH.NOPE"}, "unknown SEAMCALL leaf"),
    ("query-vtdx-trace", {"count": 0}, "must be >= 1"),
    ("vtdx-inject", {"status": "TDX_NOPE"}, "unknown TDX status"),
    ("vtdx-inject", {"status": 0x1234}, "not a status the TDX module returns"),
    ("vtdx-inject", {"status": "TDX_SYS_BUSY", "probability": 2}, "must be <= 1"),
    ("vtdx-inject", {"status": "TDX_SYS_BUSY", "lp": 9}, "no such LP"),
    ("vtdx-inject", {"status": "TDX_SYS_BUSY", "lp": 0, "lps": [1]}, "either 'lp' or 'lps'"),
    ("vtdx-inject", {"status": "TDX_SYS_BUSY", "leaf": 200}, "not implemented"),
    ("stop", {}, "has not been found"),  # no QEMU attached to this endpoint
]


def test_bad_arguments_get_errors_not_disconnects(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        for cmd, args, desc in BAD:
            try:
                cls, got = await error_of(qmp, cmd, args)
            except pytest.fail.Exception:
                pytest.fail(f"{cmd} {args} did not fail")
            assert desc in got, (cmd, args, got)
            assert cls in ("GenericError", "CommandNotFound", "DeviceNotFound")
        assert (await qmp.execute("query-vtdx-status"))["state"] == "SYS_READY"

    qmp_session(ep, body)


def test_every_command_is_listed_and_documented(booted):
    ep, host, boot = booted

    async def body(qmp: QMPClient):
        names = {c["name"] for c in await qmp.execute("query-commands")}
        for n in ("query-vtdx-status", "query-vtdx-tdmrs", "query-vtdx-pamt",
                  "query-vtdx-tds", "query-vtdx-sept", "query-vtdx-locks",
                  "query-vtdx-trace", "query-vtdx-stats", "vtdx-inject",
                  "vtdx-inject-clear"):
            assert n in names
        helps = await qmp.execute("query-vtdx-help")
        assert all(h["doc"] for h in helps)
        json.dumps(helps)

    qmp_session(ep, body)


def test_pamt_summary_equals_a_page_by_page_count(tmp_path: Path):
    """The aggregated summary against brute force over every page of a 1 GiB platform,
    with entries changed at every level, inside and outside reserved areas."""
    from collections import Counter

    from vtdx.module import pamt as P
    from vtdx.observe.inspect import Inspector

    profile = Profile.from_vm(2, GiB)
    mem = SparseMemory(profile.ram)
    module = TdxModule(profile, mem)
    host = LinuxHost(module.seamcall, [0, 1], profile.package_of)
    boot = host.tdx_enable(q35_memblocks(GiB), mem, tdx_keyid_start=profile.tdx_keyid_start,
                           info_pa=0x100000, array_pa=0x101000)
    pm = module.pamt
    t = pm.tdmrs[0]
    rsvd_pa = t.base + t.reserved[-1][0]
    with module.cond:
        for i in range(300):
            pm.set(0x2000000 + i * 4096, P.LEVEL_4K, P.PT_REG, owner=0x5000)
        pm.set(0x3000000, P.LEVEL_4K, P.PT_TDR)
        pm.set(rsvd_pa, P.LEVEL_4K, P.PT_REG, owner=0x5000)  # a reserved page, changed
        pm.set(0x4000000, P.LEVEL_2M, P.PT_REG, owner=0x5000)
        pm.set(0, P.LEVEL_1G, P.PT_REG, owner=0x5000)
    got = Inspector(module).pamt_summary()
    for lv, name in zip(P.LEVELS, P.LEVEL_NAMES, strict=True):
        want: Counter[str] = Counter()
        for tdmr in pm.tdmrs:
            for pa in range(tdmr.base, tdmr.end, P.PAGE_SIZE[lv]):
                want[P.PAGE_TYPE_NAMES[pm.get(pa, lv).pt]] += 1
        assert got["totals"][name] == dict(want), name
    assert got["totals"]["4K"]["PT_REG"] == 301 and got["totals"]["4K"]["PT_TDR"] == 1
    assert got["pamt-bytes"] == boot.pamt_kb * 1024
