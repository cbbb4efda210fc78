"""A small TD guest for the engine's tests and benchmark, assembled at run time with GNU as.

The guest starts at the reset vector in 32-bit mode (as TDH.VP.INIT leaves the vCPU),
records the initial registers, enables PAE paging with tables the loader placed in private
memory and far-jumps to 64-bit code, which runs the routine whose number TDH.VP.INIT's RCX
carried. Every routine reports with TDG.VP.VMCALL: R11 = report code, R12-R15 = values.

``GuestRig`` lays the guest out in a ``SandboxTd`` and makes the vCPU engine.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vtdx.abi.regs import Regs
from vtdx.module.engine.engine import TdVcpuEngine
from vtdx.module.engine.exits import EXIT_TDCALL, TdExit
from vtdx.module.engine.hostram import HostRam
from vtdx.module.engine.interfaces import TdConfig
from vtdx.testing.td_sandbox import SandboxTd, SharedEpt

# Routine numbers (TDH.VP.INIT RCX).
T_BOOT, T_INFO, T_EPT, T_ACCEPT_4K, T_ACCEPT_2M, T_ACCEPT_MISMATCH, T_SHARED, T_LOOP = range(8)
T_HLT, T_TRIPLE, T_CPUID, T_PENDING, T_VM_RD_WR, T_BAD_TDCALLS, T_EXIT_LOOP = range(8, 15)
T_COMPUTE, T_INFO_LOOP, T_PAGE_FAULT, T_LOCK_LOOP, T_CPUID_LEAVES = 15, 16, 17, 18, 19
T_SMC_ALIAS, T_CMPXCHG16B_LOOP, T_RMW_FAULTS, T_RTMR_EXTEND = 20, 21, 22, 23

SAVE = 0x20000            # guest data page: initial registers, SAVE+64 = loop count
SCRATCH = 0x22000         # guest scratch slots; SCRATCH+0x100 the lock counter
WIDE_COUNTER = SCRATCH + 0x110  # the 128-bit counter of T_CMPXCHG16B_LOOP (16-byte aligned)
RTMR_DATA = SCRATCH + 0x180     # T_RTMR_EXTEND's extension data (64-byte aligned, 48 bytes)
SHARED_GPA = 0x400000     # | the shared bit; guest VA 0x40000000
UNMAPPED_GPA = 0x30000
ACCEPT_4K_GPA = 0x31000
PENDING_GPA = 0x32000
ACCEPT_2M_GPA = 0x200000
MISMATCH_2M_GPA = 0x400000

GUEST_SOURCE = r"""
/* test guest: see tests/test_engine.py */
#define TDCALL .byte 0x66, 0x0f, 0x01, 0xcc
#define SAVE 0x20000
#define IDT 0x21000
#define SCRATCH 0x22000
        .macro REPORT code, a, b, c, d
        push    \a
        push    \b
        push    \c
        push    \d
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        mov     $\code, %r11
        call    vmcall
        .endm

        .section .reset, "ax"
        .code32
entry32:
        mov     %ebx, SAVE
        mov     %ecx, SAVE + 8
        mov     %edx, SAVE + 16
        mov     %esi, SAVE + 24
        mov     $0xC0000080, %ecx
        rdmsr
        mov     %eax, SAVE + 32
        mov     %cr0, %eax
        mov     %eax, SAVE + 40
        mov     %cr4, %eax
        mov     %eax, SAVE + 48
        lgdtl   (gdt_desc - entry32 + 0xFFFFF000)
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $0x1000, %eax
        mov     %eax, %cr3
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $0x10000
        .balign 16
gdt:    .quad   0
        .quad   0x00AF9A000000FFFF
        .quad   0x00CF92000000FFFF
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt - entry32 + 0xFFFFF000
        .org    0xFF0
        jmp     entry32
        .org    0x1000

        .section .text64, "ax"
        .code64
main64:
        mov     %r8, SAVE + 56
        mov     %rsi, %rax              /* VCPU_INDEX: one 4 KB stack per vCPU */
        shl     $12, %rax
        mov     $0x2F000, %rsp
        sub     %rax, %rsp
        movzbl  SAVE + 8, %eax
        cmp     $ntests, %eax
        jae     bad
        lea     table(%rip), %rbx
        jmp     *(%rbx,%rax,8)
bad:    REPORT  0xBAD, %rax, $0, $0, $0
        jmp     bad

