"""Wire protocol, platform facade, daemon and guest-RAM mapping, over real Unix sockets.

The clients here are plain blocking sockets speaking the frames of docs/protocol.md, like
the plugin does; the C side's layout is checked by compiling qemu_plugin/wire.h.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from vtdx.abi.regs import MASK64, Regs
from vtdx.abi.status import TDX_OPERAND_INVALID
from vtdx.errors import VtdxError
from vtdx.platform.memory import GuestRam, PhysAddrError, SparseMemory
from vtdx.platform.profile import PROFILES, GiB, MiB, Profile, q35_ram_layout
from vtdx.resources import asset
from vtdx.runtime import platform_rows as facade
from vtdx.runtime import protocol
from vtdx.runtime.daemon import Daemon, EchoBackend, rotl64
from vtdx.runtime.protocol import (
    CALL,
    CONTROL_VCPU,
    RET,
    ROW,
    WELCOME,
    Call,
    Hello,
    Kind,
    Result,
    Row,
    RowType,
    Welcome,
    unpack_ret,
)

# --------------------------------------------------------------------------- C and Python agree

C_LAYOUT = r"""
#include <stddef.h>
#include <stdio.h>
#include "wire.h"
#define P(x) printf(#x " %lu\n", (unsigned long)(x))
int main(void) {
    P(sizeof(struct vtdx_hello)); P(sizeof(struct vtdx_welcome)); P(sizeof(struct vtdx_row));
    P(sizeof(struct vtdx_call)); P(sizeof(struct vtdx_ret));
    P(offsetof(struct vtdx_call, regs)); P(offsetof(struct vtdx_call, rflags));
    P(offsetof(struct vtdx_call, cr3)); P(offsetof(struct vtdx_ret, regs));
    P(offsetof(struct vtdx_row, d)); P(VTDX_MAGIC); P(VTDX_PROTO_VERSION); P(VTDX_CALL);
    P(VTDX_RET); P(VTDX_ECHO); P(VTDX_ECHO_RET); P(VTDX_F_SEAM); P(VTDX_F_MOVDIR64B);
    P(VTDX_MSR_GP); P(VTDX_VMFAILINVALID); P(VTDX_CONTROL_VCPU);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_wire_layout_matches_python(tmp_path: Path) -> None:
    src = tmp_path / "layout.c"
    src.write_text(C_LAYOUT)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(asset("qemu_plugin")), "-o", str(exe), str(src)],
                   check=True)
    got = dict(line.rsplit(" ", 1) for line in subprocess.check_output([exe], text=True)
               .splitlines())
    got = {k: int(v) for k, v in got.items()}
    assert got["sizeof(struct vtdx_hello)"] == protocol.HELLO.size
    assert got["sizeof(struct vtdx_welcome)"] == WELCOME.size
    assert got["sizeof(struct vtdx_row)"] == ROW.size
    assert got["sizeof(struct vtdx_call)"] == CALL.size
    assert got["sizeof(struct vtdx_ret)"] == RET.size
    assert got["offsetof(struct vtdx_call, regs)"] == 16
    assert got["offsetof(struct vtdx_call, rflags)"] == 16 + 8 * protocol.NREGS
    assert got["offsetof(struct vtdx_call, cr3)"] == CALL.size - 8
    assert got["offsetof(struct vtdx_ret, regs)"] == 16
    assert got["offsetof(struct vtdx_row, d)"] == 16
    assert got["VTDX_MAGIC"] == protocol.MAGIC
    assert got["VTDX_PROTO_VERSION"] == protocol.VERSION
    assert (got["VTDX_CALL"], got["VTDX_RET"]) == (Kind.CALL, Kind.RET)
    assert (got["VTDX_ECHO"], got["VTDX_ECHO_RET"]) == (Kind.ECHO, Kind.ECHO_RET)
    assert got["VTDX_F_SEAM"] == protocol.Feature.SEAM
    assert got["VTDX_F_MOVDIR64B"] == protocol.Feature.MOVDIR64B
    assert got["VTDX_MSR_GP"] == protocol.MsrWrite.GP
    assert got["VTDX_VMFAILINVALID"] == Result.VMFAILINVALID
    assert got["VTDX_CONTROL_VCPU"] == CONTROL_VCPU


