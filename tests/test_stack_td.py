"""Whole stack for the TD leaves: scripts recorded in-process, replayed by the test guest.

KVM cannot drive TDs on vtdx yet, so the SEAMCALLs come from the freestanding test guest
(``test=script``, guest/testguest/main.c) running a script recorded against an in-process
module (tests/stack_td_scenarios.py, vtdx/seamscript.py): real QEMU + the plugin + the
daemon + the module, guest RAM shared through the memory-backend file. Every output
register of every call must equal the in-process one, and the daemon's module must end in
the state the in-process module reached.

The race is the seed's (Yan Zhao, RFC v5 30/45 review): DEMOTE on LP0 with DPAMT pages
A1/B1 in R12/R13 vs PAMT.ADD on LP1 for the 2MB range holding A1's neighbour. The daemon's
module pauses one call at its "locked" control point (vtdx/module/control.py) while that
vCPU sits inside SEAMCALL; the host sees the pause and sets the go flag the other vCPU's
record waits for. Statuses from intel/tdx-module: tdh_phymem_pamt_add.c (BUSY | RCX,
0x8000020000000001) and pamt_manager.c pamt_demote() (BUSY | R12, 0x800002000000000c).

TDH.VP.ENTER's refusals (unmodified KVM never provokes them) and a TD guest's access to a
PENDING page: the engine's test guest is TDH.MEM.PAGE.ADDed into a TD and run by the
daemon's TD vCPU engine over QEMU's RAM (the memory-backend file), so the EPT-violation TD
exit crosses the whole stack. Entries of a vCPU running guest code are REENTER records:
time-slice exits are re-entered, as KVM does, and not compared (their number is the wall
clock's); every other output register is.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from stack_td_scenarios import (
    BUSY_R12,
    BUSY_RCX,
    BUSY_SEPT_TREE,
    DPAMT_A1,
    DPAMT_B1,
    GUEST_2M_HPA,
    IMAGES,
    MEM,
    OP_STATE_INCORRECT,
    PAMT_ADD_PA,
    PENDING_EXIT,
    RACE_GPA,
    SMP,
    VCPU_ASSOCIATED,
    VCPU_STATE_INCORRECT,
    ZERO_STEP_EXIT,
    Lifecycle,
    Race,
    ScenarioWorld,
    VpEnterNegatives,
    ZeroStep,
    record_lifecycle,
    record_race,
    record_sliced_entry,
    record_vp_enter_negatives,
    record_zero_step,
    stack_profile,
)
from test_td_support import expected_mrtd

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.errors import VtdxError
from vtdx.host.qemu import QemuRuntime
from vtdx.module import TdxModule
from vtdx.module import sept as S
from vtdx.module.control import PauseHandle
from vtdx.module.events import CallObserved
from vtdx.module.leaves.td_vp_enter import STEPPING_EPF_THRESHOLD
from vtdx.module.pamt import PT_EPT, PT_NDA, PT_PAMT, PT_REG, PT_RSVD
from vtdx.platform.memory import GuestRam
from vtdx.platform.profile import Profile
from vtdx.session.machine import Machine
from vtdx.testing import td_test_guest as tg
from vtdx.testing import testguest
from vtdx.testing.invariants import check_invariants, fingerprint
from vtdx.testing.seamscript import (
    BARRIER,
    CONCURRENT,
    PHASE_TURN,
    REENTER,
    TIME_SLICE_EXIT,
    WAIT_GO,
    Mailbox,
    Mismatch,
    Record,
    Script,
)

pytestmark = pytest.mark.stack




@pytest.fixture(scope="module")
def elf() -> Path:
    return testguest.build()


class CallLog:
    """Module observer: (lp, leaf, status) of every SEAMCALL the daemon's module finished."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, ev: CallObserved) -> None:
        with self.cond:
            self.calls.append((ev.lp, ev.leaf, ev.out.rax))
            self.cond.notify_all()

    def wait_for(self, lp: int, leaf: int, nth: int = 1, timeout: float = 30) -> int:
        """Status of the ``nth`` call of ``leaf`` on ``lp``, waiting for it to finish."""
        def hits() -> list[int]:
            return [s for c_lp, c_leaf, s in self.calls if (c_lp, c_leaf) == (lp, leaf)]

        with self.cond:
            if not self.cond.wait_for(lambda: len(hits()) >= nth, timeout):
                raise VtdxError(f"{Leaf(leaf).name} #{nth} on LP{lp} never finished")
            return hits()[nth - 1]

    def count(self, leaf: int, lp: int | None = None) -> int:
        with self.cond:
            return sum(1 for c_lp, c_leaf, _ in self.calls
                       if c_leaf == leaf and lp in (None, c_lp))