vmcall: xor     %eax, %eax
        mov     $0xFC00, %ecx
        xor     %r10d, %r10d
        TDCALL
        ret

/* 0: boot state, then a TDVMCALL whose replies come back */
t_boot:
        REPORT  0x100, SAVE, SAVE + 8, SAVE + 16, SAVE + 24
        REPORT  0x101, SAVE + 32, SAVE + 40, SAVE + 48, SAVE + 56
        xor     %eax, %eax
        mov     $0xFC00, %ecx
        xor     %r10d, %r10d
        mov     $0x1111, %r11
        mov     $0x2222, %r12
        TDCALL
        mov     %rax, SCRATCH
        mov     %rcx, SCRATCH + 8
        mov     %r14, SCRATCH + 16
        mov     %r15, SCRATCH + 24
        REPORT  0x102, %r10, %r11, %r12, %r13
        REPORT  0x103, SCRATCH + 16, SCRATCH + 24, SCRATCH, SCRATCH + 8
        jmp     done

/* 1: TDG.VP.INFO */
t_info: mov     $1, %eax
        TDCALL
        mov     %r9, SCRATCH
        mov     %r10, SCRATCH + 8
        mov     %r11, SCRATCH + 16
        REPORT  0x110, %rax, %rcx, %rdx, %r8
        REPORT  0x111, SCRATCH, SCRATCH + 8, SCRATCH + 16, $0
        jmp     done

/* 2: store to a private GPA the S-EPT lacks; the host maps it, the store re-executes */
t_ept:  movabs  $0x1122334455667788, %rax
        mov     %rax, 0x30008
        mov     0x30008, %rbx
        REPORT  0x120, %rbx, $0, $0, $0
        mov     0x30008, %rbx
        REPORT  0x121, %rbx, $0, $0, $0
        jmp     done

/* 3: ACCEPT 4 KB (twice) */
t_acc4k:
        mov     $6, %eax
        mov     $0x31000, %ecx
        TDCALL
        mov     %rax, SCRATCH
        mov     $6, %eax
        mov     $0x31000, %ecx
        TDCALL
        REPORT  0x130, SCRATCH, %rax, 0x31000, 0x31FF8
        jmp     done

/* 4: ACCEPT 2 MB, then a 4 KB ACCEPT inside the accepted 2 MB page */
t_acc2m:
        mov     $6, %eax
        mov     $0x200001, %ecx
        TDCALL
        mov     %rax, SCRATCH
        mov     $6, %eax
        mov     $0x205000, %ecx
        TDCALL
        REPORT  0x140, SCRATCH, %rax, 0x200000, 0x3FFFF8
        jmp     done

/* 5: 4 KB ACCEPT of a 2 MB PENDING page: EPT violation exit, host splits, retried */
t_accmis:
        mov     $6, %eax
        mov     $0x407000, %ecx
        TDCALL
        REPORT  0x150, %rax, 0x407000, $0, $0
        jmp     done

/* 6: store through a shared GPA (PTE with the shared bit) */
t_shared:
        mov     $0xC0FFEE, %eax
        mov     %rax, 0x40000008
        mov     0x40000010, %rbx
        REPORT  0x160, %rax, %rbx, $0, $0
        jmp     done

/* 7: endless loop */
t_loop: jmp     t_loop

/* 8: HLT is a #VE; the handler reads VE_INFO and steps over the HLT */
t_hlt:  call    setup_idt
        hlt
        REPORT  0x180, SCRATCH, SCRATCH + 8, SCRATCH + 16, SCRATCH + 24
        jmp     done

/* 9: #UD with an empty IDT: #DF undeliverable too: triple fault */
t_triple:
        lidt    idt_empty(%rip)
        ud2
        jmp     done

/* 10: CPUID from the TD's configuration, then CPUID #VE after TDG.VP.CPUIDVE.SET */
t_cpuid:
        call    setup_idt
        mov     $1, %eax
        xor     %ecx, %ecx
        cpuid
        REPORT  0x1A0, %rax, %rbx, %rcx, %rdx
        mov     $5, %eax
        mov     $1, %ecx
        TDCALL
        mov     %rax, SCRATCH + 32
        mov     $0, %eax
        cpuid
        REPORT  0x1A1, SCRATCH + 32, SCRATCH, SCRATCH + 8, SCRATCH + 24
        jmp     done

/* 19: CPUID(0), CPUID(0x80000000) and CPUID(0x80000008), no #VE gate: a #VE would end in
   a triple fault */
