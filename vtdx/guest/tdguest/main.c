/* TD guest of the kvm-td payload: freestanding C running in 64-bit mode (start.S got it
 * there from the reset vector). Everything it needs from outside goes through the TDX
 * module: TDG.VP.INFO, TDG.VM.RD, TDG.MEM.PAGE.ACCEPT, and TDG.VP.VMCALL for the VMM
 * (GHCI: Instruction.IO, #VE.RequestMMIO, MapGPA, ReportFatalError).
 *
 * vCPU 0 runs every check; vCPU 1 (when the VMM made two) the TD-wide ones and its own
 * private pages. Each prints its progress on the console port and ends with PASS on the
 * done port, or ReportFatalError naming the first check that failed. */
#include <stddef.h>
#include <stdint.h>

#include "tdguest.h"

struct tdcall_regs {
	uint64_t rax, rcx, rdx, r8, r9, r10, r11, r12, r13, r14, r15;
};

void tdcall(struct tdcall_regs *r);
void *memcpy(void *d, const void *s, size_t n);
void flush_tlb(void);
void tdg_main(uint32_t vcpu, uint64_t init_rcx, uint64_t init_r8, uint32_t max_pa,
	      uint32_t cpuid1_eax) __attribute__((noreturn));
extern uint64_t pd_low[512];

#define TDG_VP_VMCALL		0
#define TDG_VP_INFO		1
#define TDG_MR_RTMR_EXTEND	2
#define TDG_MEM_PAGE_ACCEPT	6
#define TDG_VM_RD		7

/* GHCI sub-functions (R11 of TDG.VP.VMCALL with R10 = 0). */
#define VMCALL_CPUID		10
#define VMCALL_IO		30
#define VMCALL_MMIO		48
#define VMCALL_MAP_GPA		0x10001
#define VMCALL_REPORT_FATAL	0x10003
#define VMCALL_STATUS_RETRY	1
/* R10..R15 go to the VMM. */
#define VMCALL_REG_MASK		0xFC00

/* Guest checks: bit numbers in tdg_report.checks, and the error code of ReportFatalError. */
enum {
	CHECK_INIT_REGS = 1,	/* RCX = R8 = the configuration block's GPA */
	CHECK_VP_INFO,		/* TDG.VP.INFO against the configuration */
	CHECK_VM_RD,		/* TDG.VM.RD against the configuration */
	CHECK_ACCEPT,		/* accept, write and read back private pages */
	CHECK_IO_IN,		/* an IO read answered by the VMM */
	CHECK_MMIO,		/* an MMIO write and read answered by the VMM */
	CHECK_MAP_SHARED,	/* MapGPA to shared */
	CHECK_SHARED_RW,	/* report in the shared page, acknowledged by the VMM */
	CHECK_MAP_PRIVATE,	/* MapGPA back to private, accepted again, zeroed */
	CHECK_RTMR,		/* TDG.MR.RTMR.EXTEND: a bad index refused, RTMR[2] extended */
};

/* TDX_OPERAND_INVALID with operand id RDX (2). */
#define TDX_OPERAND_INVALID_RDX	0xC000010000000002ULL

/* The 48 bytes TDG.MR.RTMR.EXTEND reads: private memory of the image, 64-byte aligned as the
 * leaf requires (the image is identity-mapped, so its address is its GPA). */
static uint8_t rtmr_data[48] __attribute__((aligned(64)));

static volatile struct tdg_config *const cfg = (volatile struct tdg_config *)TDG_CONFIG_GPA;

/* Set by each other vCPU once it has passed and made its last exit to the VMM (private
 * memory of the image, seen by every vCPU). vCPU 0 converts pages only after that: KVM's
 * conversion holds mmu_lock for write, so a vCPU still faulting would wait on it, and a
 * vCPU whose VMM thread still runs may wait on vCPU 0's CPU (a TLB shootdown IPI while a
 * call there is held) instead of re-entering the TD. So the conversions meet a vCPU that
 * only spins and re-enters, as the race scenarios of docs/races.md need. One byte per
 * vCPU: no locked instruction needed. */
static volatile uint8_t pages_done[TDG_MAX_VCPUS];

