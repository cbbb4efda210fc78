"""TDH.SYS.KEY.CONFIG: program the global private keyid on this LP's package
(tdh_sys_key_config.c). The last package moves the module to SYS_READY."""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.leaves.sys_init import SYS_LOCK
from vtdx.module.state import SysState


def tdh_sys_key_config(ctx: CallContext) -> int:
    m = ctx.module
    ctx.lock(SYS_LOCK, True, st.TDX_SYS_BUSY)
    ctx.checkpoint("locked")
    if m.state != SysState.SYSCONFIG_DONE:
        return st.TDX_SYS_KEY_CONFIG_NOT_PENDING
    pkg = ctx.lp_state.package
    if pkg in m.pkg_config:
        return st.TDX_KEY_CONFIGURED
    m.pkg_config.add(pkg)
    if len(m.pkg_config) == m.profile.num_packages:
        m.state = SysState.SYS_READY
    return st.TDX_SUCCESS


LEAVES = [LeafSpec(Leaf.TDH_SYS_KEY_CONFIG, tdh_sys_key_config)]
