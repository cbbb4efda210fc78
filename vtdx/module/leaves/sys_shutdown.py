"""TDH.SYS.SHUTDOWN (tdh_sys_shutdown.c, used by Linux 7.3 before a module update) and
TDH.SYS.DISABLE (Linux 7.3 tdx_sys_disable() on reboot/kexec).

SYS.DISABLE is not in the open-source 1.5 module; modelled from the Linux series' description
(lkml 2603.2): it frees and resets everything so the next kernel can initialise the module
from scratch, and answers TDX_SYS_BUSY while other TDH.SYS.* calls are in flight. Enumerated
by TDX_FEATURES0 bit 53; without it the leaf is unknown (TDX_OPERAND_INVALID | RAX).
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import SYS_LOCK
from vtdx.module.state import SysState

MODULE_HV = 0
MIN_UPDATE_HV = 0
NO_DOWNGRADE = False


def _others_busy(ctx: CallContext) -> bool:
    return any(s.busy for s in ctx.gd.lps if s.lp != ctx.lp)


def tdh_sys_shutdown(ctx: CallContext, inp: Regs, out: Regs) -> None:
    hv = inp.rcx
    if hv < MIN_UPDATE_HV or hv > MODULE_HV or (NO_DOWNGRADE and hv != MODULE_HV):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if _others_busy(ctx):  # another LP is inside the module
        raise TdxError(st.TDX_SYS_BUSY)
    ctx.gd.sys_state = SysState.SYS_SHUTDOWN


def tdh_sys_disable(ctx: CallContext, inp: Regs, out: Regs) -> None:
    m = ctx.module
    if not m.profile.sys_disable:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if _others_busy(ctx):
        raise TdxError(st.TDX_SYS_BUSY)
    m.reset()


LEAVES = [
    LeafSpec(Leaf.TDH_SYS_SHUTDOWN, tdh_sys_shutdown),
    LeafSpec(Leaf.TDH_SYS_DISABLE, tdh_sys_disable),
]
