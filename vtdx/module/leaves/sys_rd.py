"""TDH.SYS.RD and TDH.SYS.RDALL: read global metadata (tdh_sys_rd.c, tdh_sys_rdall.c,
metadata_generic.c, metadata_sys.c).

Values come from the platform profile (vtdx.platform.profile.Profile) and module state; field ids
and shapes from vtdx.abi.fields. SYS.RD: RDX = field id in, next field id out; R8 = value.
SYS.RDALL: RDX = 4 KB-aligned buffer for a metadata list, R8 = first field id in / next out.

RDALL builds sequences as md_dump_list() does (consecutive fields of one class, element
count and size share a sequence), over vtdx's global field list (vtdx.abi.fields).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vtdx.abi import fields as fl
from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import metadata as md
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.cpuid import CONFIGURABLE, platform_cpuid
from vtdx.module.errors import TdxError, fail

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

_FIELD_NA = fl.FIELD_ID_NA


def global_values(m: TdxModule) -> dict[str, list[int]]:
    """Every global field's elements as the module would report them now."""
    p = m.profile
    major, minor, update = p.module_version
    # NUM_CPUID_CONFIG is MAX_NUM_CPUID_CONFIG; each entry's values are its CONFIG_DIRECT
    # bits and the ALLOW_DIRECT bits the platform has (metadata_sys.c of 1.5.06).
    pc = platform_cpuid(p)
    cpuid_leaves = []
    cpuid_values = []
    for i, c in enumerate(CONFIGURABLE):
        eax, ebx, ecx, edx = pc.config_values(i)
        cpuid_leaves.append(c.leaf | (c.sub << 32))
        cpuid_values += [eax | (ebx << 32), ecx | (edx << 32)]
    num_cpuid_config = len(cpuid_leaves)
    # Slots past NUM_CPUID_CONFIG read as leaf ~0 and values 0 (metadata_sys.c 262-285 of the
    # 1.5 tree): the CPUID arrays are whole 32-field entries and never answer FIELD_SKIP.
    cpuid_leaves += [(1 << 64) - 1] * (32 - len(cpuid_leaves))
    cpuid_values += [0] * (64 - len(cpuid_values))
    cmrs = [c for c in p.cmrs if c.size]
    v: dict[str, list[int]] = {
        "NUM_PKGS": [p.num_packages],
        "PKG_FMS": [p.cpu_fms if i < p.num_packages else 0 for i in range(8)],
        "VENDOR_ID": [0x8086],
        "BUILD_DATE": [p.build_date],
        "BUILD_NUM": [p.build_num],
        "MINOR_VERSION": [minor],
        "MAJOR_VERSION": [major],
        "UPDATE_VERSION": [update],
        "INTERNAL_VERSION": [0],
        "MODULE_HV": [0],
        "MIN_UPDATE_HV": [0],
        "NO_DOWNGRADE": [0],
        "NUM_HANDOFF_PAGES": [0],
        "SYS_ATTRIBUTES": [m.gd.sys_attributes],
        "NUM_TDX_FEATURES": [1],
        "TDX_FEATURES0": [p.features0],
        "NUM_CMRS": [32 if p.gen.num_cmrs_is_max else len(cmrs)],
        "CMR_BASE": [c.base for c in cmrs] + [0] * (32 - len(cmrs)),
        "CMR_SIZE": [c.size for c in cmrs] + [0] * (32 - len(cmrs)),
        "MAX_TDMRS": [p.max_tdmrs],
        "MAX_RESERVED_PER_TDMR": [p.max_reserved_per_tdmr],
        "PAMT_4K_ENTRY_SIZE": [p.pamt_entry_sizes[0]],
        "PAMT_2M_ENTRY_SIZE": [p.pamt_entry_sizes[1]],
        "PAMT_1G_ENTRY_SIZE": [p.pamt_entry_sizes[2]],
        "TDR_BASE_SIZE": [p.tdr_base_size],
        "TDCS_BASE_SIZE": [p.tdcs_base_size],
        "TDCS_SIZE_PER_L2_VM": [4096],
        "TDVPS_BASE_SIZE": [p.tdvps_base_size],
        "TDVPS_SIZE_PER_L2_VM": [3 * 4096],
        "ATTRIBUTES_FIXED0": [p.attributes_fixed0],
        "ATTRIBUTES_FIXED1": [p.attributes_fixed1],
        "XFAM_FIXED0": [p.xfam_fixed0],
        "XFAM_FIXED1": [p.xfam_fixed1],
        "NUM_CPUID_CONFIG": [num_cpuid_config],
        "CONFIG_FLAGS_FIXED0": [p.config_flags_fixed0],
        "CONFIG_FLAGS_FIXED1": [p.config_flags_fixed1],
        "MAX_VCPUS_PER_TD": [p.max_vcpus_per_td],
        "CPUID_CONFIG_LEAVES": cpuid_leaves,
        "CPUID_CONFIG_VALUES": cpuid_values,
    }
    if p.dynamic_pamt:
        v["PAMT_PAGE_BITMAP_ENTRY_BITS"] = [p.pamt_bitmap_entry_bits]
    return v