def test_frames_round_trip() -> None:
    regs = Regs(*[random.getrandbits(64) for _ in range(14)])
    call = Call(3, 77, regs, rflags=0x46, rip=0xFFFFFFFF81000000, rsp=0x1000, cr3=0x2000)
    assert len(call.pack()) == CALL.size
    assert Call.unpack(call.pack()) == call
    row = Row(RowType.MSR, 0x87, d=(16 << 32) | 15, flags=protocol.MsrWrite.GP)
    assert Row.unpack(row.pack()) == row
    kind, result, seq, out = unpack_ret(protocol.pack_ret(9, regs, Result.VMFAILINVALID))
    assert (kind, result, seq, out) == (Kind.RET, Result.VMFAILINVALID, 9, regs)


# --------------------------------------------------------------------------- facade


def _rows(p: Profile, **kw: bool) -> list[Row]:
    return facade.platform_rows(p, **kw)


def _msr(rows: list[Row], index: int) -> int:
    (row,) = [r for r in rows if r.type == RowType.MSR and r.a == index]
    return row.d


def _feature(rows: list[Row], f: protocol.Feature) -> int:
    (row,) = [r for r in rows if r.type == RowType.FEATURE and r.a == f]
    return row.d


def test_facade_default_profile_has_what_linux_checks() -> None:
    p = Profile.from_vm(4, 2 * GiB)
    rows = _rows(p)
    feat_ctl = _msr(rows, facade.MSR_FEAT_CTL)
    assert feat_ctl & facade.FEAT_CTL_LOCKED and feat_ctl & facade.FEAT_CTL_VMX_OUTSIDE_SMX
    part = _msr(rows, facade.MSR_MKTME_KEYID_PARTITIONING)
    assert (part & 0xFFFFFFFF, part >> 32) == (p.mktme_keyids, p.tdx_keyids)
    # TME capability/activate agree with the keyid split: all keyids fit in keyid_bits.
    act = _msr(rows, facade.MSR_TME_ACTIVATE)
    assert act & 3 == 3 and (act >> 32) & 0xF == p.keyid_bits
    assert p.mktme_keyids + p.tdx_keyids <= (1 << ((act >> 32) & 0xF)) - 1
    cap = _msr(rows, facade.MSR_TME_CAPABILITY)
    assert (cap >> 32) & 0xF == p.keyid_bits
    basic = _msr(rows, facade.MSR_VMX_BASIC)
    assert basic & 0x7FFFFFFF == facade.VMCS_REVISION and (basic >> 32) & 0x1FFF == 0x1000
    assert (basic >> 50) & 0xF == 6 and not basic & (1 << 48)
    cpuid = [r for r in rows if r.type == RowType.CPUID]
    leaf1_ecx = [r for r in cpuid if r.a == 1 and r.c == protocol.CpuidReg.ECX][0]
    assert leaf1_ecx.d & facade.CPUID1_ECX_VMX and leaf1_ecx.d & facade.CPUID1_ECX_XSAVE
    assert [r for r in cpuid if r.a == 1 and r.c == protocol.CpuidReg.EDX][0].d & (1 << 27)
    leaf7 = [r for r in cpuid if r.a == 7][0]
    assert leaf7.d & facade.CPUID7_ECX_MOVDIR64B and not leaf7.e & facade.CPUID7_ECX_MOVDIR64B
    assert _feature(rows, protocol.Feature.SEAM) == 1
    assert _feature(rows, protocol.Feature.MOVDIR64B) == 1
    # Every MSR the facade provides is read-only (#GP on write), as on hardware.
    assert all(r.flags == protocol.MsrWrite.GP for r in rows if r.type == RowType.MSR)


