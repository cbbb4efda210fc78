"""The one exception of the module model.

A leaf handler (or a helper deep inside it) raises ``TdxError(status, rcx, rdx)`` to abandon
the call; the dispatcher turns it into RAX (and RCX/RDX when the failure reports extended
information, such as the S-EPT entry a walk stopped at), after releasing every TDX lock the
call took. This keeps handlers as straight-line code, like the module's ``goto EXIT`` style,
without return-code plumbing.
"""

from __future__ import annotations

from vtdx.abi.status import decode


class TdxError(Exception):
    """Abort the current SEAMCALL with ``status`` (already including any operand id).

    ``rcx`` / ``rdx``, when not None, are the extended error information the module writes
    to those output registers for this failure.
    """

    __slots__ = ("status", "rcx", "rdx")

    def __init__(self, status: int, rcx: int | None = None, rdx: int | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.rcx = rcx
        self.rdx = rdx

    def __str__(self) -> str:
        return decode(self.status)


def fail(base: int, operand_id: int = 0) -> TdxError:
    """``TdxError`` for ``base`` with an operand id (api_error_with_operand_id)."""
    return TdxError(base + operand_id)
