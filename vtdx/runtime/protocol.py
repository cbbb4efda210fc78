"""The vtdx wire protocol between the QEMU plugin and the daemon (Python side).

Fixed-size little-endian frames over one Unix stream socket per vCPU; docs/protocol.md
describes them and qemu_plugin/wire.h is the C side (tests/test_transport.py checks that
both agree). Fixed sizes let the daemon's per-vCPU loop read a frame with one
``recv_into`` into a preallocated buffer and decode it with one ``struct.unpack_from``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from vtdx.abi.regs import REG_NAMES, Regs

MAGIC = 0x58445456  # "VTDX"
VERSION = 1
#: vCPU index of the control connection the plugin opens at load time to fetch the profile.
CONTROL_VCPU = 0xFFFF_FFFF
NREGS = len(REG_NAMES)


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    CALL = 3
    RET = 4
    ECHO = 5
    ECHO_RET = 6


class Welcome(IntEnum):
    OK = 0
    BAD_VERSION = 1
    BAD_VCPU = 2


class Result(IntEnum):
    """How the plugin finishes the SEAMCALL instruction."""

    VMSUCCEED = 0  # registers written back, CF=PF=AF=ZF=SF=OF=0
    VMFAILINVALID = 1  # registers untouched, CF=1 (no SEAM module)


class RowType(IntEnum):
    CPUID = 1
    MSR = 2
    FEATURE = 3


class MsrWrite(IntEnum):
    """What WRMSR to a profile MSR does."""

    IGNORE = 0
    STORE = 1
    GP = 2


class Feature(IntEnum):
    SEAM = 1  # a TDX module is loaded
    VMX = 2  # emulate CR4.VMXE, VMXON, VMXOFF
    MOVDIR64B = 3  # emulate MOVDIR64B
    PHYS_BITS = 4  # MAXPHYADDR for VMXON's pointer check


class CpuidReg(IntEnum):
    EAX = 0
    EBX = 1
    ECX = 2
    EDX = 3


HELLO = struct.Struct("<IHHIIIIQ")
WELCOME = struct.Struct("<IHHIIIIQ")
ROW = struct.Struct("<HHIIIQQ")
CALL = struct.Struct(f"<IIQ{NREGS}QQQQQ")
RET = struct.Struct(f"<IIQ{NREGS}Q")

assert (HELLO.size, WELCOME.size, ROW.size, CALL.size, RET.size) == (32, 32, 32, 160, 128)

ANY_SUBLEAF = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Row:
    """One platform-profile row (see vtdx.runtime.platform_rows for what rows mean)."""

    type: RowType
    a: int
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return ROW.pack(self.type, self.flags, self.a, self.b, self.c, self.d, self.e)

    @classmethod
    def unpack(cls, data: bytes) -> Row:
        t, flags, a, b, c, d, e = ROW.unpack(data)
        return cls(RowType(t), a, b, c, d, e, flags)


@dataclass(frozen=True, slots=True)
class Hello:
    vcpu: int
    nvcpus: int
    pid: int = 0
    version: int = VERSION
    magic: int = MAGIC
    flags: int = 0

    def pack(self) -> bytes:
        return HELLO.pack(self.magic, self.version, Kind.HELLO, self.vcpu, self.nvcpus,
                          self.flags, 0, self.pid)

    @classmethod
    def unpack(cls, data: bytes) -> Hello:
        magic, version, kind, vcpu, nvcpus, flags, _, pid = HELLO.unpack(data)
        if kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO, got frame kind {kind}")
        return cls(vcpu, nvcpus, pid, version, magic, flags)


def pack_welcome(status: Welcome, rows: list[Row] | tuple[Row, ...] = ()) -> bytes:
    head = WELCOME.pack(MAGIC, VERSION, Kind.WELCOME, status, len(rows), ROW.size, 0, 0)
    return head + b"".join(r.pack() for r in rows)


@dataclass(slots=True)
class Call:
    """One SEAMCALL as the plugin sends it (the caller's context rides along)."""

    vcpu: int
    seq: int
    regs: Regs
    rflags: int = 0
    rip: int = 0
    rsp: int = 0
    cr3: int = 0
    kind: Kind = Kind.CALL

    def pack(self) -> bytes:
        return CALL.pack(self.kind, self.vcpu, self.seq, *self.regs.as_tuple(), self.rflags,
                         self.rip, self.rsp, self.cr3)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Call:
        v = CALL.unpack_from(data)
        rflags, rip, rsp, cr3 = v[3 + NREGS:]
        return cls(v[1], v[2], Regs(*v[3:3 + NREGS]), rflags, rip, rsp, cr3, Kind(v[0]))


def pack_ret(seq: int, regs: Regs, result: Result = Result.VMSUCCEED,
             kind: Kind = Kind.RET) -> bytes:
    return RET.pack(kind, result, seq, *regs.as_tuple())


def unpack_ret(data: bytes) -> tuple[Kind, Result, int, Regs]:
    v = RET.unpack(data)
    return Kind(v[0]), Result(v[1]), v[2], Regs(*v[3:])


class ProtocolError(Exception):
    """A peer sent a frame that breaks the protocol; the connection is closed."""