def _kvm_root_zap_reaches(maxphyaddr: int, gpa: int) -> bool:
    """Whether KVM's VM-destruction zap of a 4-level TDP root visits the PML4 entry of ``gpa``.

    tdp_mmu_zap_root (arch/x86/kvm/mmu/tdp_mmu.c) walks a root with
    for_each_tdp_pte_min_level_all (mmu/tdp_iter.h): GFNs upward from 0 while below
    tdp_mmu_max_gfn_exclusive() = kvm_mmu_max_gfn() + 1 = 2^(MAXPHYADDR - 12) (mmu.h), with
    MAXPHYADDR the raw CPUID 0x80000008 EAX[7:0] (kvm_get_host_maxphyaddr, mmu/spte.c). A PML4
    entry (512 GiB) is visited, and the page tables under it freed, if its first GFN is
    below that bound.
    """
    first_gfn = (gpa >> 39) << (39 - 12)
    return first_gfn < 1 << (maxphyaddr - 12)


@pytest.mark.parametrize("name", list(PROFILES))
def test_facade_maxphyaddr_lets_kvm_free_a_tds_shared_ept(name: str) -> None:
    """A GPAW-48 TD's shared GPAs carry bit 47 (TDX_SHARED_BIT_PWL_4, arch/x86/kvm/vmx/tdx.c),
    so KVM maps them under PML4 entry 256 of the TD's direct root. With the CPUID MAXPHYADDR
    below 48 KVM's root zap stops short of that entry, the shared EPT's page tables stay
    counted and KVM_PROVE_MMU warns at kvm_mmu_uninit_tdp_mmu. TDX platforms report 52
    (TME-MT, hence TDX, needs the CPU's full address width); Linux keeps 52 - keyid bits."""
    p = Profile.named(name, 2, 2 * GiB)
    rows = _rows(p)
    (leaf,) = [r for r in rows if r.type == RowType.CPUID and r.a == 0x8000_0008
               and r.c == protocol.CpuidReg.EAX]
    assert leaf.e & 0xFF == 0xFF  # the row replaces MAXPHYADDR, whatever TCG's CPU says
    maxpa = leaf.d & 0xFF
    shared_bit = 1 << 47
    assert _kvm_root_zap_reaches(maxpa, shared_bit), f"MAXPHYADDR {maxpa}"
    assert maxpa == _feature(rows, protocol.Feature.PHYS_BITS) == 52
    assert not _kvm_root_zap_reaches(47, shared_bit)  # the bound the old 46-bit platform missed
    assert maxpa - p.keyid_bits == p.hkid_start_bit == 46


def test_facade_cpu_is_not_l1tf_affected() -> None:
    """Linux marks a CPU without IA32_ARCH_CAPABILITIES.RDCL_NO (or a whitelisted model) as
    Meltdown and L1TF affected (cpu_set_bug_bits, arch/x86/kernel/cpu/common.c); kvm then
    warns in kvm_mmu_reset_all_pte_masks (mmu/spte.c) for a 52-bit CPU. TDX-capable Xeons
    report RDCL_NO, so the facade does: CPUID.7.0:EDX[29] and the read-only MSR."""
    rows = _rows(Profile.from_vm(2, 2 * GiB))
    (edx,) = [r for r in rows if r.type == RowType.CPUID and r.a == 7 and r.b == 0
              and r.c == protocol.CpuidReg.EDX]
    assert edx.d & facade.CPUID7_EDX_ARCH_CAPABILITIES and not edx.e
    assert _msr(rows, facade.MSR_ARCH_CAPABILITIES) & facade.ARCH_CAP_RDCL_NO


def test_facade_expresses_platforms_linux_must_refuse() -> None:
    p = Profile.from_vm(2, 2 * GiB, movdir64b=False, tdx_keyids=1)
    rows = _rows(p, seam_module=False)
    leaf7 = [r for r in rows if r.type == RowType.CPUID and r.a == 7][0]
    assert leaf7.e & facade.CPUID7_ECX_MOVDIR64B and not leaf7.d & facade.CPUID7_ECX_MOVDIR64B
    assert _feature(rows, protocol.Feature.MOVDIR64B) == 0
    assert _msr(rows, facade.MSR_MKTME_KEYID_PARTITIONING) >> 32 == 1
    assert _feature(rows, protocol.Feature.SEAM) == 0


# --------------------------------------------------------------------------- echo backend


