"""The race controls as options: `vtdx run --profile/--features/--pause/--contend/--serial`,
the pytest marker's keywords, and the trace header that records what was in force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dpamt_demote_race import BUSY_RCX, Scenario

from vtdx.abi.leaves import Leaf
from vtdx.errors import VtdxError
from vtdx.harness.vm import BootSpec, Pause
from vtdx.module import TdxModule
from vtdx.module.contention import ContentionLog
from vtdx.module.timing import Explore
from vtdx.observe.qmp.endpoint import InspectEndpoint
from vtdx.observe.trace import read_trace
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import Profile
from vtdx.session.run import ConsoleLog, PauseRule, RunOptions, RunResult, summarize


def test_pause_rule_parses_every_field_and_refuses_in_one_line() -> None:
    r = PauseRule.parse("TDH.MEM.PAGE.AUG:lp=1:point=entry:nth=3:td=0x7f000:gpa=0x1000+0x2000"
                        ":hpa=0x200000:until=TDH.MEM.SEPT.ADD:timeout=2.5")
    assert (r.leaf, r.lp, r.point, r.nth, r.td) == (Leaf.TDH_MEM_PAGE_AUG, 1, "entry", 3,
                                                     0x7F000)
    assert r.gpa == (0x1000, 0x3000) and r.hpa == (0x200000, 0x201000)
    assert (r.until, r.timeout) == (Leaf.TDH_MEM_SEPT_ADD, 2.5)
    assert PauseRule.parse("any:lp=0").leaf is None
    for bad, words in [("TDH.NOPE", "unknown SEAMCALL leaf"), ("any:lp=x", "number"),
                       ("any:point=middle", "point 'middle'"), ("any:nth=0", "nth must"),
                       ("any:colour=red", "unknown field"), ("any:lp", "needs a value")]:
        with pytest.raises(VtdxError, match=words) as e:
            PauseRule.parse(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith("--pause ")


def test_pause_rule_arms_the_module() -> None:
    sc = Scenario()
    PauseRule.parse("TDH.MEM.TRACK:lp=1:timeout=0.05").arm(sc.w.module)
    (h,) = sc.w.control.pauses()
    assert (h.leaf, h.lp, h.point, h.timeout_s) == (Leaf.TDH_MEM_TRACK, 1, "locked", 0.05)


def test_run_options_profile_features_and_timing(tmp_path: Path) -> None:
    k = tmp_path / "bzImage"
    k.write_bytes(b"x")
    opts = RunOptions(kernel=k, platform="dpamt", features="-demote-nointerrupt")
    p = opts.profile()
    assert p.name == "dpamt" and p.dynamic_pamt and not p.demote_nointerrupt
    opts.validate()
    assert RunOptions(kernel=k, movdir64b=False).profile().name == "default+no-movdir64b"
    for bad, words in [({"serial": True, "contend": 1}, "exclude"),
                       ({"features": "+bogus"}, "unknown feature"),
                       ({"platform": "nope"}, "unknown")]:
        with pytest.raises(VtdxError, match=words):
            RunOptions(kernel=k, **bad).validate()  # type: ignore[arg-type]
    m = TdxModule(Profile.from_vm(2, 2 << 30), SparseMemory(Profile.from_vm(2, 2 << 30).ram))
    RunOptions(kernel=k, contend=9, pauses=(PauseRule.parse("any:lp=1"),)).arm(m)
    assert m.control.describe()["seed"] == 9 and len(m.control.pauses()) == 1
    RunOptions(kernel=k, serial=True).arm(m)
    assert m.control.describe()["mode"] == "serial"
    assert RunOptions(kernel=k).timing_text() == "overlap"


def test_boot_spec_keywords_of_the_marker() -> None:
    spec = BootSpec(kernel=Path("bz"), profile="dpamt", pauses=(Pause("TDH.SYS.LP.INIT", lp=1,
                                                                      timeout=2),), contend=3)
    assert spec.platform().dynamic_pamt
    m = TdxModule(spec.platform(), SparseMemory(spec.platform().ram))
    spec.pauses[0].arm(m)
    (h,) = m.control.pauses()
    assert (h.leaf, h.lp, h.timeout_s) == (Leaf.TDH_SYS_LP_INIT, 1, 2)
    with pytest.raises(VtdxError, match="unknown feature"):
        BootSpec(kernel=Path("bz"), features="+nope").platform()


def test_trace_header_names_profile_features_and_timing(tmp_path: Path) -> None:
    sc = Scenario()
    sc.w.control.set_timing(Explore(seed=4))
    ep = InspectEndpoint(sc.w.module, tmp_path).start()
    try:
        sc.w.module.seamcall(0, sc.demote_regs())
    finally:
        ep.stop()
    first = json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[0])
    head = first["vtdx-header"]
    assert head["timing"]["mode"] == "explore" and head["timing"]["seed"] == 4
    assert "+dynamic-pamt" in head["features"] and head["profile"] == sc.w.module.profile.name
    recs = list(read_trace(tmp_path / "trace.jsonl"))  # readers skip the header
    assert [r["name"] for r in recs] == ["TDH.MEM.PAGE.DEMOTE"] and recs[0]["call"] > 0


def test_summary_says_timing_features_and_tabulates_contention(tmp_path: Path) -> None:
    """The end-of-run summary of `vtdx run`: platform line and the contention table."""
    sc = Scenario()
    m = sc.w.module
    log = ContentionLog().attach(m)
    pause = m.control.pause(lp=0, leaf=Leaf.TDH_MEM_PAGE_DEMOTE)
    t, _ = sc.in_thread(0, sc.demote_regs())
    assert pause.wait_paused(5)
    assert m.seamcall(1, sc.pamt_add_regs()).rax == BUSY_RCX
    pause.resume()
    t.join(5)
    assert m.seamcall(1, sc.pamt_add_regs()).rax == 0
    k = tmp_path / "bzImage"
    k.write_bytes(b"x")
    opts = RunOptions(kernel=k, platform="dpamt", contend=5)
    rec = log.records[0]
    res = RunResult(0, "ok", ConsoleLog(), 1.0, {}, m.stats, None, contention=log.snapshot(),
                    timing="explore (seed 5)",
                    busy_callers={rec.call: "tdx_pamt_get+0x10/0x80"})
    text = summarize(res, opts)
    assert "profile dpamt" in text and "+dynamic-pamt" in text
    assert "timing explore (seed 5)" in text
    assert "contention: 1 BUSY from locks another call held" in text
    row = next(ln for ln in text.splitlines() if "TDH.PHYMEM.PAMT.ADD" in ln and "BUSY" in ln)
    assert row.split()[:4] == ["TDH.PHYMEM.PAMT.ADD", "TDX_OPERAND_BUSY(RCX)", "pamt",
                               "TDH.MEM.PAGE.DEMOTE"]
    assert row.split()[4:7] == ["1", "1", "0"] and "tdx_pamt_get+0x10/0x80" in row


@pytest.mark.kernel
@pytest.mark.stack
def test_dpamt_profile_boots_the_default_kernel_on_static_pamt() -> None:
    """`vtdx run --profile dpamt` with the default 7.3 kernel, which has no Dynamic PAMT: the
    module offers it (TDX_FEATURES0), the kernel does not take it (TDH.SYS.CONFIG without
    bit 16 in R8), and TDX comes up on static PAMT exactly as with the default profile."""
    import subprocess
    import sys

    from vtdx.host import kernel as kernel_build

    if kernel_build.default_kernel(None) is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    r = subprocess.run([sys.executable, "-m", "vtdx", "run", "--profile", "dpamt",
                        "--checks", "tdx"], capture_output=True, text=True, timeout=600,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "profile dpamt" in out and "+dynamic-pamt" in out, out
    assert "tdx_initialized=1" in out and "pamt_kb=8212" in out, out
    assert "TDH.PHYMEM.PAMT.ADD" not in out, out
