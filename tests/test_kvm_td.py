"""The kvm-td payload (guest/payloads/kvm-td.c) and its TD guest (guest/tdguest/).

In process: the TD guest image is built and executed on unicorn from the reset vector, in
the state TDH.VP.INIT leaves (tdx-module src/common/data_structures/td_vmcs_init.c,
src/td_vp/tdh_vp_init.c: init_vcpu_gprs_and_registers), with its TDCALLs answered by a
small stand-in for the module and the VMM that follows the ABI the guest relies on
(TDG.VP.INFO, TDG.VM.RD, TDG.MEM.PAGE.ACCEPT, TDG.VP.VMCALL per the GHCI). This proves the
guest's own path (32-bit entry, long mode, its checks and its report layout) without a TD
engine; the whole-stack tests below run the real VMM on the real kernel.

Whole stack (``kernel``): the default Linux 7.3 kernel with ``kvm_intel.tdx=1`` runs the
payload through partial TD lives (``--stop-after``) and checks the SEAMCALLs each KVM ioctl
made (arch/x86/kvm/vmx/tdx.c), with 1 and 2 TD vCPUs, and that teardown leaves no TD.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kvm_cpuid import CPUID_FIELDS
from kvm_tolerated import tolerated_by_kvm

from vtdx.host.payloads import TDGUEST_IMAGE_SIZE, build_tdguest

IMAGE_GPA = (1 << 32) - TDGUEST_IMAGE_SIZE
#: The stand-in's guest physical address width. A TD has 48 or 52; unicorn's CPU model has
#: 40 physical address bits, and a guest page-table entry with the shared bit above them
#: would be reserved-bit #PF. The guest derives the shared bit from TDG.VP.INFO either way.
GPAW = 40
SHARED_BIT = 1 << (GPAW - 1)
CONFIG_MAGIC = 0x4746433154445456
REPORT_MAGIC = 0x5045523154445456
ATTRIBUTES, XFAM = 1 << 28, 0x3
# TDG_* of guest/tdguest/tdguest.h
ACCEPT_GPA = {0: 0x100000, 1: 0x120000}
ACCEPT_PAGES = {0: 16, 1: 4}
SHARED_GPA, SHARED_VA, MMIO_GPA = 0x180000, 0x200000, 0xFEB00000
PORT_CONSOLE, PORT_DOORBELL, PORT_DONE, PORT_CONFIG = 0x3F8, 0x510, 0x511, 0x512
PORT_BENCH = 0x513
DONE_PASS = 0x600D
TDX_PAGE_ALREADY_ACCEPTED = 0xC0000B0A00000000  # tdx-module src/include/tdx_api_defs.h
TDX_OPERAND_INVALID = 0xC000010000000000  # the same file; operand id in bits 31:0


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tdguest(tmp_path_factory.mktemp("tdguest"))


def config_block(nr_vcpus: int, max_vcpus: int, secret: int, cookie: int,
                 bench_exits: int = 0) -> bytes:
    """struct tdg_config."""
    return struct.pack("<QIIQQIIQQ", CONFIG_MAGIC, nr_vcpus, max_vcpus, ATTRIBUTES, XFAM, GPAW,
                       bench_exits, secret, cookie)


REPORT = struct.Struct("<QII" + "Q" * 14)  # struct tdg_report


@dataclass
class FakeTd:
    """The module and VMM as the guest sees them through TDCALL (one vCPU at a time)."""

    nr_vcpus: int
    max_vcpus: int
    secret: int = 0x5EC12E7_0000_0001
    cookie: int = 0xC00C1E_0000_0042
    memory: dict[int, bytearray] = field(default_factory=dict)  # GPA page -> contents
    accepted: set[int] = field(default_factory=set)
    shared: set[int] = field(default_factory=set)
    console: dict[int, str] = field(default_factory=lambda: collections.defaultdict(str))
    calls: collections.Counter = field(default_factory=collections.Counter)
    mmio: int = 0
    report: tuple | None = None
    done: dict[int, int] = field(default_factory=dict)
    fatal: dict[int, int] = field(default_factory=dict)
    vm_rd_override: dict[int, int] = field(default_factory=dict)
    #: TDG.MR.RTMR.EXTEND calls: (index, the 48 bytes) in order.
    rtmr_extends: list[tuple[int, bytes]] = field(default_factory=list)
    bench_exits: int = 0
    bench_marks: list[int] = field(default_factory=list)
    #: The image as the last vCPU left it (its data is private memory every vCPU shares).
    image: bytearray | None = None


def run_vcpu(td: FakeTd, image: bytes, vcpu: int) -> None:
    from unicorn import UC_ARCH_X86, UC_HOOK_INSN_INVALID, UC_MODE_64, Uc
    from unicorn import x86_const as X

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    if td.image is None:
        td.image = bytearray(image)
        td.image[:64] = config_block(td.nr_vcpus, td.max_vcpus, td.secret, td.cookie,
                                     td.bench_exits).ljust(64, b"\0")
    uc.mem_map(IMAGE_GPA, TDGUEST_IMAGE_SIZE)
    uc.mem_write(IMAGE_GPA, bytes(td.image))
    uc.mem_map(0, 0x200000)                      # private RAM (pages become usable on ACCEPT)
    uc.mem_map(SHARED_BIT, 0x200000)             # the VMM's shared view of it
    for page in td.accepted:
        uc.mem_write(page, bytes(td.memory[page]))

    def reg(name: str) -> int:
        return uc.reg_read(getattr(X, f"UC_X86_REG_{name}"))

    def setreg(name: str, v: int) -> None:
        uc.reg_write(getattr(X, f"UC_X86_REG_{name}"), v & (1 << 64) - 1)

    def vmcall() -> None:
        fn, r12, r13, r14, r15 = (reg(n) for n in ("R11", "R12", "R13", "R14", "R15"))
        td.calls[("vmcall", fn)] += 1
        setreg("R10", 0)
        if fn == 30:  # Instruction.IO: R12 size, R13 direction (1 = out), R14 port, R15 data
            if r14 == PORT_CONSOLE:
                td.console[vcpu] += chr(r15 & 0xFF)
            elif r14 == PORT_CONFIG and r13 == 0:
                setreg("R11", CONFIG_MAGIC & 0xFFFFFFFF)
            elif r14 == PORT_DOORBELL:
                raw = bytes(uc.mem_read(SHARED_BIT | SHARED_GPA, REPORT.size))
                td.report = REPORT.unpack(raw)
                ack_at = SHARED_BIT | SHARED_GPA + REPORT.size - 8
                uc.mem_write(ack_at, struct.pack("<Q", ~td.cookie & (1 << 64) - 1))
            elif r14 == PORT_DONE:
                td.done[vcpu] = r15
                if vcpu == 0:  # the others go on to say so to vCPU 0, then spin
                    uc.emu_stop()
            elif r14 == PORT_BENCH:
                td.bench_marks.append(r15)
        elif fn == 10:  # Instruction.CPUID(R12 leaf, R13 subleaf) -> R12..R15
            setreg("R12", 0x23 if r12 == 0 else 0)
            for n in ("R13", "R14", "R15"):
                setreg(n, 0)
        elif fn == 48:  # #VE.RequestMMIO: R12 size, R13 direction (1 = write), R14 GPA
            assert r14 == MMIO_GPA | SHARED_BIT and r12 == 8
            if r13:
                td.mmio = r15
            else:
                setreg("R11", td.mmio)
        elif fn == 0x10001:  # MapGPA(R12 GPA with the shared bit or not, R13 size)
            page = r12 & ~SHARED_BIT
            assert r13 == 4096
            if r12 & SHARED_BIT:
                td.shared.add(page)
                td.accepted.discard(page)
                uc.mem_write(page, bytes(4096))   # the private page is gone
            else:
                td.shared.discard(page)
        elif fn == 0x10003:  # ReportFatalError(R12 error code)
            td.fatal[vcpu] = r12
            uc.emu_stop()
        else:
            setreg("R10", 0x8000000000000003)  # TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED

    def on_invalid(uc_: Uc, _ud: object) -> bool:
        rip = reg("RIP")
        if bytes(uc.mem_read(rip, 4)) != b"\x66\x0f\x01\xcc":
            return False
        leaf = reg("RAX")
        td.calls[leaf] += 1
        status = 0
        if leaf == 0:
            vmcall()
        elif leaf == 1:  # TDG.VP.INFO
            setreg("RCX", GPAW)
            setreg("RDX", ATTRIBUTES)
            setreg("R8", td.max_vcpus << 32 | td.nr_vcpus)
            setreg("R9", vcpu)
        elif leaf == 6:  # TDG.MEM.PAGE.ACCEPT(RCX = GPA | level)
            page = reg("RCX") & ~0xFFF
            assert reg("RCX") & 7 == 0, "4 KB accepts only"
            if page in td.accepted:
                status = TDX_PAGE_ALREADY_ACCEPTED
            else:
                td.accepted.add(page)
                uc.mem_write(page, bytes(4096))
        elif leaf == 2:  # TDG.MR.RTMR.EXTEND(RCX = 64-byte aligned GPA, RDX = index)
            gpa, index = reg("RCX"), reg("RDX")
            assert gpa % 64 == 0
            if index >= 4:
                status = TDX_OPERAND_INVALID | 2   # operand RDX
            else:
                td.rtmr_extends.append((index, bytes(uc.mem_read(gpa, 48))))
        elif leaf == 7:  # TDG.VM.RD(RDX = field id) -> R8
            fields = {0x1110000300000000: ATTRIBUTES, 0x1110000300000001: XFAM,
                      0x1110000200000003: td.max_vcpus}
            fields.update(td.vm_rd_override)
            setreg("R8", fields[reg("RDX")])
        else:
            raise AssertionError(f"unexpected TDCALL leaf {leaf}")
        setreg("RAX", status)
        setreg("RIP", rip + 4)
        return True

    uc.hook_add(UC_HOOK_INSN_INVALID, on_invalid)
    # The state TDH.VP.INIT leaves: leave unicorn's initial long mode the way a CPU does
    # (PG off clears LMA), then CR0 = PE|NE, CR4 = MCE, EFER = SCE|LME|NXE, flat 32-bit.
    setreg("CR4", 0x20)
    setreg("CR0", 0x80000021)
    setreg("CR0", 0x21)
    setreg("CR4", 0x40)
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, 0x901))
    setreg("RBX", 48)
    setreg("RCX", IMAGE_GPA)
    setreg("R8", IMAGE_GPA)
    setreg("RDX", 0x806F8)
    setreg("RSI", vcpu)
    uc.emu_start(0xFFFFFFF0, 0, count=5_000_000)
    td.image = bytearray(uc.mem_read(IMAGE_GPA, TDGUEST_IMAGE_SIZE))
    for page in list(td.accepted):
        td.memory[page] = bytearray(uc.mem_read(page, 4096))


def test_tdguest_image_layout(image: bytes) -> None:
    assert len(image) == TDGUEST_IMAGE_SIZE
    assert image[:4096] == bytes(4096)  # the configuration page, filled in by the VMM
    # The reset vector (last 16 bytes, GPA 0xFFFFFFF0) is a near jmp into the image.
    assert image[-16] == 0xE9
    target = 0xFFFFFFF5 + struct.unpack("<i", image[-15:-11])[0]
    assert IMAGE_GPA + 4096 <= target < (1 << 32) - 16


@pytest.mark.parametrize("nr_vcpus", [1, 2])
def test_tdguest_runs_its_checks_from_the_reset_vector(image: bytes, nr_vcpus: int) -> None:
    td = FakeTd(nr_vcpus=nr_vcpus, max_vcpus=2)
    # One vCPU at a time, vCPU 1 first: vCPU 0 converts memory only once the others have
    # accepted their pages (tdguest/main.c pages_done).
    for vcpu in reversed(range(nr_vcpus)):
        run_vcpu(td, image, vcpu)
    assert td.fatal == {}, td.console
    assert td.done == {v: DONE_PASS for v in range(nr_vcpus)}, td.console
    for vcpu in range(nr_vcpus):
        assert td.console[vcpu].splitlines()[0] == f"vcpu{vcpu}: 64-bit mode"
        assert td.console[vcpu].splitlines()[-1] == f"vcpu{vcpu}: PASS"
    # vCPU 0's report, read by the VMM from the shared page.
    assert td.report is not None
    (magic, vcpu, checks, rcx, r8, info_rcx, info_rdx, info_r8, info_r9, attrs, xfam,
     max_vcpus, accepted, _sum, cookie, mmio, _ack) = td.report
    assert (magic, vcpu, rcx, r8) == (REPORT_MAGIC, 0, IMAGE_GPA, IMAGE_GPA)
    assert checks == 0b10111111110  # INIT_REGS .. SHARED_RW, RTMR (MAP_PRIVATE comes later)
    # Each vCPU extended RTMR[2] once with its 48 bytes (the index-4 call was refused).
    assert td.rtmr_extends == [(2, bytes(i * 3 + 1 for i in range(48)))] * nr_vcpus
    assert (info_rcx, info_rdx, info_r8, info_r9) == (GPAW, ATTRIBUTES, 2 << 32 | nr_vcpus, 0)
    assert (attrs, xfam, max_vcpus, accepted, cookie, mmio) == (
        ATTRIBUTES, XFAM, 2, 16, td.cookie, td.cookie)
    # The private pages hold the guest's pattern; the shared page came back private and
    # accepted again; vCPU 1 only accepted its own pages.
    for v in range(nr_vcpus):
        for p in range(ACCEPT_PAGES[v]):
            page = ACCEPT_GPA[v] + p * 4096
            assert page in td.accepted and td.memory[page] != bytes(4096)
    assert SHARED_GPA in td.accepted and td.shared == set()
    assert td.calls[("vmcall", 0x10001)] == 2  # MapGPA: to shared and back


def test_tdguest_times_td_exit_round_trips_when_asked(image: bytes) -> None:
    # tdg_config.bench_exits: vCPU 0 makes that many TDVMCALL<CPUID> exits between two
    # marks on the bench port, and still passes every check.
    td = FakeTd(nr_vcpus=1, max_vcpus=2, bench_exits=50)
    run_vcpu(td, image, 0)
    assert td.fatal == {} and td.done == {0: DONE_PASS}, td.console
    assert td.calls[("vmcall", 10)] == 50 and td.bench_marks == [1, 2]
    plain = FakeTd(nr_vcpus=1, max_vcpus=2)
    run_vcpu(plain, image, 0)
    assert plain.calls[("vmcall", 10)] == 0 and plain.bench_marks == []


def test_tdguest_reports_a_fatal_error_on_a_wrong_configuration(image: bytes) -> None:
    # TDG.VM.RD's MAX_VCPUS disagrees with the configuration block: check 3 (VM_RD) fails
    # with TDVMCALL<ReportFatalError>, after the guest printed which check it was.
    td = FakeTd(nr_vcpus=1, max_vcpus=2, vm_rd_override={0x1110000200000003: 3})
    run_vcpu(td, image, 0)
    assert td.fatal == {0: 3} and td.done == {}, td.console
    assert "vcpu0: FAIL check 0x3 detail 0x10000000" in td.console[0]


def _run_on_td_engine(image: bytes, nr_vcpus: int) -> dict:
    """The guest on vtdx's TD vCPU engine (vtdx.module.engine) in its sandbox TD, this
    function acting as KVM and the VMM: private EPT violations answered with PAGE.AUG,
    shared ones by mapping a page in KVM's shared EPT (non-present entries carry
    suppress-#VE, as KVM's do), TDVMCALLs as kvm-td.c answers them."""
    # Imported here: the engine (vtdx.module.engine) may not be in this tree yet.
    sandbox = pytest.importorskip("vtdx.testing.td_sandbox",
                                  reason="the TD vCPU engine is not in this tree")
    from vtdx.abi.regs import Regs
    from vtdx.module.engine import TdConfig, TdVcpuEngine
    from vtdx.module.engine.exits import EXIT_EPT_VIOLATION, EXIT_TDCALL, EXIT_TIME_SLICE

    shared_bit = 1 << 47
    out: dict = {"console": collections.defaultdict(str), "done": {}, "map_gpa": [],
                 "report": None, "exits": collections.Counter()}
    with sandbox.temp_host_ram(128 << 20) as ram:
        td = sandbox.SandboxTd(ram, TdConfig(max_vcpus=2, attributes=ATTRIBUTES))
        td.vcpus = nr_vcpus
        td.metadata.update({0x1110000300000000: ATTRIBUTES, 0x1110000300000001: XFAM,
                            0x1110000200000003: 2})
        out["rtmr"] = td.rtmr               # the list TDG.MR.RTMR.EXTEND updates
        cookie = 0xC00C1E_0000_0042
        img = bytearray(image)
        blk = struct.pack("<QIIQQIIQQ", CONFIG_MAGIC, nr_vcpus, 2, ATTRIBUTES, XFAM, 48, 0,
                          0x5EC12E7_0000_0001, cookie)
        img[:len(blk)] = blk
        for off in range(0, TDGUEST_IMAGE_SIZE, 4096):
            td.page_add(IMAGE_GPA + off, bytes(img[off:off + 4096]))
        ept = sandbox.SharedEpt(td)
        ept.map(shared_bit | SHARED_GPA, td.alloc())
        ept.unmap(shared_bit | SHARED_GPA, suppress_ve=True)
        shared: dict[int, int] = {}
        mmio = 0
        for vcpu in reversed(range(nr_vcpus)):  # vCPU 0 waits for the others' pages
            engine = TdVcpuEngine(ram, td, vcpu_index=vcpu, init_rcx=IMAGE_GPA)
            engine.shared_eptp = ept.eptp
            td.engines.add(engine)
            regs = Regs()
            for _ in range(5000):
                ex, regs = engine.enter(regs)
                out["exits"][ex.reason] += 1
                if ex.reason == EXIT_TIME_SLICE:
                    if vcpu in out["done"]:  # past its DONE: it has told vCPU 0, and spins
                        break
                    continue
                if ex.reason == EXIT_EPT_VIOLATION:
                    if ex.gpa & shared_bit:
                        page = ex.gpa & ~shared_bit & ~0xFFF
                        ept.map(ex.gpa & ~0xFFF, shared.setdefault(page, td.alloc()))
                        td.engines.sept_changed("UNBLOCK", ex.gpa)
                    else:
                        td.page_aug(ex.gpa & ~0xFFF)
                    continue
                assert ex.reason == EXIT_TDCALL, ex
                g = ex.gprs
                regs.r10 = 0
                if g["r11"] == 30 and g["r14"] == PORT_CONSOLE:
                    out["console"][vcpu] += chr(g["r15"] & 0xFF)
                elif g["r11"] == 30 and g["r14"] == PORT_CONFIG:
                    regs.r11 = CONFIG_MAGIC & 0xFFFFFFFF
                elif g["r11"] == 30 and g["r14"] == PORT_DOORBELL:
                    hpa = shared[SHARED_GPA]
                    out["report"] = REPORT.unpack(ram.read(hpa, REPORT.size))
                    ram.write_u64(hpa + REPORT.size - 8, ~cookie & (1 << 64) - 1)
                elif g["r11"] == 30 and g["r14"] == PORT_DONE:
                    out["done"][vcpu] = g["r15"]
                    if vcpu == 0:
                        break
                elif g["r11"] == 48:
                    if g["r13"]:
                        mmio = g["r15"]
                    else:
                        regs.r11 = mmio
                elif g["r11"] == 0x10001:
                    gpa = g["r12"]
                    out["map_gpa"].append(gpa)
                    if gpa & shared_bit:  # KVM zaps the private page
                        td.range_block(gpa & ~shared_bit)
                        td.page_remove(gpa & ~shared_bit)
                    else:
                        ept.unmap(gpa | shared_bit)
                        shared.pop(gpa, None)
                else:
                    out["done"][vcpu] = ("fatal", g.get("r12"))
                    break
    return out