@dataclass
class StackRun:
    """What one replay through the whole stack produced."""

    result: testguest.TgResult
    status: int
    mismatches: list[Mismatch]
    module: TdxModule
    log: CallLog
    problems: list[str] = field(default_factory=list)   # invariant checker, after the run
    stderr: list[str] = field(default_factory=list)
    daemon_errors: list[str] = field(default_factory=list)
    host_result: object = None
    state: dict[str, object] = field(default_factory=dict)
    divergence: list[str] = field(default_factory=list)

    def assert_clean(self, script: Script) -> None:
        lines = self.result.results("script")
        assert self.status == testguest.EXIT_STATUS_DONE and self.result.done, \
            self.result.output[-2000:]
        assert not self.mismatches, "\n".join(map(str, self.mismatches[:20]))
        assert not self.divergence, self.divergence
        ok = sum(ln.num("ok") for ln in lines.values())
        fail = sum(ln.num("fail") for ln in lines.values())
        assert (ok, fail) == (len(script.records), 0), lines
        for lp in script.lps:  # every LP with records really ran them on its own vCPU
            want = sum(1 for r in script.records if r.lp == lp)
            assert lines[lp].num("ok") == want, lines[lp]
        assert not self.result.exceptions()
        assert not self.daemon_errors and not self.module.internal_errors
        assert not [ln for ln in self.stderr if "vtdx-plugin" in ln], self.stderr


Host = Callable[[TdxModule, Mailbox, CallLog], object]


def _answered(module: TdxModule) -> tuple[Counter[int], Counter[int]]:
    """SEAMCALLs per leaf and per status, without TDH.VP.ENTER's time-slice exits: how many
    slices a running vCPU takes depends on the wall clock (seamscript REENTER)."""
    by_leaf: Counter[int] = Counter()
    by_status: Counter[int] = Counter()
    for (_, leaf, rax), n in module.stats.counts.items():
        if leaf == Leaf.TDH_VP_ENTER and rax == TIME_SLICE_EXIT:
            continue
        by_leaf[leaf] += n
        by_status[rax] += n
    return by_leaf, by_status


def divergence(stack: TdxModule, ram: GuestRam, ref: TdxModule) -> list[str]:
    """How the daemon's module (and guest RAM) differ from the in-process recording's."""
    out = []
    names = ("PAMT entries", "TDs and S-EPT", "Dynamic PAMT nodes/bitmap", "KOT")
    for name, a, b in zip(names, fingerprint(stack), fingerprint(ref), strict=True):
        if a != b:
            out.append(f"{name} differ")
    for what, a, b in zip(("calls by leaf", "calls by status"), _answered(stack),
                          _answered(ref), strict=True):
        if a != b:
            out.append(f"module.stats {what}: {dict(a)} != {dict(b)}")
    for what in ("state", "global_keyid", "pkg_config"):
        if getattr(stack, what) != getattr(ref, what):
            out.append(f"module.{what}: {getattr(stack, what)} != {getattr(ref, what)}")
    touched = getattr(ref.memory, "touched", set())
    bad = [pfn for pfn in sorted(touched)
           if ram.read(pfn << 12, 4096) != ref.memory.read(pfn << 12, 4096)]
    if bad:
        out.append(f"{len(bad)} of {len(touched)} pages differ in RAM, first {bad[0] << 12:#x}")
    return out


def replay(runtime: QemuRuntime, elf: Path, script: Script, *,
           arm: Callable[[TdxModule], None] | None = None, host: Host | None = None,
           inspect: Callable[[TdxModule, GuestRam], dict[str, object]] | None = None,
           reference: TdxModule | None = None, profile: Profile | None = None,
           timeout: float = 60, append: str = "") -> StackRun:
    """Boot the test guest with ``script`` in its RAM and the daemon's module armed.

    ``arm`` runs on the daemon's module before QEMU starts (pauses); ``host`` runs in a
    thread while the guest runs (sees pauses, sets go flags); ``inspect`` reads module state
    after QEMU exited, while guest RAM is still mapped; ``reference`` (the recording's
    module) fills ``StackRun.divergence``.
    """
    log = CallLog()
    made: list[TdxModule] = []

    def backend(prof: Profile, ram: GuestRam) -> TdxModule:
        script.install(ram)  # before QEMU starts: the guest finds it at boot
        module = TdxModule(prof, ram)
        module.events.subscribe(CallObserved, log)
        if arm:
            arm(module)
        made.append(module)
        return module

    async def run() -> StackRun:
        async with Machine(elf, append=f"smp={SMP} test=script {append}".strip(), smp=SMP,
                           mem=MEM,
                           profile=profile or stack_profile(), backend=backend,
                           runtime=runtime, extra_args=testguest.EXIT_DEVICE) as m:
            assert m.ram is not None and m.daemon is not None
            module, box = made[0], Mailbox(m.ram)

            def host_thread() -> object:
                try:
                    return host(module, box, log) if host else None
                finally:  # never leave the guest or a paused call waiting on a failed host
                    for i in range(8):
                        box.set_go(i)
                    module.control.clear()

            hosting = asyncio.create_task(asyncio.to_thread(host_thread))
            try:
                status = await m.wait(timeout)
            except VtdxError as e:
                raise VtdxError(f"{e}; script state: {box.describe()}") from None
            finally:
                module.control.clear()
            host_result = await hosting
            run = StackRun(testguest.parse_output(m.console_text()), status,
                           script.mismatches(m.ram), module, log,
                           check_invariants(module, expect_no_locks=True), m.stderr_lines,
                           list(m.daemon.errors), host_result)
            if inspect:
                run.state = inspect(module, m.ram)
            if reference is not None:
                run.divergence = divergence(module, m.ram, reference)
            return run

    return asyncio.run(run())


