"""Serving SEAMCALLs: the plugin wire protocol, the per-vCPU transport and the daemon that
hands each call to a backend (the TDX module model, or the echo backend that measures the
transport's floor).

Imports: ``vtdx.module``, ``vtdx.platform``, ``vtdx.abi``, ``vtdx.errors``.
"""
