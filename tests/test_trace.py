"""SEAMCALL trace: records from a real module, the JSONL file, filters and `vtdx trace`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from linux_tdmr import LinuxHost, q35_memblocks

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.errors import VtdxError
from vtdx.module import TdxModule
from vtdx.observe.trace import (
    TraceRecorder,
    filter_trace,
    format_record,
    parse_leaf,
    read_trace,
    reg_in,
    reg_out,
)
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import GiB, Profile


@pytest.fixture
def traced(tmp_path: Path):
    profile = Profile.from_vm(2, 2 * GiB)
    mem = SparseMemory(profile.ram)
    module = TdxModule(profile, mem)
    ctx = {0: (0xFFFFFFFF81000010, 0xFFFFC90000001F00, 0x1000), 1: None}
    rec = TraceRecorder(tmp_path / "trace.jsonl", context=ctx.get,
                        symbolise=lambda rip, rsp, cr3: lambda: {"caller": f"fn_at_{rip:x}"})
    rec.attach(module)
    host = LinuxHost(module.seamcall, [0, 1], profile.package_of)
    boot = host.tdx_enable(q35_memblocks(2 * GiB), mem, tdx_keyid_start=profile.tdx_keyid_start,
                           info_pa=0x100000, array_pa=0x101000)
    # One failing call: SYS.RD of a field id that does not exist.
    bad = module.seamcall(1, Regs(rax=Leaf.TDH_SYS_RD, rdx=0x7777))
    rec.close()
    return rec, boot, bad


def test_records_carry_registers_status_and_caller(traced):
    rec, boot, bad = traced
    recs = list(read_trace(rec.path))
    assert len(recs) == len(boot.calls) + 1
    for r, c in zip(recs, boot.calls, strict=False):
        assert r["leaf"] == c.leaf and r["lp"] == c.lp
        for reg in ("rcx", "rdx", "r8", "r9"):
            assert reg_in(r, reg) == getattr(c.regs_in, reg)
            assert reg_out(r, reg) == getattr(c.regs_out, reg)
        assert r["status-name"] == "TDX_SUCCESS" and r["ok"]
        assert r["duration-us"] >= 0
    first = recs[0]
    assert first["name"] == "TDH.SYS.INIT" and first["rip"] == "0xffffffff81000010"
    assert first["caller"] == "fn_at_ffffffff81000010"
    last = recs[-1]
    assert last["lp"] == 1 and "rip" not in last  # no context for LP 1
    assert not last["ok"] and int(last["status"], 16) == bad.rax
    assert last["status-name"] == st.decode(bad.rax)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


def test_filters_and_parse_leaf(traced):
    rec, boot, bad = traced
    recs = list(read_trace(rec.path))
    assert parse_leaf("TDH.SYS.LP.INIT") == parse_leaf("sys.lp.init") == parse_leaf("35") == 35
    assert parse_leaf("tdh_sys_rd") == parse_leaf("0x22") == 34
    with pytest.raises(VtdxError):
        parse_leaf("TDH.NOPE")
    lp_init = filter_trace(recs, leaves_=["sys.lp.init"])
    assert [r["lp"] for r in lp_init] == [0, 1]
    assert filter_trace(recs, lps=[1], leaves_=[35]) == lp_init[1:]
    errs = filter_trace(recs, errors=True)
    assert len(errs) == 1 and errs[0]["lp"] == 1
    assert filter_trace(recs, status_name="field_id") == errs
    assert len(filter_trace(recs, leaves_=["sys.tdmr.init"], last=3)) == 3
    assert all(r["caller"].startswith("fn_at_")
               for r in filter_trace(recs, caller="fn_at_", lps=[0]))
    # The in-memory ring answers the same question.
    assert [r["seq"] for r in rec.last(2, leaf=35)] == [r["seq"] for r in lp_init]
    line = format_record(errs[0])
    assert "lp1 TDH.SYS.RD -> TDX_METADATA_FIELD_ID_INCORRECT" in line


def test_stats(traced):
    rec, boot, bad = traced
    s = rec.stats()
    assert s["calls"] == len(boot.calls) + 1 and s["errors"] == 1
    assert s["per-leaf"]["TDH.SYS.TDMR.INIT"]["calls"] == boot.count(Leaf.TDH_SYS_TDMR_INIT)
    assert s["per-leaf"]["TDH.SYS.RD"]["errors"] == 1


def test_torn_last_line_is_skipped(tmp_path: Path):
    p = tmp_path / "trace.jsonl"
    p.write_text(json.dumps({"seq": 1, "leaf": 35}) + "\n" + '{"seq": 2, "le')
    assert [r["seq"] for r in read_trace(p)] == [1]


def vtdx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtdx", *args], capture_output=True,
                          text=True, timeout=60)


def test_vtdx_trace_command(traced):
    rec, boot, bad = traced
    run_dir = str(rec.path.parent)
    r = vtdx("trace", run_dir, "--leaf", "TDH.SYS.LP.INIT")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("    ")]
    assert [ln.split()[1] for ln in lines] == ["lp0", "lp1"]
    r = vtdx("trace", run_dir, "--lp", "1", "--errors", "--json")
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(recs) == 1 and recs[0]["name"] == "TDH.SYS.RD"
    r = vtdx("trace", run_dir, "--leaf", "TDH.SYS.TDMR.INIT", "--last", "2", "--json")
    assert len(r.stdout.splitlines()) == 2
    r = vtdx("trace", run_dir, "--leaf", "bogus")
    assert r.returncode == 1 and "unknown SEAMCALL leaf" in r.stderr
    r = vtdx("trace", str(rec.path.parent / "missing"))
    assert r.returncode == 1 and "no trace at" in r.stderr


def test_vtdx_trace_follow(tmp_path: Path):
    """--follow prints calls appended while the run goes on, through the same filters."""
    import time

    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps({"seq": 1, "lp": 0, "leaf": 35, "name": "TDH.SYS.LP.INIT",
                                "status-name": "TDX_SUCCESS", "ok": True}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "vtdx", "trace", str(tmp_path), "-f",
                             "--lp", "1", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        with open(path, "a") as f:
            for seq, lp in ((2, 0), (3, 1)):
                f.write(json.dumps({"seq": seq, "lp": lp, "leaf": 35}) + "\n")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line) == {"seq": 3, "lp": 1, "leaf": 35}
    finally:
        proc.terminate()
        proc.wait(10)
