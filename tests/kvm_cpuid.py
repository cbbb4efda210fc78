"""KVM_TDX_GET_CPUID's probing reads, for the whole-stack tests' failure checks.

Linux arch/x86/kvm/vmx/tdx.c tdx_vcpu_get_cpuid reads leaf 0, then every leaf up to the
maximum, each first without a subleaf and then subleaf by subleaf until a read fails
(tdx_vcpu_get_cpuid_leaf). Reads of a leaf/subleaf the module's cpuid_lookup does not have
fail with TDX_METADATA_FIELD_ID_INCORRECT and of a faulting one with
TDX_METADATA_FIELD_NOT_READABLE (tdx-module metadata_td.c 476-504); KVM expects those. Any
other failure - leaf 0, a readable slot, another status - is a regression.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.module.cpuid import LOOKUP, NA, lookup_slot

CPUID_FIELDS = 0x9410000300000000


def _leaf_sub(code: int) -> tuple[int, int]:
    leaf = ((code >> 9) & 0x7F) | (0x80000000 if code & (1 << 16) else 0)
    return leaf, NA if code & (1 << 8) else (code >> 1) & 0x7F


def expected_status(field_id: int) -> int:
    """The status the module gives a host read of this CPUID_VALUES field of a TD after
    TDH.MNG.INIT."""
    slot = lookup_slot(*_leaf_sub(field_id & 0x1FFFF))
    if slot is None:
        return st.TDX_METADATA_FIELD_ID_INCORRECT
    return st.TDX_METADATA_FIELD_NOT_READABLE if LOOKUP[slot].faulting else st.TDX_SUCCESS


def is_cpuid_probe_miss(r: dict) -> bool:
    """A failed TDH.MNG.RD record that is one of KVM_TDX_GET_CPUID's expected misses."""
    if r["name"] != "TDH.MNG.RD" or "tdx_read_cpuid" not in " ".join(r.get("stack") or []):
        return False
    fid = int(r["in"]["rdx"], 16)
    if fid & ~0x1FFFF != CPUID_FIELDS:
        return False
    want = expected_status(fid)
    return want != st.TDX_SUCCESS and int(r["status"], 16) == want