t_cpuid_leaves:
        xor     %eax, %eax
        xor     %ecx, %ecx
        cpuid
        REPORT  0x1A2, %rax, %rbx, %rcx, %rdx
        mov     $0x80000000, %eax
        xor     %ecx, %ecx
        cpuid
        REPORT  0x1A3, %rax, %rbx, %rcx, %rdx
        mov     $0x80000008, %eax
        xor     %ecx, %ecx
        cpuid
        REPORT  0x1A4, %rax, %rbx, %rcx, %rdx
        jmp     done

/* 11: read of a PENDING page */
t_pend: mov     0x32000, %rax
        REPORT  0x1B0, %rax, $0, $0, $0
        jmp     done

/* 12: TDG.VM.RD / TDG.VM.WR */
t_vm:   mov     $7, %eax
        xor     %ecx, %ecx
        mov     $0x77, %edx
        TDCALL
        REPORT  0x1C0, %rax, %r8, $0, $0
        mov     $8, %eax
        xor     %ecx, %ecx
        mov     $0x77, %edx
        mov     $0xABCD, %r8d
        mov     $0xFF00, %r9d
        TDCALL
        REPORT  0x1C1, %rax, %r8, $0, $0
        mov     $7, %eax
        xor     %ecx, %ecx
        mov     $0x99, %edx
        TDCALL
        REPORT  0x1C2, %rax, %r8, $0, $0
        mov     $7, %eax
        mov     $1, %ecx
        mov     $0x77, %edx
        TDCALL
        REPORT  0x1C3, %rax, $0, $0, $0
        jmp     done

/* 13: status codes of bad TDCALLs (no TD exit) */
t_bad:  mov     $3, %eax
        TDCALL
        mov     %rax, SCRATCH
        mov     $5, %eax
        mov     $4, %ecx
        TDCALL
        mov     %rax, SCRATCH + 8
        mov     $200, %eax
        TDCALL
        mov     %rax, SCRATCH + 16
        mov     $0x10001, %eax
        TDCALL
        mov     %rax, SCRATCH + 24
        xor     %eax, %eax
        mov     $0x10, %ecx
        TDCALL
        mov     %rax, SCRATCH + 32
        REPORT  0x1D0, SCRATCH, SCRATCH + 8, SCRATCH + 16, SCRATCH + 24
        REPORT  0x1D1, SCRATCH + 32, $0, $0, $0
        jmp     done

/* 14: TD exit loop (benchmark): SAVE+64 iterations of TDG.VP.VMCALL */
t_exits:
        mov     SAVE + 64, %rbx
1:      mov     $0x1E0, %r11
        call    vmcall
        dec     %rbx
        jnz     1b
        jmp     done

/* 15: compute loop (benchmark): SAVE+64 iterations of 6 instructions */
t_compute:
        mov     SAVE + 64, %rcx
        mov     $SCRATCH, %rsi
        xor     %ebx, %ebx
1:      add     %rcx, %rbx
        mov     %rbx, (%rsi)
        xor     (%rsi), %rdx
        ror     $3, %rbx
        dec     %rcx
        jnz     1b
        REPORT  0x1F0, %rbx, $0, $0, $0
        jmp     done

/* 20: self-modifying code through a second mapping: PT slot 0x1F0 maps VA 0x1F0000 to the
   SCRATCH page; `mov $1, %eax; ret` is written at SCRATCH+0x800 through that alias, called
   at its own address, its immediate rewritten to 2 through the alias, and called again */
t_smc:
        movq    $(SCRATCH | 3), 0x4000 + 0x1F0 * 8
        invlpg  0x1F0800
        movl    $0x000001B8, 0x1F0800
        movw    $0xC300, 0x1F0804
        mov     $(SCRATCH + 0x800), %rbx
        call    *%rbx
        mov     %rax, SCRATCH + 64
        movb    $2, 0x1F0801
        call    *%rbx
        REPORT  0x200, SCRATCH + 64, %rax, $0, $0
        jmp     done

/* 16: in-TD TDCALL loop (benchmark): SAVE+64 TDG.VP.INFO calls */
t_info_loop:
        mov     SAVE + 64, %rbx
1:      mov     $1, %eax
        TDCALL
        dec     %rbx
        jnz     1b
        jmp     done

/* 17: guest #PF (PDE not present) to the guest's handler, which maps the page */
t_pf:   call    setup_idt
        movq    0x610008, %rax
        mov     %rax, SCRATCH + 40
        REPORT  0x190, SCRATCH + 48, SCRATCH + 56, SCRATCH + 40, $0
        jmp     done

