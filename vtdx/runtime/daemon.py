"""The vtdx daemon: serves SEAMCALLs from the QEMU plugin to a backend (the TDX module).

The sockets, handshake and per-vCPU threads are vtdx.runtime.transport; this module picks the
backend (module, the test ``EchoBackend``, or none), hands the platform profile's facade
rows to the transport and records each vCPU's caller context. Backends are called from
several vCPU threads at once (``TdxModule`` is thread-safe).

Run standalone (``python -m vtdx.runtime.daemon`` / ``vtdx daemon``) when the daemon must be a
separate process, e.g. to test what the guest sees when the daemon dies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from vtdx.abi.regs import MASK64, REG_NAMES, Regs
from vtdx.abi.status import TDX_OPERAND_INVALID
from vtdx.errors import VtdxError
from vtdx.module.timing import Overlap
from vtdx.platform.memory import GuestRam, PhysAddrError, PhysMemory
from vtdx.platform.profile import Profile
from vtdx.runtime.platform_rows import platform_rows
from vtdx.runtime.protocol import Result
from vtdx.runtime.transport import Server
from vtdx.units import parse_size

log = logging.getLogger(__name__)



class Backend(Protocol):
    """What serves SEAMCALLs: ``vtdx.module.TdxModule`` or the test ``EchoBackend``."""

    def seamcall(self, lp: int, regs: Regs) -> Regs: ...


# --------------------------------------------------------------------------- echo backend

#: Test leaves (outside the TDX leaf space) the freestanding test guest uses.
ECHO_LEAF_ROTATE = 0xE000
ECHO_LEAF_MEMORY = 0xE001
_ROTATED = REG_NAMES[1:]  # every register but RAX, in Regs field order
_rotated_values = attrgetter(*_ROTATED)


def rotl64(x: int, n: int = 1) -> int:
    return ((x << n) | (x >> (64 - n))) & MASK64


class EchoBackend:
    """Transport/plugin test backend with a contract the test guest checks.

    RAX 0xE000: RAX=0 and every other register out = rotl64(in, 1) ^ (lp << 56), so a
    result proves which vCPU's registers made the round trip. RAX 0xE001: RDX = qword at
    guest PA RCX, then the qword R8 is written at PA R9, RAX=0 (guest RAM seen from both
    sides). Any other RAX goes to ``delegate`` (the real module) or gets
    TDX_OPERAND_INVALID. A PA outside RAM gives TDX_OPERAND_INVALID | operand id.
    """

    def __init__(self, memory: PhysMemory | None = None, delegate: Backend | None = None) -> None:
        self.memory = memory
        self.delegate = delegate

    def seamcall(self, lp: int, regs: Regs) -> Regs:
        if regs.rax == ECHO_LEAF_ROTATE:
            tag = (lp << 56) & MASK64
            return Regs(0, *[(((x << 1) | (x >> 63)) & MASK64) ^ tag
                             for x in _rotated_values(regs)])
        if regs.rax == ECHO_LEAF_MEMORY and self.memory is not None:
            try:
                value = int.from_bytes(self.memory.read(regs.rcx, 8), "little")
            except PhysAddrError:
                return regs.copy(rax=TDX_OPERAND_INVALID | 1)  # operand id 1: RCX
            try:
                self.memory.write(regs.r9, regs.r8.to_bytes(8, "little"))
            except PhysAddrError:
                return regs.copy(rax=TDX_OPERAND_INVALID | 9)  # operand id 9: R9
            return regs.copy(rax=0, rdx=value)
        if self.delegate is not None:
            return self.delegate.seamcall(lp, regs)
        return regs.copy(rax=TDX_OPERAND_INVALID)


# --------------------------------------------------------------------------- daemon


def overlap_by_default(backend: object) -> None:
    """A module served to a live guest overlaps calls of different LPs as hardware does
    (``vtdx.module.timing.Overlap``), unless its timing was chosen already (serial runs)."""
    module = getattr(backend, "delegate", backend)
    control = getattr(module, "control", None)
    if control is not None and getattr(control, "timing", "") is None:
        control.set_timing(Overlap())


class Daemon:
    """The transport server (vtdx.runtime.transport) wired to a backend and a platform profile.

    ``backend=None`` models a platform with no TDX module: the plugin is told so in the
    profile and SEAMCALL ends in VMfailInvalid without reaching the daemon.

    ``Daemon.pending`` listens before the backend exists, so that QEMU can start while the
    module model is imported and built (~40 ms of every `vtdx run`); ``attach`` hands it over
    and the vCPUs' SEAMCALLs are served from then on.
    """

    def __init__(self, socket_path: str | Path, profile: Profile,
                 backend: Backend | None) -> None:
        self._init(socket_path, profile, seam_module=backend is not None)
        self.attach(backend)

    @classmethod
    def pending(cls, socket_path: str | Path, profile: Profile, *,
                seam_module: bool) -> Daemon:
        """A daemon whose backend comes later (``attach``); ``seam_module`` says now
        whether there will be one, since the facade rows the plugin gets at start-up tell
        the guest whether SEAM exists."""
        daemon = cls.__new__(cls)
        daemon._init(socket_path, profile, seam_module=seam_module)
        return daemon

    def _init(self, socket_path: str | Path, profile: Profile, *, seam_module: bool) -> None:
        self.profile = profile
        self.backend: Backend | None = None
        self.seam_module = seam_module
        self.rows = platform_rows(profile, seam_module=seam_module)
        #: Last caller context per vCPU: (rflags, rip, rsp, cr3), for symbolising callers.
        self.callers: dict[int, tuple[int, ...]] = {}
        self.server = Server(socket_path, profile.num_lps, self.rows, self._call,
                             serving=False)
        self._errors = self.server.errors

    def attach(self, backend: Backend | None) -> None:
        """Serve SEAMCALLs from ``backend`` (None only for a daemon made without SEAM)."""
        if (backend is not None) != self.seam_module:
            raise VtdxError("the backend does not match the platform rows already sent: "
                            f"SEAM module {'expected' if self.seam_module else 'absent'}")
        overlap_by_default(backend)
        self.backend = backend
        self.server.serve()

    @property
    def socket_path(self) -> Path:
        return self.server.socket_path

    @property
    def calls(self) -> list[int]:
        """SEAMCALLs served per vCPU."""
        return self.server.calls

    @property
    def errors(self) -> list[str]:
        """Protocol and backend problems, one line each."""
        return self.server.errors

    def _call(self, vcpu: int, regs_in: tuple[int, ...],
              caller: tuple[int, ...]) -> tuple[Result, tuple[int, ...]]:
        self.callers[vcpu] = caller
        backend = self.backend
        if backend is None:
            return Result.VMFAILINVALID, regs_in
        try:
            return Result.VMSUCCEED, backend.seamcall(vcpu, Regs(*regs_in)).as_tuple()
        except Exception as e:  # noqa: BLE001 - a backend bug must not kill the vCPU thread
            log.exception("backend failed on vCPU %d", vcpu)
            self._errors.append(f"backend raised {type(e).__name__}: {e}")
            return Result.VMFAILINVALID, regs_in

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------- backends by name

BACKENDS = ("echo", "module", "echo+module", "none")


def make_backend(name: str, profile: Profile, memory: PhysMemory) -> Backend | None:
    """``echo`` (test leaves only), ``module`` (TdxModule), ``echo+module`` (test leaves,
    everything else to the module), ``none`` (no TDX module: VMfailInvalid)."""
    if name == "none":
        return None
    if name == "echo":
        return EchoBackend(memory)
    if name not in BACKENDS:
        raise VtdxError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")

    from vtdx.module import TdxModule  # the model loads while QEMU starts (Machine)

    module = TdxModule(profile, memory)
    return module if name == "module" else EchoBackend(memory, module)


# --------------------------------------------------------------------------- standalone

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vtdx-daemon", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="Unix socket the plugin connects to")
    p.add_argument("--ram", required=True, help="guest RAM file (memory-backend-file mem-path)")
    p.add_argument("--smp", type=int, required=True, help="number of vCPUs")
    p.add_argument("--mem", required=True, help="guest RAM size: bytes, or e.g. 2G (QEMU's -m)")
    p.add_argument("--backend", choices=BACKENDS, default="module")


async def serve(args: argparse.Namespace, ready: Callable[[], None] | None = None) -> None:
    """Run a daemon until SIGTERM/SIGINT/SIGHUP (prints ``ready`` once listening); the socket
    is removed and the RAM file unmapped on the way out."""

    profile = Profile.from_vm(args.smp, parse_size(args.mem))
    ram = GuestRam(args.ram, profile.ram)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Daemon(args.socket, profile, make_backend(args.backend, profile, ram)):
            print("vtdx-daemon: ready", flush=True)
            if ready:
                ready()
            await stop.wait()
    finally:
        ram.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        asyncio.run(serve(args))
    except VtdxError as e:
        print(f"vtdx-daemon: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