def _mask(f: fl.FieldDef) -> int:
    return (1 << (8 * f.size)) - 1


def _elements(values: dict[str, list[int]]) -> list[int]:
    """Readable element ids in context order."""
    out = []
    for f in fl.GLOBAL_FIELDS:
        vals = values.get(f.name)
        if vals is None:
            continue
        out += [f.element_id(i) for i in range(len(vals))]
    return out


class _Catalogue:
    """Field values plus the context order, cached per module (the profile is immutable)."""

    __slots__ = ("key", "values", "ids", "next_of")

    def __init__(self, m: TdxModule) -> None:
        self.key = m.gd.sys_attributes
        self.values = global_values(m)
        self.ids = _elements(self.values)
        self.next_of = {
            (fl.class_code(fid), fl.field_code(fid)): (self.ids[k + 1] if k + 1 < len(self.ids)
                                                        else _FIELD_NA)
            for k, fid in enumerate(self.ids)
        }


def catalogue(m: TdxModule) -> _Catalogue:
    """The catalogue, cached in the module state (rebuilt when SYS_ATTRIBUTES changes)."""
    cat = m.gd.sys_rd_catalogue
    if not isinstance(cat, _Catalogue) or cat.key != m.gd.sys_attributes:
        cat = m.gd.sys_rd_catalogue = _Catalogue(m)
    return cat


def tdh_sys_rd(ctx: CallContext, inp: Regs, out: Regs) -> None:
    out.rdx = _FIELD_NA
    out.r8 = 0
    if not ctx.lp_state.initialized:
        raise TdxError(st.TDX_SYS_LP_INIT_NOT_DONE)
    field_id = inp.rdx & ~fl.CONTEXT_MASK  # context code is implicit (SYS = 0)
    cat = catalogue(ctx.module)
    values = cat.values
    if md.is_null(field_id):
        out.rdx = cat.ids[0] if cat.ids else _FIELD_NA
        ctx.set_status(st.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT)
        return
    md.check_single_element(field_id)
    hit = fl.lookup_global(field_id)
    if hit is None or hit[0].name not in values:
        raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
    f, idx = hit
    out.r8 = values[f.name][idx] & _mask(f)
    # Next element (md_get_next_element_in_context): inside the same entry only the field
    # code advances and the caller's other bits stay; otherwise the next entry's table id.
    if idx + 1 < f.count:
        out.rdx = (field_id & ~fl.FIELD_CODE_MASK) | (fl.field_code(field_id) + 1)
    else:
        out.rdx = cat.next_of.get((fl.class_code(field_id), fl.field_code(field_id)),
                                  _FIELD_NA)


RDALL_BUF = 4096


