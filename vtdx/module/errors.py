"""The one internal exception of the module model.

A leaf handler (or a helper deep inside it) raises ``TdxError(status)`` to abandon the call;
the dispatcher turns it into RAX, after releasing every TDX lock the call took. This keeps
handlers as straight-line code, like the module's ``goto EXIT`` style, without return-code
plumbing.
"""

from __future__ import annotations


class TdxError(Exception):
    """Abort the current SEAMCALL with ``status`` (already including any operand id)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

    def __str__(self) -> str:
        from vtdx.abi.status import decode

        return decode(self.status)
