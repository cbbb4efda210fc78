"""Leaf families the dispatcher registers, in order (a later family may override a leaf).

Each name is a module under vtdx.module exposing ``LEAVES: list[LeafSpec]``. Other engineers
add their families here (one line each).
"""

FAMILIES: list[str] = [
    "sys_init",
    "sys_lp",
    "sys_config",
    "sys_key",
    "sys_tdmr",
    "sys_rd",
    "sys_shutdown",
    "phymem",
    # TD engineer (issue 4): TD, vCPU, private memory, measurement, DPAMT leaves.
    "td_mng",
    "td_vp",
    "mem_sept",
    "mem_page",
    "mem_range",
    "mr",
    "phymem_td",
    "dpamt",
]
