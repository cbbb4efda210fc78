"""Python model of Intel's TDX module (see vtdx.module.core)."""

from vtdx.module.core import CallContext, LeafSpec, SysState, TdxModule
from vtdx.module.errors import TdxError

__all__ = ["CallContext", "LeafSpec", "SysState", "TdxError", "TdxModule"]
