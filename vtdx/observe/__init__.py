"""Looking inside a running module: queries, the SEAMCALL trace and its symbolisation, the QMP
endpoint and its commands, the interactive console.

Imports: ``vtdx.module`` and below. Never ``vtdx.host``, ``vtdx.session`` or higher.
"""