/* 18: SAVE+64 iterations of lock incl on one counter (run on several vCPUs) */
t_lock: mov     SAVE + 64, %rcx
1:      lock incl SCRATCH + 0x100
        dec     %rcx
        jnz     1b
        jmp     done

/* 21: SAVE+64 increments of the 128-bit counter at SCRATCH+0x110 by lock cmpxchg16b (a
   failed exchange loads the current value into RDX:RAX: retry from it) */
t_cx16: mov     SAVE + 64, %rsi
1:      mov     SCRATCH + 0x110, %rax
        mov     SCRATCH + 0x118, %rdx
2:      mov     %rax, %rbx
        mov     %rdx, %rcx
        add     $1, %rbx
        adc     $0, %rcx
        lock cmpxchg16b SCRATCH + 0x110
        jnz     2b
        dec     %rsi
        jnz     1b
        jmp     done

/* 22: read-modify-writes whose read faults: addl on the unmapped GPA (EPT violation), then
   incl through the not-present PDE of t_pf (#PF; the handler maps it, SCRATCH+0x200) */
t_rmw:  call    setup_idt
        addl    $5, 0x30000
        mov     0x30000, %eax
        mov     %rax, SCRATCH + 40
        incl    0x622200
        REPORT  0x220, SCRATCH + 48, SCRATCH + 56, SCRATCH + 40, SCRATCH + 0x200
        jmp     done

/* 23: TDG.MR.RTMR.EXTEND: a GPA aligned to 32 bytes only, index 4, the shared alias of
   the data (GPAW 48: bit 47), RTMR[2] from the data, then RTMR[1] from the unmapped GPA
   (an EPT-violation exit; the TDCALL runs again once the page is there) */
t_rtmr: mov     $2, %eax
        mov     $SCRATCH + 0x1A0, %ecx
        xor     %edx, %edx
        TDCALL
        mov     %rax, SCRATCH + 0x240
        mov     $2, %eax
        mov     $SCRATCH + 0x180, %ecx
        mov     $4, %edx
        TDCALL
        mov     %rax, SCRATCH + 0x248
        mov     $2, %eax
        movabs  $0x800000022180, %rcx
        xor     %edx, %edx
        TDCALL
        mov     %rax, SCRATCH + 0x250
        mov     $2, %eax
        mov     $SCRATCH + 0x180, %ecx
        mov     $2, %edx
        TDCALL
        mov     %rax, SCRATCH + 0x258
        mov     $2, %eax
        mov     $0x30000, %ecx
        mov     $1, %edx
        TDCALL
        mov     %rax, SCRATCH + 0x260
        REPORT  0x230, SCRATCH + 0x240, SCRATCH + 0x248, SCRATCH + 0x250, SCRATCH + 0x258
        REPORT  0x231, SCRATCH + 0x260, $0, $0, $0
        jmp     done

done:   REPORT  0x1FF, $0, $0, $0, $0
        jmp     done

pf_handler:                     /* CR2 and error code recorded; PD[3] = 2 MB page at GPA 0 */
        push    %rax
        mov     %cr2, %rax
        mov     %rax, SCRATCH + 48
        mov     8(%rsp), %rax
        mov     %rax, SCRATCH + 56
        movq    $0x83, 0x3018
        invlpg  0x610000
        pop     %rax
        add     $8, %rsp
        iretq

        .macro GATE vec, handler
        lea     \handler(%rip), %rax
        mov     $IDT + \vec * 16, %rdi
        mov     %ax, (%rdi)
        movw    $0x08, 2(%rdi)
        movw    $0x8E00, 4(%rdi)
        shr     $16, %rax
        mov     %ax, 6(%rdi)
        shr     $16, %rax
        mov     %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        .endm

setup_idt:
        GATE    20, ve_handler
        GATE    14, pf_handler
        lidt    idt_desc(%rip)
        ret

ve_handler:                     /* TDG.VP.VEINFO.GET, record, skip the instruction */
        push    %rax
        push    %rcx
        push    %rdx
        push    %r8
        push    %r9
        push    %r10
        mov     $3, %eax
        TDCALL
        mov     %rcx, SCRATCH
        mov     %r10, SCRATCH + 8
        mov     %rax, SCRATCH + 16
        mov     48(%rsp), %r8   /* RIP in the frame */
        mov     %r8, SCRATCH + 24
        and     $0xFFFFFFFF, %r10d
        add     %r10, 48(%rsp)
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

        .balign 8
