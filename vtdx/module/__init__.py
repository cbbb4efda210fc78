"""Python model of Intel's TDX module (see vtdx.module.core)."""

from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.core import TdxModule
from vtdx.module.errors import TdxError
from vtdx.module.state import SysState

__all__ = ["CallContext", "LeafSpec", "SysState", "TdxError", "TdxModule"]
