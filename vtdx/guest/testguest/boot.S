/* vtdx test guest: multiboot v1 entry (32-bit), long-mode switch, AP trampoline, exception
 * stubs and the two register-exact helpers (SEAMCALL, guarded call) C cannot express. */

#include "testguest.h"
#define TR(x) ((x) - tramp_start + TRAMPOLINE)   /* address of a trampoline label once copied */

    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002                    /* magic */
    .long 0                             /* flags: ELF image, nothing else needed */
    .long -0x1BADB002                   /* checksum */

/* ---- BSP entry: 32-bit protected mode, paging off, EBX = multiboot info ---- */
    .text
    .code32
    .globl _start
_start:
    cli
    mov %ebx, %esi
    cld                                 /* zero .bss: page tables, stacks, per-CPU data */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov %esi, mb_info
    mov $(bsp_stack + 16384), %esp

    /* Identity map [0, 16 GiB) with 1 GiB pages; U/S set everywhere so the ring-3 test can
     * run code and use a stack anywhere (SMEP/SMAP stay off). */
    mov $pdpt, %edi
    mov $0x87, %eax                     /* P | RW | US | PS */
    xor %edx, %edx
    mov $16, %ecx
1:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x40000000, %eax
    adc $0, %edx
    add $8, %edi
    loop 1b
    mov $pdpt, %eax
    or $0x7, %eax
    mov %eax, pml4

enter_long_mode:                        /* shared by BSP and APs (32-bit, flat segments) */
    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000021, %eax                /* PG | NE | PE (NE: VMXON's CR0 fixed bits) */
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $KCODE, $long_entry

    .code64
long_entry:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov ap_stack_top(%rip), %rsp        /* 0 on the BSP: keep the boot stack */
    test %rsp, %rsp
    jnz 2f
    mov $(bsp_stack + 16384), %rsp
    mov mb_info(%rip), %edi
    call kmain
    jmp halt_forever
2:  call ap_main
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---- AP trampoline: copied to TRAMPOLINE, entered in real mode by the SIPI ---- */
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TR(tramp_gdtr)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KCODE32, $TR(tramp_pm)
    .code32
tramp_pm:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $enter_long_mode, %eax          /* absolute jump: this code runs from a copy */
    jmp *%eax
    .align 4
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:

/* ---- void seamcall_regs(struct sregs *r): RAX..R15 + RFLAGS in, RAX..R15 + RFLAGS out ---- */
    .code64
    .globl seamcall_regs
seamcall_regs:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdi
    push 112(%rdi)                      /* RFLAGS in: tests preset the arithmetic flags so */
    popfq                               /* only the SEAMCALL itself can produce the result */
    mov 0(%rdi), %rax
    mov 8(%rdi), %rcx
    mov 16(%rdi), %rdx
    mov 24(%rdi), %rbx
    mov 32(%rdi), %rsi
    mov 48(%rdi), %r8
    mov 56(%rdi), %r9
    mov 64(%rdi), %r10
    mov 72(%rdi), %r11
    mov 80(%rdi), %r12
    mov 88(%rdi), %r13
    mov 96(%rdi), %r14
    mov 104(%rdi), %r15
    mov 40(%rdi), %rdi
    .globl seamcall_insn
seamcall_insn:
    .byte 0x66, 0x0f, 0x01, 0xcf        /* SEAMCALL */
    pushfq
    push %rdi
    mov 16(%rsp), %rdi
    mov %rax, 0(%rdi)
    mov %rcx, 8(%rdi)
    mov %rdx, 16(%rdi)
    mov %rbx, 24(%rdi)
    mov %rsi, 32(%rdi)
    mov %r8, 48(%rdi)
    mov %r9, 56(%rdi)
    mov %r10, 64(%rdi)
    mov %r11, 72(%rdi)
    mov %r12, 80(%rdi)
    mov %r13, 88(%rdi)
    mov %r14, 96(%rdi)
    mov %r15, 104(%rdi)
    pop %rax
    mov %rax, 40(%rdi)
    pop %rax
    mov %rax, 112(%rdi)                 /* RFLAGS */
    pop %rdi
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