@pytest.mark.parametrize("nr_vcpus", [1, 2])
def test_tdguest_on_the_td_engine(image: bytes, nr_vcpus: int) -> None:
    out = _run_on_td_engine(image, nr_vcpus)
    assert out["done"] == {v: DONE_PASS for v in range(nr_vcpus)}, out["console"]
    report = out["report"]
    assert report is not None and report[2] == 0b10111111110 and report[12] == 16
    # Every vCPU extended RTMR[2] with the same 48 bytes (tdg_mr_rtmr_extend.c).
    data = bytes(i * 3 + 1 for i in range(48))
    rtmr2 = bytes(48)
    for _ in range(nr_vcpus):
        rtmr2 = hashlib.sha384(rtmr2 + data).digest()
    assert out["rtmr"] == [bytes(48), bytes(48), rtmr2, bytes(48)]
    assert report[7] == 2 << 32 | nr_vcpus  # TDG.VP.INFO R8: MAX_VCPUS, NUM_VCPUS
    assert out["map_gpa"] == [(1 << 47) | SHARED_GPA, SHARED_GPA]
    # One EPT violation per page accepted (16 + 4 per extra vCPU, the shared page twice)
    # and one for the shared alias.
    assert out["exits"][48] == 16 + 4 * (nr_vcpus - 1) + 2 + 1


