"""Metadata field identifiers (TDH.SYS.RD / RDALL, later TDH.MNG.RD / TDH.VP.RD).

A field id (the module's md_field_id_t): bits 23:0 field code, 31:24 reserved, 33:32
element size code (size = 1 << code bytes), 37:34 last element in field, 46:38 last field in
sequence, 49:47 reserved, 50 inc size, 51 write-mask valid, 54:52 context code (0 = SYS,
1 = TD, 2 = VP), 55 reserved, 61:56 class code, 62 reserved, 63 non-architectural.
Global field ids and shapes from intel/tdx-module include/auto_gen/global_sys_fields_lookup.c;
MAX_VCPUS_PER_TD (0x9900000100000008) from Linux 7.3 tdx_global_metadata.c (1.5.06 and later);
PAMT_PAGE_BITMAP_ENTRY_BITS (0x9100000100000013, 16-bit) as the Dynamic PAMT kernel reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

FIELD_CODE_MASK = 0xFFFFFF
CONTEXT_SHIFT = 52
CONTEXT_MASK = 0x7 << CONTEXT_SHIFT
CLASS_SHIFT = 56
ELEMENT_SIZE_SHIFT = 32
#: Bits that must be zero when a field id names a single element (md_check_as_single_element_id):
#: reserved 31:24, 49:47, 55, 62 and last-element (37:34) / last-field (46:38).
SINGLE_ELEMENT_MBZ = (
    (0xFF << 24) | (0xF << 34) | (0x1FF << 38) | (0x7 << 47) | (1 << 55) | (1 << 62)
)
#: The null field id (-1 ignoring the context bits) asks for the first field in the context.
FIELD_ID_NA = (1 << 64) - 1

CTX_SYS = 0
CTX_TD = 1
CTX_VP = 2


def class_code(field_id: int) -> int:
    return (field_id >> CLASS_SHIFT) & 0x3F


def field_code(field_id: int) -> int:
    return field_id & FIELD_CODE_MASK


def element_size(field_id: int) -> int:
    return 1 << ((field_id >> ELEMENT_SIZE_SHIFT) & 0x3)


def is_null(field_id: int) -> bool:
    return (field_id | CONTEXT_MASK) == FIELD_ID_NA


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One row of a metadata lookup table: ``num_fields`` × ``num_elem`` consecutive elements."""

    name: str
    field_id: int
    num_fields: int = 1
    num_elem: int = 1

    @property
    def count(self) -> int:
        return self.num_fields * self.num_elem

    @property
    def klass(self) -> int:
        return class_code(self.field_id)

    @property
    def code(self) -> int:
        return field_code(self.field_id)

    @property
    def size(self) -> int:
        return element_size(self.field_id)

    def element_id(self, index: int) -> int:
        """Field id of element ``index`` (0-based across fields and elements)."""
        return self.field_id + index


