"""One TD vCPU executing guest code on unicorn (stock PyPI wheel 2.1.4).

Design (see the package docstring for the why):
- Host RAM is mapped once per engine with uc_mem_map_ptr, at host-physical addresses.
- Unicorn runs in UC_TLB_VIRTUAL mode: every TLB miss calls ``_on_tlb_fill``, which walks
  the guest's own 4-level page tables (in guest memory) and then the second stage: the
  module's S-EPT for a private GPA, KVM's shared EPT (bytes in host RAM, from the EPTP KVM
  wrote with TDH.VP.WR 0x203C) for a shared one. A missing mapping ends the slice with an
  EPT-violation TD exit, RIP still on the faulting instruction, so the next entry
  re-executes it once the host mapped the page.
- TDCALL (66 0F 01 CC) is #UD to unicorn and arrives in the invalid-instruction hook; the
  TDG.* leaves of ``guest_leaves`` answer inside the hook and emulation goes on; only
  TDG.VP.VMCALL and an ACCEPT that needs the host end the slice.
- Time slices are wall-clock: one shared watchdog thread calls uc_emu_stop() on an engine
  whose slice ran out. The slice ends with the OTHER_SMI exit (see exits.EXIT_TIME_SLICE
  for why that reason). Count mode (``precise_stops``) adds instruction budgets for
  deterministic stepping at the price of a stop check before every instruction.
- Data TLB entries never carry execute permission unless the page holds translated code.
  Unicorn does no dirty tracking: a store through an entry that also allows execution stays
  on QEMU's self-modifying-code path (about 35 ns a store, accel/tcg/cputlb.c
  notdirty_write), while a data-only entry is cleaned after its first store. On a loop with
  one store that was ~150 against ~1,100 MIPS (stock unicorn).
- Guest exceptions (stock unicorn never uses the guest IDT) are delivered here through the
  guest's 64-bit IDT, CPL0 to CPL0 only; #VE (HLT, CPUID, pending pages) the same way.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_CTL_TLB_FLUSH
from unicorn.unicorn_py3.unicorn import uc_engine, uclib

from vtdx.abi.regs import Regs
from vtdx.abi.status import TDX_NON_RECOVERABLE_VCPU
from vtdx.module.engine import guest_leaves, unicorn_lib
from vtdx.module.engine.decode import MAX_INSN, is_memory_rmw
from vtdx.module.engine.errors import EngineUnsupported
from vtdx.module.engine.exits import (
    EEQ_NONE,
    EEQ_PENDING_EPT_VIOLATION,
    EXIT_EPT_VIOLATION,
    EXIT_TIME_SLICE,
    EXIT_TRIPLE_FAULT,
    LAST_EXIT_TDVMCALL,
    QUAL_FETCH,
    QUAL_READ,
    QUAL_WRITE,
    TdExit,
    vmcall_reply,
    vp_enter_outputs,
)
from vtdx.module.engine.hostram import HostRam
from vtdx.module.engine.interfaces import (
    LEVEL_4K,
    SEPT_MAPPED,
    SEPT_PENDING,
    TdView,
    level_size,
)

TDCALL_BYTES = b"\x66\x0f\x01\xcc"
RESET_RIP = 0xFFFF_FFF0
PAGE = 4096
ADDR_MASK = 0x000F_FFFF_FFFF_F000          # physical-address bits 51:12 of a paging entry
MASK64 = (1 << 64) - 1

# VMX basic exit reasons recorded in VE_INFO for #VE the module injects.
VE_REASON_CPUID = 10
VE_REASON_HLT = 12
VE_REASON_EPT_VIOLATION = 48

# Exception vectors.
VEC_UD, VEC_DF, VEC_GP, VEC_PF, VEC_VE = 6, 8, 13, 14, 20
_HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
# Page-fault error code bits: W/R, I/D (instruction fetch).
PFEC_W, PFEC_I = 0x2, 0x10

_ACCESS_QUAL = {UC_MEM_WRITE: QUAL_WRITE, UC_MEM_FETCH: QUAL_FETCH}
_UNBOUNDED = 1 << 62        # count mode without a budget: the stop checks, never the count
_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15")

uclib.uc_reg_read.argtypes = [uc_engine, ctypes.c_int, ctypes.c_void_p]
uclib.uc_reg_write.argtypes = [uc_engine, ctypes.c_int, ctypes.c_void_p]
uclib.uc_emu_stop.argtypes = [uc_engine]


class _MsrStruct(ctypes.Structure):
    _fields_ = (("rid", ctypes.c_uint32), ("value", ctypes.c_uint64))


class _EptExit(Exception):
    def __init__(self, gpa: int, qual: int, eeq: int = EEQ_NONE) -> None:
        self.gpa, self.qual, self.eeq = gpa, qual, eeq


class _GuestFault(Exception):
    """An event for the guest IDT: exception ``vector`` (with error code) or #VE."""

    def __init__(self, vector: int, err: int | None = None, cr2: int | None = None,
                 ve: dict[str, int] | None = None) -> None:
        self.vector, self.err, self.cr2, self.ve = vector, err, cr2, ve


