"""The public pytest harness for testing a kernel on vtdx: the plugin, the VM handle and the
guest agent.

Imports: ``vtdx.session`` and below.
"""
