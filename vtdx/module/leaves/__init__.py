"""Every leaf the module answers, one file per leaf family (Intel's api_calls/, grouped).

``LEAF_TABLE`` is the dispatcher's table, in the spirit of tdx_vmm_dispatcher.c's switch:
each family exports ``LEAVES`` (a list of ``LeafSpec``) and is named here once, so the link
from a leaf number to its handler is an import an editor can follow.

Adding a leaf: write ``def tdh_xxx(ctx: CallContext, inp: Regs, out: Regs) -> None`` in its
family's file (checks in the module's order through ``vtdx.module.helpers``, failures raised
as ``TdxError`` with operand ids from ``vtdx.abi.status``, ``ctx.checkpoint("locked")`` after
the last check, then the state changes on ``ctx.gd``), add ``LeafSpec(Leaf.TDH_XXX, tdh_xxx)``
to that file's ``LEAVES``, and name a new family file in ``_FAMILIES`` below.
"""

from __future__ import annotations

from vtdx.module.context import LeafSpec
from vtdx.module.leaves import (
    dpamt,
    mem_page,
    mem_range,
    mem_sept,
    mr,
    phymem,
    phymem_td,
    sys_config,
    sys_init,
    sys_key,
    sys_lp,
    sys_rd,
    sys_shutdown,
    sys_tdmr,
    td_mng,
    td_vp,
    td_vp_enter,
)

_FAMILIES = (sys_init, sys_lp, sys_config, sys_key, sys_tdmr, sys_rd, sys_shutdown, phymem,
             td_mng, td_vp, td_vp_enter, mem_sept, mem_page, mem_range, mr, phymem_td, dpamt)


def leaf_table() -> dict[int, LeafSpec]:
    """Leaf number -> spec for every modelled leaf; a leaf named twice is a bug."""
    table: dict[int, LeafSpec] = {}
    for family in _FAMILIES:
        for spec in family.LEAVES:
            if spec.leaf in table:
                raise AssertionError(f"leaf {spec.leaf:#x} registered twice")
            table[spec.leaf] = spec
    return table
