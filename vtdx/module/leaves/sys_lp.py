"""TDH.SYS.LP.INIT (tdh_sys_lp_init.c) and TDH.SYS.LP.SHUTDOWN (tdh_sys_lp_shutdown.c)."""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.leaves.sys_init import SYS_LOCK
from vtdx.module.state import SysState


def tdh_sys_lp_init(ctx: CallContext) -> int:
    m, out = ctx.module, ctx.out
    out.rcx = out.rdx = out.r8 = 0
    ctx.lock(SYS_LOCK, False, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if m.state != SysState.SYSINIT_DONE:
        return st.TDX_SYS_LP_INIT_NOT_PENDING
    lp = ctx.lp_state
    if lp.initialized:
        return st.TDX_SYS_LP_INIT_DONE
    lp.initialized = True
    m.num_init_lps += 1
    return st.TDX_SUCCESS


def tdh_sys_lp_shutdown(ctx: CallContext) -> int:
    """The 1.5 module does nothing here; it is the one leaf allowed after SYS.SHUTDOWN."""
    return st.TDX_SUCCESS


LEAVES = [
    LeafSpec(Leaf.TDH_SYS_LP_INIT, tdh_sys_lp_init),
    LeafSpec(Leaf.TDH_SYS_LP_SHUTDOWN, tdh_sys_lp_shutdown),
]
