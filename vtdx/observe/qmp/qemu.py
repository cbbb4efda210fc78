"""Forwarding ``stop`` / ``cont`` / ``query-status`` / ``quit`` to QEMU's own QMP socket.

vtdx's QMP socket offers these so one console can pause the machine for a consistent
snapshot and resume it. The server is asyncio code, so this uses qemu.qmp's async
``QMPClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import cast

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vtdx.observe.answers import QemuStatus
from vtdx.observe.qmp.errors import QmpError
from vtdx.observe.qmp.schema import Command

#: How long QEMU's socket may take to appear (QEMU still starting) or a command to answer.
TIMEOUT = 10.0


class QemuControl:
    """Commands on QEMU's QMP socket at ``path``.

    Connects per request and disconnects again: QEMU's QMP chardev serves one client at a
    time, and the machine runner or a developer may want it in between.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    async def execute(self, cmd: str, args: dict[str, object] | None = None,
                      timeout: float = TIMEOUT) -> object:
        client = QMPClient("vtdx-control")
        await self._connect(client, timeout)
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        except ExecuteError as e:
            raise QmpError(f"QEMU: {e}", e.error_class) from e
        except (TimeoutError, QMPError) as e:
            if cmd == "quit":  # QEMU may hang up before answering
                return {}
            raise QmpError(f"QEMU did not answer {cmd}: {e!r}") from e
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def _connect(self, client: QMPClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:  # QEMU may still be starting: its socket appears a moment later
            try:
                await asyncio.wait_for(client.connect(self.path), timeout)
                return
            except (TimeoutError, OSError, QMPError) as e:
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {self.path} is not available: {e}"
                                   ) from e
                await asyncio.sleep(0.05)

    async def stop(self) -> object:
        return await self.execute("stop")

    async def cont(self) -> object:
        return await self.execute("cont")

    async def status(self) -> QemuStatus:
        # QEMU's StatusInfo, forwarded as it is.
        return cast(QemuStatus, await self.execute("query-status"))

    async def quit(self) -> object:
        return await self.execute("quit")

    def commands(self) -> list[Command]:
        """The forwarded commands, for the vtdx command table."""
        return [
            Command("stop", self.stop, "Pause the machine (QEMU stop)."),
            Command("cont", self.cont, "Resume the machine (QEMU cont)."),
            Command("query-status", self.status, "QEMU run state."),
            Command("quit", self.quit, "Quit QEMU."),
        ]