def _dump_list(fields: list[tuple[int, fl.FieldDef, list[int]]]
               ) -> tuple[bytes, int, int]:
    """md_dump_list / md_dump_sequence (metadata_generic.c 872-1058): a sequence goes on
    while the next field has the same class, the next field code, the same number of
    elements and the same element size, and stops when a whole field no longer fits in the
    4 KB buffer. Returns (sequences, number of sequences, next field id or -1)."""
    space = RDALL_BUF - 8
    body = bytearray()
    nseq = 0
    k = 0
    while k < len(fields) and space >= 8 + 8 * fields[k][1].num_elem:
        head, f, _ = fields[k]
        room = space - 8
        elems: list[int] = []
        count = 0
        while k < len(fields) and room >= 8 * f.num_elem:
            fid, f, vals = fields[k]
            elems += [x & _mask(f) for x in vals]
            room -= 8 * f.num_elem
            count += 1
            k += 1
            if k == len(fields):
                break
            nxt, g, _ = fields[k]
            if (fl.class_code(nxt) != fl.class_code(fid)
                    or fl.field_code(nxt) != fl.field_code(fid) + f.num_elem
                    or g.num_elem != f.num_elem or g.size != f.size):
                break
        header = ((head & ~(fl.CONTEXT_MASK | (1 << 51)) & ~fl.SINGLE_ELEMENT_MBZ)
                  | ((f.num_elem - 1) << 34) | ((count - 1) << 38))
        body += struct.pack("<Q", header) + b"".join(struct.pack("<Q", x) for x in elems)
        space -= 8 + 8 * len(elems)
        nseq += 1
    next_id = fields[k][0] if k < len(fields) else _FIELD_NA
    return bytes(body), nseq, next_id


def tdh_sys_rdall(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """Dump fields from R8 on as a metadata list: u16 size, u16 sequences, u32 0, then per
    sequence a field id header (last-element / last-field counts set) and u64 elements."""
    m = ctx.module
    out.r8 = _FIELD_NA
    if not ctx.lp_state.initialized:
        raise TdxError(st.TDX_SYS_LP_INIT_NOT_DONE)
    buf_pa = inp.rdx
    if not m.shared_hpa_ok(buf_pa, RDALL_BUF):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    values = catalogue(m).values
    start = inp.r8 & ~fl.CONTEXT_MASK
    rows = [f for f in fl.GLOBAL_FIELDS if f.name in values]
    first_field = 0
    if not fl.is_null(start):
        # md_check_field_and_get_entry (metadata_generic.c 735-766): the first element of
        # a field, with the entry's exact element size code.
        hit = fl.lookup_global(start)
        if (hit is None or hit[0] not in rows or hit[1] % hit[0].num_elem
                or (start >> 32) & 3 != (hit[0].field_id >> 32) & 3):
            raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
        rows = rows[rows.index(hit[0]):]
        first_field = hit[1] // hit[0].num_elem
    # Every field from the start on: (field id of its first element, row, its elements).
    fields = []
    for k, f in enumerate(rows):
        vals = values[f.name]
        for i in range(first_field if k == 0 else 0, len(vals) // f.num_elem):
            fid = f.field_id + i * f.num_elem
            fields.append((fid, f, vals[i * f.num_elem:(i + 1) * f.num_elem]))
    body, nseq, next_id = _dump_list(fields)
    if not m.memory.contains(buf_pa, RDALL_BUF):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RDX)
    m.memory.write(buf_pa, struct.pack("<HHI", 8 + len(body), nseq, 0) + bytes(body))
    out.r8 = next_id
    if next_id != _FIELD_NA:
        raise TdxError(st.TDX_METADATA_LIST_OVERFLOW)


LEAVES = [
    LeafSpec(Leaf.TDH_SYS_RD, tdh_sys_rd),
    LeafSpec(Leaf.TDH_SYS_RDALL, tdh_sys_rdall),
]
