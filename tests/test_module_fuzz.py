"""Random SEAMCALLs against the module: it never raises, answers with real statuses, and its
state stays consistent.

Two scenarios x 100 examples x 60 calls = 12,000 calls (plus the boot replays), from a fresh
module and from one Linux has already initialised (so TD leaves registered by other families
run against a ready module too). Register values mix random 64-bit numbers with values that
reach deep into the handlers (RAM addresses, a valid TDMR_INFO array, field ids, keyids).
"""

from __future__ import annotations

import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from linux_tdmr import write_tdmr_info
from test_module_init import ARRAY_PA, INFO_PA, boot, good_tdmr, make

from vtdx.abi import fields as fl
from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf, encode
from vtdx.abi.regs import REG_NAMES, Regs
from vtdx.module import SysState, TdxModule
from vtdx.module.pamt import LEVELS
from vtdx.testing.invariants import check_invariants as td_invariants

MiB = 1 << 20
GiB = 1 << 30
CALLS_PER_EXAMPLE = 60
EXAMPLES = 100
CALLS_MADE: list[int] = []

_INTERESTING = [
    0, 1, 2, 3, 8, 15, 16, 17, 31, 32, 0x1000, 0x1008, 2 * MiB, 16 * MiB, 64 * MiB, GiB,
    2 * GiB, 3 * GiB, 4 * GiB, ARRAY_PA, INFO_PA, 16 | (1 << 16), 1 << 45, (1 << 46) - 4096,
    (1 << 64) - 1, fl.FIELD_ID_NA & ~fl.CONTEXT_MASK,
] + [f.field_id for f in fl.GLOBAL_FIELDS] + [f.field_id + 1 for f in fl.GLOBAL_FIELDS]

_SYS_LEAVES = [int(x) for x in (
    Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL,
    Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG, Leaf.TDH_SYS_TDMR_INIT,
    Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_SHUTDOWN, Leaf.TDH_SYS_DISABLE,
    Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_PHYMEM_PAGE_RDMD)]

reg_value = hs.one_of(hs.sampled_from(_INTERESTING), hs.integers(0, (1 << 64) - 1))


def _rax(leaf_pool: list[int]) -> hs.SearchStrategy[int]:
    plain = hs.sampled_from(leaf_pool)
    versioned = hs.builds(encode, hs.sampled_from(leaf_pool), hs.integers(0, 3))
    return hs.one_of(plain, plain, versioned, hs.integers(0, 200),
                     hs.integers(0, (1 << 64) - 1))


def _regs(**kw: int) -> list[int]:
    """RCX..R15 (REG_NAMES order without RAX) with the given registers set."""
    return [kw.get(n, 0) for n in REG_NAMES[1:]]


#: Well-formed calls that move the state machine forward (the host doing the right thing).
_PLAUSIBLE = [
    (int(Leaf.TDH_SYS_INIT), _regs()),
    (int(Leaf.TDH_SYS_LP_INIT), _regs()),
    (int(Leaf.TDH_SYS_LP_INIT), _regs()),
    (int(Leaf.TDH_SYS_CONFIG), _regs(rcx=ARRAY_PA, rdx=1, r8=16)),
    (int(Leaf.TDH_SYS_KEY_CONFIG), _regs()),
    (int(Leaf.TDH_SYS_TDMR_INIT), _regs(rcx=0)),
    (int(Leaf.TDH_SYS_RD), _regs(rdx=0x0A00000300000008)),
    (int(Leaf.TDH_PHYMEM_PAGE_RDMD), _regs(rcx=16 * MiB)),
]


def _calls(leaf_pool: list[int]) -> hs.SearchStrategy[list[tuple[int, tuple[int, list[int]]]]]:
    lp = hs.integers(0, 3)
    random_call = hs.tuples(_rax(leaf_pool), hs.tuples(
        lp, hs.lists(reg_value, min_size=13, max_size=13)))
    plausible = hs.builds(lambda t, p: (t[0], (p, t[1])), hs.sampled_from(_PLAUSIBLE), lp)
    return hs.lists(hs.one_of(random_call, plausible), min_size=CALLS_PER_EXAMPLE,
                    max_size=CALLS_PER_EXAMPLE)


