/* TD guest entry: the reset vector, the switch from the 32-bit flat state TDH.VP.INIT
 * leaves (CR0 = PE|NE, CR4 = MCE|VMXE, EFER = SCE|LME|NXE, CS/DS 4 GiB flat; tdx-module
 * td_vmcs_init.c) to 64-bit mode, and TDCALL, which C cannot express register-exactly.
 *
 * Registers at the reset vector (tdx-module tdh_vp_init.c, init_vcpu_gprs_and_registers):
 * RBX = maximum PA width, RCX = R8 = the VMM's initial value, RDX = CPUID(1).EAX,
 * RSI = vCPU index. Nothing here needs memory to be writable before paging is on: the page
 * tables are part of the image (added and measured by the VMM), built by the assembler. */

#include "tdguest.h"

#define PTE_P		0x1
#define PTE_RW		0x2
#define PTE_PS		0x80
#define STACK_SIZE	0x2000

/* ---- the last 16 bytes below 4 GiB ---- */
	.section .resetvec, "ax"
	.code32
	.globl reset_vector
reset_vector:
	jmp	start32
	.fill	16 - (. - reset_vector), 1, 0xF4

/* ---- 32-bit flat protected mode, paging off ---- */
	.section .text.start32, "ax"
	.code32
start32:
	mov	%cr4, %eax			/* read-modify-write keeps MCE (and the module's */
	or	$0x20, %eax			/* view of VMXE) as they are: only PAE changes */
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	%cr0, %eax			/* EFER.LME is already 1: PG turns on long mode */
	or	$0x80000000, %eax
	mov	%eax, %cr0
	lgdt	gdt_desc
	ljmp	$0x08, $start64

/* ---- 64-bit mode ---- */
	.text
	.code64
start64:
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	xor	%eax, %eax
	mov	%eax, %fs
	mov	%eax, %gs
	mov	%esi, %esi			/* vCPU index, zero-extended */
	cmp	$TDG_MAX_VCPUS, %esi
	jae	too_many_vcpus
	lea	stacks(%rip), %rsp
	mov	%rsi, %rax
	inc	%rax
	shl	$13, %rax			/* (index + 1) * STACK_SIZE */
	add	%rax, %rsp
	/* tdg_main(vcpu, init_rcx, init_r8, max_pa, cpuid1_eax): RCX and R8 kept their
	 * 64-bit values (32-bit code never wrote them); the others are 32-bit quantities. */
	mov	%rsi, %rdi			/* vcpu */
	mov	%rcx, %rsi			/* init_rcx */
	mov	%edx, %r9d			/* cpuid1_eax (temporarily) */
	mov	%r8, %rdx			/* init_r8 */
	mov	%ebx, %ecx			/* max_pa */
	mov	%r9d, %r8d			/* cpuid1_eax */
	xor	%ebp, %ebp
	call	tdg_main
1:	pause					/* tdg_main does not return; never run on */
	jmp	1b

too_many_vcpus:				/* no stack for it: a triple fault stops the TD */
	lidt	null_idt(%rip)
	ud2

/* void tdcall(struct tdcall_regs *r): RAX, RCX, RDX, R8..R15 from *r, TDCALL, results back
 * into *r. RBX, RBP, RSI, RDI are never passed (not in any RCX mask used here). */
	.globl tdcall
tdcall:
	push	%rbx
	push	%rbp
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	push	%rdi
	mov	0(%rdi), %rax
	mov	8(%rdi), %rcx
	mov	16(%rdi), %rdx
	mov	24(%rdi), %r8
	mov	32(%rdi), %r9
	mov	40(%rdi), %r10
	mov	48(%rdi), %r11
	mov	56(%rdi), %r12
	mov	64(%rdi), %r13
	mov	72(%rdi), %r14
	mov	80(%rdi), %r15
	.byte	0x66, 0x0f, 0x01, 0xcc		/* TDCALL */
	pop	%rdi
	mov	%rax, 0(%rdi)
	mov	%rcx, 8(%rdi)
	mov	%rdx, 16(%rdi)
	mov	%r8, 24(%rdi)
	mov	%r9, 32(%rdi)
	mov	%r10, 40(%rdi)
	mov	%r11, 48(%rdi)
	mov	%r12, 56(%rdi)
	mov	%r13, 64(%rdi)
	mov	%r14, 72(%rdi)
	mov	%r15, 80(%rdi)
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%rbp
	pop	%rbx
	ret

/* void flush_tlb(void): reload CR3 after a page-table edit. */
	.globl flush_tlb
flush_tlb:
	mov	%cr3, %rax
	mov	%rax, %cr3
	ret

/* ---- descriptor tables ---- */
	.section .rodata.gdt, "a"
	.align	16
gdt:
	.quad	0
	.quad	0x00AF9A000000FFFF		/* 0x08: 64-bit code */
	.quad	0x00CF92000000FFFF		/* 0x10: data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt
null_idt:
	.word	0
	.quad	0

/* ---- page tables: VA [0, 2M) -> private RAM, [2M, 4M) -> its shared alias (the
 * shared bit is set by the guest once TDG.VP.INFO told it the GPA width), and the 2 MiB
 * below 4 GiB -> the image itself, all identity-mapped with 2 MiB pages. ---- */
	.section .data.pagetables, "aw"
	.balign	4096
	.globl pml4, pd_low
pml4:
	.quad	pdpt + PTE_P + PTE_RW
	.fill	511, 8, 0
pdpt:
	.quad	pd_low + PTE_P + PTE_RW
	.quad	0
	.quad	0
	.quad	pd_high + PTE_P + PTE_RW
	.fill	508, 8, 0
pd_low:
	.quad	TDG_RAM_GPA + PTE_P + PTE_RW + PTE_PS
	.quad	0				/* shared alias: filled in by the guest */
	.fill	510, 8, 0
pd_high:
	.fill	511, 8, 0
	.quad	0xFFE00000 + PTE_P + PTE_RW + PTE_PS

	.section .bss.stacks, "aw", @nobits
	.balign	4096
stacks:
	.skip	TDG_MAX_VCPUS * STACK_SIZE
	.section .note.GNU-stack, "", @progbits