def test_echo_backend_contract() -> None:
    # Status and operand ids as the TDX module builds them (intel/tdx-module:
    # include/auto_gen/tdx_error_codes_defs.h TDX_OPERAND_INVALID; api_error_with_operand_id
    # with OPERAND_ID_RCX = 1, OPERAND_ID_R9 = 9).
    mem = SparseMemory(q35_ram_layout(512 * MiB))
    b = EchoBackend(mem)
    regs = Regs(0xE000, *[random.getrandbits(64) for _ in range(13)])
    out = b.seamcall(5, regs)
    assert out.rax == 0
    for name in ("rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r15"):
        assert getattr(out, name) == rotl64(getattr(regs, name)) ^ (5 << 56)
    mem.write(0x1000, (0x1122334455667788).to_bytes(8, "little"))
    out = b.seamcall(0, Regs(rax=0xE001, rcx=0x1000, r8=0xABCDEF, r9=0x2000))
    assert (out.rax, out.rdx) == (0, 0x1122334455667788)
    assert mem.read(0x2000, 8) == (0xABCDEF).to_bytes(8, "little")
    out = b.seamcall(0, Regs(rax=0xE001, rcx=1 << 40, r9=0x2000))
    assert out.rax == TDX_OPERAND_INVALID | 1
    out = b.seamcall(0, Regs(rax=0xE001, rcx=0x1000, r9=(1 << 40)))
    assert out.rax == TDX_OPERAND_INVALID | 9
    assert b.seamcall(0, Regs(rax=0x21)).rax == TDX_OPERAND_INVALID


# --------------------------------------------------------------------------- daemon


def _hello(path: Path, vcpu: int, nvcpus: int, **kw: int) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(Hello(vcpu, nvcpus, os.getpid(), **kw).pack())
    return s, _recv(s, WELCOME.size)


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


def _call(s: socket.socket, vcpu: int, seq: int, regs: Regs,
          kind: Kind = Kind.CALL) -> tuple[Kind, Result, int, Regs]:
    s.sendall(Call(vcpu, seq, regs, kind=kind).pack())
    return unpack_ret(_recv(s, RET.size))


class _Running:
    """A daemon on its own event loop thread, as the plugin sees it from outside."""

    def __init__(self, path: Path, profile: Profile, backend: object,
                 pending: bool = False) -> None:
        """``pending``: listen with no backend yet (``Daemon.pending``); ``attach`` it."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = Daemon.pending(path, profile, seam_module=backend is not None) \
            if pending else Daemon(path, profile, backend)  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(10)

    def attach(self, backend: object) -> None:
        async def attach() -> None:  # on the daemon's loop, as Machine does
            self.daemon.attach(backend)  # type: ignore[arg-type]

        asyncio.run_coroutine_threadsafe(attach(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.close(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "vtdx.sock"


def test_handshake_profile_and_rejections(sock_path: Path) -> None:
    p = Profile.from_vm(2, 512 * MiB)
    d = _Running(sock_path, p, EchoBackend())
    try:
        s, head = _hello(sock_path, CONTROL_VCPU, 2)
        magic, _, kind, status, nrows, row_size, *_ = WELCOME.unpack(head)
        assert (magic, kind, status, row_size) == (protocol.MAGIC, Kind.WELCOME, Welcome.OK,
                                                   ROW.size)
        rows = [Row.unpack(_recv(s, ROW.size)) for _ in range(nrows)]
        assert rows == facade.platform_rows(p)
        s.close()
        s, head = _hello(sock_path, 0, 2, version=protocol.VERSION + 1)
        assert WELCOME.unpack(head)[3] == Welcome.BAD_VERSION
        s.close()
        s, head = _hello(sock_path, 2, 2)  # only LPs 0 and 1 exist
        assert WELCOME.unpack(head)[3] == Welcome.BAD_VCPU
        s.close()
        assert len(d.daemon.errors) == 2
    finally:
        d.close()


def test_concurrent_vcpus_round_trip(sock_path: Path) -> None:
    nvcpus, calls = 4, 300
    d = _Running(sock_path, Profile.from_vm(nvcpus, 512 * MiB), EchoBackend())
    failures: list[str] = []

    def vcpu(i: int) -> None:
        s, head = _hello(sock_path, i, nvcpus)
        assert WELCOME.unpack(head)[3] == Welcome.OK
        rng = random.Random(i)
        for seq in range(1, calls + 1):
            regs = Regs(0xE000, *[rng.getrandbits(64) for _ in range(13)])
            kind, result, rseq, out = _call(s, i, seq, regs)
            want = [rotl64(x) ^ (i << 56) for x in regs.as_tuple()[1:]]
            if (kind, result, rseq, out.rax, list(out.as_tuple()[1:])) != \
                    (Kind.RET, Result.VMSUCCEED, seq, 0, want):
                failures.append(f"vcpu {i} call {seq}: {out}")
        kind, _, _, out = _call(s, i, calls + 1, Regs(rax=7, rcx=8), kind=Kind.ECHO)
        if (kind, out) != (Kind.ECHO_RET, Regs(rax=7, rcx=8)):
            failures.append(f"vcpu {i}: echo answered {kind} {out}")
        s.close()

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(nvcpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not failures
        assert d.daemon.calls == [calls] * nvcpus
    finally:
        d.close()


class _GatedBackend:
    """Holds LP 0's call until released: a paused SEAMCALL must not stall other vCPUs."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def seamcall(self, lp: int, regs: Regs) -> Regs:
        if lp == 0:
            self.entered.set()
            self.release.wait(20)
        return regs.copy(rax=lp)


