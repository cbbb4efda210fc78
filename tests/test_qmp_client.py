"""VtdxClient, the synchronous client on qemu.qmp's legacy QEMUMonitorProtocol that the
pytest VM handle (``vm.vtdx``) and ``vtdx console -c`` use: typed queries against a live
endpoint over a module brought up the Linux way, QMP errors as QmpCommandError, a lost
connection as one VtdxError line, and a new connection on the next call."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_qmp_inspect import booted  # noqa: F401  (fixture)
from test_qmp_protocol import toy_commands

from vtdx.abi.leaves import Leaf
from vtdx.errors import VtdxError
from vtdx.observe.qmp.client import QmpCommandError, VtdxClient, socket_path
from vtdx.observe.qmp.server import QmpServer
from vtdx.observe.qmp.thread import QmpServerThread


def test_typed_queries_match_the_kernel_view(booted):  # noqa: F811
    ep, host, boot = booted
    with VtdxClient(socket_path(ep.run_dir)) as c:
        status = c.status()
        assert status["state"] == "SYS_READY" and status["num-init-lps"] == 2
        assert status["keyids"]["global"] == boot.global_keyid
        assert status.get("seamcalls") == len(boot.calls)
        assert [(t["base"], t["size"]) for t in c.tdmrs()] == [(t.base, t.size)
                                                                for t in boot.tdmrs]
        page = c.pamt_page(0x1B090C)
        assert page["pa"] == 0x1B090C000 and page["tdmr"] == 1
        assert [lv["level"] for lv in page["levels"]] == ["1G", "2M", "4K"]
        assert c.pamt("0x1b090c") == page == c.pamt_page(pa=0x1B090C000)
        rows = c.pamt_range(pa=boot.tdmrs[1].pamt_base[0], count=2)
        assert [r.get("pt-name") for r in rows] == ["PT_RSVD"] * 2
        assert c.pamt(pa=boot.tdmrs[1].pamt_base[0], count=2) == rows
        summary = c.pamt_summary()
        assert summary["pamt-bytes"] == boot.pamt_kb * 1024
        assert c.pamt() == summary
        last = c.trace(3, leaf="TDH.SYS.TDMR.INIT")
        assert [r["name"] for r in last] == ["TDH.SYS.TDMR.INIT"] * 3
        assert [r["seq"] for r in c.trace(2)] == [len(boot.calls) - 1, len(boot.calls)]
        stats = c.stats()
        assert stats["calls"] == len(boot.calls)
        assert stats["per-leaf"]["TDH.SYS.RD"]["calls"] == boot.count(Leaf.TDH_SYS_RD)
        assert c.tds() == [] and c.locks() == {"held": [], "waiting-calls": []}


def test_faults_and_errors(booted):  # noqa: F811
    ep, host, boot = booted
    c = VtdxClient(ep.socket_path)
    try:
        rid = c.inject("TDX_SYS_BUSY", "TDH.SYS.LP.INIT", count=3, lp=1)
        [rule] = c.faults()
        assert (rule["id"], rule["status-name"], rule.get("leaf-name"), rule["lps"],
                rule["count"]) == (rid, "TDX_SYS_BUSY", "TDH.SYS.LP.INIT", [1], 3)
        assert c.inject_clear(rid) == 1 and c.faults() == []
        with c.injecting("TDX_OPERAND_BUSY+RCX", probability=0.0) as rid2:
            assert [r["id"] for r in c.faults()] == [rid2]
        assert c.faults() == []  # the context removed it

        with pytest.raises(QmpCommandError) as ei:
            c.pamt(0x7FFFFFFFFF)
        assert ei.value.error_class == "GenericError"
        assert str(ei.value) == ("query-vtdx-pamt: page 0x7fffffffff (PA 0x7fffffffff000) "
                                 "is not in any TDMR")
        with pytest.raises(QmpCommandError) as ei:
            c.sept(0)
        assert (ei.value.error_class, ei.value.desc) == ("DeviceNotFound", "no TD exists")
        with pytest.raises(QmpCommandError) as ei:
            c.execute("nope")
        assert ei.value.error_class == "CommandNotFound"
        assert c.status()["state"] == "SYS_READY"  # errors leave the session usable
    finally:
        c.close()
    c.close()  # idempotent


def test_lost_connection_is_one_error_then_reconnects(tmp_path: Path):
    path = tmp_path / "vtdx-qmp.sock"
    c = VtdxClient(path, timeout=5)
    with pytest.raises(VtdxError, match=r"vtdx QMP socket .*: No such file or directory"):
        c.execute("x-add", a=1)
    t = QmpServerThread(QmpServer(path, toy_commands())).start()
    try:
        assert c.execute("x-add", a=40, b=2) == {"sum": 42}
    finally:
        t.stop()
    with pytest.raises(VtdxError) as ei:  # the server is gone: no qemu.qmp error leaks
        c.execute("x-add", a=1)
    assert not isinstance(ei.value, QmpCommandError)
    assert str(ei.value).startswith(f"vtdx QMP socket {path}: x-add: ")
    t = QmpServerThread(QmpServer(path, toy_commands())).start()
    try:
        assert c.execute("x-add", a=1) == {"sum": 1}  # the next call connects again
    finally:
        c.close()
        t.stop()
    with pytest.raises(VtdxError, match="no vtdx QMP socket"):
        socket_path(tmp_path)
