"""Control points from outside: vtdx-pause / query-vtdx-pauses / vtdx-resume over QMP, the
pause events, the bounded hold, and the contention report of the BUSY the race produces.

Scene: the seed's race (tests/test_dpamt_demote_race.py). LP0's DEMOTE takes the 2MB PAMT
entry of R12's page shared (intel/tdx-module pamt_manager.c pamt_demote()); LP1's PAMT.ADD
of the same 2MB range wants it exclusive and gets TDX_OPERAND_BUSY | RCX
(tdh_phymem_pamt_add.c), 0x8000020000000001.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import EventListener, QMPClient
from test_dpamt_demote_race import BUSY_RCX, DPAMT_A1, GPA, PAMT_ADD_PFN, Scenario

from vtdx.abi.leaves import Leaf
from vtdx.module.pamt import pamt_key
from vtdx.observe.answers import EVENT_CALL_PAUSED, EVENT_CALL_RESUMED
from vtdx.observe.console.commands import ConsoleCommands
from vtdx.observe.qmp.client import QmpCommandError, VtdxClient
from vtdx.observe.qmp.endpoint import InspectEndpoint


def test_pause_over_qmp_busy_report_and_events(tmp_path: Path) -> None:
    sc = Scenario()
    module = sc.w.module
    ep = InspectEndpoint(module, tmp_path).start()
    threads: list[threading.Thread] = []
    try:
        async def body() -> None:
            qmp = QMPClient("races")
            await qmp.connect(str(ep.socket_path))
            try:
                info = await qmp.execute("vtdx-pause", {"leaf": "TDH.MEM.PAGE.DEMOTE",
                                                        "lp": 0, "point": "locked"})
                assert (info["leaf"], info["point"], info["armed"]) == (
                    "TDH.MEM.PAGE.DEMOTE", "locked", True)
                paused = EventListener(EVENT_CALL_PAUSED)
                resumed = EventListener(EVENT_CALL_RESUMED)
                with qmp.listen(paused), qmp.listen(resumed):
                    demote, out = sc.in_thread(0, sc.demote_regs())
                    threads.append(demote)
                    ev = (await asyncio.wait_for(paused.get(), 10))["data"]
                    assert (ev["id"], ev["call-lp"], ev["call-leaf"]) == (
                        info["id"], 0, "TDH.MEM.PAGE.DEMOTE")
                    assert str(pamt_key(1, DPAMT_A1)) in ev["locks"]
                    listed = await qmp.execute("query-vtdx-pauses")
                    assert [p["paused"] for p in listed] == [True]
                    # the held lock shows its holder call by LP, leaf and point
                    locks = await qmp.execute("query-vtdx-locks")
                    held = {h["key"]: h for h in locks["held"]}
                    holder = held[str(pamt_key(1, DPAMT_A1))]["holders"][0]
                    assert (holder["lp"], holder["leaf"], holder["point"]) == (
                        0, "TDH.MEM.PAGE.DEMOTE", "locked")

                    busy = await asyncio.to_thread(module.seamcall, 1, sc.pamt_add_regs())
                    assert busy.rax == BUSY_RCX
                    report = await qmp.execute("query-vtdx-contention")
                    (rec,) = report["busy"]
                    assert (rec["lp"], rec["leaf"], rec["status-name"]) == (
                        1, "TDH.PHYMEM.PAMT.ADD", "TDX_OPERAND_BUSY(RCX)")
                    assert int(rec["operand"], 16) == sc.pamt_add_regs().rcx
                    assert rec["lock"] == str(pamt_key(1, PAMT_ADD_PFN))
                    assert (rec["wanted"], rec["held"]) == ("exclusive", "shared")
                    h = rec["holders"][0]
                    assert (h["lp"], h["leaf"], h["point"]) == (0, "TDH.MEM.PAGE.DEMOTE",
                                                                "locked")
                    assert rec["next"] is None  # LP1 has not called again yet

                    r = await qmp.execute("vtdx-resume", {"id": info["id"]})
                    assert r == {"resumed": 1, "removed": 1}
                    ev = (await asyncio.wait_for(resumed.get(), 10))["data"]
                    assert (ev["id"], ev["reason"], ev["paused"]) == (info["id"], "resume",
                                                                      False)
                    await asyncio.to_thread(demote.join, 10)
                    assert out[0].rax == 0
                # LP1 retries: the report says so
                again = await asyncio.to_thread(module.seamcall, 1, sc.pamt_add_regs())
                assert again.rax == 0
                report = await qmp.execute("query-vtdx-contention")
                nxt = report["busy"][0]["next"]
                assert (nxt["action"], nxt["same-operands"], nxt["ok"]) == ("retried", True,
                                                                           True)
                (row,) = report["summary"]
                assert (row["leaf"], row["holder-leaf"], row["lock"], row["count"],
                        row["retried"]) == ("TDH.PHYMEM.PAMT.ADD", "TDH.MEM.PAGE.DEMOTE",
                                            "pamt", 1, 1)
                assert await qmp.execute("query-vtdx-pauses") == []
                assert (await qmp.execute("query-vtdx-locks"))["held"] == []
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        module.control.clear()
        for t in threads:
            t.join(10)
        ep.stop()
    sc.assert_demoted()


@pytest.mark.parametrize("args, fragment", [
    ({"point": "middle"}, "does not accept value 'middle'"),
    ({"leaf": "TDH.NO.SUCH"}, "unknown SEAMCALL leaf"),
    ({"nth": 0}, "'nth' must be >= 1"),
    ({"gpa-size": 4096}, "'gpa-size' needs 'gpa'"),
    ({"lp": 9}, "no such LP: 9"),
    ({"timeout": 0}, "'timeout' must be >="),
    ({"until-leaf": 4242}, "until-leaf 4242 is not implemented"),
    ({"colour": "red"}, "'colour' is unexpected"),
])
def test_vtdx_pause_validates_and_the_connection_stays(tmp_path: Path, args: dict[str, object],
                                                        fragment: str) -> None:
    sc = Scenario()
    ep = InspectEndpoint(sc.w.module, tmp_path).start()
    try:
        with VtdxClient(ep.socket_path) as c:
            with pytest.raises(QmpCommandError) as e:
                c.execute("vtdx-pause", **args)
            assert e.value.error_class == "GenericError" and fragment in e.value.desc
            with pytest.raises(QmpCommandError, match="no pause 99"):
                c.resume(99)
            with pytest.raises(QmpCommandError, match="unknown timing mode|does not accept"):
                c.set_timing("fast")
            assert c.pauses() == [] and c.status()["state"]  # still connected
    finally:
        ep.stop()


def test_bounded_hold_until_another_lps_leaf_returns(tmp_path: Path) -> None:
    """One declaration: DEMOTE held at locked until LP1's PAMT.ADD has returned."""
    sc = Scenario()
    module = sc.w.module
    ep = InspectEndpoint(module, tmp_path).start()
    try:
        with VtdxClient(ep.socket_path) as c:
            p = c.pause("TDH.MEM.PAGE.DEMOTE", lp=0, until_leaf="TDH.PHYMEM.PAMT.ADD",
                        timeout=20)
            demote, out = sc.in_thread(0, sc.demote_regs())
            assert c.wait_paused(p["id"], 10)["call-lp"] == 0
            assert module.seamcall(1, sc.pamt_add_regs()).rax == BUSY_RCX
            demote.join(10)
            assert not demote.is_alive() and out[0].rax == 0
            assert c.pauses() == []
            # timeout bound: nothing else comes, the hold ends by itself
            h = module.control.pause(lp=1, leaf=Leaf.TDH_PHYMEM_PAMT_ADD,
                                     until_leaf=Leaf.TDH_MEM_TRACK, timeout_s=0.2)
            t0 = time.monotonic()
            assert module.seamcall(1, sc.pamt_add_regs()).rax == 0
            assert time.monotonic() - t0 >= 0.2 and h.reason == "timeout"
    finally:
        module.control.clear()
        ep.stop()


