"""SEAMCALL scripts in-process (vtdx/seamscript.py): recording, the binary layout, replay.

The whole-stack replays are tests/test_stack_td.py; these check that a script is
self-contained (a fresh module given only its calls and memory images answers exactly what
was recorded), that the layout round-trips and matches what guest/testguest/main.c reads,
and that ordering flags and guards behave.
"""

from __future__ import annotations

import re
import struct

import pytest
from stack_td_scenarios import (
    BUSY_R12,
    BUSY_RCX,
    ScenarioWorld,
    record_lifecycle,
    record_race,
    stack_profile,
)

from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.errors import VtdxError
from vtdx.module import TdxModule
from vtdx.platform.memory import SparseMemory
from vtdx.resources import asset
from vtdx.testing.seamscript import (
    BARRIER,
    CONCURRENT,
    HEADER_SIZE,
    MAGIC,
    OFF_GO,
    OFF_PROGRESS,
    REENTER,
    RESULT_SIZE,
    SCRIPT_PA,
    TIME_SLICE_EXIT,
    WAIT_GO,
    Mailbox,
    MemWrite,
    Record,
    Recorder,
    Script,
    replay,
)


@pytest.fixture(scope="module")
def lifecycle_script() -> Script:
    return record_lifecycle().script


def _fresh_module() -> TdxModule:
    p = stack_profile()
    return TdxModule(p, SparseMemory(p.ram))


def test_lifecycle_script_replays_identically_in_process(lifecycle_script: Script) -> None:
    m = _fresh_module()
    assert replay(lifecycle_script, m.seamcall, m.memory) == []
    assert all(r.regs_out.rax == 0 for r in lifecycle_script.records
               if r.leaf != Leaf.TDH_PHYMEM_CACHE_WB)


def test_memory_images_are_what_makes_it_replay(lifecycle_script: Script) -> None:
    """Drop the TD_PARAMS image: TDH.MNG.INIT then fails on a fresh module."""
    init = lifecycle_script.find(0, Leaf.TDH_MNG_INIT)
    assert [len(w.data) for w in init.writes] == [1024]
    stripped = Script([Record(r.seq, r.lp, r.regs_in, r.regs_out,
                              [] if r is init else r.writes, r.flags, r.go, r.cmp_mask)
                       for r in lifecycle_script.records])
    m = _fresh_module()
    bad = replay(stripped, m.seamcall, m.memory)
    assert bad and bad[0].record.seq == init.seq and bad[0].reg == "rax"


def test_binary_round_trip_and_layout(lifecycle_script: Script) -> None:
    data = lifecycle_script.to_bytes()
    again = Script.from_bytes(data)
    assert again.to_bytes() == data
    for a, b in zip(again.records, lifecycle_script.records, strict=True):
        assert (a.seq, a.lp, a.regs_in, a.regs_out, a.writes, a.flags) == \
            (b.seq, b.lp, b.regs_in, b.regs_out, b.writes, b.flags)
    magic, version, n, rec_off, res_off, total = struct.unpack_from("<8sIIIII", data)
    assert (magic, version, n, rec_off) == (MAGIC, 1, len(lifecycle_script.records),
                                            HEADER_SIZE)
    assert res_off == lifecycle_script.results_off() and res_off % 8 == 0
    assert total == len(data) == res_off + RESULT_SIZE * n
    # first record as main.c's struct script_rec reads it: 16-byte head, then in[], out[]
    size, seq, lp, flags, mask, go, nw = struct.unpack_from("<IIHHHBB", data, rec_off)
    first = lifecycle_script.records[0]
    assert (seq, lp, flags, mask, go, nw) == (0, 0, 0, 0x3FFF, 0, 0) and size == 240
    assert struct.unpack_from("<Q", data, rec_off + 16)[0] == first.regs_in.rax
    assert len(data) < 512 * 1024  # compact: 1173 calls, trailing zeros of images dropped


def test_memwrite_keeps_length_but_not_trailing_zeros() -> None:
    w = MemWrite(0x1000_0000, b"ab" + bytes(4000))
    enc = w.encode()
    assert struct.unpack_from("<QII", enc) == (0x1000_0000, 4002, 2) and len(enc) == 24
    rec = Record(0, 0, Regs(rax=1), Regs(), [w])
    assert Script.from_bytes(Script([rec]).to_bytes()).records[0].writes == [w]


