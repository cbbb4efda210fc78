"""Regs, platform profile and in-process memory: the types every layer shares."""

import pytest

from vtdx.abi.regs import REG_NAMES, Regs
from vtdx.platform.memory import PhysAddrError, SparseMemory
from vtdx.platform.profile import GiB, Profile, Region, q35_ram_layout


def test_regs_mask_and_order():
    r = Regs(rax=-1, r15=1 << 70 | 5)
    assert r.rax == (1 << 64) - 1 and r.r15 == 5
    assert tuple(r.to_dict()) == REG_NAMES
    assert Regs.from_tuple(r.as_tuple()) == r


@pytest.mark.parametrize(
    "mem, expect",
    [
        (2 * GiB, [(0, 2 * GiB)]),
        (0xB000_0000, [(0, 2 * GiB), (4 * GiB, 0xB000_0000 - 2 * GiB)]),
        (6 * GiB, [(0, 2 * GiB), (4 * GiB, 4 * GiB)]),
    ],
)
def test_q35_split_matches_qemu_rule(mem, expect):
    assert [(r.base, r.size) for r in q35_ram_layout(mem)] == expect


def test_profile_from_vm():
    p = Profile.from_vm(4, 6 * GiB, tdx_keyids=1)
    assert p.num_lps == 4 and p.ram_bytes == 6 * GiB and p.tdx_keyids == 1
    assert p.tdx_keyid_start == p.mktme_keyids + 1


def test_sparse_memory_bounds_and_contents():
    m = SparseMemory((Region(0, 1 << 20), Region(4 * GiB, 1 << 20)))
    m.write(4 * GiB + 4090, b"abcdefghij")  # crosses a page boundary
    assert m.read(4 * GiB + 4090, 10) == b"abcdefghij"
    assert m.read(0x1000, 4) == bytes(4)
    m.zero(4 * GiB + 4092, 4)
    assert m.read(4 * GiB + 4090, 10) == b"ab\0\0\0\0ghij"
    with pytest.raises(PhysAddrError):
        m.read((1 << 20) - 4, 8)  # straddles the end of RAM
    with pytest.raises(PhysAddrError):
        m.write(2 * GiB, b"x")
