"""Measurement: TDH.MR.EXTEND (16) and TDH.MR.FINALIZE (17), real SHA-384.

Input layout from intel/tdx-module tdh_mr_extend.c / tdh_mem_page_add.c and
crypto/sha384.h: each event is one 128-byte block {API name as 16 ASCII bytes zero padded,
GPA (u64), zeros}; MR.EXTEND adds the 256 bytes of the chunk as two more blocks.
MR.FINALIZE finalises the running hash into MRTD and makes the TD runnable.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.helpers import (
    EX,
    check_gpa_validity,
    check_lock_and_map_explicit_tdr,
    check_state_map_tdcs_and_lock,
    septe_error,
    sha_block,
)
from vtdx.module.state import OP_RUNNABLE


def tdh_mr_extend(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MR.EXTEND(RCX = GPA of a 256-byte chunk, RDX = TDR)."""
    gpa, tdr_pa = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    td = check_lock_and_map_explicit_tdr(ctx, tdr_pa, st.OPERAND_ID_RDX, EX)
    check_state_map_tdcs_and_lock(ctx, td, None, Leaf.TDH_MR_EXTEND)
    if gpa % 256 or not check_gpa_validity(td, gpa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    assert td.sept is not None
    # check_and_walk_private_gpa_to_leaf: no S-EPT lock (the TDR is held exclusive)
    w = td.sept.walk(gpa, 0)
    if not w.entry.is_leaf or w.entry.state not in S.RWX_STATES:
        raise septe_error(st.TDX_EPT_ENTRY_NOT_PRESENT, st.OPERAND_ID_RCX, w)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MR_EXTEND]:
        raise TdxError(st.TDX_EPT_ENTRY_NOT_PRESENT)
    ctx.checkpoint("locked")
    hpa = w.entry.hpa + (gpa & (S.level_size(w.level) - 1))
    td.mrtd_ctx.update(sha_block(b"MR.EXTEND", gpa))
    td.mrtd_ctx.update(ctx.module.memory.read(hpa, 256))


def tdh_mr_finalize(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MR.FINALIZE(RCX = TDR): MRTD = SHA-384 of everything measured so far."""
    td = check_lock_and_map_explicit_tdr(ctx, inp.rcx, st.OPERAND_ID_RCX, EX)
    check_state_map_tdcs_and_lock(ctx, td, None, Leaf.TDH_MR_FINALIZE)
    if td.num_vcpus == 0:
        raise TdxError(st.TDX_NO_VCPUS)
    ctx.checkpoint("locked")
    td.mrtd = td.mrtd_ctx.digest()
    td.finalized = True
    td.op_state = OP_RUNNABLE


LEAVES = [
    LeafSpec(Leaf.TDH_MR_EXTEND, tdh_mr_extend),
    LeafSpec(Leaf.TDH_MR_FINALIZE, tdh_mr_finalize),
]
