"""TDH.SYS.LP.INIT (tdh_sys_lp_init.c) and TDH.SYS.LP.SHUTDOWN (tdh_sys_lp_shutdown.c)."""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError
from vtdx.module.locks import SYS_LOCK
from vtdx.module.state import SysState


def tdh_sys_lp_init(ctx: CallContext, inp: Regs, out: Regs) -> None:
    gd = ctx.gd
    out.rcx = out.rdx = out.r8 = 0
    ctx.lock(SYS_LOCK, False, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if gd.sys_state != SysState.SYSINIT_DONE:
        raise TdxError(st.TDX_SYS_LP_INIT_NOT_PENDING)
    lp = ctx.lp_state
    if lp.initialized:
        raise TdxError(st.TDX_SYS_LP_INIT_DONE)
    lp.initialized = True
    gd.num_init_lps += 1


def tdh_sys_lp_shutdown(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """The 1.5 module does nothing here; it is the one leaf allowed after SYS.SHUTDOWN."""


LEAVES = [
    LeafSpec(Leaf.TDH_SYS_LP_INIT, tdh_sys_lp_init),
    LeafSpec(Leaf.TDH_SYS_LP_SHUTDOWN, tdh_sys_lp_shutdown),
]
