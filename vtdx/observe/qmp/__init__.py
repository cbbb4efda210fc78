"""vtdx's QMP endpoint, so QEMU's own tools (qemu.qmp, qmp-shell) and ``vtdx console`` can
look inside a running module; and the clients vtdx itself uses.

By job, lowest first:

* ``errors``: ``QmpError``, what a command raises (description and QMP error class).
* ``framing``: the input stream cut into JSON messages, with size and nesting limits.
* ``schema``: ``Arg`` and ``Command``, one table entry per command.
* ``events``: event messages and their per-name rate limit.
* ``server``: ``QmpServer`` (socket, command table, broadcast) and its ``Connection``.
* ``thread``: ``QmpServerThread``, the server on a thread of its own (for the daemon).
* ``qemu``: ``QemuControl``, stop/cont/query-status/quit forwarded to QEMU (async client).
* ``commands``: the vtdx command table over an ``Inspector``.
* ``endpoint``: ``InspectEndpoint`` and ``start_inspect``, what the daemon runs.
* ``client``: ``VtdxClient``, the synchronous client with typed queries.

Answer types, the socket name and event names are in ``vtdx.observe.answers``.
"""
