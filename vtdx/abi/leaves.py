"""SEAMCALL leaf numbers and the RAX leaf/version encoding.

RAX on entry: bits 15:0 leaf, bits 23:16 version, bits 63:24 reserved (must be 0).
Numbers from intel/tdx-module include/tdx_api_defs.h (seamcall_leaf_opcode_t) plus the
newer leaves Linux 7.3 uses (TDH.SYS.DISABLE = 69, arch/x86/virt/vmx/tdx/tdx.h) and the
Dynamic PAMT leaves (58/59: TDH.PHYMEM.PAMT.ADD/REMOVE in the Dynamic PAMT series for
arch/x86/virt/vmx/tdx/tdx.h).
"""

from __future__ import annotations

from enum import IntEnum

LEAF_MASK = 0xFFFF
VERSION_SHIFT = 16
VERSION_MASK = 0xFF
RESERVED_MASK = ~((1 << 24) - 1) & ((1 << 64) - 1)


class Leaf(IntEnum):
    """Host-side (SEAMCALL) interface functions."""

    TDH_VP_ENTER = 0
    TDH_MNG_ADDCX = 1
    TDH_MEM_PAGE_ADD = 2
    TDH_MEM_SEPT_ADD = 3
    TDH_VP_ADDCX = 4
    TDH_MEM_PAGE_RELOCATE = 5
    TDH_MEM_PAGE_AUG = 6
    TDH_MEM_RANGE_BLOCK = 7
    TDH_MNG_KEY_CONFIG = 8
    TDH_MNG_CREATE = 9
    TDH_VP_CREATE = 10
    TDH_MNG_RD = 11
    TDH_MEM_RD = 12
    TDH_MNG_WR = 13
    TDH_MEM_WR = 14
    TDH_MEM_PAGE_DEMOTE = 15
    TDH_MR_EXTEND = 16
    TDH_MR_FINALIZE = 17
    TDH_VP_FLUSH = 18
    TDH_MNG_VPFLUSHDONE = 19
    TDH_MNG_KEY_FREEID = 20
    TDH_MNG_INIT = 21
    TDH_VP_INIT = 22
    TDH_MEM_PAGE_PROMOTE = 23
    TDH_PHYMEM_PAGE_RDMD = 24
    TDH_MEM_SEPT_RD = 25
    TDH_VP_RD = 26
    TDH_MNG_KEY_RECLAIMID = 27
    TDH_PHYMEM_PAGE_RECLAIM = 28
    TDH_MEM_PAGE_REMOVE = 29
    TDH_MEM_SEPT_REMOVE = 30
    TDH_SYS_KEY_CONFIG = 31
    TDH_SYS_INFO = 32
    TDH_SYS_INIT = 33
    TDH_SYS_RD = 34
    TDH_SYS_LP_INIT = 35
    TDH_SYS_TDMR_INIT = 36
    TDH_SYS_RDALL = 37
    TDH_MEM_TRACK = 38
    TDH_MEM_RANGE_UNBLOCK = 39
    TDH_PHYMEM_CACHE_WB = 40
    TDH_PHYMEM_PAGE_WBINVD = 41
    TDH_MEM_SEPT_WR = 42
    TDH_VP_WR = 43
    TDH_SYS_LP_SHUTDOWN = 44
    TDH_SYS_CONFIG = 45
    TDH_SERVTD_BIND = 48
    TDH_SERVTD_PREBIND = 49
    TDH_SYS_SHUTDOWN = 52
    TDH_SYS_UPDATE = 53
    TDH_PHYMEM_PAMT_ADD = 58
    TDH_PHYMEM_PAMT_REMOVE = 59
    TDH_SYS_DISABLE = 69


#: Leaves the module accepts before SYS_READY (tdx_vmm_dispatcher.c); SYS.DISABLE is assumed
#: allowed in every state (it exists to reset the module, Linux calls it on kexec/reboot).
ALLOWED_BEFORE_READY = frozenset({
    Leaf.TDH_SYS_INFO, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL, Leaf.TDH_SYS_INIT,
    Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG,
    Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_UPDATE, Leaf.TDH_SYS_DISABLE,
})


def encode(leaf: int, version: int = 0) -> int:
    """RAX value for ``leaf`` at ``version``."""
    return (leaf & LEAF_MASK) | ((version & VERSION_MASK) << VERSION_SHIFT)


def decode(rax: int) -> tuple[int, int, int]:
    """(leaf, version, reserved bits) of a SEAMCALL RAX."""
    return rax & LEAF_MASK, (rax >> VERSION_SHIFT) & VERSION_MASK, rax & RESERVED_MASK


def leaf_name(leaf: int) -> str:
    """``TDH.SYS.INIT`` style name, or ``LEAF_<n>`` for a number the module does not define."""
    try:
        return Leaf(leaf).name.replace("_", ".")
    except ValueError:
        return f"LEAF_{leaf}"