/* ---- Ring-3 code: SEAMCALL(0xE000) at CPL3, then int $0x81 ("returned without a fault") ---- */
    .globl user_seamcall
user_seamcall:
    mov $0xE000, %eax
    .byte 0x66, 0x0f, 0x01, 0xcf
    int $0x81
    jmp .

/* ---- int guard_call(struct guard *g, void (*fn)(void *), void *arg)
 * Returns 0 when fn returns; 1 when an exception inside fn was redirected to guard_resume
 * by the exception handler (which leaves g in RDI). Like setjmp/longjmp. ---- */
    .globl guard_call, guard_resume
guard_call:
    mov %rbx, 0(%rdi)
    mov %rbp, 8(%rdi)
    mov %r12, 16(%rdi)
    mov %r13, 24(%rdi)
    mov %r14, 32(%rdi)
    mov %r15, 40(%rdi)
    mov %rsp, 48(%rdi)
    mov %rdx, %rdi
    call *%rsi
    xor %eax, %eax
    ret
guard_resume:
    mov 0(%rdi), %rbx
    mov 8(%rdi), %rbp
    mov 16(%rdi), %r12
    mov 24(%rdi), %r13
    mov 32(%rdi), %r14
    mov 40(%rdi), %r15
    mov 48(%rdi), %rsp
    mov $1, %eax
    ret

/* ---- void enter_user(u64 rip, u64 rsp): iretq to CPL3 ---- */
    .globl enter_user
enter_user:
    push $UDATA                         /* SS = user data | 3 */
    push %rsi
    push $0x2                           /* RFLAGS: IF=0 */
    push $UCODE                         /* CS = user code64 | 3 */
    push %rdi
    iretq

/* ---- exception stubs: push (error code), vector; save GPRs; call trap(frame) ---- */
    .macro stub vec, has_err
    .align 16
    .if \has_err == 0
    push $0
    .endif
    push $\vec
    jmp trap_common
    .endm

    .align 16
    .globl trap_stubs
trap_stubs:                              /* 32 stubs for vectors 0..31, 16 bytes apart */
    stub 0,0
    stub 1,0
    stub 2,0
    stub 3,0
    stub 4,0
    stub 5,0
    stub 6,0
    stub 7,0
    stub 8,1
    stub 9,0
    stub 10,1
    stub 11,1
    stub 12,1
    stub 13,1
    stub 14,1
    stub 15,0
    stub 16,0
    stub 17,1
    stub 18,0
    stub 19,0
    stub 20,0
    stub 21,1
    stub 22,0
    stub 23,0
    stub 24,0
    stub 25,0
    stub 26,0
    stub 27,0
    stub 28,0
    stub 29,1
    stub 30,1
    stub 31,0
    .align 16
    .globl trap_user_done
trap_user_done:                          /* vector 0x81, DPL3 gate */
    stub USER_DONE_VECTOR,0

trap_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                       /* vector, error code */
    iretq

/* ---- data: GDT (TSS descriptors filled in by C), boot variables, page tables, BSP stack ---- */
    .data
    .align 16
    .globl gdt, gdt_ptr, mb_info, ap_stack_top
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF            /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF            /* 0x18 user data (DPL3) */
    .quad 0x00AFFA000000FFFF            /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x00CF9A000000FFFF            /* 0x28 kernel code, 32-bit (AP trampoline) */
    .fill 2 * MAX_CPUS, 8, 0            /* TSS_SEL(cpu): one 16-byte TSS descriptor per CPU */
gdt_end:
    .align 8
    .word 0, 0, 0
gdt_ptr:                                /* limit + base, also loaded by lgdt in 32-bit mode */
    .word gdt_end - gdt - 1
    .quad gdt
mb_info:
    .long 0
    .align 8
ap_stack_top:                           /* set by the BSP before starting each AP */
    .quad 0

    .bss
    .align 4096
    .globl pml4, pdpt
pml4:
    .skip 4096
pdpt:
    .skip 4096
bsp_stack:
    .skip 16384
    .section .note.GNU-stack, "", @progbits
