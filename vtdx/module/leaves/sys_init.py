"""TDH.SYS.INIT: global module initialisation (tdh_sys_init.c).

Platform enumeration checks the real module does here (CPUID, MSRs, SMRRs, SEAM
capabilities) always pass on a vtdx platform: the profile is consistent by construction.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.state import SysState

SYS_LOCK = ("sys",)


def tdh_sys_init(ctx: CallContext) -> int:
    m, out = ctx.module, ctx.out
    out.rcx = out.rdx = out.r8 = out.r9 = out.r10 = 0
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    attributes = ctx.regs.rcx
    if attributes != 0:  # sys_attributes_t: all 64 bits reserved
        return st.TDX_OPERAND_INVALID + st.OPERAND_ID_RCX
    m.sys_attributes = attributes
    if m.state != SysState.SYSINIT_PENDING:
        return st.TDX_SYS_INIT_NOT_PENDING
    m.num_init_lps = 0
    m.pkg_config.clear()
    m.state = SysState.SYSINIT_DONE
    return st.TDX_SUCCESS


LEAVES = [LeafSpec(Leaf.TDH_SYS_INIT, tdh_sys_init)]
