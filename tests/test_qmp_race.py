"""The seed's question, asked over QMP while the race is held open: "what does the module
think page 0x1b090c is, who holds its lock, which call issued the last DEMOTE?"

TDH.MEM.PAGE.DEMOTE on LP0 is paused at its "locked" control point (tests/
test_dpamt_demote_race.py sets the scene: DPAMT pair 0x1b090c/0x119b4f in R12/R13); a
QMPClient then reads the PAMT, the locks, the TD and its S-EPT, and sees LP1's PAMT.ADD
fail with the BUSY the lock causes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from qemu.qmp import EventListener, QMPClient
from test_dpamt_demote_race import BUSY_RCX, DPAMT_A1, DPAMT_B1, GPA, Scenario

from vtdx.abi.leaves import Leaf
from vtdx.module.pamt import pamt_key
from vtdx.observe.answers import EVENT_SEAMCALL_ERROR
from vtdx.observe.qmp.endpoint import InspectEndpoint


def test_lock_holder_of_0x1b090c_during_demote(tmp_path: Path):
    sc = Scenario()
    module = sc.w.module
    ep = InspectEndpoint(module, tmp_path).start()
    pause = sc.w.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE)
    demote, demote_out = sc.in_thread(0, sc.demote_regs())
    try:
        assert pause.wait_paused(10)

        async def body() -> None:
            qmp = QMPClient("race")
            await qmp.connect(str(ep.socket_path))
            try:
                page = await qmp.execute("query-vtdx-pamt", {"pfn": DPAMT_A1 >> 12})
                lv2m = next(lv for lv in page["levels"] if lv["level"] == "2M")
                holders = lv2m["lock"]["holders"]
                assert {"lp": 0, "leaf": "TDH.MEM.PAGE.DEMOTE", "point": "locked"} in [
                    {k: h[k] for k in ("lp", "leaf", "point")} for h in holders]
                assert "dpamt" in page  # Dynamic PAMT is on in this platform
                locks = await qmp.execute("query-vtdx-locks")
                assert locks["waiting-calls"][0]["leaf"] == "TDH.MEM.PAGE.DEMOTE"
                assert any(h["key"] == str(pamt_key(1, DPAMT_A1)) for h in locks["held"])

                tds = await qmp.execute("query-vtdx-tds")
                assert len(tds) == 1 and tds[0]["tdr"] == sc.td.tdr
                assert tds[0]["op-state"] == "RUNNABLE"
                walk = (await qmp.execute("query-vtdx-sept", {"td": 0, "gpa": GPA}))["walk"]
                # AUGed (never accepted), then blocked for the demote.
                assert (walk[-1]["level"], walk[-1]["state"]) == (1, "PENDING_BLOCKED")

                # LP1's PAMT.ADD in the same 2MB range meets the lock: BUSY | RCX.
                listener = EventListener(EVENT_SEAMCALL_ERROR)
                with qmp.listen(listener):
                    out = await asyncio.to_thread(module.seamcall, 1, sc.pamt_add_regs())
                    ev = await asyncio.wait_for(listener.get(), 5)
                assert out.rax == BUSY_RCX
                assert ev["data"]["name"] == "TDH.PHYMEM.PAMT.ADD"
                assert ev["data"]["status-name"] == "TDX_OPERAND_BUSY(RCX)"

                pause.resume()
                await asyncio.to_thread(demote.join, 10)
                assert demote_out[0].rax == 0
                last = await qmp.execute("query-vtdx-trace",
                                         {"leaf": "TDH.MEM.PAGE.DEMOTE", "count": 1})
                assert last[0]["lp"] == 0 and last[0]["ok"]
                assert int(last[0]["in"]["r12"], 16) == DPAMT_A1
                assert int(last[0]["in"]["r13"], 16) == DPAMT_B1
                walk = (await qmp.execute("query-vtdx-sept", {"td": sc.td.tdr,
                                                              "gpa": GPA}))["walk"]
                assert [(w["level"], w["state"]) for w in walk[-2:]] == [
                    (1, "NL_MAPPED"), (0, "PENDING")]
                page = await qmp.execute("query-vtdx-pamt", {"pfn": 0x511A00})
                assert page["dpamt"]["pair"] == [DPAMT_A1, DPAMT_B1]
                assert page["dpamt"]["page-count"] == 512
                assert (await qmp.execute("query-vtdx-locks"))["held"] == []
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        pause.cancel()
        demote.join(10)
        ep.stop()