table:  .quad   t_boot, t_info, t_ept, t_acc4k, t_acc2m, t_accmis, t_shared, t_loop
        .quad   t_hlt, t_triple, t_cpuid, t_pend, t_vm, t_bad, t_exits, t_compute
        .quad   t_info_loop, t_pf, t_lock, t_cpuid_leaves, t_smc, t_cx16, t_rmw, t_rtmr
        .set    ntests, (. - table) / 8
idt_desc:
        .word   256 * 16 - 1
        .quad   IDT
idt_empty:
        .word   0
        .quad   0
"""


class GuestBuildError(Exception):
    """The GNU toolchain is missing or rejected the guest."""


@cache
def build_guest() -> tuple[bytes, bytes]:
    """(64-bit code for GPA 0x10000, reset page for GPA 0xFFFFF000)."""
    tools = [shutil.which(t) for t in ("gcc", "ld", "objcopy")]
    if not all(tools):
        raise GuestBuildError("building the TD test guest needs gcc, ld and objcopy")
    with tempfile.TemporaryDirectory(prefix="vtdx-tdguest-") as d:
        p = Path(d)
        (p / "guest.S").write_text(GUEST_SOURCE)
        (p / "guest.ld").write_text(LINKER_SCRIPT)
        steps = [["gcc", "-c", "-o", "guest.o", "guest.S"],
                 ["ld", "-T", "guest.ld", "-o", "guest.elf", "guest.o"],
                 ["objcopy", "-O", "binary", "--only-section=.text64", "guest.elf", "t64"],
                 ["objcopy", "-O", "binary", "--only-section=.reset", "guest.elf", "reset"]]
        for cmd in steps:
            r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
            if r.returncode:
                raise GuestBuildError(f"{cmd[0]}: {r.stderr.strip()}")
        return (p / "t64").read_bytes(), (p / "reset").read_bytes()


LINKER_SCRIPT = """SECTIONS {
  .text64 0x10000 : { *(.text64) }
  .reset 0xFFFFF000 : { *(.reset) }
  /DISCARD/ : { *(.note*) *(.data) *(.bss) }
}
"""


def guest_pages(shared_bit: int, loop_count: int = 0) -> dict[int, bytes]:
    """Every private page of the test guest by GPA (what TDH.MEM.PAGE.ADD loads). Page
    tables (guest-physical): PML4 0x1000 -> PDPT 0x2000; 0-2 MB through PT 0x4000 (4 KB,
    identity), 2-4 MB and 4-6 MB as 2 MB pages (identity), VA 1 GB -> the shared GPA
    0x400000, and the reset page at 4 GB - 4 KB; code at 0x10000, data from SAVE, whose
    quadword at +64 is the loop routines' ``loop_count``."""
    text, reset = build_guest()
    pt: dict[int, bytearray] = {g: bytearray(4096) for g in range(0x1000, 0x9000, 4096)}

    def ent(table: int, idx: int, value: int) -> None:
        pt[table][idx * 8:idx * 8 + 8] = (value | 3).to_bytes(8, "little")

    ent(0x1000, 0, 0x2000)
    ent(0x2000, 0, 0x3000)
    ent(0x2000, 1, 0x7000)
    ent(0x2000, 3, 0x5000)
    ent(0x3000, 0, 0x4000)
    ent(0x3000, 1, ACCEPT_2M_GPA | 0x80)
    ent(0x3000, 2, MISMATCH_2M_GPA | 0x80)
    for i in range(512):
        ent(0x4000, i, i * 4096)
    ent(0x7000, 0, 0x8000)
    ent(0x8000, 0, shared_bit | SHARED_GPA)
    ent(0x5000, 511, 0x6000)
    ent(0x6000, 511, 0xFFFFF000)
    pages: dict[int, bytes] = {g: bytes(data) for g, data in pt.items()}
    for off in range(0, len(text), 4096):
        pages[0x10000 + off] = text[off:off + 4096].ljust(4096, b"\0")
    pages[0xFFFFF000] = reset.ljust(4096, b"\0")
    for g in range(SAVE, SAVE + 0x10000, 4096):
        pages[g] = bytes(4096)
    pages[SAVE] = bytes(64) + loop_count.to_bytes(8, "little") + bytes(4096 - 72)
    return pages


@dataclass
class Report:
    code: int
    values: tuple[int, int, int, int]