# --------------------------------------------------------------------------- the replay itself

def test_a_wrong_expectation_is_reported_precisely(runtime: QemuRuntime, elf: Path) -> None:
    """The comparison can fail: module init recorded, one TDH.SYS.RD result (R8) and one
    LP1 status changed; the guest names the first of its CPU, the host finds both."""
    script = ScenarioWorld().rec.script()
    rd = script.find(0, Leaf.TDH_SYS_RD)
    rd.regs_out = rd.regs_out.copy(r8=rd.regs_out.r8 ^ 1)
    lp_init = script.find(1, Leaf.TDH_SYS_LP_INIT)
    lp_init.regs_out = lp_init.regs_out.copy(rax=0xC000_0000_0000_0000)
    run = replay(runtime, elf, script)
    assert run.status == testguest.EXIT_STATUS_DONE and run.result.done
    lines = run.result.results("script")
    assert (lines[0].num("fail"), lines[0].num("seq")) == (1, rd.seq), lines[0]
    assert lines[0].fields["reg"] == "r8"
    assert (lines[0].num("got"), lines[0].num("want")) == (rd.regs_out.r8 ^ 1, rd.regs_out.r8)
    assert (lines[1].num("fail"), lines[1].fields["reg"], lines[1].num("got")) == (1, "rax", 0)
    assert [(m.record.seq, m.reg) for m in run.mismatches] == [(lp_init.seq, "rax"),
                                                                (rd.seq, "r8")]
    assert lines[0].num("ok") + lines[1].num("ok") == len(script.records) - 2


