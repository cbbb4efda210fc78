"""TDH.SYS.TDMR.INIT: initialise a TDMR's PAMT a slice per call (tdh_sys_tdmr_init.c).

Each call covers 1024 4 KB entries (4 MB of the TDMR) and returns in RDX the next address to
initialise rounded down to 1 GB, so the host loops until RDX reaches the TDMR's end. The
sparse PAMT needs no per-entry work: initialised entries equal the defaults.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.pamt import TDMR_INIT_4K_PER_CALL, GiB


def tdh_sys_tdmr_init(ctx: CallContext) -> int:
    m, out = ctx.module, ctx.out
    out.rdx = 0
    tdmr_pa = ctx.regs.rcx
    if tdmr_pa & (GiB - 1) or not m.pa_ok(tdmr_pa):
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    tdmr = m.pamt.tdmr_by_base(tdmr_pa)
    if tdmr is None:
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    ctx.lock(("tdmr", tdmr.index), True, st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    if tdmr.next_init >= tdmr.end:
        return st.TDX_TDMR_ALREADY_INITIALIZED
    tdmr.next_init += TDMR_INIT_4K_PER_CALL * 4096
    out.rdx = tdmr.next_init & ~(GiB - 1)
    return st.TDX_SUCCESS


LEAVES = [LeafSpec(Leaf.TDH_SYS_TDMR_INIT, tdh_sys_tdmr_init)]
