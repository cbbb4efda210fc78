"""TDH.SYS.INIT: global module initialisation (tdh_sys_init.c).

Platform enumeration checks the real module does here (CPUID, MSRs, SMRRs, SEAM
capabilities) always pass on a vtdx platform: the profile is consistent by construction.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError, fail
from vtdx.module.locks import SYS_LOCK
from vtdx.module.state import SysState


def tdh_sys_init(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.SYS.INIT(RCX = 0; 2.0.08 version 1: R8 = fatal-error diagnostics config).

    tdh_sys_init.c 1282-1291 (1.5): RCX (sys_attributes_t / reserved_rcx, all bits
    reserved) non-zero -> OPERAND_INVALID | RCX after the global lock, before the state
    check. Version 1 exists only in the 2.0 generation (the dispatcher refuses it in 1.5):
    version > 1 -> OPERAND_INVALID | RAX before the lock; R8 is checked by
    configure_fatal_info_diagnostics, which the model does not have: it accepts R8 = 0
    (diagnostics off) and refuses anything else with OPERAND_INVALID | R8."""
    gd = ctx.gd
    r8 = inp.r8
    out.rcx = out.rdx = out.r8 = out.r9 = out.r10 = 0
    if ctx.version > 1:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    if ctx.version == 1 and r8 != 0:
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R8)
    ctx.checkpoint("locked")
    attributes = inp.rcx
    if attributes != 0:  # sys_attributes_t: all 64 bits reserved
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    gd.sys_attributes = attributes
    if gd.sys_state != SysState.SYSINIT_PENDING:
        raise TdxError(st.TDX_SYS_INIT_NOT_PENDING)
    gd.num_init_lps = 0
    gd.pkg_config.clear()
    gd.sys_state = SysState.SYSINIT_DONE


LEAVES = [LeafSpec(Leaf.TDH_SYS_INIT, tdh_sys_init)]