def test_every_register_crosses_the_stack_both_ways(runtime: QemuRuntime, elf: Path) -> None:
    """RBX, RSI, RDI (Linux's __seamcall_saved_ret) and R9-R15 carry distinct values into
    a TDH.SYS.RD on each LP and must come back as the in-process module returned them."""
    w = ScenarioWorld()
    spare = ("rbx", "rsi", "rdi", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
    for lp in (0, 1):
        pattern = {n: 0x8000_0000_0000_0000 | (lp << 56) | (0x1111_1111 * (i + 1))
                   for i, n in enumerate(spare)}
        out = w.rec.call(lp, Regs(rax=Leaf.TDH_SYS_RD, rdx=0, **pattern))
        assert out.rax == 0 and {n: getattr(out, n) for n in spare} == pattern
    script = w.rec.script()
    run = replay(runtime, elf, script, reference=w.module)
    run.assert_clean(script)
    got = run.log.calls[-2:]
    assert sorted(lp for lp, _, _ in got) == [0, 1]


def test_a_record_for_a_missing_vcpu_stops_every_cpu(runtime: QemuRuntime, elf: Path) -> None:
    """LP 5 on a 2-vCPU guest: each CPU refuses the script up front rather than spin."""
    script = Script([Record(0, 0, Regs(rax=Leaf.TDH_SYS_INIT), Regs()),
                     Record(1, 5, Regs(rax=Leaf.TDH_SYS_LP_INIT), Regs())])
    run = replay(runtime, elf, script, timeout=30)
    assert run.status == testguest.EXIT_STATUS_DONE and run.result.done
    for cpu, line in run.result.results("script").items():
        assert (line.num("ok"), line.num("fail"), line.fields["error"], line.num("lp")) == \
            (0, 1, "no_cpu_for_lp", 5), (cpu, line)
    assert [m.got for m in run.mismatches] == [None, None] and not run.log.calls


# --------------------------------------------------------------------------- (a) TD life

@pytest.fixture(scope="module")
def lifecycle() -> Lifecycle:
    return record_lifecycle()


def test_td_life_replayed_through_the_whole_stack(runtime: QemuRuntime, elf: Path,
                                                  lifecycle: Lifecycle) -> None:
    script = lifecycle.script
    leaves = {r.leaf for r in script.records}
    for leaf in (Leaf.TDH_MNG_CREATE, Leaf.TDH_MNG_KEY_CONFIG, Leaf.TDH_MNG_INIT,
                 Leaf.TDH_VP_CREATE, Leaf.TDH_MEM_PAGE_ADD, Leaf.TDH_MR_EXTEND,
                 Leaf.TDH_MR_FINALIZE, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK,
                 Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_DEMOTE, Leaf.TDH_MEM_PAGE_REMOVE,
                 Leaf.TDH_PHYMEM_PAMT_ADD, Leaf.TDH_PHYMEM_PAMT_REMOVE,
                 Leaf.TDH_MNG_KEY_FREEID, Leaf.TDH_PHYMEM_PAGE_RECLAIM):
        assert leaf in leaves, Leaf(leaf).name
    assert script.lps == {0, 1}
    # the measurement the in-process module took, from an independent SHA-384
    assert lifecycle.mrtd == expected_mrtd(IMAGES)

    mrtd: list[bytes] = []

    def arm(module: TdxModule) -> None:
        def on_finalize(ev: CallObserved) -> None:
            if ev.leaf == Leaf.TDH_MR_FINALIZE and ev.out.rax == 0:
                mrtd.append(module.gd.tds[ev.inp.rcx].mrtd)
        module.events.subscribe(CallObserved, on_finalize)

    def inspect(module: TdxModule, ram: GuestRam) -> dict[str, object]:
        busy = [(lvl, idx, e.pt) for lvl in (0, 1, 2)
                for idx, e in module.pamt.entries(lvl).items() if e.pt not in (PT_NDA, PT_RSVD)]
        gd = module.gd
        return {"busy": busy, "tds": len(gd.tds), "dp_nodes": len(gd.pamt.nodes),
                "dp_bitmap": len(gd.pamt.bitmap), "locks": len(module.locks),
                "kot": dict(module.kot)}

    run = replay(runtime, elf, script, arm=arm, inspect=inspect, reference=lifecycle.module)
    run.assert_clean(script)
    # the guest copied the source pages into guest RAM; the daemon measured the same bytes
    assert mrtd == [lifecycle.mrtd]
    assert run.state == {"busy": [], "tds": 0, "dp_nodes": 0, "dp_bitmap": 0, "locks": 0,
                         "kot": dict(lifecycle.module.kot)}
    assert run.problems == []
    assert run.log.count(Leaf.TDH_PHYMEM_PAGE_RECLAIM) == \
        sum(1 for r in script.records if r.leaf == Leaf.TDH_PHYMEM_PAGE_RECLAIM)


# --------------------------------------------------------------------------- (b) the race

def _demoted(module: TdxModule, race: Race) -> dict[str, object]:
    """The guest's 2MB page: S-EPT shape, PAMT types and the DPAMT node of its range."""
    gd = module.gd
    td = gd.tds[race.tdr]
    w = td.sept.walk(RACE_GPA, 1)
    leaves = [(g, lvl, e) for g, lvl, e in td.sept.leaves()
              if RACE_GPA <= g < RACE_GPA + (2 << 20)]
    node = gd.pamt.node(GUEST_2M_HPA)
    add_node = gd.pamt.node(PAMT_ADD_PA)
    return {
        "entry": (w.level, w.entry.state, w.entry.hpa),
        "leaves_4k_pending": sum(1 for g, lvl, e in leaves if lvl == 0 and
                                 e.state == S.PENDING and e.hpa == GUEST_2M_HPA + g - RACE_GPA),
        "pamt_2m": module.pamt.get(GUEST_2M_HPA, 1).pt,
        "pamt_4k_reg": sum(1 for i in range(512)
                           if module.pamt.get(GUEST_2M_HPA + (i << 12), 0).pt == PT_REG),
        "node": None if node is None else (node.hpa0, node.hpa1, node.page_count),
        "add_node": None if add_node is None else (add_node.hpa0, add_node.hpa1),
        "a1_b1_pamt_pages": {DPAMT_A1 >> 12, DPAMT_B1 >> 12} <= gd.pamt.bitmap,
        "sept_page": module.pamt.get(race.sept_page, 0).pt,
        "locks": len(module.locks),
    }


def _expected_after_race(race: Race) -> dict[str, object]:
    return {
        "entry": (1, S.NL_MAPPED, race.sept_page),
        "leaves_4k_pending": 512,
        "pamt_2m": PT_PAMT,
        "pamt_4k_reg": 512,
        "node": (DPAMT_A1, DPAMT_B1, 512),
        "add_node": race.add_pair,
        "a1_b1_pamt_pages": True,
        "sept_page": PT_EPT,
        "locks": 0,
    }


def _race_host(race: Race, pauses: list[PauseHandle]) -> Host:
    """The host's side of each order, event-driven: pause hit -> go -> loser's status."""
    lp, leaf = race.paused_leaf

    def run(module: TdxModule, box: Mailbox, log: CallLog) -> object:
        (pause,) = pauses
        assert pause.wait_paused(60), f"{Leaf(leaf).name} never paused; {box.describe()}"
        seen: dict[str, object] = {"paused": (pause.paused_lp, pause.paused_leaf)}
        if race.order == "serialised":
            # LP1 spins on the guest's ordering (the kernel's pamt_lock) and never reaches
            # the module while DEMOTE holds its locks
            box.wait_progress(1, race.pamt_add, PHASE_TURN)
            seen["pamt_add_calls_while_paused"] = log.count(Leaf.TDH_PHYMEM_PAMT_ADD, 1)
            seen["held_while_paused"] = len(module.locks) > 0
            pause.resume()
            seen["demote"] = log.wait_for(0, Leaf.TDH_MEM_PAGE_DEMOTE)  # the race's only one
            seen["pamt_add"] = log.wait_for(1, Leaf.TDH_PHYMEM_PAMT_ADD)
            return seen
        other_lp, other_leaf = ((1, Leaf.TDH_PHYMEM_PAMT_ADD) if lp == 0
                                else (0, Leaf.TDH_MEM_PAGE_DEMOTE))
        winner_before = log.count(leaf, lp)
        loser_before = log.count(other_leaf, other_lp)
        box.set_go(0)
        # the loser comes back while the winner still sits at its pause point
        seen["loser"] = log.wait_for(other_lp, other_leaf, nth=loser_before + 1)
        seen["winner_returned_first"] = log.count(leaf, lp) != winner_before
        pause.resume()
        seen["winner"] = log.wait_for(lp, leaf, nth=winner_before + 1)
        seen["retry"] = log.wait_for(other_lp, other_leaf, nth=loser_before + 2)
        return seen

    return run


@pytest.mark.parametrize("order", ["demote-first", "pamt-add-first", "serialised"])
def test_seed_race_through_the_whole_stack(runtime: QemuRuntime, elf: Path,
                                           order: str) -> None:
    race = record_race(order)
    recs = race.script.records
    # the recording is the seed's result, in-process
    if order == "demote-first":
        assert recs[race.pamt_add].regs_out.rax == BUSY_RCX == 0x8000020000000001
        assert recs[race.demote].regs_out.rax == 0
    elif order == "pamt-add-first":
        assert recs[race.demote].regs_out.rax == BUSY_R12 == 0x800002000000000C
        assert recs[race.pamt_add].regs_out.rax == 0
    else:
        assert recs[race.demote].regs_out.rax == 0 == recs[race.pamt_add].regs_out.rax
    assert DPAMT_A1 >> 21 == PAMT_ADD_PA >> 21  # A1 and the PAMT.ADD target share a 2MB range
    assert recs[race.pamt_add].regs_in.rcx == (DPAMT_A1 & ~0x1FFFFF) | 1
    assert (recs[race.demote].regs_in.r12, recs[race.demote].regs_in.r13) == (DPAMT_A1,
                                                                              DPAMT_B1)
    expected = _demoted(race.module, race)
    assert expected == _expected_after_race(race)
    lp, leaf = race.paused_leaf
    pauses: list[PauseHandle] = []

    def arm(module: TdxModule) -> None:
        pauses.append(module.control.pause(lp=lp, leaf=leaf, point="locked"))

    run = replay(runtime, elf, race.script, arm=arm, host=_race_host(race, pauses),
                 inspect=lambda module, ram: _demoted(module, race), reference=race.module)
    run.assert_clean(race.script)
    seen = run.host_result
    assert isinstance(seen, dict)
    assert seen["paused"] == (lp, leaf)
    if order == "demote-first":
        assert seen["loser"] == BUSY_RCX and not seen["winner_returned_first"]
        assert (seen["winner"], seen["retry"]) == (0, 0)
    elif order == "pamt-add-first":
        assert seen["loser"] == BUSY_R12 and not seen["winner_returned_first"]
        assert (seen["winner"], seen["retry"]) == (0, 0)
    else:
        assert seen["pamt_add_calls_while_paused"] == 0 and seen["held_while_paused"]
        assert (seen["demote"], seen["pamt_add"]) == (0, 0)
    assert run.state == expected
    assert run.problems == []


# --------------------------------------------------------------------------- (c) VP.ENTER

@pytest.fixture(scope="module")
def vp_enter(tmp_path_factory: pytest.TempPathFactory) -> VpEnterNegatives:
    return record_vp_enter_negatives(tmp_path_factory.mktemp("vp-enter") / "ram")


@pytest.fixture(scope="module")
def vp_enter_run(runtime: QemuRuntime, elf: Path, vp_enter: VpEnterNegatives) -> StackRun:
    """The script replayed once; what the guest's CPUs got per record is kept."""

    def inspect(module: TdxModule, ram: GuestRam) -> dict[str, object]:
        return {"outputs": vp_enter.script.outputs(ram), "tds": len(module.gd.tds),
                "locks": len(module.locks)}

    return replay(runtime, elf, vp_enter.script, inspect=inspect, reference=vp_enter.module,
                  timeout=120)


def _guest_got(run: StackRun, seq: int) -> Regs:
    outputs = run.state["outputs"]
    assert isinstance(outputs, list)
    got = outputs[seq]
    assert got is not None, f"record {seq} never ran"
    return got[1]


def _vp_enter_statuses(run: StackRun, lp: int) -> list[int]:
    """TDH.VP.ENTER statuses the daemon's module gave ``lp``, time-slice exits left out."""
    return [rax for c_lp, leaf, rax in run.log.calls
            if (c_lp, leaf) == (lp, Leaf.TDH_VP_ENTER) and rax != TIME_SLICE_EXIT]


def test_vp_enter_script_replays_cleanly(vp_enter: VpEnterNegatives,
                                         vp_enter_run: StackRun) -> None:
    """Every register of every call, TD guest code run by the daemon's engine over QEMU's
    RAM included, equals the recording; the daemon's module ends where the recording did
    (no TD, same PAMT, same stats but for time slices, same bytes in every page written)."""
    script = vp_enter.script
    run = vp_enter_run
    run.assert_clean(script)
    assert run.divergence == [] and run.problems == []
    assert run.state["tds"] == 0 and run.state["locks"] == 0
    assert [r.seq for r in script.records if r.flags & REENTER] == [vp_enter.pending,
                                                                   vp_enter.after_flush]
    # the guest re-entered exactly the time slices the daemon's module ended
    lines = run.result.results("script")
    slices = sum(1 for lp, leaf, rax in run.log.calls
                 if leaf == Leaf.TDH_VP_ENTER and rax == TIME_SLICE_EXIT)
    assert sum(ln.num("reenters") for ln in lines.values()) == slices
    # each case's record was issued on the LP the scenario names
    for name, lp in (("not_runnable", 0), ("uninitialised", 0), ("pending", 0),
                     ("associated", 1), ("after_flush", 1)):
        rec = script.records[getattr(vp_enter, name)]
        assert (rec.lp, rec.leaf) == (lp, Leaf.TDH_VP_ENTER), name
    assert script.records[vp_enter.uninitialised].regs_in.rcx == vp_enter.raw_tdvpr
    assert script.records[vp_enter.not_runnable].regs_in.rcx == vp_enter.tdvpr


@pytest.mark.parametrize("case, want", [
    ("not_runnable", OP_STATE_INCORRECT),
    ("uninitialised", VCPU_STATE_INCORRECT),
    ("associated", VCPU_ASSOCIATED),
])
def test_vp_enter_refused_through_the_whole_stack(vp_enter: VpEnterNegatives,
                                                  vp_enter_run: StackRun, case: str,
                                                  want: int) -> None:
    """intel/tdx-module 1.5 src/td_transitions/tdh_vp_enter.c, in its check order:
    check_state_map_tdcs_and_lock (helpers.c) refuses a TD whose OP_STATE is not RUNNABLE
    (before TDH.MR.FINALIZE) with TDX_OP_STATE_INCORRECT, no operand id; map_tdvps passes
    (all TDVPX pages added), then check_and_associate_vcpu (helpers.c) refuses a vCPU that
    is not VCPU_READY (never TDH.VP.INIT'ed) with TDX_VCPU_STATE_INCORRECT, bare in 1.5;
    associate_vcpu refuses a vCPU associated with another LP (TDH.VP.INIT and an entry on
    LP0, no TDH.VP.FLUSH) with TDX_VCPU_ASSOCIATED, bare. The recording, the test guest's
    RAX and the daemon's module all say so. tdh_vp_enter.c's EXIT_FAILURE path writes no
    output register, so RCX comes back as the host passed it."""
    seq = getattr(vp_enter, case)
    rec = vp_enter.script.records[seq]
    assert rec.regs_out.rax == want
    got = _guest_got(vp_enter_run, seq)
    assert got.rax == want, f"{got.rax:#x} != {want:#x}"
    assert got.rcx == rec.regs_in.rcx
    assert want in _vp_enter_statuses(vp_enter_run, rec.lp)


def test_pending_page_access_exits_through_the_whole_stack(vp_enter: VpEnterNegatives,
                                                           vp_enter_run: StackRun) -> None:
    """The test guest (PAGE.ADDed at the reset vector, run by the daemon's engine over
    QEMU's RAM) reads a page TDH.MEM.PAGE.AUG mapped but it never accepted: under
    SEPT_VE_DISABLE the module exits to the host (td_ept_violation.c ->
    td_other_exits.c tdx_ept_violation_exit_to_vmm): reason 48, qualification 0x1 (data
    read, bits 12:7 cleared), extended qualification type 6 PENDING_EPT_VIOLATION, R8 =
    the GPA, every other GPR 0 (td_exit.c). From LP1 the same vCPU is first refused
    (TDX_VCPU_ASSOCIATED) and, after TDH.VP.FLUSH on LP0, faults the same way again."""
    want = Regs(**PENDING_EXIT)
    for seq in (vp_enter.pending, vp_enter.after_flush):
        assert vp_enter.script.records[seq].regs_out == want
        got = _guest_got(vp_enter_run, seq)
        assert got == want, f"{got} != {want}"
    assert _vp_enter_statuses(vp_enter_run, 0) == [OP_STATE_INCORRECT, VCPU_STATE_INCORRECT,
                                                   PENDING_EXIT["rax"]]
    assert _vp_enter_statuses(vp_enter_run, 1) == [VCPU_ASSOCIATED, PENDING_EXIT["rax"]]


def _compute(iterations: int) -> int:
    """RBX after the test guest's T_COMPUTE loop (vtdx/testing/td_test_guest.py), here in
    Python: add the counter, rotate right by 3, count down."""
    mask = (1 << 64) - 1
    rbx = 0
    for rcx in range(iterations, 0, -1):
        rbx = (rbx + rcx) & mask
        rbx = (rbx >> 3 | rbx << 61) & mask
    return rbx


def test_time_slices_are_reentered_through_the_whole_stack(
        runtime: QemuRuntime, elf: Path, tmp_path: Path) -> None:
    """A vCPU that computes for many wall-clock slices: the module ends each with the
    OTHER_SMI exit (RAX 6), the guest re-enters (seamscript REENTER, as KVM does) until the
    TDG.VP.VMCALL report, whose registers equal the recording's and the loop's result
    computed here. The guest counts exactly the slices the daemon's module ended."""
    # 48 million guest instructions: several 5 ms slices even at the engine's ~2,700 MIPS.
    iterations = 8_000_000
    sliced = record_sliced_entry(tmp_path / "ram", iterations)
    assert sliced.slices > 0          # the recording itself needed re-entries
    rec = sliced.script.records[sliced.enter]
    want = Regs(rax=77, rcx=0xFC00, r11=0x1F0, r12=_compute(iterations))
    assert rec.regs_out == want
    run = replay(runtime, elf, sliced.script, reference=sliced.module, timeout=120)
    run.assert_clean(sliced.script)
    assert run.divergence == [] and run.problems == []
    slices = sum(1 for lp, leaf, rax in run.log.calls
                 if (lp, leaf, rax) == (0, Leaf.TDH_VP_ENTER, TIME_SLICE_EXIT))
    assert slices > 0
    assert run.result.results("script")[0].num("reenters") == slices


# --------------------------------------------------------------------------- (d) 0-step

#: The EPT-violation exit of the guest's ``lock incl`` on its BLOCKed SCRATCH page, as the
#: guest really ran into it (td_ept_violation.c -> tdx_ept_violation_exit_to_vmm): reason
#: 48, qualification 0x2 (the SDM, Vol. 3C "Exit Qualification for EPT Violations": a
#: read-modify-write sets the data-write bit; the patched unicorn probes a locked one for
#: writing first; entry not present), no extended qualification (not a PENDING page),
#: R8 = the GPA.
BLOCKED_EXIT = {"rax": 48, "rcx": 0x2, "rdx": 0, "r8": tg.SCRATCH, "r9": 0}


def _guest_ran(log: list[tuple[int, list[int], int]]) -> list[bool]:
    """Per entry of a (stepping, GPA list, guest exits counted) log: did the guest run,
    i.e. did the vCPU engine count an exit during that entry."""
    counts = [n for _, _, n in log]
    return [b > a for a, b in zip([0, *counts], counts, strict=False)]


def _contend_host(zs: ZeroStep, pauses: list[PauseHandle]) -> Host:
    """LP1's AUG sits at its pause point (S-EPT tree lock SHARED); only then LP0's entry may
    go; once LP0 got its answer the AUG is let go."""

    def run(module: TdxModule, box: Mailbox, log: CallLog) -> object:
        (pause,) = pauses
        assert pause.wait_paused(60), f"AUG never paused; {box.describe()}"
        seen: dict[str, object] = {"paused": (pause.paused_lp, pause.paused_leaf)}
        box.set_go(0)
        with log.cond:
            assert log.cond.wait_for(lambda: any(
                (lp, leaf, rax) == (0, Leaf.TDH_VP_ENTER, BUSY_SEPT_TREE)
                for lp, leaf, rax in log.calls), 60), box.describe()
            seen["aug_done_before_busy"] = log.count(Leaf.TDH_MEM_PAGE_AUG, 1)
        pause.resume()
        seen["aug"] = log.wait_for(1, Leaf.TDH_MEM_PAGE_AUG)
        return seen

    return run


@pytest.mark.parametrize("contend", [False, True], ids=["alone", "aug-on-lp1"])
def test_zero_step_mitigation_through_the_whole_stack(runtime: QemuRuntime, elf: Path,
                                                       tmp_path: Path, contend: bool) -> None:
    """intel/tdx-module 1.5.06 (commit 1e636985) 0-step mitigation, as tests/test_zero_step.py
    follows it (line numbers of the public tdx_1.5 branch): the host BLOCKs and TRACKs the
    page the guest's next instruction writes, and enters again and again. Each entry runs
    the guest into the same EPT violation at one RIP; td_exit_stepping.c
    td_exit_epf_stepping_log counts the first STEPPING_EPF_THRESHOLD (6) of them and logs
    the GPA on the next (380-396). From then on tdh_vp_enter.c handle_stepping_filter /
    td_exit_stepping.c td_entry_stepping_filter (316-360) finds the logged GPA still
    faulting and answers with emulate_ept_violation_td_exit (tdh_vp_enter.c 126-162,
    776-787) without entering the guest: RCX is the write qualification 0x2, the same as in
    the real exits of the guest's locked read-modify-write, every other GPR 0, so only the
    in-process log tells them apart. After TDH.MEM.RANGE.UNBLOCK the entry runs the guest
    to its TDG.VP.VMCALL report, and that progress (an exit at another RIP) empties the list
    (td_exit_stepping.c 189-194). Every output register of every call, through QEMU, the
    plugin and the daemon, equals the recording; the daemon's vCPU went through the same
    tracking states, and its guest did not run on the emulated entries.

    ``aug-on-lp1``: in 0-step mode the entry takes the S-EPT tree lock EXCLUSIVE
    (td_exit_stepping.c 331); with a TDH.MEM.PAGE.AUG on LP1 held at its "locked" point
    (the tree lock SHARED) the entry fails with TDX_OPERAND_BUSY | SEPT_TREE, the epoch
    refcount given back (tdh_vp_enter.c 350-367), and once the AUG completed the next entry
    is the emulated exit again (the AUGed page is not the logged GPA)."""
    zs = record_zero_step(tmp_path / "ram", STEPPING_EPF_THRESHOLD, contend=contend)
    recs = zs.script.records
    n_fake = 3 if contend else 2
    assert len(zs.faulting) == STEPPING_EPF_THRESHOLD + 1 and len(zs.emulated) == n_fake
    # the recording is what the module source says
    for seq in zs.faulting:
        assert recs[seq].regs_out == Regs(**BLOCKED_EXIT), recs[seq].regs_out
    for seq in zs.emulated:
        assert recs[seq].regs_out == Regs(**ZERO_STEP_EXIT), recs[seq].regs_out
    assert recs[zs.unblock].leaf == Leaf.TDH_MEM_RANGE_UNBLOCK
    assert recs[zs.unblock].regs_out.rax == 0
    # the guest's report (td_test_guest.py ``done``): TDG.VP.VMCALL, R11 = 0x1FF
    assert recs[zs.resumed].regs_out == Regs(rax=77, rcx=0xFC00, r11=0x1FF)
    # before/after the threshold: the host sees the same registers (the emulated exit's
    # write qualification is what the RMW's real exit reports); the log below differs
    assert recs[zs.faulting[-1]].regs_out == recs[zs.emulated[0]].regs_out
    # in-process tracking: counted to the threshold, then the GPA logged; the guest ran on
    # every faulting entry and on the resumed one, never on the emulated ones
    steps = [(n, gpas) for n, gpas, _ in zs.vcpu_log]
    assert steps == [(n, []) for n in range(1, STEPPING_EPF_THRESHOLD + 1)] + \
        [(STEPPING_EPF_THRESHOLD, [tg.SCRATCH])] * (n_fake + 1) + [(0, [])]
    ran = _guest_ran(zs.vcpu_log)
    assert ran == [True] * (STEPPING_EPF_THRESHOLD + 1) + [False] * n_fake + [True]
    pauses: list[PauseHandle] = []
    host: Host | None = None
    if contend:
        assert zs.aug is not None and zs.busy is not None
        aug, busy = recs[zs.aug], recs[zs.busy]
        assert (aug.lp, aug.leaf, aug.regs_out.rax, aug.flags) == \
            (1, Leaf.TDH_MEM_PAGE_AUG, 0, CONCURRENT)
        assert (busy.lp, busy.leaf, busy.flags) == (0, Leaf.TDH_VP_ENTER, WAIT_GO)
        # the failure path writes no output register: RCX comes back as passed
        assert busy.regs_out == busy.regs_in.copy(rax=BUSY_SEPT_TREE)
        assert BUSY_SEPT_TREE == st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE
        assert recs[zs.emulated[-1]].flags == REENTER | BARRIER
        host = _contend_host(zs, pauses)

    entries = set(zs.faulting + zs.emulated + [zs.resumed])
    seen: list[tuple[int, list[int], int]] = []

    def arm(module: TdxModule) -> None:
        def on_enter(ev: CallObserved) -> None:
            if ev.leaf != Leaf.TDH_VP_ENTER or ev.out.rax in (TIME_SLICE_EXIT,
                                                              BUSY_SEPT_TREE):
                return
            with module.cond:
                vs = module.gd.vcpus[zs.tdvpr]
                ran = sum(vs.engine.exit_counts.values()) if vs.engine is not None else -1
                seen.append((vs.possibly_epf_stepping, list(vs.last_epf_gpa_list), ran))
        module.events.subscribe(CallObserved, on_enter)
        if contend:
            pauses.append(module.control.pause(lp=1, leaf=Leaf.TDH_MEM_PAGE_AUG,
                                               point="locked"))

    run = replay(runtime, elf, zs.script, arm=arm, host=host, reference=zs.module,
                 timeout=120)
    run.assert_clean(zs.script)
    assert run.divergence == [] and run.problems == []
    assert [r.seq for r in recs if r.flags & REENTER] == sorted(entries)
    statuses = [48] * (STEPPING_EPF_THRESHOLD + 3)
    if contend:
        statuses += [BUSY_SEPT_TREE, 48]
        assert run.host_result == {"paused": (1, Leaf.TDH_MEM_PAGE_AUG),
                                   "aug_done_before_busy": 0, "aug": 0}
    assert _vp_enter_statuses(run, 0) == statuses + [77]
    assert [(n, gpas) for n, gpas, _ in seen] == steps
    assert _guest_ran(seen) == ran