# --------------------------------------------------------------------------- whole stack


def test_payload_skips_without_tdx_uapi(tmp_path: Path) -> None:
    from vtdx.host.payloads import build_payloads

    exe = tmp_path / "kvm-td"
    exe.write_bytes(build_payloads(tmp_path)["kvm-td"])  # host headers: no TDX UAPI
    exe.chmod(0o755)
    r = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "ok 1 kvm_td # SKIP" in r.stdout


def _default_kernel():  # noqa: ANN202 (a KernelArtifact or None)
    from vtdx.host import kernel as kernel_build

    return kernel_build.default_kernel(None)


def _boot(append: str = "kvm_intel.tdx=1"):  # noqa: ANN202 (a started Vm)
    from vtdx.harness.vm import BootSpec, Vm

    art = _default_kernel()
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, append=append, smp=2,
                    kernel_src=Path(str(art.info()["path"])))
    return Vm(spec).start()


@pytest.fixture(scope="module")
def tdx_vm():
    vm = _boot()
    try:
        yield vm
    finally:
        vm.stop()


def _unexpected_failures(recs: list[dict]) -> list[dict]:
    """Every failed SEAMCALL except KVM_TDX_GET_CPUID's probes past the module's CPUID
    lookup table (tests/kvm_cpuid.py: exactly the status the table gives; leaf 0 and every
    readable leaf must succeed)."""
    return [r for r in recs if not r["ok"] and not tolerated_by_kvm(r)]


