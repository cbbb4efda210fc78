"""``vtdx console RUN_DIR``: short commands over the daemon's QMP socket, readable tables.

* ``format``: each QMP answer as text (pure functions of the ``answers`` types).
* ``commands``: the command table: words -> one QMP request, answer -> text.
* ``script``: ``-c "cmd; cmd"``, synchronous, for scripts.
* ``interactive``: the aioconsole CLI with readline, history, completion and events.
"""
