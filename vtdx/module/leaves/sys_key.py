"""TDH.SYS.KEY.CONFIG: program the global private keyid on this LP's package
(tdh_sys_key_config.c). The last package moves the module to SYS_READY."""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import TdxError
from vtdx.module.locks import SYS_LOCK
from vtdx.module.state import SysState


def tdh_sys_key_config(ctx: CallContext, inp: Regs, out: Regs) -> None:
    gd = ctx.gd
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if gd.sys_state != SysState.SYSCONFIG_DONE:
        raise TdxError(st.TDX_SYS_KEY_CONFIG_NOT_PENDING)
    pkg = ctx.lp_state.package
    if pkg in gd.pkg_config:
        raise TdxError(st.TDX_KEY_CONFIGURED)
    gd.pkg_config.add(pkg)
    if len(gd.pkg_config) == ctx.module.profile.num_packages:
        gd.sys_state = SysState.SYS_READY


LEAVES = [LeafSpec(Leaf.TDH_SYS_KEY_CONFIG, tdh_sys_key_config)]
