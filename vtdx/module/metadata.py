"""One metadata layer for every RD/WR leaf (src/common/metadata_handlers/ of intel/tdx-module).

TDH.MNG.RD/WR (TD context), TDH.VP.RD/WR (VP context) and TDH.SYS.RD/RDALL (SYS context)
all go through here, as the module's leaves all go through metadata_generic.c:

- ``check_single_element(fid)``: ``md_check_as_single_element_id`` (metadata_generic.c
  100-117): reserved bits and the last-element / last-field counts must be zero; the element
  size (33:32), inc_size (50), write_mask_valid (51), context (54:52) and non_arch (63) bits
  are ignored. Failure: TDX_METADATA_FIELD_ID_INCORRECT, bare.
- ``MdTable.find(fid)``: ``md_find_entry_idx``: same class code, field code inside
  ``[base, base + num_fields * num_elem * (inc_size + 1))`` of an entry.
- ``read_element`` / ``write_element``: ``md_{td,vp}_{read,write}_element`` (metadata_td.c
  602-626 / 700-818, metadata_vp.c 650-674 / 1413-1516) with the host masks of the entry:
  ``dbg_*`` on a DEBUG TD, ``prod_*`` otherwise. Every metadata status is returned bare
  except OPERAND_BUSY | METADATA_FIELD and TD_VMCS_FIELD_NOT_INITIALIZED | <VMCS encoding>.
- ``next_element``: ``md_get_next_element_in_context`` (metadata_generic.c 372-522): within
  one entry only the field code advances (the caller's other bits stay), crossing to another
  entry yields that entry's table id; entries with a zero read mask are skipped.

Tables: the TD and VP tables are the module's auto-generated lookup tables
(``vtdx.abi.md_tables``, generated from the 1.5 tree); the SYS table is
``vtdx.abi.fields.GLOBAL_FIELDS``.

Values: fields the model computes (TD lifecycle, sizes, TSC, CPUID, vCPU index, pages,
association...) come from ``TdState`` / ``VcpuState``; every other field lives in the
``fields`` dict of its TD or vCPU, keyed by the element's canonical id, with the module's
initial value where td_vmcs_init.c sets one and 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vtdx.abi import md_tables
from vtdx.abi import status as st
from vtdx.abi.fields import FIELD_ID_NA as FIELD_ID_NA
from vtdx.abi.fields import SINGLE_ELEMENT_MBZ
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext
from vtdx.module.cpuid import LOOKUP, MAX_NUM_CPUID_LOOKUP, SLOTS, lookup_slot
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import check_gpa_validity
from vtdx.module.state import TdState, VcpuState

CODE_MASK = 0xFFFFFF
CTX_SHIFT = 52
CTX_MASK = 0x7 << CTX_SHIFT
CTX_SYS, CTX_TD, CTX_VP = 0, 1, 2
MASK64 = (1 << 64) - 1

#: Attribute bits of a table entry (md_field_attributes_t).
ATTR_HPA, ATTR_GPA, ATTR_PRIVATE, ATTR_SHARED = 1, 2, 4, 8

#: Class codes (tdx_api_defs.h / metadata_vp.h).
CLASS_VMCS = 0
CLASS_TD_CPUID_VALUES = 20
#: L2 classes (VMCS, MSR bitmaps, shadow MSR bitmaps of L2 VMs 1-3): the model has no L2
#: VM (NUM_L2_VMS = 0), so md_vp_get_element answers FIELD_ID_INCORRECT for all of them.
L2_CLASSES = frozenset({0x24, 0x25, 0x26, 0x2C, 0x2D, 0x2E, 0x34, 0x35, 0x36})

#: TD VMCS initial values the host can observe (td_vmcs_init.c 74-75): the posted-interrupt
#: notification vector starts at 0xFFFF (an illegal value) and the descriptor address at
#: NULL_PA; TDH.VP.WR of pin-based controls bit 7 checks both (metadata_vp.c 798-815).
VMCS_PI_NV = 0x0002
VMCS_PI_DESC = 0x2016
VMCS_PIN_BASED = 0x4000
VMCS_SHARED_EPTP = 0x203C
PI_NV_INIT = 0xFFFF
VMCS_INITIAL = {VMCS_PI_NV: PI_NV_INIT, VMCS_PI_DESC: MASK64}
#: Checked size of the shared HPA a VP field holds (md_vp_get_checked_size_of_shared_hpa_range).
SHARED_HPA_SIZE = {VMCS_PI_DESC: 64}
#: HP_LOCK_TIMEOUT limits in microseconds (td_control_structures.h 380-381).
MIN_HP_LOCK_TIMEOUT_USEC = 10_000
MAX_HP_LOCK_TIMEOUT_USEC = 100_000_000
HP_LOCK_TIMEOUT_ID = 0x9110000300000011
TD_CPUID_VALUES_ID = 0x9410000300000000


def class_code(fid: int) -> int:
    return (fid >> 56) & 0x3F


def field_code(fid: int) -> int:
    return fid & CODE_MASK


def is_null(fid: int) -> bool:
    """is_null_field_id (metadata_generic.h 222-225): all ones, context bits aside."""
    return (fid | CTX_MASK) == FIELD_ID_NA


def with_context(fid: int, ctx_code: int) -> int:
    """The leaf overwrites the caller's context bits (tdh_vp_rd_wr.c 158, tdh_mng_rd_wr.c
    107, tdh_sys_rd.c)."""
    return (fid & ~CTX_MASK) | (ctx_code << CTX_SHIFT)


def check_single_element(fid: int) -> None:
    """md_check_as_single_element_id (metadata_generic.c 100-117)."""
    if fid & SINGLE_ELEMENT_MBZ:
        raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)


@dataclass(frozen=True, slots=True)
class MdEntry:
    """One lookup-table entry (md_lookup_t): ``num_fields`` x ``num_elem`` elements."""

    name: str
    field_id: int
    num_fields: int
    num_elem: int
    attributes: int = 0
    prod_rd: int = 0
    prod_wr: int = 0
    dbg_rd: int = 0
    dbg_wr: int = 0
    special_rd: bool = False
    special_wr: bool = False

    @property
    def klass(self) -> int:
        return class_code(self.field_id)

    @property
    def base(self) -> int:
        return field_code(self.field_id)

    @property
    def stride(self) -> int:
        """Field codes between two elements (inc_size + 1; 2 for VMCS fields)."""
        return ((self.field_id >> 50) & 1) + 1

    @property
    def span(self) -> int:
        return self.num_fields * self.num_elem * self.stride

    @property
    def size_mask(self) -> int:
        return (1 << (8 << ((self.field_id >> 32) & 3))) - 1

    def masks(self, debug: bool) -> tuple[int, int]:
        """(read mask, write mask) of a host access (md_get_rd_wr_mask, 589-651)."""
        return (self.dbg_rd, self.dbg_wr) if debug else (self.prod_rd, self.prod_wr)

    def element_id(self, code: int) -> int:
        """The canonical id of the element at ``code`` (the table id's upper bits)."""
        return (self.field_id & ~CODE_MASK) | code

    def elements(self) -> Iterator[int]:
        return (self.element_id(self.base + i * self.stride)
                for i in range(self.num_fields * self.num_elem))


class MdTable:
    """The lookup tables of one context, in the module's order (VP: TD VMCS then TDVPS)."""

    def __init__(self, ctx_code: int, entries: tuple[MdEntry, ...]) -> None:
        self.ctx_code = ctx_code
        self.entries = entries
        self._by_class: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            self._by_class.setdefault(e.klass, []).append(i)

    def find_index(self, fid: int) -> int | None:
        """md_find_entry_idx: class equal, field code inside the entry's span; a TD
        CPUID_VALUES id (class 20) matches its entry whatever the leaf/subleaf code
        (the code is decoded by md_td_get_element, metadata_td.c 476-504)."""
        code = field_code(fid)
        klass = class_code(fid)
        if self.ctx_code == CTX_TD and klass == CLASS_TD_CPUID_VALUES:
            hits = self._by_class.get(klass, ())
            return hits[0] if hits else None
        for i in self._by_class.get(klass, ()):
            e = self.entries[i]
            if e.base <= code < e.base + e.span:
                return i
        return None

    def find(self, fid: int) -> MdEntry | None:
        i = self.find_index(fid)
        return None if i is None else self.entries[i]

    def by_name(self, name: str) -> MdEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def next_element(self, fid: int, readable: Callable[[MdEntry], bool]) -> int:
        """md_get_next_element_in_context for a read: the next element after ``fid`` (or the
        first element in the context for the null id) whose entry ``readable`` accepts;
        FIELD_ID_NA when none is left."""
        if is_null(fid):
            start = 0
        else:
            i = self.find_index(fid)
            if i is None:
                return FIELD_ID_NA
            e = self.entries[i]
            code = field_code(fid)
            elem = (code - e.base) // e.stride
            if elem < e.num_fields * e.num_elem - 1 and readable(e):
                return (fid & ~CODE_MASK) | (code + e.stride)
            start = i + 1
        for e in self.entries[start:]:
            if readable(e):
                return e.field_id
        return FIELD_ID_NA


def _rows(rows: tuple[md_tables.MdRow, ...]) -> tuple[MdEntry, ...]:
    return tuple(MdEntry(*r) for r in rows)


def _vp_entries() -> tuple[MdEntry, ...]:
    # The L2 VMCS / MSR-bitmap entries stay in the table (so their ids are recognised and
    # refused as the module refuses them with no L2 VM) but are never iterated.
    return _rows(md_tables.TD_VMCS) + _rows(md_tables.TDVPS)


TD_TABLE = MdTable(CTX_TD, _rows(md_tables.TDR_TDCS))
VP_TABLE = MdTable(CTX_VP, _vp_entries())


def host_readable(debug: bool) -> Callable[[MdEntry], bool]:
    """Entries a host read may return on this TD (non-zero read mask, no L2 VM: the TD
    table's L2 S-EPT roots and the VP table's L2 classes are left out, as md_get_lookup_table
    leaves out the unused L2 entries)."""
    def ok(e: MdEntry) -> bool:
        return (bool(e.masks(debug)[0]) and e.klass not in L2_CLASSES
                and not e.name.startswith("L2_SEPT_ROOT"))
    return ok


def forbidden_bits_unchanged(current: int, value: int, req_mask: int, wr_mask: int) -> bool:
    """md_check_forbidden_bits_unchanged (metadata_generic.h 251-264): bits the caller asks
    to write but the field does not allow must keep their current value."""
    forbidden = req_mask & ~wr_mask
    return (current & forbidden) == (value & forbidden)


# --- TD context (metadata_td.c) --------------------------------------------------------------

def _cpuid_key(code: int) -> tuple[int, int, int]:
    """(leaf, subleaf, element) of a TD CPUID_VALUES field code (tdx_api_defs.h 271-279);
    reserved code bits 23:17 -> FIELD_ID_INCORRECT (metadata_td.c 482-486)."""
    if code >> 17:
        raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
    leaf = ((code >> 9) & 0x7F) | (0x80000000 if code & (1 << 16) else 0)
    sub = 0xFFFFFFFF if code & (1 << 8) else (code >> 1) & 0x7F
    return leaf, sub, code & 1


def _td_value(td: TdState, e: MdEntry, fid: int) -> int:
    """md_td_get_element's value for the model's TD."""
    code = field_code(fid)
    idx = (code - e.base) // e.stride
    name = e.name
    if name == "CPUID_VALUES":
        # metadata_td.c 476-504: a leaf/subleaf cpuid_lookup does not have is
        # FIELD_ID_INCORRECT; a faulting one, or one TDH.MNG.INIT has not set CPUID_VALID
        # for, is FIELD_NOT_READABLE; else the values TDH.MNG.INIT stored.
        leaf, sub, half = _cpuid_key(code)
        slot = lookup_slot(leaf, sub)
        if slot is None:
            raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
        vals = td.cpuid.get(slot)
        if vals is None or LOOKUP[slot].faulting:
            raise TdxError(st.TDX_METADATA_FIELD_NOT_READABLE)
        return vals[2] | (vals[3] << 32) if half else vals[0] | (vals[1] << 32)
    computed: dict[str, Callable[[], int]] = {
        "FATAL": lambda: int(td.fatal),
        "NUM_TDCX": lambda: len(td.tdcx),
        "CHLDCNT": lambda: td.chldcnt,
        "LIFECYCLE_STATE": lambda: td.lifecycle,
        "TDCX_PA": lambda: td.tdcx[idx] if idx < len(td.tdcx) else 0,
        "HKID": lambda: td.hkid,
        "PKG_CONFIG_BITMAP": lambda: td.pkg_config_bitmap,
        "NUM_VCPUS": lambda: td.num_vcpus,
        "NUM_ASSOC_VCPUS": lambda: sum(v.associated_lp is not None
                                       for v in td.vcpus.values()),
        "OP_STATE": lambda: td.op_state,
        "ATTRIBUTES": lambda: td.attributes,
        "XFAM": lambda: td.xfam,
        "MAX_VCPUS": lambda: td.max_vcpus,
        "GPAW": lambda: int(td.gpaw),
        "EPTP": lambda: (td.sept.root.hpa | td.eptp_controls) if td.sept is not None else 0,
        "TSC_OFFSET": lambda: td.tsc_offset,
        "TSC_MULTIPLIER": lambda: td.tsc_multiplier,
        "TSC_FREQUENCY": lambda: td.tsc_frequency,
        "NUM_CPUID_VALUES": lambda: MAX_NUM_CPUID_LOOKUP,
        "CONFIG_FLAGS": lambda: td.config_flags,
        "TD_EPOCH": lambda: td.td_epoch,
        "REFCOUNT": lambda: td.refcount[idx],
        "MRTD": lambda: int.from_bytes(td.mrtd[8 * idx:8 * idx + 8], "little"),
        "RTMR": lambda: int.from_bytes(td.rtmr[idx // 6][8 * (idx % 6):8 * (idx % 6) + 8],
                                       "little"),
        "MRCONFIGID": lambda: int.from_bytes(td.mr_config_id[8 * idx:8 * idx + 8], "little"),
        "MROWNER": lambda: int.from_bytes(td.mr_owner[8 * idx:8 * idx + 8], "little"),
        "MROWNERCONFIG": lambda: int.from_bytes(td.mr_owner_config[8 * idx:8 * idx + 8],
                                                "little"),
    }
    f = computed.get(name)
    if f is not None:
        return f() & e.size_mask
    return td.fields.get(e.element_id(code), 0) & e.size_mask


def td_lookup(fid: int) -> MdEntry:
    """md_read_element / md_write_element: no entry -> FIELD_ID_INCORRECT (bare)."""
    e = TD_TABLE.find(fid)
    if e is None or e.klass in L2_CLASSES or e.name.startswith("L2_SEPT_ROOT"):
        raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
    return e


def td_read(td: TdState, fid: int) -> int:
    """md_td_read_element (metadata_td.c 602-626)."""
    e = td_lookup(fid)
    debug = bool(td.attributes & 1)
    value = _td_value(td, e, fid)
    rd, _ = e.masks(debug)
    if not rd:
        raise TdxError(st.TDX_METADATA_FIELD_NOT_READABLE)
    return value & rd


def td_write(td: TdState, fid: int, value: int, req_mask: int) -> tuple[int, Callable[[], None]]:
    """md_td_write_element (metadata_td.c 700-818): every check, then (old value, commit)."""
    e = td_lookup(fid)
    debug = bool(td.attributes & 1)
    current = _td_value(td, e, fid)
    rd, wr = e.masks(debug)
    combined = wr & req_mask
    if not combined:
        raise TdxError(st.TDX_METADATA_FIELD_NOT_WRITABLE)
    if not forbidden_bits_unchanged(current, value, req_mask, wr):
        raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
    new = (current & ~combined) | (value & combined)
    if e.field_id == HP_LOCK_TIMEOUT_ID:
        if combined != MASK64:
            raise TdxError(st.TDX_METADATA_WR_MASK_NOT_VALID)
        if not MIN_HP_LOCK_TIMEOUT_USEC <= new <= MAX_HP_LOCK_TIMEOUT_USEC:
            raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
    key = e.element_id(field_code(fid))

    def commit() -> None:
        td.fields[key] = new

    return current & rd, commit


def cpuid_field_code(leaf: int, sub: int, half: int) -> int:
    """The CPUID_VALUES field code of (leaf, subleaf, element); inverse of _cpuid_key."""
    code = ((leaf & 0x7F) << 9) | ((1 << 16) if leaf & 0x80000000 else 0) | half
    return code | (1 << 8) | (0x7F << 1) if sub == 0xFFFFFFFF else code | ((sub & 0x7F) << 1)


def td_next(td: TdState, fid: int) -> int:
    """The next readable TD element (TDH.MNG.RD version 1). CPUID_VALUES elements follow
    cpuid_lookup's valid slots in slot order (md_get_next_cpuid_value_entry,
    metadata_generic.c 269-310)."""
    readable = host_readable(bool(td.attributes & 1))
    cpuid = TD_TABLE.by_name("CPUID_VALUES")
    codes = [cpuid_field_code(LOOKUP[i].leaf, LOOKUP[i].sub, h) for i in SLOTS
             for h in (0, 1)]
    if not is_null(fid) and class_code(fid) == CLASS_TD_CPUID_VALUES:
        code = field_code(fid)
        if code in codes and codes.index(code) + 1 < len(codes):
            return (fid & ~CODE_MASK) | codes[codes.index(code) + 1]
        fid = cpuid.element_id(cpuid.base + cpuid.span - 1)  # past the CPUID entry
    nxt = TD_TABLE.next_element(fid, readable)
    if nxt == cpuid.field_id and codes:
        return cpuid.element_id(codes[0])
    return nxt


# --- VP context (metadata_vp.c) --------------------------------------------------------------

#: TDVPS.management.state values (tdx_tdvps.h 139-143).
VCPU_UNINITIALIZED, VCPU_READY = 0, 2
NO_LP = 0xFFFFFFFF


def vcpu_state(vcpu: VcpuState) -> int:
    return VCPU_READY if vcpu.initialized else VCPU_UNINITIALIZED


def vp_key(e: MdEntry, fid: int) -> int:
    return e.element_id(field_code(fid))


def _vp_value(td: TdState, vcpu: VcpuState, e: MdEntry, fid: int) -> int:
    code = field_code(fid)
    idx = (code - e.base) // e.stride
    key = vp_key(e, fid)
    if e.klass == CLASS_VMCS:
        return vcpu.fields.get(key, VMCS_INITIAL.get(code, 0)) & e.size_mask
    pages = [vcpu.tdvpr_pa, *vcpu.tdvpx]
    computed: dict[str, Callable[[], int]] = {
        "VCPU_STATE": lambda: vcpu_state(vcpu),
        "VCPU_INDEX": lambda: vcpu.vcpu_index & 0xFFFFFFFF,
        "NUM_TDVPS_PAGES": lambda: vcpu.num_pages,
        "ASSOC_LPID": lambda: NO_LP if vcpu.associated_lp is None else vcpu.associated_lp,
        "VCPU_EPOCH": lambda: td.td_epoch,
        "XFAM": lambda: td.xfam,
        "TDVPS_PAGE_PA": lambda: pages[idx] if idx < len(pages) else 0,
        # Special read (metadata_vp.c md_vp_get_element_special_rd_handle): the pending
        # virtual-interrupt summary; the model never has one pending on the host side.
        "VCPU_STATE_DETAILS": lambda: 0,
    }
    f = computed.get(e.name)
    if f is not None:
        return f() & e.size_mask
    return vcpu.fields.get(key, 0) & e.size_mask


def vp_lookup(fid: int) -> MdEntry:
    """md_vp_get_element's id checks: an entry, no L2 VM class, no VMCS "HIGH" access
    (field code bit 0 of a VMCS field, metadata_vp.c 557-563)."""
    e = VP_TABLE.find(fid)
    if e is None or e.klass in L2_CLASSES or (e.klass == CLASS_VMCS and fid & 1):
        raise TdxError(st.TDX_METADATA_FIELD_ID_INCORRECT)
    return e


def vp_read(td: TdState, vcpu: VcpuState, fid: int) -> int:
    """md_vp_read_element (metadata_vp.c 650-674)."""
    e = vp_lookup(fid)
    value = _vp_value(td, vcpu, e, fid)
    rd, _ = e.masks(bool(td.attributes & 1))
    if not rd:
        raise TdxError(st.TDX_METADATA_FIELD_NOT_READABLE)
    return value & rd


def _shared_hpa_ok(pa: int, size: int, max_pa: int, hkid_of: Callable[[int], int],
                   first_private: int) -> bool:
    """shared_hpa_check: aligned to ``size``, below MAX_PA, no private HKID."""
    return pa % size == 0 and pa + size <= max_pa and hkid_of(pa) < first_private


def vp_write(td: TdState, vcpu: VcpuState, fid: int, value: int, req_mask: int, *,
             max_pa: int, hkid_of: Callable[[int], int],
             first_private_hkid: int) -> tuple[int, Callable[[], None]]:
    """md_vp_write_element (metadata_vp.c 1413-1516) with the special VMCS writes KVM's
    sequence reaches (md_vp_element_vmcs_wr_handle 724-870): every check, then (old value,
    commit)."""
    e = vp_lookup(fid)
    code = field_code(fid)
    current = _vp_value(td, vcpu, e, fid)
    rd, wr = e.masks(bool(td.attributes & 1))
    combined = wr & req_mask
    if not combined:
        raise TdxError(st.TDX_METADATA_FIELD_NOT_WRITABLE)
    # A whole-element write starts from 0 (metadata_vp.c 1446-1452).
    base = 0 if combined == e.size_mask else current
    if e.attributes & (ATTR_HPA | ATTR_GPA) and base == e.size_mask:
        base &= wr  # NULL_PA initial value (md_vp_adjust_value_per_field_attr_on_wr)
    if not forbidden_bits_unchanged(base, value, req_mask, wr):
        raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
    new = (base & ~combined) | (value & combined)
    if e.attributes & ATTR_HPA and e.attributes & ATTR_SHARED:
        size = SHARED_HPA_SIZE.get(code, 4096)
        if not _shared_hpa_ok(new, size, max_pa, hkid_of, first_private_hkid):
            raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
    elif e.attributes & ATTR_GPA and e.attributes & ATTR_PRIVATE:
        # md_vp_handle_field_attribute_on_wr (metadata_vp.c 1400-1408), e.g. guest CR3
        if not check_gpa_validity(td, new):
            raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
    if e.klass == CLASS_VMCS and e.special_wr:
        if code == VMCS_PI_NV and new > 0xFF:
            raise TdxError(st.TDX_METADATA_FIELD_VALUE_NOT_VALID)
        if code == VMCS_PIN_BASED and new & 0x80:
            nv_entry = VP_TABLE.find(VMCS_PI_NV)
            desc_entry = VP_TABLE.find(VMCS_PI_DESC)
            assert nv_entry is not None and desc_entry is not None
            if _vp_value(td, vcpu, nv_entry, VMCS_PI_NV) == PI_NV_INIT:
                raise fail(st.TDX_TD_VMCS_FIELD_NOT_INITIALIZED, VMCS_PI_NV)
            if _vp_value(td, vcpu, desc_entry, VMCS_PI_DESC) == MASK64:
                raise fail(st.TDX_TD_VMCS_FIELD_NOT_INITIALIZED, VMCS_PI_DESC)
    key = vp_key(e, fid)

    def commit() -> None:
        vcpu.fields[key] = new

    return current & rd, commit


def vp_next(td: TdState, fid: int) -> int:
    """The next readable VP element (TDH.VP.RD version 1)."""
    return VP_TABLE.next_element(fid, host_readable(bool(td.attributes & 1)))


def finish_rd_wr(ctx: CallContext, out: Regs, write: bool, read: Callable[[], int],
                 write_prepared: Callable[[], tuple[int, Callable[[], None]]],
                 next_id: Callable[[], int]) -> None:
    """The common end of every metadata RD/WR leaf, once its own checks passed: a write is
    prepared (every check of the value), the call reaches ``locked``, then it commits and
    returns the old value in R8; a read returns the value in R8 and, for version 1, the next
    field id in RDX (tdh_mng_rd.c / tdh_mng_wr.c / tdh_vp_rd_wr.c all end this way)."""
    if write:
        old, commit = write_prepared()
        ctx.checkpoint("locked")
        commit()
        out.r8 = old
        return
    value = read()
    ctx.checkpoint("locked")
    out.r8 = value
    if ctx.version >= 1:
        out.rdx = next_id()