#: Global-scope (context SYS) fields in the module's table order.
GLOBAL_FIELDS: tuple[FieldDef, ...] = (
    FieldDef("NUM_PKGS", 0x0000000200000000),
    FieldDef("PKG_FMS", 0x0000000200000001, 8),
    FieldDef("VENDOR_ID", 0x0800000200000000),
    FieldDef("BUILD_DATE", 0x8800000200000001),
    FieldDef("BUILD_NUM", 0x8800000100000002),
    FieldDef("MINOR_VERSION", 0x0800000100000003),
    FieldDef("MAJOR_VERSION", 0x0800000100000004),
    FieldDef("UPDATE_VERSION", 0x0800000100000005),
    FieldDef("INTERNAL_VERSION", 0x0800000100000006),
    FieldDef("MODULE_HV", 0x8900000100000000),
    FieldDef("MIN_UPDATE_HV", 0x8900000100000001),
    FieldDef("NO_DOWNGRADE", 0x8900000000000002),
    FieldDef("NUM_HANDOFF_PAGES", 0x8900000100000003),
    FieldDef("SYS_ATTRIBUTES", 0x0A00000200000000),
    FieldDef("NUM_TDX_FEATURES", 0x0A00000000000001),
    FieldDef("TDX_FEATURES0", 0x0A00000300000008),
    FieldDef("NUM_CMRS", 0x9000000100000000),
    FieldDef("CMR_BASE", 0x9000000300000080, 32),
    FieldDef("CMR_SIZE", 0x9000000300000100, 32),
    FieldDef("MAX_TDMRS", 0x9100000100000008),
    FieldDef("MAX_RESERVED_PER_TDMR", 0x9100000100000009),
    FieldDef("PAMT_4K_ENTRY_SIZE", 0x9100000100000010),
    FieldDef("PAMT_2M_ENTRY_SIZE", 0x9100000100000011),
    FieldDef("PAMT_1G_ENTRY_SIZE", 0x9100000100000012),
    FieldDef("PAMT_PAGE_BITMAP_ENTRY_BITS", 0x9100000100000013),
    FieldDef("TDR_BASE_SIZE", 0x9800000100000000),
    FieldDef("TDCS_BASE_SIZE", 0x9800000100000100),
    FieldDef("TDCS_SIZE_PER_L2_VM", 0x9800000100000101),
    FieldDef("TDVPS_BASE_SIZE", 0x9800000100000200),
    FieldDef("TDVPS_SIZE_PER_L2_VM", 0x9800000100000201),
    FieldDef("ATTRIBUTES_FIXED0", 0x1900000300000000),
    FieldDef("ATTRIBUTES_FIXED1", 0x1900000300000001),
    FieldDef("XFAM_FIXED0", 0x1900000300000002),
    FieldDef("XFAM_FIXED1", 0x1900000300000003),
    FieldDef("NUM_CPUID_CONFIG", 0x9900000100000004),
    FieldDef("CONFIG_FLAGS_FIXED0", 0x9900000300000006),
    FieldDef("CONFIG_FLAGS_FIXED1", 0x9900000300000007),
    FieldDef("MAX_VCPUS_PER_TD", 0x9900000100000008),
    FieldDef("CPUID_CONFIG_LEAVES", 0x9900000300000400, 32),
    FieldDef("CPUID_CONFIG_VALUES", 0x9900000300000500, 32, 2),
)

GLOBAL_BY_NAME: dict[str, FieldDef] = {f.name: f for f in GLOBAL_FIELDS}

#: The ids Linux 7.3 reads at boot (tdx_global_metadata.c, excluding the CPUID arrays).
LINUX_BOOT_FIELDS: tuple[str, ...] = (
    "MINOR_VERSION", "MAJOR_VERSION", "UPDATE_VERSION", "TDX_FEATURES0", "MAX_TDMRS",
    "MAX_RESERVED_PER_TDMR", "PAMT_4K_ENTRY_SIZE", "PAMT_2M_ENTRY_SIZE", "PAMT_1G_ENTRY_SIZE",
    "TDR_BASE_SIZE", "TDCS_BASE_SIZE", "TDVPS_BASE_SIZE", "ATTRIBUTES_FIXED0",
    "ATTRIBUTES_FIXED1", "XFAM_FIXED0", "XFAM_FIXED1", "NUM_CPUID_CONFIG", "MAX_VCPUS_PER_TD",
)

#: TDX_FEATURES0 bits (Linux asm/tdx.h, DPAMT/DEMOTE series, SYS.DISABLE review thread).
FEATURES0_TD_PRESERVING = 1 << 1
FEATURES0_NO_RBP_MOD = 1 << 18
FEATURES0_TOPOLOGY_ENUM = 1 << 20
FEATURES0_DYNAMIC_PAMT = 1 << 36
FEATURES0_DEMOTE_NOINTERRUPT = 1 << 51
FEATURES0_SYS_DISABLE = 1 << 53


def lookup_global(field_id: int) -> tuple[FieldDef, int] | None:
    """(definition, element index) for a global field id, matching class and field code only."""
    return _INDEX.get((class_code(field_id), field_code(field_id)))


_INDEX: dict[tuple[int, int], tuple[FieldDef, int]] = {
    (f.klass, f.code + i): (f, i) for f in GLOBAL_FIELDS for i in range(f.count)
}
