"""The one error a QMP command raises: a description and QMP's error class.

QEMU's qapi/error.json lists the classes; vtdx uses three of them: ``GenericError`` for
almost everything, ``CommandNotFound`` (unknown command, or a command before/after
capabilities negotiation) and ``DeviceNotFound`` (a query naming a TD that does not exist).
"""

from __future__ import annotations

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"


class QmpError(Exception):
    """A command failure reported to the client as ``{"error": {"class", "desc"}}``."""

    def __init__(self, desc: str, cls: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc

    def reply(self) -> dict[str, object]:
        """The ``error`` member of the reply."""
        return {"class": self.cls, "desc": self.desc}
