"""TDH.SYS.TDMR.INIT: initialise a TDMR's PAMT a slice per call (tdh_sys_tdmr_init.c).

Each call covers 1024 4 KB entries (4 MB of the TDMR) and returns in RDX the next address to
initialise rounded down to 1 GB, so the host loops until RDX reaches the TDMR's end. The
sparse PAMT needs no per-entry work: initialised entries equal the defaults.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import tdmr_key
from vtdx.module.pamt import PAGE_4K, TDMR_INIT_4K_PER_CALL, GiB


def tdh_sys_tdmr_init(ctx: CallContext, inp: Regs, out: Regs) -> None:
    out.rdx = 0
    tdmr_pa = inp.rcx
    if tdmr_pa & (GiB - 1) or not ctx.module.pa_ok(tdmr_pa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    tdmr = ctx.gd.pamt.tdmr_by_base(tdmr_pa)
    if tdmr is None:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    ctx.lock(tdmr_key(tdmr.index), True, st.TDX_OPERAND_BUSY + st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    if tdmr.next_init >= tdmr.end:
        raise TdxError(st.TDX_TDMR_ALREADY_INITIALIZED)
    tdmr.next_init += TDMR_INIT_4K_PER_CALL * PAGE_4K
    out.rdx = tdmr.next_init & ~(GiB - 1)


LEAVES = [LeafSpec(Leaf.TDH_SYS_TDMR_INIT, tdh_sys_tdmr_init)]