def test_pause_filters_td_gpa_hpa_and_nth() -> None:
    sc = Scenario()
    m, ctl = sc.w.module, sc.w.control
    track = sc.demote_regs().copy(rax=Leaf.TDH_MEM_TRACK, rcx=sc.td.tdr, rdx=0, r8=0, r12=0,
                                  r13=0)
    # another TD's TDR: no match; the second TRACK on this TD: match (nth=2)
    other = ctl.pause(leaf=Leaf.TDH_MEM_TRACK, td=sc.td.tdr + 0x1000)
    second = ctl.pause(leaf=Leaf.TDH_MEM_TRACK, td=sc.td.tdr, nth=2, timeout_s=0.05)
    assert m.seamcall(0, track).rax == 0
    assert second.seen == 1 and second.hits == 0 and other.seen == 0
    assert m.seamcall(0, track).rax == 0
    assert second.hits == 1 and second.reason == "timeout"
    other.cancel()
    # GPA range: DEMOTE's RCX is GPA | 1; a range elsewhere does not match
    miss = ctl.pause(leaf=Leaf.TDH_MEM_PAGE_DEMOTE, gpa=(GPA + (2 << 20), GPA + (4 << 20)))
    hit = ctl.pause(leaf=Leaf.TDH_MEM_PAGE_DEMOTE, gpa=(GPA, GPA + 0x1000),
                    hpa=(DPAMT_A1, DPAMT_A1 + 0x1000), timeout_s=0.05)
    assert m.seamcall(0, sc.demote_regs()).rax == 0
    assert (miss.seen, hit.hits, hit.reason) == (0, 1, "timeout")
    miss.cancel()
    assert not ctl.active or ctl.timing_in_force.holds


def test_console_pause_call_pauses_resume_contention(tmp_path: Path) -> None:
    """The same through the console's words (vtdx console -c)."""
    sc = Scenario()
    module = sc.w.module
    ep = InspectEndpoint(module, tmp_path).start()
    cc = ConsoleCommands()
    try:
        with VtdxClient(ep.socket_path) as c:
            assert cc.run_line("pause-call TDH.MEM.PAGE.DEMOTE --lp 0", c) == \
                "pause 1: locked leaf=TDH.MEM.PAGE.DEMOTE lp=0"
            demote, out = sc.in_thread(0, sc.demote_regs())
            c.wait_paused(1, 10)
            listed = cc.run_line("pauses", c)
            assert "holding call" in listed and str(pamt_key(1, DPAMT_A1)) in listed
            assert module.seamcall(1, sc.pamt_add_regs()).rax == BUSY_RCX
            text = cc.run_line("contention", c)
            assert "1 BUSY from held locks" in text
            assert "TDH.PHYMEM.PAMT.ADD" in text and "TDX_OPERAND_BUSY(RCX)" in text
            assert cc.run_line("resume-call 1", c) == "1 call(s) resumed, 1 pause(s) removed"
            demote.join(10)
            assert out[0].rax == 0
            assert cc.run_line("timing explore 7", c).startswith("timing: mode=explore")
            assert "seed=7" in cc.run_line("timing", c)
            assert cc.run_line("pause-call --point middle", c).startswith("usage:")
    finally:
        module.control.clear()
        ep.stop()
