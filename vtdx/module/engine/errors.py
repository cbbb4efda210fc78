"""The engine's own error: guest behaviour it cannot model on unicorn."""

from __future__ import annotations


class EngineUnsupported(Exception):
    """Guest behaviour the engine cannot model faithfully (e.g. an exception
    that needs a privilege change to deliver, a TDCALL leaf not modelled). Never a TDX
    status: the caller decides what the vCPU does next."""