def _callers(recs: list[dict], leaf: str) -> list[str]:
    """The kernel functions on the stacks of ``leaf``'s calls (symbol names only)."""
    return [" ".join(s.split("+")[0] for s in r.get("stack") or [])
            for r in recs if r["name"] == leaf]


STAGES = ["vm", "init-vm", "vcpus", "memory"]
STAGE_TESTS = ["create_vm", "init_vm", "init_vcpus", "guest_memory", "init_mem_region",
               "finalize_vm", "td_run"]


def _life(vm, *args: str, timeout: float = 300):  # noqa: ANN202 (KtapResult, records)
    mark = vm.trace.mark()
    ktap = vm.payload("kvm-td", *args, timeout=timeout)
    return ktap, vm.trace.since(mark)


@pytest.mark.kernel
@pytest.mark.stack
@pytest.mark.parametrize("stop", STAGES)
def test_partial_life_until(tdx_vm, stop: str) -> None:
    """Each stage's ioctls succeed and make the SEAMCALLs arch/x86/kvm/vmx/tdx.c issues for
    them; closing the fds reclaims the TD (no TD left in the module)."""
    ktap, recs = _life(tdx_vm, "--stop-after", stop)
    ktap.assert_ok()
    reached = STAGES.index(stop)
    for i, name in enumerate(STAGE_TESTS):
        assert ktap.case(name).skipped == (i > reached), ktap.describe()
    assert not ktap.case("teardown").skipped
    assert _unexpected_failures(recs) == [], tdx_vm.trace.format(recs)
    names = collections.Counter(r["name"] for r in recs)
    if stop == "vm":
        # KVM_CREATE_VM and KVM_TDX_CAPABILITIES (cached sysinfo) make no SEAMCALL.
        assert recs == [], tdx_vm.trace.format(recs)
        assert ktap.diag["KVM_TDX_CAPABILITIES"] == "ok"
    else:
        # KVM_TDX_INIT_VM: __tdx_td_init, then the TSC offset and multiplier.
        assert names["TDH.MNG.CREATE"] == names["TDH.MNG.INIT"] == 1
        assert names["TDH.MNG.KEY.CONFIG"] == 1 and names["TDH.MNG.ADDCX"] >= 1
        assert all("tdx_vm_ioctl" in c for c in _callers(recs, "TDH.MNG.INIT"))
        tsc = [r for r in recs if r["name"] == "TDH.MNG.RD" and r["ok"]
               and int(r["in"]["rdx"], 16) & ~0x1FFFF != CPUID_FIELDS]
        assert [int(r["in"]["rdx"], 16) for r in tsc] == [0x110000000000000A,
                                                         0x110000000000000B]
        # Teardown: the HKID released and every control page reclaimed.
        assert names["TDH.MNG.VPFLUSHDONE"] == names["TDH.MNG.KEY.FREEID"] == 1
        assert names["TDH.PHYMEM.PAGE.RECLAIM"] >= names["TDH.MNG.ADDCX"] + 1
        assert any("kvm_put_kvm" in c for c in _callers(recs, "TDH.MNG.KEY.FREEID"))
    if reached >= STAGES.index("vcpus"):
        # KVM_TDX_INIT_VCPU: VP.CREATE, ADDCX, INIT (version 1), three VP.WRs; closing the
        # vCPU flushes it.
        assert names["TDH.VP.CREATE"] == names["TDH.VP.INIT"] == names["TDH.VP.FLUSH"] == 1
        assert all("tdx_vcpu_unlocked_ioctl" in c for c in _callers(recs, "TDH.VP.INIT"))
        init = next(r for r in recs if r["name"] == "TDH.VP.INIT")
        assert int(init["in"]["rdx"], 16) == IMAGE_GPA  # the initial RCX: the config block
        assert sorted(int(r["in"]["rdx"], 16) for r in recs if r["name"] == "TDH.VP.WR") == [
            0x2, 0x2016, 0x4000]
        assert ktap.diag["KVM_TDX_INIT_VCPU.0"] == "ok"
    else:
        assert names["TDH.VP.CREATE"] == 0
    if stop == "memory":
        # guest_memfd, memslots and attributes are KVM bookkeeping: no SEAMCALL of their own.
        assert set(names) <= {"TDH.MNG.CREATE", "TDH.MNG.KEY.CONFIG", "TDH.MNG.ADDCX",
                              "TDH.MNG.INIT", "TDH.MNG.RD", "TDH.VP.CREATE", "TDH.VP.ADDCX",
                              "TDH.VP.INIT", "TDH.VP.WR", "TDH.VP.FLUSH",
                              "TDH.MNG.VPFLUSHDONE", "TDH.PHYMEM.CACHE.WB",
                              "TDH.MNG.KEY.FREEID", "TDH.PHYMEM.PAGE.RECLAIM",
                              "TDH.PHYMEM.PAGE.WBINVD"}, names
        for key in ("KVM_CREATE_GUEST_MEMFD", "KVM_SET_USER_MEMORY_REGION2",
                    "KVM_SET_MEMORY_ATTRIBUTES"):
            assert ktap.diag[key] == "ok"
    assert tdx_vm.vtdx.tds() == []