def test_one_paused_vcpu_does_not_stall_the_others(sock_path: Path) -> None:
    backend = _GatedBackend()
    d = _Running(sock_path, Profile.from_vm(2, 512 * MiB), backend)
    try:
        s0, _ = _hello(sock_path, 0, 2)
        s1, _ = _hello(sock_path, 1, 2)
        s0.sendall(Call(0, 1, Regs(rax=0x100)).pack())
        assert backend.entered.wait(10)
        for seq in range(1, 50):
            assert _call(s1, 1, seq, Regs())[3].rax == 1
        backend.release.set()
        assert unpack_ret(_recv(s0, RET.size))[3].rax == 0
        s0.close()
        s1.close()
    finally:
        backend.release.set()
        d.close()


class _Broken:
    def seamcall(self, lp: int, regs: Regs) -> Regs:
        raise RuntimeError("model bug")


@pytest.mark.parametrize("backend", [None, _Broken()], ids=["no-module", "backend-raises"])
def test_failures_answer_vmfailinvalid(sock_path: Path, backend: object) -> None:
    d = _Running(sock_path, Profile.from_vm(1, 512 * MiB), backend)
    try:
        s, _ = _hello(sock_path, 0, 1)
        regs = Regs(rax=0x21, rcx=5)
        kind, result, seq, out = _call(s, 0, 1, regs)
        assert (kind, result, seq, out) == (Kind.RET, Result.VMFAILINVALID, 1, regs)
        s.close()
        assert bool(d.daemon.errors) == (backend is not None)
    finally:
        d.close()


def test_pending_daemon_welcomes_qemu_and_serves_once_the_backend_is_attached(
        sock_path: Path) -> None:
    """Machine starts QEMU before it builds the module (vtdx/runtime/daemon.py,
    ``Daemon.pending``): the control connection gets its rows and a vCPU its WELCOME at once,
    and a SEAMCALL sent before ``attach`` is answered, by that backend, right after it."""
    p = Profile.from_vm(2, 512 * MiB)
    d = _Running(sock_path, p, EchoBackend(), pending=True)
    try:
        s, head = _hello(sock_path, CONTROL_VCPU, 2)
        nrows = WELCOME.unpack(head)[4]
        assert [Row.unpack(_recv(s, ROW.size)) for _ in range(nrows)] == \
            facade.platform_rows(p)
        s.close()
        s, head = _hello(sock_path, 1, 2)
        assert WELCOME.unpack(head)[3] == Welcome.OK
        s.sendall(Call(1, 1, Regs(rax=0xE000, rcx=1)).pack())
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(RET.size)  # nothing serves the vCPU yet
        s.settimeout(10)
        d.attach(EchoBackend())
        kind, result, seq, out = unpack_ret(_recv(s, RET.size))
        assert (kind, result, seq, out.rcx) == (Kind.RET, Result.VMSUCCEED, 1,
                                                rotl64(1) ^ (1 << 56))
        assert d.daemon.calls == [0, 1]
        s.close()
    finally:
        d.close()


