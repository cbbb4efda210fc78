"""A ``QmpServer`` on an event loop of its own thread.

The daemon serves vCPUs on plain threads; this keeps the QMP socket responsive without
making the daemon asyncio-based. ``start()`` returns once the socket accepts (or raises
what binding it raised); ``stop()`` closes the server, cancels what is left and closes the
loop, so nothing of it outlives the call.
"""

from __future__ import annotations

import asyncio
import threading

from vtdx.observe.qmp.server import QmpServer


class QmpServerThread:
    """Run ``server`` on its own thread (see the module docstring)."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="vtdx-qmp", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        # Connections accepted while closing never registered: cancel whatever is left.
        pending = asyncio.all_tasks(self._loop)
        for t in pending:
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> QmpServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