@pytest.mark.kernel
@pytest.mark.stack
def test_two_vcpus_until_memory(tdx_vm) -> None:
    ktap, recs = _life(tdx_vm, "--vcpus", "2", "--stop-after", "memory")
    ktap.assert_ok()
    assert _unexpected_failures(recs) == [], tdx_vm.trace.format(recs)
    names = collections.Counter(r["name"] for r in recs)
    assert names["TDH.VP.CREATE"] == names["TDH.VP.INIT"] == names["TDH.VP.FLUSH"] == 2
    assert names["TDH.VP.WR"] == 6
    assert [ktap.diag[f"KVM_TDX_INIT_VCPU.{i}"] for i in (0, 1)] == ["ok", "ok"]
    assert tdx_vm.vtdx.tds() == []


@pytest.mark.kernel
@pytest.mark.stack
def test_get_cpuid_reads_the_tds_cpuid(tdx_vm) -> None:
    """KVM_TDX_GET_CPUID (tdx.c tdx_vcpu_get_cpuid) reads leaf 0 first, then every leaf up
    to its EAX (0x23) and the extended range: leaf 0 reads what TDH.MNG.INIT computed
    (tdx-module cpuid_configurations.c slot 10: EAX FIXED1 0x23), the misses are only the
    lookup table's (tests/kvm_cpuid.py)."""
    ktap, recs = _life(tdx_vm, "--stop-after", "vcpus")
    assert ktap.diag["KVM_TDX_GET_CPUID.0"] == "ok"
    assert _unexpected_failures(recs) == [], tdx_vm.trace.format(recs)
    reads = [r for r in recs if r["name"] == "TDH.MNG.RD"
             and int(r["in"]["rdx"], 16) & ~0x1FFFF == CPUID_FIELDS]
    leaf0 = [r for r in reads if int(r["in"]["rdx"], 16) == CPUID_FIELDS | 0x1FE]
    assert leaf0 and leaf0[0]["ok"] and int(leaf0[0]["out"].get("r8", "0"), 16) & 0xFFFFFFFF == 0x23
    assert any(r["ok"] for r in reads if int(r["in"]["rdx"], 16) >> 9 & 0xFF == 0x80)


