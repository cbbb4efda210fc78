"""vtdx: a virtual Intel TDX platform for QEMU (TCG plugin + Python TDX module model)."""

__version__ = "0.1.0"
