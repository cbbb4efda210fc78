"""The platform vtdx presents: the profile (CPUs, RAM layout, keyids, module sizes) and the
physical memory the module reads and writes.

Imports: ``vtdx.abi`` and ``vtdx.errors`` only.
"""