class Watchdog:
    """One thread ending the wall-clock slices of every engine it watches.

    Arming costs no thread hand-off: the thread is not woken per entry (a TD exit loop
    enters thousands of times a second) but sleeps until the nearest armed deadline, at
    least ``period`` and at most ``poll`` (an engine armed meanwhile is stopped up to
    ``poll`` late). After ``linger`` with nothing armed it waits until an engine is armed
    again. Each wake-up takes the GIL from whichever thread holds it, so the old fixed 1 ms
    poll cost the vCPU threads a thousand GIL hand-offs a second. uc_emu_stop() is safe
    from another thread and takes effect at the next translation-block boundary.
    """

    def __init__(self, period: float = 0.001, poll: float = 0.005,
                 linger: float = 0.05) -> None:
        self.period, self.poll, self.linger = period, poll, linger
        self._armed: dict[TdVcpuEngine, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = False
        self._thread: threading.Thread | None = None

    def arm(self, engine: TdVcpuEngine, deadline: float, entry: int) -> None:
        with self._lock:
            self._armed[engine] = (deadline, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="td-watchdog",
                                                daemon=True)
                self._thread.start()
            elif self._idle:
                self._idle = False
                self._wake.notify()

    def disarm(self, engine: TdVcpuEngine) -> None:
        with self._lock:
            self._armed.pop(engine, None)

    def _loop(self) -> None:
        quiet_since = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                if not self._armed and now - quiet_since >= self.linger:
                    self._idle = True
                    while self._idle:
                        self._wake.wait()
                    continue
                due = [(e, entry) for e, (dl, entry) in self._armed.items() if now >= dl]
                later = [dl for dl, _ in self._armed.values() if dl > now]
                if self._armed:
                    quiet_since = now
            for e, entry in due:
                e._slice_over(entry)
            nap = min(later) - now if later else self.poll
            time.sleep(min(max(nap, self.period), self.poll))


_DEFAULT_WATCHDOG = Watchdog()
_log = logging.getLogger(__name__)
_STOCK_WARNED = threading.Event()


class TdVcpuEngine:
    """A TD vCPU's architectural state and the unicorn instance that runs it.

    Create one per TD vCPU at TDH.VP.INIT and keep it with the vCPU: KVM moves vCPUs
    between LPs, and ``run``/``enter`` execute on whichever thread calls them (the LP's
    transport thread, so the QEMU vCPU blocks as the LP would). Not re-entrant: one caller
    at a time, which the module's vCPU association already guarantees.

    Slices end on the wall clock (``slice_seconds``, one shared watchdog thread) or, with
    ``precise_stops``, on an explicit instruction budget passed to ``run``/``enter``.
    ``precise_stops`` runs unicorn in count mode, which puts a stop check before every
    instruction (about 10x slower guest code). Its count is unbounded unless a budget is
    given, because stock unicorn returns from emu_start the same way after HLT as after the
    count ran out: an exhausted count could only be told from HLT by the byte before RIP,
    which misreads any instruction ending in 0xF4 (``mov %esi,%esp`` is 89 F4). So budgets
    are for callers that want determinism (tests, replay) and accept that.

    Without count mode (the default) a CPUID that must become a #VE still stops right after
    the CPUID: the first executable fill of a code page scans it for CPUID (0F A2) and puts
    a bounded UC_HOOK_CODE on the byte after each one, and unicorn emits a stop check after
    every hooked instruction (qemu/target/i386/translate.c, check_exit_request). A CPUID
    written after its page was scanned has no such stop and is refused with
    ``EngineUnsupported`` rather than run past.
    """

    #: The module's time slice: short enough that a guest never holds the host vCPU for
    #: long, long enough that the slice exits stay a small part of the run.
    SLICE_SECONDS = 0.005

    def __init__(self, ram: HostRam, td: TdView, vcpu_index: int, init_rcx: int, *,
                 precise_stops: bool = False, slice_seconds: float | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.ram = ram
        self.td = td
        self.cfg = td.config
        self.vcpu_index = vcpu_index
        self.precise_stops = precise_stops
        self.slice_seconds = self.SLICE_SECONDS if slice_seconds is None else slice_seconds
        self.watchdog = watchdog or _DEFAULT_WATCHDOG
        #: KVM's shared EPTP (TDH.VP.WR of TD VMCS field 0x203C).
        self.shared_eptp = 0
        #: TDVPS.VE_INFO (tdx_tdvps.h tdvps_ve_info_t): valid flag plus the #VE details.
        self.ve_info: dict[str, int] = {"valid": 0}
        self.cpuid_supervisor_ve = False
        self.cpuid_user_ve = False
        self.last_exit: TdExit | None = None
        self.disabled = False
        self.exit_counts: dict[int, int] = {}
        self.stats = {"tlb_fills": 0, "tdcalls_in_td": 0, "guest_events": 0}
        #: TDG leaves the engine does not model, supplied by the module: leaf -> handler.
        self.extra_leaves: dict[int, Callable[[TdVcpuEngine], int]] = {}

        self._u64 = ctypes.c_uint64()
        self._batch_ids = (ctypes.c_int * len(_GPR_NAMES))(*(self._GPR_IDS[n]
                                                              for n in _GPR_NAMES))
        self._batch_vals = (ctypes.c_uint64 * len(_GPR_NAMES))()
        vbase = ctypes.addressof(self._batch_vals)
        self._batch_ptrs = (ctypes.c_void_p * len(_GPR_NAMES))(
            *(vbase + 8 * i for i in range(len(_GPR_NAMES))))
        self._msr = _MsrStruct()
        self._write_batches: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()          # exit/stop bookkeeping vs the watchdog
        self._entry = 0
        self._running = False
        self._stop_reason: str | None = None
        self._exit: TdExit | None = None
        self._event: _GuestFault | None = None
        self._trap_rip_advance = 0
        self._gcache: dict[int, tuple[int, int]] = {}   # GPA page -> (HPA page, EPT perms)
        self._code_cache: dict[int, int] = {}       # VA page -> HPA page, from fetch fills
        # HPA pages fetched from since the last TB flush: their data entries keep execute
        # permission, so stores to them stay on the self-modifying-code path.
        self._code_pages: set[int] = set()
        # HPA pages with data-only entries since the last TLB flush (such an entry skips
        # the self-modifying-code check once it has been written through).
        self._data_pages: set[int] = set()
        self._resync = False            # a data page became code: flush the TLB, go on
        self._scanned: set[int] = set()  # VA pages scanned for CPUID since the last TB flush
        self._stop_sites: set[int] = set()   # addresses right after a CPUID, hooked
        self._flush_tlb = False
        self._flush_tb = False
        self._fault_gla = 0
        self._mode_cache: dict[int, bool] = {}           # CS selector -> CS.L
        self._reinject: _GuestFault | None = None
        self._fatal: EngineUnsupported | None = None    # raised by run() after the stop

        #: Runs on vtdx's patched unicorn (vtdx/unicorn/README.md), not the stock wheel.
        self.patched_library = unicorn_lib.patched()
        if not self.patched_library and not _STOCK_WARNED.is_set():
            _STOCK_WARNED.set()
            _log.warning("TD guest code runs on the stock unicorn (%s): a time slice or kick "
                         "can re-execute a guest store and LOCK is not atomic across vCPUs; "
                         "`vtdx setup` builds the patched one", unicorn_lib.library())
        # Typed as Any: unicorn's stubs lack the 2.1 ctl_* methods used here.
        uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)  # type: ignore[no-untyped-call]
        self.uc = uc
        self._uch = uc._uch
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        for lo, hi, off in ram.spans:
            uc.mem_map_ptr(lo, hi - lo, UC_PROT_ALL, ram.base + off)
        # With exits enabled and no exit address, emu_start's `until` is never translated
        # (otherwise every start ends with a spurious fill of that address).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._hooks: list[Any] = [
            uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill),
            uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid),
            uc.hook_add(UC_HOOK_INTR, self._on_intr),
            uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID),
        ]
        self._reset_state(init_rcx)

    # ---------------------------------------------------------------- TDH.VP.INIT state
    def _reset_state(self, init_rcx: int) -> None:
        """The state TDH.VP.INIT leaves (intel/tdx-module td_vmcs_init.c guest-state table,
        tdh_vp_init.c init_vcpu_gprs_and_registers): RIP 0xFFFFFFF0, 32-bit protected mode
        with flat 4 GB segments (CS AR 0xC09B, data AR 0xC093), CR0 = PE|NE (0x21), CR4 =
        MCE (0x40; the VMXE bit of the VMCS value 0x2040 is host-owned and read-shadowed),
        EFER = SCE|LME|NXE (0x901), PAT 0x0007040600070406, DR7 0x400, RFLAGS 0x2,
        RBX = GPA width, RCX = R8 = TDH.VP.INIT's RCX, RDX = CPUID(1).EAX, RSI = VCPU_INDEX,
        every other GPR 0."""
        wr = self.uc.reg_write
        # A UC_MODE_64 engine starts in long mode. Turning paging on (PAE, LME) and off
        # again leaves IA-32e mode as the CPU does, with 32-bit code/stack segments whose
        # zero caches TCG treats as flat (it checks no limits in this mode).
        wr(X.UC_X86_REG_CR4, 0x20)
        wr(X.UC_X86_REG_CR0, 0x8000_0021)
        wr(X.UC_X86_REG_CR0, 0x21)
        wr(X.UC_X86_REG_CR4, 0x40)
        wr(X.UC_X86_REG_MSR, (0xC000_0080, 0x901))
        wr(X.UC_X86_REG_MSR, (0x277, 0x0007_0406_0007_0406))
        wr(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        wr(X.UC_X86_REG_IDTR, (0, 0, 0, 0))
        wr(X.UC_X86_REG_DR7, 0x400)
        wr(X.UC_X86_REG_RFLAGS, 0x2)
        for reg in (X.UC_X86_REG_RAX, X.UC_X86_REG_RDI, X.UC_X86_REG_RSP, X.UC_X86_REG_RBP,
                    X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12,
                    X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15):
            wr(reg, 0)
        wr(X.UC_X86_REG_RBX, self.cfg.max_pa_for_gpa)
        wr(X.UC_X86_REG_RCX, init_rcx & MASK64)
        wr(X.UC_X86_REG_R8, init_rcx & MASK64)
        wr(X.UC_X86_REG_RDX, self.cfg.cpuid1_eax)
        wr(X.UC_X86_REG_RSI, self.vcpu_index & 0xFFFF_FFFF)
        self.rip = RESET_RIP

    # ---------------------------------------------------------------- registers
    def rd(self, reg: int) -> int:
        """Read a 64-bit register (direct ctypes: the binding's dispatch costs ~1 us)."""
        uclib.uc_reg_read(self._uch, reg, ctypes.byref(self._u64))
        return self._u64.value

    def wr(self, reg: int, value: int) -> None:
        self._u64.value = value & MASK64
        uclib.uc_reg_write(self._uch, reg, ctypes.byref(self._u64))

    def rdmsr(self, index: int) -> int:
        self._msr.rid = index
        uclib.uc_reg_read(self._uch, X.UC_X86_REG_MSR, ctypes.byref(self._msr))
        return int(self._msr.value)

    _GPR_IDS = {"rax": X.UC_X86_REG_RAX, "rcx": X.UC_X86_REG_RCX, "rdx": X.UC_X86_REG_RDX,
                "rbx": X.UC_X86_REG_RBX, "rsp": X.UC_X86_REG_RSP, "rbp": X.UC_X86_REG_RBP,
                "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI, "r8": X.UC_X86_REG_R8,
                "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
                "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
                "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "cr0": X.UC_X86_REG_CR0,
                "cr3": X.UC_X86_REG_CR3, "cr4": X.UC_X86_REG_CR4, "cr2": X.UC_X86_REG_CR2,
                "rflags": X.UC_X86_REG_RFLAGS, "cs": X.UC_X86_REG_CS}

    def get(self, name: str) -> int:
        """A guest register by name (``rip`` included), e.g. for inspection and tests."""
        if name == "rip":
            return self.rip
        if name == "cs":
            return self.selector(X.UC_X86_REG_CS)
        return self.rd(self._GPR_IDS[name])

    def set(self, name: str, value: int) -> None:
        if name == "rip":
            self.rip = value & MASK64
        else:
            self.wr(self._GPR_IDS[name], value)

    def read_gprs(self) -> dict[str, int]:
        """All 16 GPRs in one unicorn call (uc_reg_read_batch)."""
        uclib.uc_reg_read_batch(self._uch, self._batch_ids, self._batch_ptrs, len(_GPR_NAMES))
        return dict(zip(_GPR_NAMES, self._batch_vals, strict=True))

    def write_gprs(self, values: dict[str, int]) -> None:
        """Write the named GPRs in one unicorn call (uc_reg_write_batch)."""
        names = tuple(values)
        n = len(names)
        batch = self._write_batches.get(names)
        if batch is None:
            # ctypes arrays per register set, made once (a TDVMCALL reply selects the same
            # registers every time, and building them costs more than the write itself).
            ids = (ctypes.c_int * n)(*(self._GPR_IDS[k] for k in names))
            vals = (ctypes.c_uint64 * n)()
            base = ctypes.addressof(vals)
            ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))
            batch = self._write_batches[names] = (ids, vals, ptrs)
        ids, vals, ptrs = batch
        for i, v in enumerate(values.values()):
            vals[i] = v & MASK64
        uclib.uc_reg_write_batch(self._uch, ids, ptrs, n)

    def efer(self) -> int:
        return self.rdmsr(0xC000_0080)

    def selector(self, reg: int) -> int:
        """A segment selector (unicorn writes only 16 bits of the buffer)."""
        self._u64.value = 0
        uclib.uc_reg_read(self._uch, reg, ctypes.byref(self._u64))
        return self._u64.value & 0xFFFF

    def cpl(self) -> int:
        return self.selector(X.UC_X86_REG_CS) & 3

    def in_64bit_mode(self) -> bool:
        """EFER.LMA and CS.L (the module's is_td_guest_in_64b_mode()). CS.L is read from the
        descriptor the CS selector names, as unicorn does not expose the hidden part; the
        answer is cached per selector until the engine's translations are flushed (a guest
        that rewrites the descriptor of its live CS selector is not followed until then)."""
        if not self.efer() & (1 << 10):
            return False
        sel = self.selector(X.UC_X86_REG_CS)
        hit = self._mode_cache.get(sel)
        if hit is not None:
            return hit
        _, gdt_base, gdt_limit, _ = self.uc.reg_read(X.UC_X86_REG_GDTR)
        idx = sel & ~7
        if sel & 4 or idx + 7 > gdt_limit:
            return False
        try:
            desc = int.from_bytes(self.vread(gdt_base + idx, 8), "little")
        except (_EptExit, _GuestFault):
            return False
        self._mode_cache[sel] = long_mode = bool(desc >> 53 & 1)
        return long_mode

    # ---------------------------------------------------------------- invalidation
    def invalidate_translations(self) -> None:
        """The S-EPT or shared EPT changed (BLOCK, REMOVE, DEMOTE, PROMOTE, RELOCATE, ...):
        drop this engine's cached GPA translations and unicorn TLB before it next runs
        guest code. A running engine keeps its old translations until it leaves the TD,
        which TDX's TLB tracking (TDH.MEM.TRACK, then kicking the vCPUs) accounts for."""
        with self._lock:
            self._flush_tlb = True

    def invalidate_code(self) -> None:
        """Host-side writes to guest memory (PAGE.ADD contents, a reused HPA, another
        engine's stores to code) are invisible to this engine's translated-code cache:
        drop it before the next guest instruction."""
        with self._lock:
            self._flush_tb = True
            self._flush_tlb = True

    def kick(self) -> bool:
        """End the running slice now (an IPI to the LP): the entry returns the time-slice
        exit. Thread-safe; False when the engine was not running guest code or its slice
        was already ending."""
        return self._slice_over(None)

    def _slice_over(self, entry: int | None) -> bool:
        """Request the end of the running slice. uc_emu_start() clears a stop requested
        before it began, so a request that lands between the entry's start and the
        emulation starting would be lost: the run loop checks the reason before every
        emu_start, and the watchdog repeats the stop on every poll past the deadline
        (uc_emu_stop is idempotent) until the entry ends. True for the first request."""
        with self._lock:
            if not self._running or (entry is not None and entry != self._entry):
                return False
            first = self._stop_reason is None
            self._stop_reason = "slice"
            # Under the lock: run() starts the next entry under it too, so a stop meant for
            # this entry can never land in the next one (where it would have no reason).
            # A stop after this entry's emulation returned is ignored by unicorn.
            uclib.uc_emu_stop(self._uch)
        return first

    def _apply_flushes(self) -> None:
        with self._lock:
            tlb, tb = self._flush_tlb, self._flush_tb
            self._flush_tlb = self._flush_tb = False
        if tlb:
            self._mode_cache.clear()
            self._gcache.clear()
            self._code_cache.clear()
            self._data_pages.clear()
            uclib.uc_ctl(self._uch, UC_CTL_TLB_FLUSH | (1 << 30))
        if tb:
            self._code_pages.clear()
            self._scanned.clear()
            self.uc.ctl_flush_tb()

    # ---------------------------------------------------------------- entry
    def enter(self, vmm: Regs, budget: int | None = None) -> tuple[TdExit, Regs]:
        """TDH.VP.ENTER's guest half: apply KVM's replies if the last exit was a
        TDG.VP.VMCALL (tdh_vp_enter.c save_regs_after_tdvmcall), run until a TD exit, and
        return the exit with the registers TDH.VP.ENTER hands back to KVM."""
        last = self.last_exit
        if last is not None and last.last_exit == LAST_EXIT_TDVMCALL:
            self.write_gprs(vmcall_reply(last.control, vmm))
            self.last_exit = None              # consumed, even if this entry fails
        ex = self.run(budget)
        return ex, vp_enter_outputs(ex)

    def run(self, budget: int | None = None) -> TdExit:
        """Run guest code until a TD exit. The wall-clock slice, or ``budget`` instructions
        when given, ends it with the time-slice exit."""
        if self.disabled:
            raise EngineUnsupported("the vCPU is disabled (TDX_NON_RECOVERABLE_VCPU)")
        if budget is not None:
            if not self.precise_stops or budget <= 0:
                raise ValueError("an instruction budget needs precise_stops (count mode)")
            count = budget
        else:
            count = _UNBOUNDED if self.precise_stops else 0
        with self._lock:
            self._entry += 1
            self._running = True
            self._stop_reason = None
            entry = self._entry
        self.watchdog.arm(self, time.monotonic() + self.slice_seconds, entry)
        try:
            ex = self._run_loop(count)
        finally:
            self.watchdog.disarm(self)
            with self._lock:
                self._running = False
        ex.rip = self.rip
        self.last_exit = ex
        self.exit_counts[ex.reason] = self.exit_counts.get(ex.reason, 0) + 1
        if ex.vcpu_disabled:
            self.disabled = True
        return ex

    def _run_loop(self, count: int) -> TdExit:
        budgeted = count not in (0, _UNBOUNDED)
        if self._reinject is not None:
            # An event whose delivery took an EPT violation is delivered again on entry,
            # as the module re-injects from the IDT-vectoring information.
            ev, self._reinject = self._reinject, None
            self._apply_flushes()
            ex = self._deliver(ev, again=True)
            if ex is not None:
                return ex
        while True:
            if self._stop_reason == "slice":
                return TdExit(EXIT_TIME_SLICE)
            self._apply_flushes()
            self._clear_outcome()
            err: UcError | None = None
            start = self.rip
            try:
                self.uc.emu_start(start, 0, count=count)
            except UcError as e:
                hook_error = self.uc._hook_exception
                if hook_error is not None:      # the binding drops it when the stop errs
                    raise hook_error from None
                err = e
            self.rip = self.rd(X.UC_X86_REG_RIP)
            if self._fatal is not None:
                fatal, self._fatal = self._fatal, None
                raise fatal
            if self._exit is not None or self._event is not None:
                self._read_fault_of_rmw_is_a_write()
            if self._exit is not None:
                self.rip += self._trap_rip_advance
                return self._exit
            if self._event is not None:
                ev, self._event = self._event, None
                if ev.ve is not None and ev.ve.get("rip") is not None:
                    self.rip = ev.ve["rip"]
                ex = self._deliver(ev)
                if ex is not None:
                    return ex
                if self._stop_reason == "slice":
                    return TdExit(EXIT_TIME_SLICE)
                continue
            if err is not None:
                raise EngineUnsupported(f"unicorn stopped at {start:#x}..{self.rip:#x}: {err}")
            if self._stop_reason == "slice":
                return TdExit(EXIT_TIME_SLICE)
            if self._resync:
                self._resync = False
                continue
            if self._ended_on_hlt():
                # HLT in a TD is a #VE (the module's td_generic_ve_exit for HLT exits),
                # fault-like: RIP on the HLT, instruction length 1 for the guest handler.
                self.rip -= 1
                ex = self._inject_ve(VE_REASON_HLT, 0, 0, 0, length=1)
                if ex is not None:
                    return ex
                continue
            if not budgeted:
                raise EngineUnsupported(f"unicorn stopped at {self.rip:#x} for no known reason")
            return TdExit(EXIT_TIME_SLICE)          # the instruction budget ran out

    def _read_fault_of_rmw_is_a_write(self) -> None:
        """A data read faulted (EPT violation exit, EPT #VE or #PF) and RIP is back on the
        instruction: if that instruction reads and writes its memory operand, the fault is
        the write's, as on a CPU (vtdx.module.engine.decode)."""
        ex, ev = self._exit, self._event
        if ex is not None:
            if ex.reason != EXIT_EPT_VIOLATION or ex.qualification & 7 != QUAL_READ:
                return
            if self._insn_is_memory_rmw():
                ex.qualification |= QUAL_WRITE
        elif ev is not None:
            if ev.ve is not None:
                qual = ev.ve["exit_qualification"]
                if ev.ve["exit_reason"] == VE_REASON_EPT_VIOLATION and qual & 7 == QUAL_READ \
                        and self._insn_is_memory_rmw():
                    ev.ve["exit_qualification"] = qual | QUAL_WRITE
            elif ev.vector == VEC_PF and ev.err is not None and not ev.err & (PFEC_W | PFEC_I) \
                    and self._insn_is_memory_rmw():
                ev.err |= PFEC_W

    def _insn_is_memory_rmw(self) -> bool:
        try:
            code = self.vread(self.rip, MAX_INSN)
        except (_EptExit, _GuestFault):             # the instruction ends the code page
            try:
                code = self.vread(self.rip, PAGE - (self.rip & 0xFFF))
            except (_EptExit, _GuestFault):
                return False
        return is_memory_rmw(code, self.in_64bit_mode())

    def _clear_outcome(self) -> None:
        """Forget the previous emu_start's outcome; the hooks set it again (a method, so
        type narrowing does not assume the hooks leave it unset)."""
        self._exit = None
        self._event = None
        self._trap_rip_advance = 0
        self._resync = False

    def _ended_on_hlt(self) -> bool:
        """Stock unicorn returns from emu_start after HLT without saying so. Without a
        budget nothing else ends it that way, so the byte before RIP confirms the HLT; with
        a budget an exhausted count looks the same and this is a guess (class docstring)."""
        try:
            return self.vread(self.rip - 1, 1) == b"\xf4"
        except (_EptExit, _GuestFault):
            return False

    # ---------------------------------------------------------------- exit helpers
    def _set_exit(self, ex: TdExit) -> None:
        if self._exit is None:
            self._exit = ex

    def _ept_exit(self, e: _EptExit) -> TdExit:
        # tdx_ept_violation_exit_to_vmm: qualification bits 12:7 and GPA bits 11:0 cleared.
        # td_ept_violation.c: a private GPA's violation is logged for 0-step tracking.
        private = not e.gpa & self.cfg.shared_bit
        return TdExit(EXIT_EPT_VIOLATION, qualification=e.qual & ~0x1F80,
                      ext_qualification=e.eeq, gpa=e.gpa & ~0xFFF,
                      epf_gpa=e.gpa if private else None)

    def triple_fault(self) -> TdExit:
        """td_dispatcher: a triple fault is an async exit with TDX_NON_RECOVERABLE_VCPU."""
        return TdExit(EXIT_TRIPLE_FAULT, status=TDX_NON_RECOVERABLE_VCPU)

    # ---------------------------------------------------------------- second stage
    def leaf_gpa_to_hpa(self, gpa: int, qual: int) -> int:
        """The HPA of ``gpa`` for a TDCALL leaf's own access to guest memory (the module's
        check_walk_and_map_guest_side_gpa): the walk and its EPT-violation exit or #VE are a
        guest access's, but the #VE carries no guest-linear address (tdx_inject_ve(...,
        gla 0))."""
        self._fault_gla = 0
        hpa, _ = self.gpa_to_hpa(gpa, qual)
        return hpa | (gpa & 0xFFF)

    def gpa_to_hpa(self, gpa: int, qual: int) -> tuple[int, int]:
        """GPA -> (HPA, EPT permissions RWX as UC_PROT bits); raises _EptExit/_GuestFault."""
        page = gpa & ~0xFFF
        hit = self._gcache.get(page)
        if hit is None:
            if page & self.cfg.shared_bit:
                hit = self._shared_ept_walk(page, qual)
            else:
                hit = self._private_walk(page, qual)
            self._gcache[page] = hit
        hpa, perms = hit
        need = UC_PROT_WRITE if qual & QUAL_WRITE else UC_PROT_EXEC if qual & QUAL_FETCH \
            else UC_PROT_READ
        if not perms & need:
            raise _EptExit(gpa, qual | _prot_to_qual(perms))
        return hpa | (gpa & 0xFFF), perms

    def _private_walk(self, page: int, qual: int) -> tuple[int, int]:
        w = self.td.sept_walk(page, LEVEL_4K)
        if w.is_leaf and w.state == SEPT_MAPPED:
            size = level_size(w.level)
            hpa = (w.hpa & ~(size - 1)) | (page & (size - 1))
            if not self.ram.contains(hpa):
                raise EngineUnsupported(f"S-EPT maps GPA {page:#x} to non-RAM {hpa:#x}")
            return hpa, UC_PROT_ALL
        if w.is_leaf and w.state == SEPT_PENDING:
            # td_ept_violation.c: a guest access to a PENDING page is a TD exit with EEQ
            # type PENDING_EPT_VIOLATION under SEPT_VE_DISABLE, else a #VE.
            if self.cfg.sept_ve_disable:
                raise _EptExit(page, qual, EEQ_PENDING_EPT_VIOLATION)
            self._raise_ept_ve(page, qual)
        raise _EptExit(page, qual | (w.rwx << 3 if w.state == SEPT_MAPPED else 0))

    def _raise_ept_ve(self, gpa: int, qual: int) -> None:
        """An EPT violation the CPU converts to #VE (entry's suppress-#VE bit clear);
        with VE_INFO still valid the CPU takes the EPT-violation exit instead."""
        if self.ve_info["valid"]:
            raise _EptExit(gpa, qual)
        raise _GuestFault(VEC_VE, ve={"exit_reason": VE_REASON_EPT_VIOLATION,
                                      "exit_qualification": qual, "gla": self._fault_gla,
                                      "gpa": gpa, "length": 0, "info": 0})

    def _shared_ept_walk(self, page: int, qual: int) -> tuple[int, int]:
        """Walk KVM's shared EPT in host memory: the root from the shared EPTP, the walk
        length of the TD's own EPT (``TdConfig.ept_levels``), as the module does."""
        eptp = self.shared_eptp
        if not eptp or eptp == MASK64:
            raise _EptExit(page, qual)
        levels = self.cfg.ept_levels
        table = eptp & ADDR_MASK
        rwx = 7
        for lvl in range(levels - 1, -1, -1):
            slot = table + ((page >> (12 + 9 * lvl)) & 511) * 8
            try:
                e = self.ram.read_u64(slot)
            except KeyError:
                raise EngineUnsupported(f"shared EPT entry at non-RAM {slot:#x}") from None
            if not e & 7:
                if e >> 63 & 1:                       # suppress #VE: EPT-violation exit
                    raise _EptExit(page, qual)
                self._raise_ept_ve(page, qual)
            rwx &= e & 7
            if lvl == 0 or (lvl in (1, 2) and e & 0x80):
                size = level_size(lvl)
                hpa = (e & ADDR_MASK & ~(size - 1)) | (page & (size - 1))
                if not self.ram.contains(hpa):
                    raise EngineUnsupported(f"shared GPA {page:#x} maps non-RAM {hpa:#x}")
                return hpa, _qual_to_prot(rwx)
            table = e & ADDR_MASK
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- first stage
    def translate(self, va: int, qual: int) -> tuple[int, int]:
        """GVA -> (HPA of the page, UC_PROT permissions for this CPL). Walks the guest's
        paging structures in guest memory, setting Accessed/Dirty bits as the CPU does."""
        cr0 = self.rd(X.UC_X86_REG_CR0)
        if not cr0 & 0x8000_0000:
            hpa, perms = self.gpa_to_hpa(va & 0xFFFF_FFFF, qual)
            return hpa & ~0xFFF, perms
        cr4 = self.rd(X.UC_X86_REG_CR4)
        if not cr4 & 0x20 or cr4 & (1 << 12):
            raise EngineUnsupported("only 4-level IA-32e paging is modelled")
        efer = self.efer()
        if not efer & (1 << 10):
            raise EngineUnsupported("PAE paging outside IA-32e mode is not modelled")
        self._fault_gla = va
        write, fetch = bool(qual & QUAL_WRITE), bool(qual & QUAL_FETCH)
        user = self.cpl() == 3
        table = self.rd(X.UC_X86_REG_CR3) & ADDR_MASK
        mm = self.ram.mm
        off_of = self.ram.offset
        rw = us = True
        nx = False
        walked: list[tuple[int, int]] = []
        gpa = 0
        e = 0
        for lvl in (3, 2, 1, 0):
            slot, _ = self.gpa_to_hpa(table | ((va >> (12 + 9 * lvl)) & 511) * 8, QUAL_READ)
            o = off_of(slot)
            e = int.from_bytes(mm[o:o + 8], "little")
            if not e & 1:
                raise _GuestFault(VEC_PF, (write << 1) | (user << 2) | (fetch << 4), va)
            rw &= bool(e & 2)
            us &= bool(e & 4)
            nx |= bool(e >> 63) and bool(efer & (1 << 11))
            walked.append((o, e))
            if lvl in (1, 2) and e & 0x80:
                size = level_size(lvl)
                gpa = (e & ADDR_MASK & ~(size - 1)) | (va & (size - 1) & ~0xFFF)
                break
            table = e & ADDR_MASK
        else:
            gpa = e & ADDR_MASK
        pfec = 1 | (write << 1) | (user << 2) | (fetch << 4)
        if not self.cfg.gpaw and gpa & (0xF << 48):
            # td_ept_violation.c: GPA bits above the shared bit morph into #PF(RSVD).
            raise _GuestFault(VEC_PF, pfec | 8, va)
        wp = bool(cr0 & 0x1_0000)
        if (user and not us) or (fetch and nx) or (write and not rw and (user or wp)):
            raise _GuestFault(VEC_PF, pfec, va)
        if not user and us and fetch and cr4 & (1 << 20):             # SMEP
            raise _GuestFault(VEC_PF, pfec, va)
        if not user and us and not fetch and cr4 & (1 << 21) \
                and not self.rd(X.UC_X86_REG_RFLAGS) & (1 << 18):      # SMAP
            raise _GuestFault(VEC_PF, pfec, va)
        hpa, ept = self.gpa_to_hpa(gpa, qual)
        last = len(walked) - 1
        for i, (o, ent) in enumerate(walked):
            new = ent | 0x20 | (0x40 if write and i == last else 0)
            if new != ent:
                mm[o:o + 8] = new.to_bytes(8, "little")
        dirty = write or bool(walked[last][1] & 0x40)
        perms = UC_PROT_READ
        if not nx and not (not user and us and cr4 & (1 << 20)):
            perms |= UC_PROT_EXEC
        if dirty and (rw or (not user and not wp)):
            perms |= UC_PROT_WRITE           # no W before D is set: the first write refills
        return hpa & ~0xFFF, perms & ept

    def vread(self, va: int, n: int) -> bytes:
        """Read guest-virtual memory as the current vCPU state sees it."""
        out = b""
        while n > 0:
            hpa, _ = self.translate(va, QUAL_READ)
            k = min(n, PAGE - (va & 0xFFF))
            out += self.ram.read(hpa + (va & 0xFFF), k)
            va, n = va + k, n - k
        return out

    def vwrite(self, va: int, data: bytes) -> None:
        while data:
            hpa, _ = self.translate(va, QUAL_WRITE)
            k = min(len(data), PAGE - (va & 0xFFF))
            self.uc.mem_write(hpa + (va & 0xFFF), data[:k])
            va, data = va + k, data[k:]

    def _fetch4(self, va: int) -> bytes:
        """The 4 bytes at ``va`` for the #UD hook (every TDCALL comes through it; a full
        walk costs ~10 us). The page's HPA comes from the last instruction-fetch TLB fill
        of that page: QEMU refills before fetching again after any TLB flush (CR3 write,
        INVLPG), so this follows the guest's current mapping."""
        off = va & 0xFFF
        if off > PAGE - 4:
            return self.vread(va, 4)
        hpa = self._code_cache.get(va >> 12)
        if hpa is None:
            hpa = self._code_cache[va >> 12] = self.translate(va, QUAL_FETCH)[0]
        return self.ram.read(hpa + off, 4)

    # ---------------------------------------------------------------- hooks
    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry: Any, _ud: Any) -> bool:
        self.stats["tlb_fills"] += 1
        try:
            hpa, perms = self.translate(vaddr, _ACCESS_QUAL.get(access, QUAL_READ))
            if access == UC_MEM_FETCH:
                self._code_cache[vaddr >> 12] = hpa
                self._note_code_page(hpa)
            elif hpa not in self._code_pages:
                perms &= ~UC_PROT_EXEC          # module docstring: fast stores
                self._data_pages.add(hpa)
            if perms & UC_PROT_EXEC and not self.precise_stops:
                self._scan_stop_sites(vaddr & ~0xFFF, hpa)
            entry.paddr, entry.perms = hpa, perms
            return True
        except _EptExit as e:
            self._set_exit(self._ept_exit(e))
        except _GuestFault as f:
            if self._event is None:
                self._event = f
        except EngineUnsupported as e:
            self._fatal = e
        return False

    def _note_code_page(self, hpa: int) -> None:
        """``hpa`` now holds translated code. Data-only entries of it from before may
        already skip the self-modifying-code check, so end the emulation here and flush
        the TLB before going on (the run loop's resync); it happens once per such page."""
        if hpa in self._code_pages:
            return
        self._code_pages.add(hpa)
        if hpa in self._data_pages:
            with self._lock:
                self._flush_tlb = True
            self._resync = True
            uclib.uc_emu_stop(self._uch)

    def _scan_stop_sites(self, va_page: int, hpa: int) -> None:
        """Hook the byte after every CPUID on this code page (class docstring). A match
        inside another instruction costs a hook nobody reaches; a CPUID straddling a page
        boundary is caught from either side."""
        if va_page in self._scanned:
            return
        self._scanned.add(va_page)
        o = self.ram.offset(hpa)
        code = bytes(self.ram.mm[o:o + PAGE])
        sites = []
        i = code.find(b"\x0f\xa2")
        while i >= 0:
            sites.append(va_page + i + 2)
            i = code.find(b"\x0f\xa2", i + 1)
        if code[0] == 0xA2:
            sites.append(va_page + 1)
        if code[-1] == 0x0F:
            sites.append(va_page + PAGE + 1)
        for a in sites:
            if a not in self._stop_sites:
                self._stop_sites.add(a)
                self._hooks.append(self.uc.hook_add(UC_HOOK_CODE, _stop_site, None, a, a))

    def _on_invalid(self, uc: Uc, _ud: Any) -> bool:
        rip = self.rd(X.UC_X86_REG_RIP)
        try:
            insn = self._fetch4(rip)
        except (_EptExit, _GuestFault):
            insn = b""
        if insn != TDCALL_BYTES:
            self._event = _GuestFault(VEC_UD)
            return False
        if not self.in_64bit_mode():
            self._event = _GuestFault(VEC_GP, 0)       # td_call(): #GP(0) outside 64-bit
            return False
        try:
            outcome = guest_leaves.dispatch(self)
        except EngineUnsupported as e:
            self._fatal = e
            return False
        except _EptExit as e:       # a leaf's guest-side GPA walk (RIP stays on the TDCALL)
            self._set_exit(self._ept_exit(e))
            return False
        except _GuestFault as f:    # the same walk converted to a #VE
            self._event = f
            return False
        if not isinstance(outcome, TdExit):
            self.stats["tdcalls_in_td"] += 1
            self.wr(X.UC_X86_REG_RIP, rip + 4)
            return True
        # The TD exits: stop here (RIP on the TDCALL); trap-like exits step over it.
        self._set_exit(outcome)
        if outcome.last_exit == LAST_EXIT_TDVMCALL:
            self._trap_rip_advance = 4
        return False

    def _on_intr(self, uc: Uc, intno: int, _ud: Any) -> None:
        # Stock unicorn reports exceptions and INT n here and never uses the guest IDT; the
        # error code is not exposed (0 is assumed where the vector pushes one).
        err = 0 if intno in _HAS_ERROR_CODE else None
        if self._event is None:
            self._event = _GuestFault(intno, err)
        uclib.uc_emu_stop(self._uch)

    def _on_cpuid(self, uc: Uc, _ud: Any) -> int:
        """CPUID in a TD is answered by the module from the TD's CPUID configuration
        (td_dispatcher/vm_exits/td_cpuid.c) or becomes a #VE."""
        rip = self.rd(X.UC_X86_REG_RIP)
        leaf = self.rd(X.UC_X86_REG_RAX) & 0xFFFF_FFFF
        sub = self.rd(X.UC_X86_REG_RCX) & 0xFFFF_FFFF
        vals = guest_leaves.cpuid_values(self, leaf, sub)
        if vals is None:
            if not self.in_64bit_mode():
                self._fatal = EngineUnsupported("CPUID #VE outside 64-bit mode is not modelled")
            elif not self.precise_stops and rip + 2 not in self._stop_sites:
                self._fatal = EngineUnsupported(
                    f"CPUID #VE at {rip:#x}: the CPUID was written after its page was "
                    "scanned, so nothing stops the emulation right after it")
            if self._fatal is not None:
                uclib.uc_emu_stop(self._uch)
                return 1
            self._event = _GuestFault(VEC_VE, ve={
                "exit_reason": VE_REASON_CPUID, "exit_qualification": 0, "gla": 0, "gpa": 0,
                "length": 2, "info": 0, "rip": rip})
            # Count mode, or the stop site after this CPUID, checks for the stop before the
            # next instruction; the #VE is then delivered with RIP on the CPUID.
            uclib.uc_emu_stop(self._uch)
            return 1
        for reg, v in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX,
                           X.UC_X86_REG_RDX), vals, strict=True):
            self.wr(reg, v & 0xFFFF_FFFF)
        return 1

    # ---------------------------------------------------------------- event delivery
    def _inject_ve(self, reason: int, qual: int, gla: int, gpa: int,
                   length: int) -> TdExit | None:
        """tdx_inject_ve(): fill VE_INFO and deliver #VE, or #DF if VE_INFO is still
        valid (the guest has not read the previous one with TDG.VP.VEINFO.GET)."""
        return self._deliver(_GuestFault(VEC_VE, ve={
            "exit_reason": reason, "exit_qualification": qual, "gla": gla, "gpa": gpa,
            "length": length, "info": 0}))

    def _deliver(self, ev: _GuestFault, again: bool = False) -> TdExit | None:
        """Deliver ``ev`` through the guest IDT. An EPT violation while doing so (IDT, GDT
        or stack page not mapped yet) is a TD exit and the event is delivered again at the
        next entry; any other failure escalates to #DF, a failing #DF to a triple fault."""
        self.stats["guest_events"] += 1
        vector, err = ev.vector, ev.err
        if ev.ve is not None and not again:
            if self.ve_info["valid"]:
                vector, err = VEC_DF, 0
            else:
                info = dict(ev.ve)
                info.pop("rip", None)
                info["valid"] = 0xFFFF_FFFF
                self.ve_info = info
        try:
            self._push_frame(vector, err, ev.cr2)
            return None
        except _EptExit as e:
            self._reinject = _GuestFault(vector, err, ev.cr2, ev.ve)
            return self._ept_exit(e)
        except (_GuestFault, _Undeliverable):
            if vector == VEC_DF:
                return self.triple_fault()
        try:
            self._push_frame(VEC_DF, 0, None)
            return None
        except _EptExit as e:
            self._reinject = _GuestFault(VEC_DF, 0)
            return self._ept_exit(e)
        except (_GuestFault, _Undeliverable):
            pass
        return self.triple_fault()

    def _push_frame(self, vector: int, err: int | None, cr2: int | None) -> None:
        if not self.in_64bit_mode():
            raise EngineUnsupported(f"vector {vector}: event delivery outside 64-bit mode "
                                    "is not modelled on unicorn")
        if self.cpl() != 0:
            raise EngineUnsupported(f"vector {vector}: delivery from CPL3 needs a CS/SS "
                                    "reload unicorn cannot do")
        _, idt_base, idt_limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 16 + 15 > idt_limit:
            raise _Undeliverable
        gate = self.vread(idt_base + vector * 16, 16)
        lo, hi = int.from_bytes(gate[:8], "little"), int.from_bytes(gate[8:], "little")
        gtype = (lo >> 40) & 0xF
        if not lo >> 47 & 1 or gtype not in (0xE, 0xF):
            raise _Undeliverable
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32)
        ist = (lo >> 32) & 7
        rflags = self.rd(X.UC_X86_REG_RFLAGS)
        old_rsp = self.rd(X.UC_X86_REG_RSP)
        rsp = old_rsp
        if ist:
            _, tss_base, _, _ = self.uc.reg_read(X.UC_X86_REG_TR)
            rsp = int.from_bytes(self.vread(tss_base + 0x24 + 8 * (ist - 1), 8), "little")
        rsp &= ~0xF
        frame = [self.selector(X.UC_X86_REG_SS), old_rsp, rflags,
                 self.selector(X.UC_X86_REG_CS),
                 self.rip]
        if vector in _HAS_ERROR_CODE:
            frame.append((err or 0) & MASK64)
        rsp -= 8 * len(frame)
        self.vwrite(rsp, b"".join(v.to_bytes(8, "little") for v in reversed(frame)))
        if cr2 is not None:
            self.wr(X.UC_X86_REG_CR2, cr2)
        self.wr(X.UC_X86_REG_RSP, rsp)
        clear = 0x100 | 0x4000 | 0x1_0000 | (0x200 if gtype == 0xE else 0)
        self.wr(X.UC_X86_REG_RFLAGS, rflags & ~clear)
        self.rip = target

    def close(self) -> None:
        self.watchdog.disarm(self)
        self.uc = None


def _stop_site(_uc: Uc, _address: int, _size: int, _ud: Any) -> None:
    """The code hook after a CPUID: its presence makes unicorn check for a stop there."""


class _Undeliverable(Exception):
    """The IDT cannot deliver the vector (beyond the limit, gate not present or wrong)."""


def _prot_to_qual(perms: int) -> int:
    """UC_PROT R/W/X -> EPT-violation qualification bits 5:3."""
    return ((perms & UC_PROT_READ and 1) | (perms & UC_PROT_WRITE and 2)
            | (perms & UC_PROT_EXEC and 4)) << 3


def _qual_to_prot(rwx: int) -> int:
    return ((UC_PROT_READ if rwx & 1 else 0) | (UC_PROT_WRITE if rwx & 2 else 0)
            | (UC_PROT_EXEC if rwx & 4 else 0))


__all__ = ["EngineUnsupported", "TdVcpuEngine", "Watchdog"]