def test_pending_daemon_refuses_a_backend_its_rows_did_not_announce(sock_path: Path) -> None:
    d = Daemon.pending(sock_path, Profile.from_vm(1, 512 * MiB), seam_module=False)
    with pytest.raises(VtdxError, match="SEAM module absent"):
        d.attach(EchoBackend())
    d = Daemon.pending(sock_path, Profile.from_vm(1, 512 * MiB), seam_module=True)
    with pytest.raises(VtdxError, match="SEAM module expected"):
        d.attach(None)


def test_closing_a_pending_daemon_drops_its_waiting_vcpus(sock_path: Path) -> None:
    d = _Running(sock_path, Profile.from_vm(1, 512 * MiB), EchoBackend(), pending=True)
    s, head = _hello(sock_path, 0, 1)
    assert WELCOME.unpack(head)[3] == Welcome.OK
    d.close()
    s.settimeout(10)
    assert s.recv(RET.size) == b""  # closed, not served
    assert not sock_path.exists()


def test_close_drops_connections(sock_path: Path) -> None:
    d = _Running(sock_path, Profile.from_vm(1, 512 * MiB), EchoBackend())
    s, _ = _hello(sock_path, 0, 1)
    d.close()
    with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
        s.sendall(Call(0, 1, Regs(rax=0xE000)).pack())
        _recv(s, RET.size)
    assert not sock_path.exists()


def test_unknown_frame_closes_connection(sock_path: Path) -> None:
    d = _Running(sock_path, Profile.from_vm(1, 512 * MiB), EchoBackend())
    try:
        s, _ = _hello(sock_path, 0, 1)
        s.sendall(Call(0, 1, Regs(), kind=Kind.WELCOME).pack())
        with pytest.raises((EOFError, ConnectionResetError)):
            _recv(s, RET.size)
        assert any("unexpected frame" in e for e in d.daemon.errors)
    finally:
        d.close()


# --------------------------------------------------------------------------- guest RAM


def test_guest_ram_maps_q35_layout_above_4g(tmp_path: Path) -> None:
    size = 3 * GiB  # q35: 2 GiB below 4 GiB, 1 GiB from 4 GiB up
    f = tmp_path / "ram"
    with open(f, "wb") as fh:
        fh.truncate(size)
    ram = GuestRam(f, q35_ram_layout(size))
    try:
        ram.write(0x1234000, b"low!")
        ram.write(4 * GiB + 0x5000, b"high")
        with open(f, "rb") as fh:
            fh.seek(0x1234000)
            assert fh.read(4) == b"low!"
            fh.seek(2 * GiB + 0x5000)  # the file holds high RAM right after low RAM
            assert fh.read(4) == b"high"
        assert ram.read(4 * GiB + 0x5000, 4) == b"high"
        assert ram.offset(4 * GiB) == 2 * GiB
        ram.zero(0x1234000, 4)
        assert ram.read(0x1234000, 4) == bytes(4)
        for pa, n in [(2 * GiB, 8), (3 * GiB, 1), (2 * GiB - 4, 8), (5 * GiB, 1)]:
            with pytest.raises(PhysAddrError):
                ram.read(pa, n)
        assert ram.contains(5 * GiB - 8, 8) and not ram.contains(5 * GiB - 4, 8)
    finally:
        ram.close()


def test_guest_ram_rejects_short_file(tmp_path: Path) -> None:
    from vtdx.errors import VtdxError

    f = tmp_path / "ram"
    f.write_bytes(bytes(4096))
    with pytest.raises(VtdxError):
        GuestRam(f, q35_ram_layout(512 * MiB))


def test_rotl64() -> None:
    assert rotl64(1 << 63) == 1
    assert rotl64(MASK64) == MASK64
