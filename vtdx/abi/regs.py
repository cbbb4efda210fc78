"""The register file a SEAMCALL carries in and out.

Linux passes SEAMCALL arguments in RCX, RDX, R8-R15 and, through
``__seamcall_saved_ret``, also RBX, RSI and RDI; the leaf and status travel in RAX.
One fixed record keeps the wire frame, the module and the trace in step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from operator import attrgetter

MASK64 = (1 << 64) - 1

#: Register order shared by the wire protocol and traces (RAX first).
REG_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass(slots=True)
class Regs:
    """General-purpose registers of one SEAMCALL (values are masked to 64 bits)."""

    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rbx: int = 0
    rsi: int = 0
    rdi: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0

    def __post_init__(self) -> None:
        # Frames from the wire are already 64-bit: check cheaply, mask only when needed
        # (this runs once per SEAMCALL on the daemon's hot path).
        values = _get_all(self)
        if min(values) < 0 or max(values) > MASK64:
            for name, value in zip(REG_NAMES, values, strict=True):
                setattr(self, name, value & MASK64)

    def as_tuple(self) -> tuple[int, ...]:
        return _get_all(self)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...] | list[int]) -> Regs:
        return cls(*values)

    def copy(self, **changes: int) -> Regs:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in REG_NAMES}


_get_all = attrgetter(*REG_NAMES)
