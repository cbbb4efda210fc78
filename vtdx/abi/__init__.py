"""The TDX module's binary interface: leaf numbers, status codes, metadata field ids."""

from vtdx.abi.leaves import Leaf, leaf_name
from vtdx.abi.status import decode as decode_status

__all__ = ["Leaf", "decode_status", "leaf_name"]
