"""CPUID virtualisation of the TDX module: the lookup table, the configurable leaves, the
platform values TDH.SYS.INIT samples and the TD values TDH.MNG.INIT computes.

Facts from intel/tdx-module 1.5.06 (commit 1e636985): include/auto_gen/
cpuid_configurations.c (``cpuid_lookup``: 73 slots, 69 valid; ``cpuid_configurable``: 18
entries; the XFAM masks), tdh_sys_init.c check_cpuid_configurations (native sampling: a
leaf above the CPU's maximum reads all-0; CPUID(1).EAX is the platform F/M/S),
helpers.c complete_cpuid_handling (clear FIXED0/DYNAMIC bits, set FIXED1 bits),
tdh_mng_init.c read_and_set_cpuid_configurations and helpers.c
check_cpuid_1f_and_compute_cpuid_0b (the TD's values), helpers.c get_cpuid_lookup_entry
(a subleaf-less entry matches any subleaf; the first match in slot order wins).

The native values are the host's (``vtdx.platform.cpuid.native_cpuid``), the one table the
plugin's rows also follow. One difference: the host's CPU (QEMU TCG ``max``) has no leaf
0x1F, without which the real module refuses TDH.SYS.INIT; vtdx's enumeration passes, so
the module samples 0x1F as a CPU with it reports its first levels: the host's leaf 0xB.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from vtdx.abi import status as st
from vtdx.module.errors import TdxError
from vtdx.platform.cpuid import last_base_leaf, last_extended_leaf, native_cpuid
from vtdx.platform.profile import Profile

NA = 0xFFFF_FFFF  # CPUID_SUBLEAF_NA
Values = tuple[int, int, int, int]
ZERO: Values = (0, 0, 0, 0)
ALL: Values = (0xFFFF_FFFF,) * 4
#: CPUID_LAST_BASE_LEAF (x86_defs.h 864): the top of the virtualised base range.
CPUID_LAST_BASE_LEAF = 0x23
CPUID_FIRST_EXTENDED_LEAF = 0x8000_0000
#: XCR0_USER_BIT_MASK (x86_defs.h 261): the XFAM bits XCR0 can hold.
XCR0_USER_BIT_MASK = 0x000602FF
LEVEL_TYPE_INVALID, LEVEL_TYPE_SMT, LEVEL_TYPE_CORE, LEVEL_TYPE_MAX = 0, 1, 2, 6


@dataclass(frozen=True, slots=True)
class Lookup:
    """One valid cpuid_lookup slot: FIXED0-or-DYNAMIC and FIXED1 masks, the faulting flag
    (CPUID #VE, MNG.RD FIELD_NOT_READABLE) and the CPUID_CONFIG index it is configured by."""

    leaf: int
    sub: int
    fixed0_or_dynamic: Values = ZERO
    fixed1: Values = ZERO
    config: int | None = None
    faulting: bool = False


@dataclass(frozen=True, slots=True)
class Configurable:
    """One cpuid_configurable entry: CONFIG_DIRECT and ALLOW_DIRECT bits, its lookup slot."""

    leaf: int
    sub: int
    config_direct: Values
    allow_direct: Values
    lookup: int


def _l(leaf: int, sub: int, f0d: Values = ZERO, f1: Values = ZERO, config: int | None = None,
       faulting: bool = False) -> Lookup:
    return Lookup(leaf, sub, f0d, f1, config, faulting)


_TOPO: Values = (0xFFFFFFE0, 0xFFFF0000, 0xFFFF0000, 0xFFFFFFFF)
_L4: Values = (0x3C00, 0, 0, 0x4)
_XSAVE_N: Values = (0, 0, 0, 0xFFFFFFFF)

#: cpuid_lookup of 1.5.06, by slot (slots 68-71 are not valid entries).
LOOKUP: dict[int, Lookup] = {
    0: _l(0x1, NA, (0xF000C000, 0xFF0000FF, 0x08010060, 0x40120400),
          (0, 0, 0x80000000, 0x200), config=0),
    1: _l(0x4, 0, _L4, config=1),
    2: _l(0x4, 1, _L4, config=2),
    3: _l(0x4, 2, _L4, config=3),
    4: _l(0x4, 3, (0x3C00, 0, 0, 0xFFFFFFF8), config=4),
    5: _l(0x7, 0, (0, 0x00404006, 0x643E8010, 0x002298C3), config=5),
    6: _l(0x7, 1, (0xFB77E20F, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFDFBCF), config=6),
    7: _l(0xA, NA, (0, 0, 0, 0xFFFF6000), config=7),
    8: _l(0x1C, NA, config=8),
    9: _l(0x8000_0008, NA, (0xFFFF0000, 0xFFFFFDFF, 0xFFFFFFFF, 0xFFFFFFFF), config=9),
    10: _l(0x0, NA, (0xFFFFFFDC, 0, 0, 0), (0x23, 0, 0, 0)),
    11: _l(0x3, NA, ALL),
    12: _l(0x4, 4, ALL),
    13: _l(0x6, NA, faulting=True),
    14: _l(0x7, 2, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFC0), config=10),
    15: _l(0x8, NA, ALL),
    16: _l(0xD, 0, (0xFFF9FD18, 0xFFFFFFFF, 0, 0xFFFFFFFF)),
    17: _l(0xD, 1, (0xFFFFFFE0, 0xFFFFFFFF, 0xFFFF26FF, 0xFFFFFFFF)),
    **{16 + n: _l(0xD, n, _XSAVE_N) for n in range(2, 0x13)},
    35: _l(0xE, NA, ALL),
    36: _l(0x11, NA, ALL),
    37: _l(0x12, NA, ALL),
    38: _l(0x13, NA, ALL),
    39: _l(0x14, 0, (0, 0xFFFFFE00, 0x7FFFFFF0, 0xFFFFFFFF)),
    40: _l(0x14, 1, (0xFFF8, 0, 0xFFFFFFFF, 0xFFFFFFFF)),
    41: _l(0x15, NA, (0xFFFFFFFE, 0, 0xFE8287BF, 0xFFFFFFFF), (0x1, 0, 0x017D7840, 0)),
    42: _l(0x19, NA, ALL),
    43: _l(0x1D, 0),
    44: _l(0x1D, 1),
    45: _l(0x1E, NA),
    **{46 + n: _l(0x1F, n, _TOPO, config=12 + n) for n in range(6)},
    52: _l(0x20, NA, ALL),
    53: _l(0x21, 0, (0xFFFFFFFF, 0x9A8B91B6, 0xDFDFDFDF, 0xA7BBAB93),
           (0, 0x65746E49, 0x20202020, 0x5844546C)),
    54: _l(0x8000_0000, NA, (0x7FFFFFF7, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
           (0x80000008, 0, 0, 0)),
    55: _l(0x8000_0001, NA, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFEDE, 0xD3EFFFFF)),
    56: _l(0x8000_0006, NA, faulting=True),
    57: _l(0x8000_0007, NA, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFEFF)),
    58: _l(0x22, NA, ALL),
    59: _l(0x23, 0, (0xFFFFFFF0, 0, 0xFFFFFFFF, 0xFFFFFFFF), config=11),
    60: _l(0x23, 1, (0, 0, 0xFFFFFFFF, 0xFFFFFFFF)),
    61: _l(0x23, 2, ALL),
    62: _l(0x23, 3, (0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    63: _l(0x5, NA, (0xFFFF0000, 0xFFFF0000, 0xFFFFFFFC, 0)),
    64: _l(0xB, 0, _TOPO),
    65: _l(0xB, 1, _TOPO),
    66: _l(0xB, 2, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFF00, 0xFFFFFFFF)),
    67: _l(0x1A, NA, (0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    72: _l(0x2, NA, (0xFF0100FE, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0x00FEFF01, 0, 0, 0)),
}
#: MAX_NUM_CPUID_LOOKUP (cpuid_configurations_defines.h): what NUM_CPUID_VALUES reads.
MAX_NUM_CPUID_LOOKUP = 73
SLOTS = tuple(sorted(LOOKUP))

_L4_CD: Values = (0xFFFFC3FF, 0xFFFFF000, 0xFFFFFFFF, 0xFFFFFFFB)
#: cpuid_configurable of 1.5.06, by CPUID_CONFIG index (MAX_NUM_CPUID_CONFIG = 18).
CONFIGURABLE: tuple[Configurable, ...] = (
    Configurable(0x1, NA, (0x0FFF3FFF, 0x00FF0000, 0, 0), (0, 0, 0x31044D88, 0xB8440000), 0),
    Configurable(0x4, 0, _L4_CD, ZERO, 1),
    Configurable(0x4, 1, _L4_CD, ZERO, 2),
    Configurable(0x4, 2, _L4_CD, ZERO, 3),
    Configurable(0x4, 3, (0xFFFFC3FF, 0xFFFFF000, 0xFFFFFFFF, 0x7), ZERO, 4),
    Configurable(0x7, 0, ZERO, (0, 0xDC2B9B18, 0x02417F65, 0x0005411C), 5),
    Configurable(0x7, 1, ZERO, (0x04881DB0, 0, 0, 0x00020430), 6),
    Configurable(0xA, NA, ZERO, ZERO, 7),
    Configurable(0x1C, NA, ZERO, (0xFF, 0, 0, 0), 8),
    Configurable(0x8000_0008, NA, (0xFF, 0, 0, 0), (0, 0x200, 0, 0), 9),
    Configurable(0x7, 2, ZERO, (0, 0, 0, 0x28), 14),
    Configurable(0x23, 0, ZERO, (0xF, 0, 0, 0), 59),
    *(Configurable(0x1F, n, (0x1F, 0xFFFF, 0xFFFF, 0), ZERO, 46 + n) for n in range(6)),
)

#: xfam_mask_* of cpuid_configurations.c: bits cleared when the XFAM bit is 0.
XFAM_MASKS: dict[tuple[int, int], dict[int, Values]] = {
    (0x1, NA): {2: (0, 0, 0x30001000, 0)},
    (0x7, 0): {2: (0, 0x20, 0x600, 0),
               **{b: (0, 0xDC230000, 0x5842, 0x80010C) for b in (5, 6, 7)},
               8: (0, 0x2000000, 0, 0), 9: (0, 0, 0x8, 0),
               **{b: (0, 0, 0x80, 0x100000) for b in (11, 12)},
               14: (0, 0, 0, 0x20), 15: (0, 0, 0, 0x80000),
               **{b: (0, 0, 0, 0x3400000) for b in (17, 18)}},
    (0x7, 1): {2: (0x800010, 0, 0, 0x430), **{b: (0x20, 0, 0, 0) for b in (5, 6, 7)}},
    (0xD, 0): {2: (0x4, 0, 0, 0), **{b: (0xE0, 0, 0, 0) for b in (5, 6, 7)},
               9: (0x200, 0, 0, 0), **{b: (0x60000, 0, 0, 0) for b in (17, 18)}},
    (0xD, 1): {8: (0, 0, 0x100, 0), **{b: (0, 0, 0x1800, 0) for b in (11, 12)},
               14: (0, 0, 0x4000, 0), 15: (0, 0, 0x8000, 0)},
}


def lookup_slot(leaf: int, sub: int) -> int | None:
    """get_cpuid_lookup_entry: the first slot whose leaf matches and whose subleaf is NA or
    equal; None for CPUID_LOOKUP_IDX_NA."""
    for i in SLOTS:
        e = LOOKUP[i]
        if e.leaf == leaf and e.sub in (NA, sub):
            return i
    return None


def _key(e: Lookup | Configurable) -> tuple[int, int]:
    return e.leaf, e.sub


@dataclass(frozen=True)
class PlatformCpuid:
    """What TDH.SYS.INIT sampled and TDH.SYS.CONFIG completed (global data)."""

    values: dict[int, Values]          # per lookup slot, FIXED0/DYNAMIC cleared, FIXED1 set
    native: dict[int, Values]          # per lookup slot, as sampled
    platform_fms: int
    max_pa: int
    last_base_leaf: int                # cpuid_last_base_leaf (the constant 0x23)
    last_extended_leaf: int            # the CPU's
    xfd_faulting_mask: int

    def config_values(self, i: int) -> Values:
        """SYS.RD CPUID_CONFIG_VALUES[i] (metadata_sys.c of 1.5.06): CONFIG_DIRECT bits and
        the ALLOW_DIRECT bits the platform has."""
        c = CONFIGURABLE[i]
        v = self.values[c.lookup]
        return tuple(cd | (ad & x) for cd, ad, x in  # type: ignore[return-value]
                     zip(c.config_direct, c.allow_direct, v, strict=True))

    def xsave_size(self, xcr0: int) -> int:
        """CPUID(0xD, 0).EBX with XCR0 = ``xcr0``: the standard-format area for the enabled
        user components (legacy area and header first), from the native sizes/offsets."""
        size = 576
        for n in range(2, 0x13):
            if xcr0 >> n & 1:
                slot = lookup_slot(0xD, n)
                if slot is not None:
                    eax, ebx, _, _ = self.native[slot]
                    size = max(size, ebx + eax)
        return size

    def xsave_size_compacted(self, xcr0_xss: int) -> int:
        """CPUID(0xD, 1).EBX with XCR0 | IA32_XSS = ``xcr0_xss``: the compacted area (legacy
        area and header, then each enabled component, 64-byte aligned where CPUID(0xD, n).ECX
        bit 1 says so)."""
        size = 576
        for n in range(2, 0x13):
            if xcr0_xss >> n & 1:
                eax, _, ecx, _ = self.native[16 + n]
                if ecx >> 1 & 1:
                    size = (size + 63) & ~63
                size += eax
        return size


@cache
def platform_cpuid(p: Profile) -> PlatformCpuid:
    """check_cpuid_configurations and complete_cpuid_handling for profile ``p``'s CPU."""
    last_base, last_ext = last_base_leaf(p), last_extended_leaf(p)
    native: dict[int, Values] = {}
    values: dict[int, Values] = {}
    for i in SLOTS:
        e = LOOKUP[i]
        sub = e.sub
        if e.leaf <= last_base or CPUID_FIRST_EXTENDED_LEAF <= e.leaf <= last_ext:
            v = native_cpuid(p, e.leaf, sub)
        elif e.leaf == 0x1F and sub <= 2:
            v = native_cpuid(p, 0xB, sub)   # see the module docstring
        else:
            v = ZERO
        if e.leaf == 1:
            v = (p.cpu_fms, *v[1:])
        native[i] = v
        values[i] = tuple((x & ~f0) | f1 for x, f0, f1 in  # type: ignore[assignment]
                          zip(v, e.fixed0_or_dynamic, e.fixed1, strict=True))
    d1 = native[lookup_slot(0xD, 1) or 0]
    xfd = 0
    if d1[0] >> 4 & 1:   # CPUID(0xD, 1).EAX.XFD_SUPPORT; ECX bit 2 of each subleaf
        for n in range(2, 0x13):
            if native[16 + n][2] >> 2 & 1:
                xfd |= 1 << n
    max_pa = native[lookup_slot(0x8000_0008, NA) or 0][0] & 0xFF
    return PlatformCpuid(values, native, p.cpu_fms, max_pa, CPUID_LAST_BASE_LEAF, last_ext,
                         xfd)


def _invalid_config(leaf: int, sub: int) -> TdxError:
    return TdxError(st.TDX_OPERAND_INVALID + st.OPERAND_ID_CPUID_CONFIG,
                    rcx=leaf | (sub << 32))


def _xfam_clear(v: list[int], xfam: int, masks: dict[int, Values]) -> None:
    for bit, m in masks.items():
        if not xfam >> bit & 1:
            for r in range(4):
                v[r] &= ~m[r]


def td_cpuid(pc: PlatformCpuid, *, attributes: int, xfam: int, gpaw: bool, tsc_frequency: int,
             configs: list[Values]) -> dict[int, Values]:
    """read_and_set_cpuid_configurations + check_cpuid_1f_and_compute_cpuid_0b: the TD's
    CPUID values per lookup slot from TD_PARAMS.CPUID_CONFIG (``configs``, by CPUID_CONFIG
    index). Raises the module's error for a refused configuration."""
    perfmon = bool(attributes >> 63 & 1)
    pks = attributes >> 30 & 1
    lass = attributes >> 27 & 1
    flags = {"monitor": False, "la57": False, "perfmon_ext": False}
    out: dict[int, Values] = {}
    for i in SLOTS:
        e = LOOKUP[i]
        v = list(pc.values[i])
        if e.config is not None:
            c = CONFIGURABLE[e.config]
            cfg = configs[e.config]
            for r in range(4):
                if cfg[r] & ~(c.config_direct[r] | c.allow_direct[r]):
                    raise _invalid_config(e.leaf, e.sub)
                v[r] &= ~e.fixed0_or_dynamic[r]
                v[r] |= e.fixed1[r]
                v[r] = (v[r] & ~c.config_direct[r]) | (cfg[r] & c.config_direct[r])
                v[r] &= cfg[r] | ~c.allow_direct[r]
        leaf, sub = e.leaf, e.sub
        if leaf == 1:
            if v[0] == 0:
                v[0] = pc.platform_fms
            if v[0] != pc.platform_fms:   # ATTRIBUTES.MIGRATABLE is never allowed here
                raise _invalid_config(leaf, sub)
            if not xfam >> 2 & 1:
                v[2] &= ~XFAM_MASKS[(1, NA)][2][2]
            flags["monitor"] = bool(v[2] >> 3 & 1)
        elif leaf == 5:
            if not flags["monitor"]:
                v = [0, 0, 0, 0]
        elif leaf == 7 and sub == 0:
            _xfam_clear(v, xfam, XFAM_MASKS[(7, 0)])
            if (v[1] >> 4 & 1) != (v[1] >> 11 & 1):   # HLE and RTM must agree
                raise _invalid_config(leaf, sub)
            v[2] = (v[2] & ~(1 << 31)) | pks << 31    # PKS reflects ATTRIBUTES.PKS
            v[2] &= ~(1 << 23)                         # KL_SUPPORTED
            flags["la57"] = bool(v[2] >> 16 & 1)
        elif leaf == 7 and sub == 1:
            _xfam_clear(v, xfam, XFAM_MASKS[(7, 1)])
            flags["perfmon_ext"] = bool(v[0] >> 8 & 1)
            v[0] = (v[0] & ~(1 << 6)) | lass << 6      # LASS reflects ATTRIBUTES.LASS
        elif leaf == 0xA:
            if not perfmon:
                v = [0, 0, 0, 0]
        elif leaf == 0xD and sub == 0:
            _xfam_clear(v, xfam, XFAM_MASKS[(0xD, 0)])
            v[2] = pc.xsave_size(xfam & XCR0_USER_BIT_MASK)
        elif leaf == 0xD and sub == 1:
            _xfam_clear(v, xfam, XFAM_MASKS[(0xD, 1)])
            if not pc.xfd_faulting_mask & xfam:
                v[0] &= ~(1 << 4)
        elif leaf == 0xD and 2 <= sub <= 18:
            if not xfam >> sub & 1:
                v = [0, 0, 0, 0]
        elif leaf == 0x14:
            if not xfam >> 8 & 1:
                v = [0, 0, 0, 0]
        elif leaf == 0x15:
            v[1] = tsc_frequency
        elif leaf == 0x19:
            v = [0, 0, 0, 0]
        elif leaf == 0x1C:
            if not xfam >> 15 & 1:
                v = [0, 0, 0, 0]
        elif leaf == 0x1D:
            if not (xfam >> 17 & 1 and xfam >> 18 & 1):
                v = [0, 0, 0, 0]
        elif leaf == 0x23:
            if not perfmon or not flags["perfmon_ext"]:
                v = [0, 0, 0, 0]
        elif leaf == 0x8000_0008:
            la_bits = 57 if flags["la57"] else 48
            # CONFIG_FLAGS.MAXPA_VIRT is never allowed by the profiles: PA bits are native.
            v[0] = (v[0] & ~0xFFFF) | la_bits << 8 | pc.max_pa
        out[i] = (v[0], v[1], v[2], v[3])
    _topology(pc, out)
    return out


def _topology(pc: PlatformCpuid, out: dict[int, Values]) -> None:
    """check_cpuid_1f_and_compute_cpuid_0b(allow_null=True) on ``out``."""
    def slot(leaf: int, sub: int) -> int:
        s = lookup_slot(leaf, sub)
        assert s is not None
        return s

    bad = TdxError(st.TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
    null = False
    level = LEVEL_TYPE_INVALID
    core_seen = False
    level_0b = 0
    last: Values = ZERO
    for sub in range(LEVEL_TYPE_MAX):
        i = slot(0x1F, sub)
        v = out[i]
        if sub == 0:
            null = not any(v)
        elif null and any(v):
            raise bad
        if null:
            v = out[i] = pc.values[i]
        prev, level = level, v[2] >> 8 & 0xFF
        if level != LEVEL_TYPE_INVALID:
            if level <= prev or level >= LEVEL_TYPE_MAX or (v[2] & 0xFF) != sub:
                raise bad
            if level == LEVEL_TYPE_SMT:
                if sub != 0:
                    raise bad
                out[slot(0xB, 0)] = v
                level_0b = 1
            elif level == LEVEL_TYPE_CORE:
                core_seen = True
            last = v
        elif sub == 0 or not core_seen:
            raise bad
    out[slot(0xB, level_0b)] = (last[0], last[1], level_0b | LEVEL_TYPE_CORE << 8, last[3])
    while level_0b < 2:
        level_0b += 1
        out[slot(0xB, level_0b)] = ZERO


def td_lookup(values: dict[int, Values], leaf: int, sub: int) -> Values | None:
    """The TD's stored values of (leaf, subleaf), or None when the leaf is not in the lookup
    table or is faulting (td_cpuid.c: #VE)."""
    i = lookup_slot(leaf, sub)
    if i is None or LOOKUP[i].faulting or i not in values:
        return None
    return values[i]


__all__ = ["CONFIGURABLE", "LOOKUP", "MAX_NUM_CPUID_LOOKUP", "NA", "PlatformCpuid",
           "lookup_slot", "platform_cpuid", "td_cpuid", "td_lookup"]
