"""Host tooling: the QEMU runtime and TCG plugin build, the Linux kernel build, the initramfs
and the static in-guest payloads.

Imports: ``vtdx.errors`` and ``vtdx.abi`` only; it knows nothing of the module or the daemon.
"""