def check_invariants(m: TdxModule) -> None:
    """Module-wide consistency after any call."""
    assert not m.internal_errors, m.internal_errors[0]
    assert len(m.locks) == 0  # no call leaves a TDX lock behind
    assert not any(s.busy for s in m.lps)
    assert m.num_init_lps == sum(s.initialized for s in m.lps)
    state = m.state
    if state >= SysState.SYSCONFIG_DONE and state != SysState.SYS_SHUTDOWN:
        assert m.pamt.tdmrs and m.global_keyid is not None
        assert m.is_private_hkid(m.global_keyid)
        assert m.num_init_lps == len(m.lps)
    if state == SysState.SYS_READY:
        assert m.pkg_config == set(range(m.profile.num_packages))
    if state == SysState.SYSINIT_PENDING:
        assert m.num_init_lps == 0
    prev_end = 0
    for t in m.pamt.tdmrs:
        assert t.base >= prev_end and t.base % GiB == 0 and t.size % GiB == 0
        assert t.base <= t.next_init <= t.end
        prev_end = t.end
    for level in LEVELS:
        for idx in m.pamt.entries(level):
            assert m.pamt.tdmr_for(idx << (12 + 9 * level)) is not None
    assert td_invariants(m, expect_no_locks=True) == []  # TD/S-EPT/DPAMT consistency (TD's)


def _run(m: TdxModule, calls: list[tuple[int, tuple[int, list[int]]]]) -> None:
    for rax, (lp, rest) in calls:
        regs = Regs(rax, *rest)
        out = m.seamcall(lp, regs)
        assert isinstance(out, Regs)
        assert all(0 <= getattr(out, n) < (1 << 64) for n in REG_NAMES)
        assert st.is_known(out.rax), hex(out.rax)
        check_invariants(m)
    CALLS_MADE.append(len(calls))


def _fresh() -> TdxModule:
    m = make(4, 2 * GiB, num_packages=2)
    write_tdmr_info(m.memory, [good_tdmr()], INFO_PA, ARRAY_PA, 16)
    return m


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(_calls(_SYS_LEAVES))
def test_fuzz_from_fresh_module(calls: list[tuple[int, tuple[int, list[int]]]]) -> None:
    _run(_fresh(), calls)


def _booted() -> TdxModule:
    m = make(2, 2 * GiB)
    boot(m)
    return m


_ALL_LEAVES = sorted(set(_SYS_LEAVES) | set(_booted().leaves))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(_calls(_ALL_LEAVES))
def test_fuzz_from_ready_module(calls: list[tuple[int, tuple[int, list[int]]]]) -> None:
    m = _booted()
    m.seamcall(0, Regs(rax=0))  # warm any lazily built per-family state
    _run(m, calls)


def test_fuzz_volume() -> None:
    """Both fuzz scenarios together issued at least 10,000 SEAMCALLs."""
    if len(CALLS_MADE) >= 2 * EXAMPLES:
        assert sum(CALLS_MADE) >= 10_000


def test_concurrent_lps_never_tear_state() -> None:
    """Two threads as two LPs: one boots the module like Linux, one hammers reads."""
    m = make(2, 2 * GiB)
    stop = threading.Event()
    statuses: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            statuses.add(m.seamcall(1, Regs(rax=Leaf.TDH_SYS_RD, rdx=0x0800000100000004)).rax)
            statuses.add(m.seamcall(1, Regs(rax=Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * MiB)).rax)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for _ in range(3):
            m.seamcall(0, Regs(rax=Leaf.TDH_SYS_DISABLE))
            boot(m)  # the reader only reads, so Linux's sequence must still succeed
            assert m.state == SysState.SYS_READY
    finally:
        stop.set()
        th.join()
    assert all(st.is_known(s) for s in statuses)
    assert not m.internal_errors and len(m.locks) == 0