static uint64_t vmcall(uint64_t fn, uint64_t a12, uint64_t a13, uint64_t a14, uint64_t a15,
		       uint64_t *r11)
{
	struct tdcall_regs r = {
		.rax = TDG_VP_VMCALL, .rcx = VMCALL_REG_MASK, .r10 = 0, .r11 = fn,
		.r12 = a12, .r13 = a13, .r14 = a14, .r15 = a15,
	};

	tdcall(&r);
	if (r11)
		*r11 = r.r11;
	/* A TDCALL failure itself (RAX) is as fatal as a VMM error (R10). */
	return r.rax ? r.rax : r.r10;
}

static void outb(uint16_t port, uint8_t v)
{
	vmcall(VMCALL_IO, 1, 1, port, v, NULL);
}

static void outl(uint16_t port, uint32_t v)
{
	vmcall(VMCALL_IO, 4, 1, port, v, NULL);
}

static uint64_t inl(uint16_t port, uint32_t *v)
{
	uint64_t val = 0, st = vmcall(VMCALL_IO, 4, 0, port, 0, &val);

	*v = (uint32_t)val;
	return st;
}

static void puts_(const char *s)
{
	while (*s)
		outb(TDG_PORT_CONSOLE, (uint8_t)*s++);
}

static void puthex(uint64_t v)
{
	char buf[19];
	int i = 18;

	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 0xF];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts_(&buf[i]);
}

static void say(uint32_t vcpu, const char *what)
{
	puts_("vcpu");
	outb(TDG_PORT_CONSOLE, (uint8_t)('0' + vcpu));
	puts_(": ");
	puts_(what);
}

static __attribute__((noreturn)) void fail(uint32_t vcpu, int check, uint64_t detail)
{
	say(vcpu, "FAIL check ");
	puthex((uint64_t)check);
	puts_(" detail ");
	puthex(detail);
	puts_("\n");
	for (;;)
		vmcall(VMCALL_REPORT_FATAL, (uint64_t)check, 0, 0, 0, NULL);
}

static uint64_t accept_page(uint64_t gpa)
{
	struct tdcall_regs r;
	int tries = 0;

	do { /* a busy S-EPT entry (another vCPU, KVM mapping it) is worth another try */
		r = (struct tdcall_regs){ .rax = TDG_MEM_PAGE_ACCEPT, .rcx = gpa /* 4K level */ };
		tdcall(&r);
	} while ((r.rax >> 32) == 0x80000200 && ++tries < 1000);
	return r.rax;
}

static uint64_t vm_rd(uint64_t field, uint64_t *value)
{
	struct tdcall_regs r = { .rax = TDG_VM_RD, .rdx = field };

	tdcall(&r);
	*value = r.r8;
	return r.rax;
}

static uint64_t map_gpa(uint64_t gpa, uint64_t size)
{
	uint64_t end = gpa + size, next = gpa, st;

	for (int tries = 0; tries < 1000; tries++) {
		st = vmcall(VMCALL_MAP_GPA, next, end - next, 0, 0, &next);
		if (st != VMCALL_STATUS_RETRY)
			return st;
	}
	return st;
}

static uint64_t pattern(uint64_t gpa, uint64_t i)
{
	return cfg->secret ^ (gpa + i * 8) * 0x9E3779B97F4A7C15ULL;
}

/* Accept the vCPU's private pages (KVM maps them on the EPT violation the first ACCEPT
 * causes), fill them and read them back; the sum of what was read. */
static uint64_t use_private_pages(uint32_t vcpu, uint64_t *accepted)
{
	uint64_t base = TDG_ACCEPT_GPA(vcpu), sum = 0, st;

	for (uint64_t p = 0; p < TDG_ACCEPT_PAGES(vcpu); p++) {
		uint64_t gpa = base + p * 4096;
		volatile uint64_t *q = (volatile uint64_t *)gpa;

		st = accept_page(gpa);
		if (st)
			fail(vcpu, CHECK_ACCEPT, st);
		for (uint64_t i = 0; i < 512; i++) /* ACCEPT hands over a zeroed page */
			if (q[i])
				fail(vcpu, CHECK_ACCEPT, gpa + i * 8);
		for (uint64_t i = 0; i < 512; i++)
			q[i] = pattern(gpa, i);
		for (uint64_t i = 0; i < 512; i++) {
			if (q[i] != pattern(gpa, i))
				fail(vcpu, CHECK_ACCEPT, gpa + i * 8);
			sum += q[i];
		}
		++*accepted;
	}
	return sum;
}

