"""Looking inside a running module: queries (``inspect``) and their answer types
(``answers``), the SEAMCALL trace and its symbolisation (``trace``, ``symbols``), the QMP
endpoint, its commands and clients (``qmp/``), the interactive console (``console/``).

Imports: ``vtdx.module`` and below. Never ``vtdx.host``, ``vtdx.session`` or higher.
"""
