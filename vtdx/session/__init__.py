"""One VM's lifetime: QEMU with the plugin, the daemon, the QMP endpoint (``Machine``), and
``vtdx run``'s boot judge and summary.

Imports: ``vtdx.observe``, ``vtdx.host``, ``vtdx.runtime`` and below.
"""