void tdg_main(uint32_t vcpu, uint64_t init_rcx, uint64_t init_r8, uint32_t max_pa,
	      uint32_t cpuid1_eax)
{
	struct tdg_report rep = { .magic = TDG_REPORT_MAGIC, .vcpu = vcpu };
	struct tdcall_regs r;
	uint64_t st, shared_bit, v;
	uint32_t in;

	(void)max_pa;
	(void)cpuid1_eax;
	say(vcpu, "64-bit mode\n");
	rep.init_rcx = init_rcx;
	rep.init_r8 = init_r8;
	if (init_rcx != TDG_CONFIG_GPA || init_r8 != init_rcx || cfg->magic != TDG_CONFIG_MAGIC)
		fail(vcpu, CHECK_INIT_REGS, init_rcx);
	rep.checks |= 1u << CHECK_INIT_REGS;

	r = (struct tdcall_regs){ .rax = TDG_VP_INFO };
	tdcall(&r);
	rep.vp_info[0] = r.rcx;
	rep.vp_info[1] = r.rdx;
	rep.vp_info[2] = r.r8;
	rep.vp_info[3] = r.r9;
	if (r.rax)
		fail(vcpu, CHECK_VP_INFO, r.rax);
	if ((r.rcx & 0x3F) != cfg->gpaw || r.rdx != cfg->attributes ||
	    (uint32_t)r.r8 != cfg->nr_vcpus || (r.r8 >> 32) != cfg->max_vcpus ||
	    (uint32_t)r.r9 != vcpu)
		fail(vcpu, CHECK_VP_INFO, r.r9);
	rep.checks |= 1u << CHECK_VP_INFO;
	shared_bit = 1ULL << ((r.rcx & 0x3F) - 1);

	st = vm_rd(TDG_FIELD_ATTRIBUTES, &rep.vm_attributes);
	if (!st)
		st = vm_rd(TDG_FIELD_XFAM, &rep.vm_xfam);
	if (!st)
		st = vm_rd(TDG_FIELD_MAX_VCPUS, &rep.vm_max_vcpus);
	if (st)
		fail(vcpu, CHECK_VM_RD, st);
	if (rep.vm_attributes != cfg->attributes || (rep.vm_xfam & cfg->xfam) != cfg->xfam ||
	    rep.vm_max_vcpus != cfg->max_vcpus)
		fail(vcpu, CHECK_VM_RD, rep.vm_attributes);
	rep.checks |= 1u << CHECK_VM_RD;
	say(vcpu, "TDG.VP.INFO and TDG.VM.RD match the VMM's configuration\n");

	for (uint32_t i = 0; i < sizeof(rtmr_data); i++)
		rtmr_data[i] = (uint8_t)(i * 3 + 1);
	r = (struct tdcall_regs){ .rax = TDG_MR_RTMR_EXTEND, .rcx = (uint64_t)rtmr_data,
				  .rdx = 4 };
	tdcall(&r);
	if (r.rax != TDX_OPERAND_INVALID_RDX)
		fail(vcpu, CHECK_RTMR, r.rax);
	r = (struct tdcall_regs){ .rax = TDG_MR_RTMR_EXTEND, .rcx = (uint64_t)rtmr_data,
				  .rdx = 2 };
	tdcall(&r);
	if (r.rax)
		fail(vcpu, CHECK_RTMR, r.rax);
	rep.checks |= 1u << CHECK_RTMR;
	say(vcpu, "TDG.MR.RTMR.EXTEND extended RTMR[2] and refused RTMR[4]\n");

	rep.sum = use_private_pages(vcpu, &rep.accepted);
	rep.checks |= 1u << CHECK_ACCEPT;
	say(vcpu, "accepted and used private pages\n");

	if (vcpu != 0) {
		say(vcpu, "PASS\n");
		outl(TDG_PORT_DONE, TDG_DONE_PASS);
		pages_done[vcpu] = 1; /* its last exit to the VMM is behind it */
		for (;;)
			;
	}

	/* TD exit round trips: TDVMCALL<Instruction.CPUID>, which KVM answers in the kernel
	 * (arch/x86/kvm/vmx/tdx.c tdx_emulate_cpuid) and enters again, between two marks the
	 * VMM times. */
	if (cfg->bench_exits) {
		outl(TDG_PORT_BENCH, 1);
		for (uint32_t i = 0; i < cfg->bench_exits; i++) {
			struct tdcall_regs r = {
				.rax = TDG_VP_VMCALL, .rcx = VMCALL_REG_MASK, .r11 = VMCALL_CPUID,
			};

			tdcall(&r);
			if (r.rax || r.r10)
				fail(vcpu, CHECK_IO_IN, r.rax ? r.rax : r.r10);
		}
		outl(TDG_PORT_BENCH, 2);
	}

	/* Emulated IO and MMIO: the VMM answers in KVM_RUN's exit data. */
	st = inl(TDG_PORT_CONFIG, &in);
	if (st || in != (uint32_t)TDG_CONFIG_MAGIC)
		fail(vcpu, CHECK_IO_IN, st ? st : in);
	rep.checks |= 1u << CHECK_IO_IN;
	st = vmcall(VMCALL_MMIO, 8, 1, TDG_MMIO_GPA | shared_bit, cfg->cookie, NULL);
	if (!st)
		st = vmcall(VMCALL_MMIO, 8, 0, TDG_MMIO_GPA | shared_bit, 0, &rep.mmio_read);
	if (st || rep.mmio_read != cfg->cookie)
		fail(vcpu, CHECK_MMIO, st ? st : rep.mmio_read);
	rep.checks |= 1u << CHECK_MMIO;

	/* Private -> shared: the page the report goes through; first the other vCPUs' pages
	 * (bounded: a vCPU that failed has reported it, and the VMM ends the run). */
	for (uint64_t spins = 0; spins < (TDG_U64(1) << 26); spins++) {
		uint32_t done = 1;

		for (uint32_t i = 1; i < cfg->nr_vcpus && i < TDG_MAX_VCPUS; i++)
			done &= pages_done[i];
		if (done)
			break;
	}
	st = accept_page(TDG_SHARED_GPA);
	if (st)
		fail(vcpu, CHECK_MAP_SHARED, st);
	*(volatile uint64_t *)TDG_SHARED_GPA = cfg->secret;
	st = map_gpa(TDG_SHARED_GPA | shared_bit, 4096);
	if (st)
		fail(vcpu, CHECK_MAP_SHARED, st);
	rep.checks |= 1u << CHECK_MAP_SHARED;
	pd_low[1] = TDG_RAM_GPA | shared_bit | 0x83; /* P | RW | PS */
	flush_tlb();
	say(vcpu, "page converted to shared\n");

	{
		volatile struct tdg_report *sh =
			(volatile struct tdg_report *)(TDG_SHARED_VA + TDG_SHARED_GPA);

		rep.cookie = cfg->cookie;
		rep.checks |= 1u << CHECK_SHARED_RW; /* as far as the guest can tell so far */
		memcpy((void *)sh, &rep, sizeof(rep)); /* vmm_ack is 0 in rep */
		outl(TDG_PORT_DOORBELL, 1);
		v = sh->vmm_ack;
		if (v != ~cfg->cookie)
			fail(vcpu, CHECK_SHARED_RW, v);
	}
	say(vcpu, "VMM acknowledged the report in the shared page\n");

	/* Shared -> private: the page comes back empty and must be accepted again. */
	pd_low[1] = 0;
	flush_tlb();
	st = map_gpa(TDG_SHARED_GPA, 4096);
	if (st)
		fail(vcpu, CHECK_MAP_PRIVATE, st);
	st = accept_page(TDG_SHARED_GPA);
	if (st)
		fail(vcpu, CHECK_MAP_PRIVATE, st);
	for (uint64_t i = 0; i < 512; i++)
		if (((volatile uint64_t *)TDG_SHARED_GPA)[i])
			fail(vcpu, CHECK_MAP_PRIVATE, i);
	say(vcpu, "page converted back to private\n");

	say(vcpu, "PASS\n");
	outl(TDG_PORT_DONE, TDG_DONE_PASS);
	for (;;)
		;
}

/* The compiler may turn struct initialisations and copies into calls of these. */
void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}
