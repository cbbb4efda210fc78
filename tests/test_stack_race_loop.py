"""Overlap by default, through the whole stack: the test guest's two vCPUs run the seed's
two calls in a loop with no pause armed (tests/stack_td_scenarios.py record_race_loop,
the guest's LOOP phase in guest/testguest/main.c).

LP0 cycles DEMOTE (DPAMT page A1 in R12) / BLOCK / TRACK / PROMOTE / BLOCK / TRACK; LP1
cycles PAMT.ADD / PAMT.REMOVE of A1's 2MB range. DEMOTE takes that 2MB PAMT entry shared
(intel/tdx-module pamt_manager.c pamt_demote()), PAMT.ADD/REMOVE exclusive
(tdh_phymem_pamt_add.c, tdh_phymem_pamt_remove.c). A daemon's module overlaps calls of
different LPs (vtdx.module.timing.Overlap) unless told to run serially, so the loop meets
BUSY by chance as on hardware; the serial switch gives none.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stack_td_scenarios import record_race_loop
from test_stack_td import replay

from vtdx.host.qemu import QemuRuntime
from vtdx.module import TdxModule
from vtdx.module.contention import ContentionLog
from vtdx.module.timing import SERIAL, Explore
from vtdx.testing import testguest
from vtdx.testing.seamscript import LOOP

pytestmark = pytest.mark.stack
ITERS = 150


@pytest.fixture(scope="module")
def elf() -> Path:
    return testguest.build()


@pytest.mark.parametrize("serial", [False, True], ids=["overlap", "serial"])
def test_seed_calls_in_a_loop_meet_by_chance(runtime: QemuRuntime, elf: Path,
                                             serial: bool) -> None:
    loop = record_race_loop()
    logs: list[ContentionLog] = []
    timing: list[str] = []

    def arm(module: TdxModule) -> None:
        if serial:
            module.control.set_timing(SERIAL)
        logs.append(ContentionLog().attach(module))

    def host(module: TdxModule, box: object, log: object) -> None:
        timing.append(module.control.timing_in_force.name)

    run = replay(runtime, elf, loop.script, arm=arm, host=host, append=f"iters={ITERS}",
                 timeout=240)
    assert run.status == testguest.EXIT_STATUS_DONE and run.result.done
    lines = run.result.results("script")
    assert set(lines) == {0, 1}
    for cpu, line in lines.items():
        assert line.num("fail") == 0, line
        ordered = sum(1 for r in loop.script.records if r.lp == cpu and not r.flags & LOOP)
        assert line.num("ok") == ordered + ITERS * (6 if cpu == 0 else 2), line
    busy = sum(line.num("loop_busy") for line in lines.values())
    calls = sum(line.num("loop_calls") for line in lines.values())
    assert timing == ["serial" if serial else "overlap"]
    assert run.problems == [] and not run.daemon_errors and not run.module.internal_errors
    (log,) = logs
    print(f"{timing[0]}: {busy} BUSY in {calls} calls ({100 * busy / calls:.1f}%), "
          f"{len(log.records)} explained")
    if serial:
        assert busy == 0 and log.records == []
    else:
        assert busy > 0
        assert len(log.records) + log.dropped == busy  # each one from a lock held by LP(1-x)
        assert {r.lp for r in log.records} <= {0, 1}
        assert all(h.lp == 1 - r.lp for r in log.records for h in r.holders)


def _met(log: ContentionLog) -> set[tuple[object, ...]]:
    """Who met whom on which lock (PAMT.ADD and PAMT.REMOVE are one family)."""
    def fam(name: object) -> object:
        return "PAMT.ADD/REMOVE" if str(name).startswith("TDH.PHYMEM.PAMT") else name
    return {(lp, fam(leaf), status, lock, hlp, fam(hleaf))
            for lp, leaf, status, lock, hlp, hleaf in (r.key() for r in log.records)}


def test_exploration_through_the_whole_stack_is_reproducible_as_a_set(
        runtime: QemuRuntime, elf: Path) -> None:
    """Two runs with one seed: the same hold schedule; the report compared as a set."""
    loop = record_race_loop()
    logs: list[ContentionLog] = []

    def arm(module: TdxModule) -> None:
        module.control.set_timing(Explore(seed=21))
        logs.append(ContentionLog().attach(module))

    for _ in range(2):
        run = replay(runtime, elf, loop.script, arm=arm, append="iters=60", timeout=240)
        assert run.status == testguest.EXIT_STATUS_DONE and run.result.done
        assert all(ln.num("fail") == 0 for ln in run.result.results("script").values())
    reports = [_met(log) for log in logs]
    assert reports[0] and reports[0] == reports[1]