def test_race_records_are_numbered_when_they_start() -> None:
    race = record_race("demote-first")
    recs = race.script.records
    d, a, retry = recs[race.demote], recs[race.pamt_add], recs[race.retry]
    assert (d.seq, a.seq, retry.seq) == (race.demote, race.demote + 1, race.demote + 2)
    assert (d.lp, d.flags, d.regs_out.rax) == (0, CONCURRENT, 0)
    assert (a.lp, a.flags, a.go, a.regs_out.rax) == (1, WAIT_GO, 0, BUSY_RCX)
    assert (retry.lp, retry.flags, retry.regs_out.rax) == (1, BARRIER, 0)
    rev = record_race("pamt-add-first")
    recs = rev.script.records
    assert (recs[rev.pamt_add].flags, recs[rev.demote].regs_out.rax) == (CONCURRENT, BUSY_R12)
    with pytest.raises(VtdxError, match="CONCURRENT"):
        m = _fresh_module()
        replay(race.script, m.seamcall, m.memory)


def test_recorder_guards() -> None:
    w = ScenarioWorld()
    with pytest.raises(VtdxError, match="below"):
        w.rec.memory.write(0x20_0000, b"x")  # the test guest's image lives there
    w.rec.memory.write(0x1800_0000, b"x")
    with pytest.raises(VtdxError, match="lost"):
        w.rec.script()
    with pytest.raises(VtdxError, match="numbered"):
        Script([Record(1, 0, Regs(), Regs())])
    rec = Recorder(lambda lp, regs: regs, SparseMemory(stack_profile().ram))
    rec.call(1, Regs(rax=5), flags=WAIT_GO, go=3)
    assert len(rec) == 1 and rec.script().records[0].go == 3


def test_reenter_keeps_the_first_output_that_is_not_a_time_slice() -> None:
    """A REENTER record is issued again while it returns RAX = 6 (TDX_SUCCESS | OTHER_SMI),
    when recorded and when replayed; other records, and other statuses, are not; main.c
    uses the same flag bit and status."""
    answers: list[int] = []

    def module(lp: int, regs: Regs) -> Regs:
        return Regs(rax=answers.pop(0), rcx=regs.rcx)

    rec = Recorder(module, SparseMemory(stack_profile().ram))
    answers[:] = [TIME_SLICE_EXIT, TIME_SLICE_EXIT, 48, TIME_SLICE_EXIT, 6 | 1 << 63]
    assert rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=0x1000), flags=REENTER).rax == 48
    assert rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=0x1000)).rax == TIME_SLICE_EXIT
    assert rec.call(0, Regs(rax=Leaf.TDH_VP_ENTER, rcx=0x1000), flags=REENTER).rax == \
        6 | 1 << 63
    script = rec.script()
    assert [r.regs_out.rax for r in script.records] == [48, TIME_SLICE_EXIT, 6 | 1 << 63]
    answers[:] = [TIME_SLICE_EXIT, 48, TIME_SLICE_EXIT, 6 | 1 << 63]
    assert replay(script, module, SparseMemory(stack_profile().ram)) == [] and not answers
    main_c = asset("guest", "testguest", "main.c").read_text()
    assert re.search(rf"#define SCRIPT_REENTER {REENTER}\b", main_c)
    assert re.search(rf"#define TIME_SLICE_EXIT {TIME_SLICE_EXIT}UL\b", main_c)


def test_mailbox_reads_what_the_guest_publishes() -> None:
    mem = SparseMemory(stack_profile().ram)
    box = Mailbox(mem)
    assert box.progress(1) == (None, 0)
    mem.write(SCRIPT_PA + OFF_PROGRESS + 8, ((41 + 1) << 8 | 3).to_bytes(8, "little"))
    assert box.progress(1) == (41, 3)
    box.set_go(2)
    assert mem.read(SCRIPT_PA + OFF_GO + 16, 8) == (1).to_bytes(8, "little")
    with pytest.raises(VtdxError):
        box.set_go(8)