@pytest.mark.kernel
@pytest.mark.stack
def test_kernel_log_clean_after_partial_lives(tdx_vm) -> None:
    import re

    trouble = re.compile(r"WARNING:|BUG:|Oops|Call Trace:|Kernel panic")
    assert [ln for ln in tdx_vm.dmesg().splitlines() if trouble.search(ln)] == []


@pytest.mark.kernel
@pytest.mark.stack
def test_measured_image_and_finalize() -> None:
    """KVM_TDX_INIT_MEM_REGION adds and measures the TD guest (SEPT.ADD per missing level,
    PAGE.ADD and 16 MR.EXTEND per page), KVM_TDX_FINALIZE_VM seals MRTD; two vCPUs."""
    vm = _boot()  # a machine of its own: the kernel may not survive this today
    try:
        ktap, recs = _life(vm, "--vcpus", "2", "--stop-after", "finalize", timeout=150)
        ktap.assert_ok()
        names = collections.Counter(r["name"] for r in recs)
        pages = TDGUEST_IMAGE_SIZE // 4096
        assert names["TDH.MEM.PAGE.ADD"] == pages and names["TDH.MR.EXTEND"] == 16 * pages
        assert names["TDH.MEM.SEPT.ADD"] >= 1 and names["TDH.MR.FINALIZE"] == 1
        assert all("tdx_gmem_post_populate" in c for c in _callers(recs, "TDH.MR.EXTEND"))
        assert _unexpected_failures(recs) == [], vm.trace.format(recs)
        # Teardown removed the private pages too.
        assert names["TDH.PHYMEM.PAGE.RECLAIM"] >= pages
        assert vm.vtdx.tds() == []
    finally:
        vm.stop()
