"""TDH.SYS.CONFIG: take the host's TDMRs, PAMT areas and the global keyid (tdh_sys_config.c).

Inputs: RCX = PA of an array of TDMR_INFO PAs (512-byte aligned), RDX = number of TDMRs,
R8 = global private keyid (bit 16 enables Dynamic PAMT on a profile that has it).
TDMR_INFO: base, size, PAMT 1G/2M/4K base and size (8 u64), then 16 reserved areas of
(offset, size). Checks run per TDMR in the module's order and fail with its status and detail
bytes (TDMR index, PAMT level, other TDMR index).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import MASK64 as U64_MAX
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import SYS_LOCK
from vtdx.module.pamt import LEVEL_1G, LEVEL_2M, LEVEL_4K, GiB, Tdmr
from vtdx.module.state import KOT_RESERVED, SysState

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

MAX_TDMRS = 64
MAX_RESERVED_AREAS = 16
TDMR_INFO_ALIGN = 512
TDMR_INFO_SIZE = 8 * 8 + MAX_RESERVED_AREAS * 16
PAGE_MASK = 0xFFF
DPAMT_ENABLE_BIT = 1 << 16
_CHECK_ORDER = (LEVEL_1G, LEVEL_2M, LEVEL_4K)
_OVERLAP_ORDER = (LEVEL_4K, LEVEL_2M, LEVEL_1G)


class _Info:
    """A copied TDMR_INFO entry (pamt indexed by level: 0 = 4K, 1 = 2M, 2 = 1G)."""

    __slots__ = ("base", "size", "pamt_base", "pamt_size", "rsvd")

    def __init__(self, raw: bytes) -> None:
        v = struct.unpack_from("<8Q", raw)
        self.base, self.size = v[0], v[1]
        self.pamt_base = (v[6], v[4], v[2])
        self.pamt_size = (v[7], v[5], v[3])
        r = struct.unpack_from(f"<{2 * MAX_RESERVED_AREAS}Q", raw, 64)
        self.rsvd = [(r[2 * j], r[2 * j + 1]) for j in range(MAX_RESERVED_AREAS)]

    def available(self) -> list[tuple[int, int]]:
        """Non-reserved [start, end) pieces, walked like the module (null entry ends the list)."""
        out: list[tuple[int, int]] = []
        start = self.base
        end_all = self.base + self.size
        valid = False
        for off, size in self.rsvd:
            rs = self.base + off
            valid = size != 0
            if start == end_all:
                return out
            if valid and start == rs:
                start = rs + size
                continue
            end = end_all if not valid else rs
            out.append((start, end))
            if not valid:
                return out
            start = rs + size
        if valid and end_all > start:
            out.append((start, end_all))
        return out


def _overlap(b1: int, s1: int, b2: int, s2: int) -> bool:
    return not (b1 >= b2 + s2 or b2 >= b1 + s1)


def _in_cmr(m: TdxModule, start: int, end: int) -> bool:
    """is_area_in_cmr(): a CMR that starts where the previous ended extends it."""
    last_start = last_end = 0
    for c in m.profile.cmrs:
        if c.size == 0:
            continue
        cs, ce = c.base, c.base + c.size
        if cs == last_end:
            cs = last_start
        if start >= cs and end <= ce:
            return True
        last_start, last_end = cs, ce
    return False


def _fail(status: int, *info: int) -> TdxError:
    return TdxError(st.with_info(status, *info))


def _check_tdmr(m: TdxModule, infos: list[_Info], i: int, dpamt: bool) -> None:
    t = infos[i]
    if t.base > U64_MAX - t.size:
        raise _fail(st.TDX_INVALID_TDMR, i)
    if i > 0:
        p = infos[i - 1]
        if t.base < p.base or t.base < p.base + p.size:
            raise _fail(st.TDX_NON_ORDERED_TDMR, i)
    # check_tdmr_area_addresses_and_size
    if t.base & (GiB - 1) or t.size & (GiB - 1) or t.size == 0:
        raise _fail(st.TDX_INVALID_TDMR, i)
    if not m.pa_ok(t.base) or not m.pa_ok(t.base + t.size - 1):
        raise _fail(st.TDX_INVALID_TDMR, i)
    _check_reserved(t, i)
    _check_pamts(m, infos, i, dpamt)
    for start, end in t.available():
        if not _in_cmr(m, start, end):
            raise _fail(st.TDX_TDMR_OUTSIDE_CMRS, i)


def _check_reserved(t: _Info, i: int) -> None:
    rsvd = t.rsvd
    for j, (off, size) in enumerate(rsvd):
        if size == 0:
            if j < MAX_RESERVED_AREAS - 1 and rsvd[j + 1][1] != 0:
                raise _fail(st.TDX_NON_ORDERED_RESERVED_IN_TDMR, i, j)
            continue
        if off > U64_MAX - size:
            raise _fail(st.TDX_INVALID_RESERVED_IN_TDMR, i, j)
        if j > 0:
            poff, psize = rsvd[j - 1]
            if off < poff or off < poff + psize:
                raise _fail(st.TDX_NON_ORDERED_RESERVED_IN_TDMR, i, j)
        if off & PAGE_MASK or size & PAGE_MASK:
            raise _fail(st.TDX_INVALID_RESERVED_IN_TDMR, i, j)
        if t.base > U64_MAX - off or t.base + off > U64_MAX - size:
            raise _fail(st.TDX_INVALID_RESERVED_IN_TDMR, i, j)
        if t.base + off + size > t.base + t.size:
            raise _fail(st.TDX_INVALID_RESERVED_IN_TDMR, i, j)


def _pamt_required(m: TdxModule, level: int, tdmr_size: int, dpamt: bool) -> int:
    if dpamt and level == LEVEL_4K:
        bits = m.profile.pamt_bitmap_entry_bits
        return ((tdmr_size >> 12) * bits + 7) // 8
    return m.gd.pamt.required_size(level, tdmr_size)


def _check_pamts(m: TdxModule, infos: list[_Info], i: int, dpamt: bool) -> None:
    t = infos[i]
    for lvl in _CHECK_ORDER:  # check_pamt_addresses
        b, s = t.pamt_base[lvl], t.pamt_size[lvl]
        if (b > U64_MAX - s or b & PAGE_MASK or s & PAGE_MASK or not m.pa_ok(b)
                or not m.pa_ok(b + s - 1 if s else b)
                or s < _pamt_required(m, lvl, t.size, dpamt)):
            raise _fail(st.TDX_INVALID_PAMT, i, lvl)
    for j in range(i):  # check_all_pamt_overlap: against earlier TDMRs' PAMTs
        o = infos[j]
        for lvl in _OVERLAP_ORDER:
            if any(_overlap(t.pamt_base[lvl], t.pamt_size[lvl], o.pamt_base[x], o.pamt_size[x])
                   for x in (LEVEL_4K, LEVEL_2M, LEVEL_1G)):
                raise _fail(st.TDX_PAMT_OVERLAP, i, lvl, j)
    for a, b in ((LEVEL_4K, LEVEL_2M), (LEVEL_4K, LEVEL_1G), (LEVEL_2M, LEVEL_1G)):
        if _overlap(t.pamt_base[a], t.pamt_size[a], t.pamt_base[b], t.pamt_size[b]):
            raise _fail(st.TDX_PAMT_OVERLAP, i, a, i)
    for j in range(i + 1):  # check_pamt_overlaps_available_areas
        avail_j = infos[j].available()
        for lvl in _OVERLAP_ORDER:
            if _hits(avail_j, t.pamt_base[lvl], t.pamt_size[lvl]):
                raise _fail(st.TDX_PAMT_OVERLAP, i, lvl, j)
        if j < i:
            avail_i = t.available()
            o = infos[j]
            for lvl in _OVERLAP_ORDER:
                if _hits(avail_i, o.pamt_base[lvl], o.pamt_size[lvl]):
                    raise _fail(st.TDX_PAMT_OVERLAP, j, lvl, i)
    for lvl in _CHECK_ORDER:  # check_pamt_in_cmr
        b, s = t.pamt_base[lvl], t.pamt_size[lvl]
        if not _in_cmr(m, b, b + s):
            raise _fail(st.TDX_PAMT_OUTSIDE_CMRS, i, lvl)


def _hits(avail: list[tuple[int, int]], base: int, size: int) -> bool:
    return any(_overlap(base, size, s, e - s) for s, e in avail if e > s)


def tdh_sys_config(ctx: CallContext, inp: Regs, out: Regs) -> None:
    m, gd = ctx.module, ctx.gd
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if gd.sys_state != SysState.SYSINIT_DONE or gd.num_init_lps < len(gd.lps):
        raise TdxError(st.TDX_SYS_CONFIG_NOT_PENDING)
    array_pa, count, hkid_in = inp.rcx, inp.rdx, inp.r8
    if not m.shared_hpa_ok(array_pa, TDMR_INFO_ALIGN):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    if count > MAX_TDMRS or count < 1:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    reserved = ~0xFFFF & U64_MAX
    if m.profile.dynamic_pamt:
        reserved &= ~DPAMT_ENABLE_BIT
    hkid = hkid_in & 0xFFFF
    if hkid_in & reserved or not m.is_private_hkid(hkid):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
    dpamt = bool(hkid_in & DPAMT_ENABLE_BIT)
    gd.global_keyid = hkid  # the module records it before checking the TDMRs
    gd.kot[hkid] = KOT_RESERVED
    infos: list[_Info] = []
    for i in range(count):
        entry_pa = ctx.read_u64(array_pa + 8 * i)
        if not m.shared_hpa_ok(entry_pa, TDMR_INFO_ALIGN):
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
        infos.append(_Info(ctx.read(entry_pa, TDMR_INFO_SIZE)))
        _check_tdmr(m, infos, i, dpamt)
    tdmrs = []
    for i, t in enumerate(infos):
        rsvd = []
        for off, size in t.rsvd:
            if size == 0:
                break
            rsvd.append((off, size))
        tdmrs.append(Tdmr(i, t.base, t.size, t.pamt_base, t.pamt_size, tuple(rsvd)))
    gd.pamt.configure(tdmrs)
    gd.pamt.dynamic = dpamt
    gd.pkg_config.clear()
    gd.sys_state = SysState.SYSCONFIG_DONE


LEAVES = [LeafSpec(Leaf.TDH_SYS_CONFIG, tdh_sys_config)]