class GuestRig:
    """The test guest loaded in a sandbox TD, with one vCPU engine running routine
    ``routine``. Page tables (guest-physical): PML4 0x1000 -> PDPT 0x2000; 0-2 MB through
    PT 0x4000 (4 KB, identity), 2-4 MB and 4-6 MB as 2 MB pages (identity), VA 1 GB -> the
    shared GPA 0x400000, and the reset page at 4 GB - 4 KB."""

    def __init__(self, ram: HostRam, routine: int, config: TdConfig | None = None,
                 loop_count: int = 0, rcx_high: int = 0x5A5A_0000_1234_5600,
                 **engine_kw: object) -> None:
        self.ram = ram
        self.routine = routine
        self.td = td = SandboxTd(ram, config)
        for g, data in guest_pages(td.config.shared_bit).items():
            td.page_add(g, data)
        ram.write_u64(td.leaves[(0, SAVE)][1] + 64, loop_count)
        self.shared_ept = SharedEpt(td)
        self.shared_hpa = td.alloc()
        self.shared_ept.map(td.config.shared_bit | SHARED_GPA, self.shared_hpa)
        # Slices of half a second unless a test asks otherwise: a loaded host must not end
        # the slice before the exit a test waits for (tests of slices set their own).
        engine_kw.setdefault("slice_seconds", 0.5)
        self.engine = TdVcpuEngine(ram, td, vcpu_index=0, init_rcx=rcx_high | routine,
                                   **engine_kw)  # type: ignore[arg-type]
        self.engine.shared_eptp = self.shared_ept.eptp
        td.engines.add(self.engine)
        self.exits: list[TdExit] = []
        self.vmm = Regs()

    def enter(self, budget: int | None = None) -> TdExit:
        ex, out = self.engine.enter(self.vmm, budget)
        self.vmm = out
        self.exits.append(ex)
        return ex

    def next_report(self, max_entries: int = 1000) -> Report:
        """Enter until a TDG.VP.VMCALL exit; anything else is an error here."""
        for _ in range(max_entries):
            ex = self.enter()
            if ex.reason == EXIT_TDCALL:
                g = ex.gprs
                self.vmm.r10 = self.vmm.r11 = 0
                return Report(g.get("r11", 0), (g.get("r12", 0), g.get("r13", 0),
                                                g.get("r14", 0), g.get("r15", 0)))
            if ex.reason != 6:
                raise AssertionError(f"unexpected TD exit {ex}")
        raise AssertionError("no report")

    def lock_counter(self) -> int:
        """The 32-bit counter T_LOCK_LOOP increments (SCRATCH + 0x100)."""
        return int.from_bytes(self.ram.read(self.td.leaves[(0, SCRATCH)][1] + 0x100, 4),
                              "little")

    def _wide_counter_hpa(self) -> int:
        return self.td.leaves[(0, SCRATCH)][1] + (WIDE_COUNTER - SCRATCH)

    def wide_counter(self) -> int:
        """The 128-bit counter T_CMPXCHG16B_LOOP increments."""
        return int.from_bytes(self.ram.read(self._wide_counter_hpa(), 16), "little")

    def scratch_hpa(self, gpa: int) -> int:
        """Host address of a guest-physical address in the scratch page."""
        return self.td.leaves[(0, SCRATCH)][1] + (gpa - SCRATCH)

    def set_wide_counter(self, value: int) -> None:
        self.ram.write(self._wide_counter_hpa(), value.to_bytes(16, "little"))


def lock_loop_on_two_vcpus(ram: HostRam, n: int) -> int:
    """Two vCPU engines of one TD on two threads, each running T_LOCK_LOOP ``n`` times on
    one counter, as two vCPU threads of KVM would: the counter at the end (2n if LOCK is
    atomic across engines)."""
    return run_on_two_vcpus(GuestRig(ram, T_LOCK_LOOP, loop_count=n)).lock_counter()


def run_on_two_vcpus(rig: GuestRig) -> GuestRig:
    """Run the rig's routine on its engine and on a second vCPU engine of the same TD, on
    two threads at once, each until its final report; the rig, for reading the result."""
    other = TdVcpuEngine(rig.ram, rig.td, vcpu_index=1, init_rcx=rig.routine)
    rig.td.engines.add(other)

    def run(eng: TdVcpuEngine) -> None:
        while eng.run().reason != EXIT_TDCALL:
            pass

    threads = [threading.Thread(target=run, args=(e,)) for e in (rig.engine, other)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return rig
