"""Measurement: TDH.MR.EXTEND (16) and TDH.MR.FINALIZE (17), real SHA-384.

Input layout from intel/tdx-module tdh_mr_extend.c / tdh_mem_page_add.c and
crypto/sha384.h: each event is one 128-byte block {API name as 16 ASCII bytes zero padded,
GPA (u64), zeros}; MR.EXTEND adds the 256 bytes of the chunk as two more blocks.
MR.FINALIZE finalises the running hash into MRTD and makes the TD runnable.
"""

from __future__ import annotations

from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module import sept as S
from vtdx.module.leaves.mem_page import _sha_block
from vtdx.module.td_common import EX, OP_RUNNABLE, TdEnv, TdxFail, fail, septe_fail, td_leaf


def mr_extend(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MR.EXTEND(RCX = GPA of a 256-byte chunk, RDX = TDR)."""
    gpa, tdr_pa = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    _, td = env.lock_tdr(ctx, tdr_pa, st.OPERAND_ID_RDX, EX)
    assert td is not None
    env.tdcs(ctx, td, None, Leaf.TDH_MR_EXTEND)
    if gpa % 256 or not env.gpa_valid(td, gpa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    assert td.sept is not None
    # check_and_walk_private_gpa_to_leaf: no S-EPT lock (the TDR is held exclusive)
    w = td.sept.walk(gpa, 0)
    if not w.entry.is_leaf or w.entry.state not in S.RWX_STATES:
        raise septe_fail(st.TDX_EPT_ENTRY_NOT_PRESENT, st.OPERAND_ID_RCX, w)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MR_EXTEND]:
        raise TdxFail(st.TDX_EPT_ENTRY_NOT_PRESENT)
    ctx.checkpoint("locked")
    hpa = w.entry.hpa + (gpa & (S.level_size(w.level) - 1))
    td.mrtd_ctx.update(_sha_block(b"MR.EXTEND", gpa))
    td.mrtd_ctx.update(env.memory.read(hpa, 256))


def mr_finalize(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MR.FINALIZE(RCX = TDR): MRTD = SHA-384 of everything measured so far."""
    _, td = env.lock_tdr(ctx, regs.rcx, st.OPERAND_ID_RCX, EX)
    assert td is not None
    env.tdcs(ctx, td, None, Leaf.TDH_MR_FINALIZE)
    if td.num_vcpus == 0:
        raise fail(st.TDX_NO_VCPUS)
    ctx.checkpoint("locked")
    td.mrtd = td.mrtd_ctx.digest()
    td.finalized = True
    td.op_state = OP_RUNNABLE


LEAVES = [
    td_leaf(Leaf.TDH_MR_EXTEND, mr_extend),
    td_leaf(Leaf.TDH_MR_FINALIZE, mr_finalize),
]
