/* kvm-td: a minimal TDX VMM. Takes one TD through its whole life with KVM's real ioctls.
 *
 *   kvm-td [--vcpus 1|2] [--stop-after STAGE] [--timeout SECONDS] [--no-pin]
 *          [--bench-exits N]
 *
 * STAGE is one of: vm, init-vm, vcpus, memory, image, finalize, run (the default: all).
 * Each stage is one KTAP test; the stages after --stop-after are reported as SKIP and the
 * TD is torn down from where it stands, so a test can exercise a partial life.
 *
 *   vm        KVM_CREATE_VM(KVM_X86_TDX_VM), split IRQ chip, MapGPA exits to userspace,
 *             KVM_TDX_CAPABILITIES
 *   init-vm   KVM_TDX_INIT_VM (attributes, XFAM, CPUID configuration)
 *   vcpus     KVM_CREATE_VCPU, KVM_TDX_GET_CPUID, KVM_SET_CPUID2, KVM_TDX_INIT_VCPU
 *   memory    KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2, KVM_SET_MEMORY_ATTRIBUTES
 *   image     KVM_TDX_INIT_MEM_REGION with KVM_TDX_MEASURE_MEMORY_REGION (the TD guest)
 *   finalize  KVM_TDX_FINALIZE_VM
 *   run       KVM_RUN on every vCPU (one thread each) until its guest says PASS, reports a
 *             fatal error or the TD shuts down; IO, MMIO, MapGPA (KVM_EXIT_HYPERCALL ->
 *             KVM_SET_MEMORY_ATTRIBUTES + guest_memfd punch-hole) and system events handled.
 *             A vCPU whose guest passed stays in KVM_RUN (its guest spins) until every vCPU
 *             has ended, as a VMM keeps running a vCPU whose guest idles: KVM keeps
 *             entering it while the others map and convert memory.
 *
 * --bench-exits N: the guest's vCPU 0 makes N TDVMCALL<CPUID> exits in a row (KVM answers
 * them in the kernel and enters again); the VMM times the loop between the guest's two
 * marks and prints "# td_exit_round_trip: N exits in T us, R/s".
 *
 * vCPU thread N is pinned to CPU N (modulo the CPUs online) unless --no-pin: which CPU, and
 * so which TDX LP, a vCPU enters from is then the same in every run, so a pause or a
 * contention schedule keyed on the LP meets the same call each time. The main thread, which
 * builds the TD (KVM_TDX_INIT_VCPU, KVM_TDX_INIT_MEM_REGION), stays on the CPU it started
 * on (the caller's `taskset` chooses it): Linux 7.3 KVM loses a vCPU's association when
 * that thread migrates inside KVM_TDX_INIT_VCPU (docs/races.md;
 * tests/test_kernel_td_race.py forces it by moving the thread from outside).
 *
 * The TD guest (guest/tdguest/) is built with this program and linked into it
 * (tdguest_image.h, generated at build time). Every ioctl's outcome is a diagnostic line
 * "# <IOCTL>[.<vcpu>]: ok" or "# <IOCTL>[.<vcpu>]: <errno text> hw_error <status>", the
 * guest's console lines are "# td.vcpu<N>: <text>". Needs the booted kernel's UAPI
 * headers; built against older ones it reports SKIP. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/kvm_para.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <cpuid.h>
#include <unistd.h>

#include "ktap.h"

/* Diagnostics come from the vCPU threads too: one line at a time. */
#define diag(...) do { flockfile(stdout); ktap_diag(__VA_ARGS__); funlockfile(stdout); } while (0)

#if defined(KVM_X86_TDX_VM) && defined(KVM_CREATE_GUEST_MEMFD) && defined(KVM_EXIT_TDX)
#define HAVE_TDX_UAPI 1
#include "tdguest.h"
#include "tdx-cpuid.h"
#include "tdguest_image.h"
#endif

#ifndef HAVE_TDX_UAPI
int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	ktap_header(1);
	ktap_skip("kvm_td", "built without the TDX KVM UAPI headers (--vtdx-kernel-src)");
	return 0;
}
#else

static const char *const stages[] = { "vm", "init-vm", "vcpus", "memory", "image",
				      "finalize", "run" };
enum { ST_VM, ST_INIT_VM, ST_VCPUS, ST_MEMORY, ST_IMAGE, ST_FINALIZE, ST_RUN, NR_STAGES };
/* KTAP tests: one per stage, the run's findings, teardown. */
static const char *const run_tests[] = { "td_console", "td_mmio", "td_map_gpa",
					 "td_shared_report" };
#define NR_RUN_TESTS (sizeof(run_tests) / sizeof(run_tests[0]))
#define NR_TESTS (NR_STAGES + NR_RUN_TESTS + 1)

static void usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--vcpus 1|2] [--stop-after vm|init-vm|vcpus|memory|image|"
		"finalize|run] [--timeout SECONDS] [--no-pin] [--bench-exits N]\n", argv0);
	exit(2);
}

#define NR_SLOTS 2
#define MAX_LINE 160

struct slot {
	uint64_t gpa, size;
	int gmem;		/* guest_memfd: the private backing */
	void *shared;		/* userspace memory: the shared backing */
};

struct vcpu {
	int idx, fd;
	struct kvm_run *run;
	pthread_t thread;
	char line[MAX_LINE];
	int line_len;
	int lines, io_exits, mmio_exits, map_gpa_exits, done;
	int passed;		/* the guest wrote TDG_DONE_PASS */
	int cpu;		/* the CPU the thread is pinned to, -1 if not */
	char why[200];		/* how the run ended, when not in a pass */
};

static struct {
	int kvm, vm, nr_vcpus, max_vcpus, stop_after, timeout, pin;
	int ended;		/* vCPU threads whose guest passed or whose run ended */
	struct kvm_tdx_capabilities *caps;
	struct kvm_tdx_init_vm *init;
	struct vcpu vcpus[TDG_MAX_VCPUS];
	struct slot slots[NR_SLOTS];
	struct tdg_config cfg;
	uint64_t shared_bit;
	pthread_mutex_t lock;
	/* run findings */
	uint64_t mmio_value;
	struct timespec bench_start, bench_end;
	int mmio_writes, mmio_reads, to_shared, to_private, punched, mem_faults, report_ok;
	char report_why[200];
	volatile sig_atomic_t stop, all_ended;
} g = { .kvm = -1, .vm = -1, .lock = PTHREAD_MUTEX_INITIALIZER };

/* ioctl with its outcome as a diagnostic; the KVM_MEMORY_ENCRYPT_OP variants add
 * hw_error (the SEAMCALL status KVM passes back). */
static int do_ioctl(int fd, unsigned long req, void *arg, const char *name, int vcpu,
		    const __u64 *hw_error)
{
	int ret = ioctl(fd, req, arg), err = errno;
	char key[64];

	if (vcpu >= 0)
		snprintf(key, sizeof(key), "%s.%d", name, vcpu);
	else
		snprintf(key, sizeof(key), "%s", name);
	if (ret < 0 && hw_error)
		diag("%s: %s hw_error %#llx", key, strerror(err),
			  (unsigned long long)*hw_error);
	else if (ret < 0)
		diag("%s: %s", key, strerror(err));
	else
		diag("%s: ok", key);
	errno = err;
	return ret;
}

static int tdx_op(int fd, uint32_t id, uint32_t flags, void *data, const char *name, int vcpu)
{
	struct kvm_tdx_cmd cmd = { .id = id, .flags = flags, .data = (uintptr_t)data };

	return do_ioctl(fd, KVM_MEMORY_ENCRYPT_OP, &cmd, name, vcpu, &cmd.hw_error);
}

static int enable_cap(uint32_t cap, uint64_t arg0, const char *name)
{
	struct kvm_enable_cap c = { .cap = cap, .args = { arg0 } };

	return do_ioctl(g.vm, KVM_ENABLE_CAP, &c, name, -1, NULL);
}

/* ------------------------------------------------------------------------ stages */

static int stage_vm(char *why, size_t n)
{
	int types;

	types = ioctl(g.kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
	diag("vm_types: %#x", types < 0 ? 0 : types);
	if (types < 0 || !(types & (1 << KVM_X86_TDX_VM))) {
		snprintf(why, n, "KVM offers no TDX VM type (kvm_intel.tdx=1? TDX up?)");
		return -1;
	}
	g.vm = do_ioctl(g.kvm, KVM_CREATE_VM, (void *)(uintptr_t)KVM_X86_TDX_VM,
			"KVM_CREATE_VM", -1, NULL);
	if (g.vm < 0) {
		snprintf(why, n, "KVM_CREATE_VM(KVM_X86_TDX_VM): %s", strerror(errno));
		return -1;
	}
	if (ioctl(g.vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0 ||
	    !(ioctl(g.vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES) &
	      KVM_MEMORY_ATTRIBUTE_PRIVATE)) {
		snprintf(why, n, "the TDX VM has no guest_memfd / private memory attribute");
		return -1;
	}
	g.max_vcpus = ioctl(g.vm, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
	diag("max_vcpus: %d", g.max_vcpus);
	/* TDX needs the local APIC in KVM and the I/O APIC in userspace (tdx_vcpu_create). */
	if (enable_cap(KVM_CAP_SPLIT_IRQCHIP, 24, "KVM_CAP_SPLIT_IRQCHIP") ||
	    /* MapGPA reaches userspace only as KVM_HC_MAP_GPA_RANGE (tdx_map_gpa). */
	    enable_cap(KVM_CAP_EXIT_HYPERCALL, 1ULL << KVM_HC_MAP_GPA_RANGE,
		       "KVM_CAP_EXIT_HYPERCALL")) {
		snprintf(why, n, "KVM_ENABLE_CAP: %s", strerror(errno));
		return -1;
	}
	g.caps = calloc(1, sizeof(*g.caps) + 256 * sizeof(struct kvm_cpuid_entry2));
	g.caps->cpuid.nent = 256;
	if (tdx_op(g.vm, KVM_TDX_CAPABILITIES, 0, g.caps, "KVM_TDX_CAPABILITIES", -1)) {
		snprintf(why, n, "KVM_TDX_CAPABILITIES: %s", strerror(errno));
		return -1;
	}
	diag("supported_attrs: %#llx", (unsigned long long)g.caps->supported_attrs);
	diag("supported_xfam: %#llx", (unsigned long long)g.caps->supported_xfam);
	diag("cpuid_configs: %u", g.caps->cpuid.nent);
	return 0;
}

/* The TD's CPUID: the host's values limited to the bits the module lets a VMM configure
 * (the capability entries are masks), guest physical address width 48. */
static int stage_init_vm(char *why, size_t n)
{
	unsigned int nent = g.caps->cpuid.nent;

	g.init = calloc(1, sizeof(*g.init) + nent * sizeof(struct kvm_cpuid_entry2));
	tdx_cpuid_from_caps(g.caps, g.init);
	/* SEPT_VE_DISABLE when offered (as QEMU's default): an access to a page that is not
	 * accepted exits to KVM instead of raising #VE in a guest that has no IDT. */
	g.init->attributes = g.caps->supported_attrs & (1ULL << 28);
	g.init->xfam = g.caps->supported_xfam & 0x3; /* x87 and SSE */
	if (tdx_op(g.vm, KVM_TDX_INIT_VM, 0, g.init, "KVM_TDX_INIT_VM", -1)) {
		snprintf(why, n, "KVM_TDX_INIT_VM: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* The entry of a leaf (subleaf 0) in a CPUID table with room for 4 more, added if missing. */
static struct kvm_cpuid_entry2 *cpuid_entry(struct kvm_cpuid2 *c, uint32_t function)
{
	struct kvm_cpuid_entry2 *e;

	for (unsigned int i = 0; i < c->nent; i++)
		if (c->entries[i].function == function && c->entries[i].index == 0)
			return &c->entries[i];
	e = &c->entries[c->nent++];
	memset(e, 0, sizeof(*e));
	e->function = function;
	return e;
}

static int stage_vcpus(char *why, size_t n)
{
	int mmap_size = ioctl(g.kvm, KVM_GET_VCPU_MMAP_SIZE, 0);

	for (int i = 0; i < g.nr_vcpus; i++) {
		struct vcpu *v = &g.vcpus[i];
		struct kvm_cpuid2 *cpuid;
		struct kvm_cpuid_entry2 *e;
		int ret;

		v->idx = i;
		v->fd = do_ioctl(g.vm, KVM_CREATE_VCPU, (void *)(uintptr_t)i, "KVM_CREATE_VCPU",
				 i, NULL);
		if (v->fd < 0) {
			snprintf(why, n, "KVM_CREATE_VCPU %d: %s", i, strerror(errno));
			return -1;
		}
		v->run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED) {
			v->run = NULL;
			snprintf(why, n, "mmap of vCPU %d's kvm_run: %s", i, strerror(errno));
			return -1;
		}
		/* The TD's CPUID as the module reports it (TDH.MNG.RD of its CPUID fields) is
		 * KVM's model of the vCPU; x2APIC is architectural in a TD and KVM needs it
		 * in the model to put the local APIC in x2APIC mode (tdx_vcpu_init). */
		cpuid = calloc(1, sizeof(*cpuid) + 260 * sizeof(struct kvm_cpuid_entry2));
		cpuid->nent = 256;
		if (tdx_op(v->fd, KVM_TDX_GET_CPUID, 0, cpuid, "KVM_TDX_GET_CPUID", i)) {
			/* Fall back to the configuration given to KVM_TDX_INIT_VM. */
			cpuid->nent = g.init->cpuid.nent;
			memcpy(cpuid->entries, g.init->cpuid.entries,
			       cpuid->nent * sizeof(struct kvm_cpuid_entry2));
		}
		cpuid_entry(cpuid, 1)->ecx |= 1u << 21;
		/* KVM's MAXPHYADDR for the vCPU comes from leaf 0x80000008 (36 bits without
		 * it): the shared bit 47 of a MapGPA or MMIO GPA must be a legal GPA bit. */
		if (cpuid_entry(cpuid, 0x80000000)->eax < 0x80000008)
			cpuid_entry(cpuid, 0x80000000)->eax = 0x80000008;
		e = cpuid_entry(cpuid, 0x80000008);
		if ((e->eax & 0xff) < 48)
			e->eax = (e->eax & ~0xffu) | 48;
		ret = do_ioctl(v->fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2", i, NULL);
		free(cpuid);
		if (ret) {
			snprintf(why, n, "KVM_SET_CPUID2 %d: %s", i, strerror(errno));
			return -1;
		}
	}
	/* Every vCPU exists before the first is initialised, as QEMU does: TDG.VP.INFO's
	 * NUM_VCPUS then counts them all by the time any runs. The initial RCX is the GPA of
	 * the configuration block (TDH.VP.INIT puts it in RCX and R8). */
	for (int i = 0; i < g.nr_vcpus; i++)
		if (tdx_op(g.vcpus[i].fd, KVM_TDX_INIT_VCPU, 0, (void *)(uintptr_t)TDG_CONFIG_GPA,
			   "KVM_TDX_INIT_VCPU", i)) {
			snprintf(why, n, "KVM_TDX_INIT_VCPU %d: %s", i, strerror(errno));
			return -1;
		}
	return 0;
}

static int stage_memory(char *why, size_t n)
{
	const uint64_t gpas[NR_SLOTS] = { TDG_RAM_GPA, TDG_IMAGE_GPA };
	const uint64_t sizes[NR_SLOTS] = { TDG_RAM_SIZE, TDG_IMAGE_SIZE };

	for (int i = 0; i < NR_SLOTS; i++) {
		struct slot *s = &g.slots[i];
		struct kvm_create_guest_memfd gm = { .size = sizes[i] };
		struct kvm_userspace_memory_region2 r;
		struct kvm_memory_attributes attr = {
			.address = gpas[i], .size = sizes[i],
			.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
		};

		s->gpa = gpas[i];
		s->size = sizes[i];
		s->gmem = do_ioctl(g.vm, KVM_CREATE_GUEST_MEMFD, &gm, "KVM_CREATE_GUEST_MEMFD", -1,
				   NULL);
		if (s->gmem < 0) {
			snprintf(why, n, "KVM_CREATE_GUEST_MEMFD: %s", strerror(errno));
			return -1;
		}
		s->shared = mmap(NULL, s->size, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (s->shared == MAP_FAILED) {
			s->shared = NULL;
			snprintf(why, n, "mmap: %s", strerror(errno));
			return -1;
		}
		memset(&r, 0, sizeof(r));
		r.slot = (uint32_t)i;
		r.flags = KVM_MEM_GUEST_MEMFD;
		r.guest_phys_addr = s->gpa;
		r.memory_size = s->size;
		r.userspace_addr = (uintptr_t)s->shared;
		r.guest_memfd = (uint32_t)s->gmem;
		r.guest_memfd_offset = 0;
		if (do_ioctl(g.vm, KVM_SET_USER_MEMORY_REGION2, &r, "KVM_SET_USER_MEMORY_REGION2",
			     -1, NULL)) {
			snprintf(why, n, "KVM_SET_USER_MEMORY_REGION2 slot %d: %s", i,
				 strerror(errno));
			return -1;
		}
		if (do_ioctl(g.vm, KVM_SET_MEMORY_ATTRIBUTES, &attr, "KVM_SET_MEMORY_ATTRIBUTES",
			     -1, NULL)) {
			snprintf(why, n, "KVM_SET_MEMORY_ATTRIBUTES(private) slot %d: %s", i,
				 strerror(errno));
			return -1;
		}
	}
	return 0;
}

/* The image with the configuration block filled in, added page by page by KVM
 * (TDH.MEM.PAGE.ADD) and measured (TDH.MR.EXTEND per 256 bytes). */
static int stage_image(char *why, size_t n)
{
	struct kvm_tdx_init_mem_region region;
	uint8_t *src;
	int ret;

	if (sizeof(tdguest_image) != TDG_IMAGE_SIZE) {
		snprintf(why, n, "TD guest image is %zu bytes, not %llu", sizeof(tdguest_image),
			 (unsigned long long)TDG_IMAGE_SIZE);
		return -1;
	}
	src = mmap(NULL, TDG_IMAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		   -1, 0);
	if (src == MAP_FAILED) {
		snprintf(why, n, "mmap: %s", strerror(errno));
		return -1;
	}
	memcpy(src, tdguest_image, TDG_IMAGE_SIZE);
	memcpy(src, &g.cfg, sizeof(g.cfg));
	region = (struct kvm_tdx_init_mem_region){
		.source_addr = (uintptr_t)src, .gpa = TDG_IMAGE_GPA,
		.nr_pages = TDG_IMAGE_SIZE / 4096,
	};
	ret = tdx_op(g.vcpus[0].fd, KVM_TDX_INIT_MEM_REGION, KVM_TDX_MEASURE_MEMORY_REGION,
		     &region, "KVM_TDX_INIT_MEM_REGION", 0);
	if (ret)
		snprintf(why, n, "KVM_TDX_INIT_MEM_REGION: %s (%llu pages left)", strerror(errno),
			 (unsigned long long)region.nr_pages);
	else
		diag("image_pages: %llu", (unsigned long long)(TDG_IMAGE_SIZE / 4096));
	munmap(src, TDG_IMAGE_SIZE);
	return ret;
}

static int stage_finalize(char *why, size_t n)
{
	if (tdx_op(g.vm, KVM_TDX_FINALIZE_VM, 0, NULL, "KVM_TDX_FINALIZE_VM", -1)) {
		snprintf(why, n, "KVM_TDX_FINALIZE_VM: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------------ KVM_RUN */

static struct slot *slot_of(uint64_t gpa, uint64_t size)
{
	for (int i = 0; i < NR_SLOTS; i++) {
		struct slot *s = &g.slots[i];

		if (gpa >= s->gpa && gpa + size <= s->gpa + s->size)
			return s;
	}
	return NULL;
}

/* Private <-> shared as a VMM does it: the attribute in KVM (which zaps the other side's
 * mapping), then the memory of the side given up is discarded: a hole punched into
 * guest_memfd (KVM removes the private pages: TDH.MEM.RANGE.BLOCK, TRACK, PAGE.REMOVE) or
 * the shared pages dropped. */
static int convert(uint64_t gpa, uint64_t size, int to_private, char *why, size_t n)
{
	struct kvm_memory_attributes attr = {
		.address = gpa, .size = size,
		.attributes = to_private ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0,
	};
	struct slot *s = slot_of(gpa, size);
	int ret;

	if (!s) {
		snprintf(why, n, "conversion of [%#llx, +%#llx) outside guest memory",
			 (unsigned long long)gpa, (unsigned long long)size);
		return -1;
	}
	pthread_mutex_lock(&g.lock);
	ret = do_ioctl(g.vm, KVM_SET_MEMORY_ATTRIBUTES, &attr, "KVM_SET_MEMORY_ATTRIBUTES", -1,
		       NULL);
	if (!ret && !to_private) {
		ret = fallocate(s->gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				(off_t)(gpa - s->gpa), (off_t)size);
		diag("punch_hole: %s", ret ? strerror(errno) : "ok");
		g.punched += !ret;
	} else if (!ret) {
		madvise((char *)s->shared + (gpa - s->gpa), size, MADV_DONTNEED);
	}
	if (!ret) {
		if (to_private)
			g.to_private++;
		else
			g.to_shared++;
	}
	pthread_mutex_unlock(&g.lock);
	if (ret)
		snprintf(why, n, "converting %#llx to %s: %s", (unsigned long long)gpa,
			 to_private ? "private" : "shared", strerror(errno));
	return ret;
}

/* The guest's report in the shared page, checked against what this VMM configured. */
static void check_report(struct vcpu *v)
{
	volatile struct tdg_report *rep = (volatile struct tdg_report *)
		((char *)g.slots[0].shared + (TDG_SHARED_GPA - TDG_RAM_GPA));
	char *why = g.report_why;
	size_t n = sizeof(g.report_why);
	uint64_t want_r8 = (uint64_t)g.max_vcpus << 32 | (uint32_t)g.nr_vcpus;

	diag("report: vcpu %u checks %#x vp_info %#llx %#llx %#llx %#llx vm_rd %#llx %#llx "
		  "%#llx accepted %llu", rep->vcpu, rep->checks,
		  (unsigned long long)rep->vp_info[0], (unsigned long long)rep->vp_info[1],
		  (unsigned long long)rep->vp_info[2], (unsigned long long)rep->vp_info[3],
		  (unsigned long long)rep->vm_attributes, (unsigned long long)rep->vm_xfam,
		  (unsigned long long)rep->vm_max_vcpus, (unsigned long long)rep->accepted);
	if (rep->magic != TDG_REPORT_MAGIC || rep->cookie != g.cfg.cookie)
		snprintf(why, n, "no report in the shared page (magic %#llx)",
			 (unsigned long long)rep->magic);
	else if (rep->vcpu != (uint32_t)v->idx)
		snprintf(why, n, "report from vCPU %u on vCPU %d's doorbell", rep->vcpu, v->idx);
	else if (rep->init_rcx != TDG_CONFIG_GPA || rep->init_r8 != TDG_CONFIG_GPA)
		snprintf(why, n, "initial RCX/R8 %#llx/%#llx, configured %#llx",
			 (unsigned long long)rep->init_rcx, (unsigned long long)rep->init_r8,
			 (unsigned long long)TDG_CONFIG_GPA);
	else if ((rep->vp_info[0] & 0x3f) != g.cfg.gpaw || rep->vp_info[1] != g.cfg.attributes ||
		 rep->vp_info[2] != want_r8 || (uint32_t)rep->vp_info[3] != (uint32_t)v->idx)
		snprintf(why, n, "TDG.VP.INFO does not match the configuration");
	else if (rep->vm_attributes != g.cfg.attributes ||
		 (rep->vm_xfam & g.cfg.xfam) != g.cfg.xfam ||
		 rep->vm_max_vcpus != (uint64_t)g.max_vcpus)
		snprintf(why, n, "TDG.VM.RD does not match the configuration");
	else if (rep->accepted != TDG_ACCEPT_PAGES(0) || rep->mmio_read != g.cfg.cookie)
		snprintf(why, n, "accepted %llu pages, MMIO read %#llx",
			 (unsigned long long)rep->accepted, (unsigned long long)rep->mmio_read);
	else if (memmem((const void *)rep, 4096, &g.cfg.secret, sizeof(g.cfg.secret)))
		snprintf(why, n, "the guest's private secret is visible in shared memory");
	else
		g.report_ok = 1;
	rep->vmm_ack = g.report_ok ? ~g.cfg.cookie : 0;
}

static void console_char(struct vcpu *v, char c)
{
	if (c == '\n' || v->line_len == MAX_LINE - 1) {
		v->line[v->line_len] = '\0';
		diag("td.vcpu%d: %s", v->idx, v->line);
		v->line_len = 0;
		v->lines++;
		if (c == '\n')
			return;
	}
	v->line[v->line_len++] = c;
}

static int handle_io(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	uint32_t val = 0;

	v->io_exits++;
	if (run->io.direction == KVM_EXIT_IO_OUT)
		memcpy(&val, data, run->io.size > 4 ? 4 : run->io.size);
	switch (run->io.port) {
	case TDG_PORT_CONSOLE:
		if (run->io.direction == KVM_EXIT_IO_OUT)
			for (uint32_t i = 0; i < run->io.count; i++)
				console_char(v, (char)data[i * run->io.size]);
		return 0;
	case TDG_PORT_CONFIG:
		val = (uint32_t)TDG_CONFIG_MAGIC;
		if (run->io.direction == KVM_EXIT_IO_IN)
			memcpy(data, &val, run->io.size > 4 ? 4 : run->io.size);
		return 0;
	case TDG_PORT_DOORBELL:
		check_report(v);
		return 0;
	case TDG_PORT_BENCH:
		clock_gettime(CLOCK_MONOTONIC, val == 1 ? &g.bench_start : &g.bench_end);
		return 0;
	case TDG_PORT_DONE:
		v->passed = val == TDG_DONE_PASS;
		if (!v->passed) {
			snprintf(v->why, sizeof(v->why), "guest done with %#x", val);
			return 1;
		}
		return 0; /* keep entering it: see vcpu_loop */
	default:
		if (run->io.direction == KVM_EXIT_IO_IN)
			memset(data, 0xff, (size_t)run->io.size * run->io.count);
		return 0;
	}
}

static int handle_mmio(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint64_t val = 0;

	v->mmio_exits++;
	if (run->mmio.phys_addr != TDG_MMIO_GPA || run->mmio.len > 8) {
		snprintf(v->why, sizeof(v->why), "MMIO at %#llx (%u bytes) outside the device",
			 (unsigned long long)run->mmio.phys_addr, run->mmio.len);
		return -1;
	}
	pthread_mutex_lock(&g.lock);
	if (run->mmio.is_write) {
		memcpy(&val, run->mmio.data, run->mmio.len);
		g.mmio_value = val;
		g.mmio_writes++;
	} else {
		memcpy(run->mmio.data, &g.mmio_value, run->mmio.len);
		g.mmio_reads++;
	}
	pthread_mutex_unlock(&g.lock);
	return 0;
}

static int handle_hypercall(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint64_t gpa = run->hypercall.args[0], npages = run->hypercall.args[1];
	int to_private = !!(run->hypercall.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED);

	if (run->hypercall.nr != KVM_HC_MAP_GPA_RANGE) {
		snprintf(v->why, sizeof(v->why), "hypercall %llu",
			 (unsigned long long)run->hypercall.nr);
		return -1;
	}
	v->map_gpa_exits++;
	diag("map_gpa.%d: %#llx +%llu pages to %s", v->idx, (unsigned long long)gpa,
		  (unsigned long long)npages, to_private ? "private" : "shared");
	run->hypercall.ret = convert(gpa, npages * 4096, to_private, v->why, sizeof(v->why))
		? EINVAL : 0;
	return 0;
}

/* One more vCPU thread has nothing left to wait for. Once all have, stage_run wakes the
 * ones still in KVM_RUN (SIGUSR2 makes KVM_RUN return EINTR). */
static void vcpu_ended(void)
{
	pthread_mutex_lock(&g.lock);
	if (++g.ended == g.nr_vcpus)
		g.all_ended = 1;
	pthread_mutex_unlock(&g.lock);
}

static void pin_thread(struct vcpu *v)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t set;

	v->cpu = -1;
	if (!g.pin || cpus < 1)
		return;
	CPU_ZERO(&set);
	CPU_SET(v->idx % (int)cpus, &set);
	if (!pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
		v->cpu = v->idx % (int)cpus;
}

static void *vcpu_loop(void *arg)
{
	struct vcpu *v = arg;
	struct kvm_run *run = v->run;
	int runs = 0, end = 0, counted = 0;

	pin_thread(v);
	diag("thread.%d: CPU %d", v->idx, v->cpu);
	while (!end && !g.stop) {
		if (v->passed && !counted) { /* stay in the TD until every vCPU has ended */
			counted = 1;
			vcpu_ended();
		}
		if (v->passed && g.all_ended)
			break;
		if (ioctl(v->fd, KVM_RUN, NULL) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			snprintf(v->why, sizeof(v->why), "KVM_RUN: %s", strerror(errno));
			diag("KVM_RUN.%d: %s (after %d exits)", v->idx, strerror(errno), runs);
			break;
		}
		if (!runs++)
			diag("KVM_RUN.%d: ok", v->idx);
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			end = handle_io(v);
			break;
		case KVM_EXIT_MMIO:
			end = handle_mmio(v);
			break;
		case KVM_EXIT_HYPERCALL:
			end = handle_hypercall(v);
			break;
		case KVM_EXIT_MEMORY_FAULT: /* an access against the attribute: convert */
			g.mem_faults++;
			end = convert(run->memory_fault.gpa, run->memory_fault.size,
				      !!(run->memory_fault.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE),
				      v->why, sizeof(v->why));
			break;
		case KVM_EXIT_SYSTEM_EVENT:
			if (run->system_event.type == KVM_SYSTEM_EVENT_TDX_FATAL)
				snprintf(v->why, sizeof(v->why),
					 "guest ReportFatalError: check %llu",
					 (unsigned long long)run->system_event.data[12]);
			else
				snprintf(v->why, sizeof(v->why), "system event %u",
					 run->system_event.type);
			end = 1;
			break;
		case KVM_EXIT_SHUTDOWN:
			snprintf(v->why, sizeof(v->why), "TD shut down (triple fault)");
			end = 1;
			break;
		case KVM_EXIT_FAIL_ENTRY:
			snprintf(v->why, sizeof(v->why), "entry failed: reason %#llx",
				 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
			end = 1;
			break;
		case KVM_EXIT_INTERNAL_ERROR:
			snprintf(v->why, sizeof(v->why), "KVM internal error %u",
				 run->internal.suberror);
			end = 1;
			break;
		default:
			snprintf(v->why, sizeof(v->why), "unexpected exit %u", run->exit_reason);
			end = 1;
		}
		if (end < 0)
			break;
	}
	if (g.stop && !v->passed && !v->why[0])
		snprintf(v->why, sizeof(v->why), "timed out after %d exits", runs);
	if (v->line_len)
		console_char(v, '\n');
	if (!counted)
		vcpu_ended();
	v->done = 1;
	return NULL;
}

static void on_alarm(int sig)
{
	(void)sig;
	g.stop = 1;
}

static void on_wake(int sig)
{
	(void)sig;
}

static int stage_run(char *why, size_t n)
{
	struct sigaction sa = { .sa_handler = on_alarm };
	struct timespec deadline;
	int ok = 1;

	struct sigaction wake = { .sa_handler = on_wake };

	sigaction(SIGUSR1, &sa, NULL); /* no SA_RESTART: KVM_RUN returns EINTR */
	sigaction(SIGUSR2, &wake, NULL);
	for (int i = 0; i < g.nr_vcpus; i++)
		if (pthread_create(&g.vcpus[i].thread, NULL, vcpu_loop, &g.vcpus[i])) {
			snprintf(why, n, "pthread_create: %s", strerror(errno));
			g.stop = 1;
			for (int j = 0; j < i; j++)
				pthread_join(g.vcpus[j].thread, NULL);
			return -1;
		}
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += g.timeout;
	for (int i = 0; i < g.nr_vcpus; i++) {
		struct vcpu *v = &g.vcpus[i];
		struct timespec now, step;
		int joined;

		/* Short waits: a vCPU that passed is woken (again: a wake-up that lands just
		 * before its KVM_RUN is lost) once every vCPU has ended. */
		do {
			clock_gettime(CLOCK_REALTIME, &now);
			step = now;
			step.tv_nsec += 50 * 1000 * 1000;
			if (step.tv_nsec >= 1000000000L) {
				step.tv_sec++;
				step.tv_nsec -= 1000000000L;
			}
			if (step.tv_sec > deadline.tv_sec ||
			    (step.tv_sec == deadline.tv_sec && step.tv_nsec > deadline.tv_nsec))
				step = deadline;
			joined = !pthread_timedjoin_np(v->thread, NULL, &step);
			if (!joined && g.all_ended)
				pthread_kill(v->thread, SIGUSR2);
		} while (!joined && (now.tv_sec < deadline.tv_sec ||
				     (now.tv_sec == deadline.tv_sec &&
				      now.tv_nsec < deadline.tv_nsec)));
		if (!joined) {
			g.stop = 1;
			for (int j = i; j < g.nr_vcpus; j++)
				pthread_kill(g.vcpus[j].thread, SIGUSR1);
			pthread_join(v->thread, NULL);
		}
		diag("vcpu%d: %s, %d console lines, %d IO, %d MMIO, %d MapGPA exits", i,
			  v->passed ? "PASS" : v->why, v->lines, v->io_exits, v->mmio_exits,
			  v->map_gpa_exits);
		if (!v->passed && ok) {
			snprintf(why, n, "vCPU %d: %s", i, v->why[0] ? v->why : "no result");
			ok = 0;
		}
	}
	return ok ? 0 : -1;
}

/* ------------------------------------------------------------------------ teardown */

static int teardown(char *why, size_t n)
{
	int bad = 0;

	/* Order as a VMM exits: vCPUs, memory, the VM (its last reference frees the TD:
	 * TDH.VP.FLUSH, MNG.VPFLUSHDONE, PHYMEM.CACHE.WB, MNG.KEY.FREEID, PAGE.RECLAIM). */
	for (int i = 0; i < g.nr_vcpus; i++) {
		struct vcpu *v = &g.vcpus[i];

		if (v->run)
			munmap(v->run, (size_t)ioctl(g.kvm, KVM_GET_VCPU_MMAP_SIZE, 0));
		if (v->fd > 0 && close(v->fd))
			bad = errno;
	}
	for (int i = 0; i < NR_SLOTS; i++) {
		struct slot *s = &g.slots[i];

		if (s->shared)
			munmap(s->shared, s->size);
		if (s->gmem > 0 && close(s->gmem))
			bad = errno;
	}
	if (g.vm >= 0 && close(g.vm))
		bad = errno;
	if (g.kvm >= 0 && close(g.kvm))
		bad = errno;
	free(g.caps);
	free(g.init);
	if (bad)
		snprintf(why, n, "close: %s", strerror(bad));
	return bad ? -1 : 0;
}

int main(int argc, char **argv)
{
	static const char *const names[NR_STAGES] = {
		"create_vm", "init_vm", "init_vcpus", "guest_memory", "init_mem_region",
		"finalize_vm", "td_run",
	};
	int (*const fns[NR_STAGES])(char *, size_t) = {
		stage_vm, stage_init_vm, stage_vcpus, stage_memory, stage_image, stage_finalize,
		stage_run,
	};
	int reached = -1, failed = -1, bench_exits = 0, cpu_on_start;
	char why[256];

	g.nr_vcpus = 1;
	g.stop_after = ST_RUN;
	g.timeout = 600;
	g.pin = 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--vcpus") && i + 1 < argc) {
			g.nr_vcpus = atoi(argv[++i]);
			if (g.nr_vcpus < 1 || g.nr_vcpus > TDG_MAX_VCPUS)
				usage(argv[0]);
		} else if (!strcmp(argv[i], "--stop-after") && i + 1 < argc) {
			const char *s = argv[++i];

			g.stop_after = -1;
			for (int j = 0; j < NR_STAGES; j++)
				if (!strcmp(s, stages[j]))
					g.stop_after = j;
			if (g.stop_after < 0)
				usage(argv[0]);
		} else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
			g.timeout = atoi(argv[++i]);
		} else if (!strcmp(argv[i], "--no-pin")) {
			g.pin = 0;
		} else if (!strcmp(argv[i], "--bench-exits") && i + 1 < argc) {
			bench_exits = atoi(argv[++i]);
			if (bench_exits < 0)
				usage(argv[0]);
		} else {
			usage(argv[0]);
		}
	}
	cpu_on_start = sched_getcpu();
	if (g.pin && cpu_on_start >= 0) {
		cpu_set_t set;
		int err;

		CPU_ZERO(&set);
		CPU_SET(cpu_on_start, &set);
		err = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
		if (err)
			diag("main thread not pinned: %s", strerror(err));
	}
	srand((unsigned)time(NULL) ^ (unsigned)getpid());
	g.cfg = (struct tdg_config){
		.magic = TDG_CONFIG_MAGIC, .nr_vcpus = (uint32_t)g.nr_vcpus, .gpaw = 48,
		.bench_exits = (uint32_t)bench_exits,
		.secret = (uint64_t)rand() << 32 | (uint64_t)rand() | 1,
		.cookie = (uint64_t)rand() << 33 | (uint64_t)rand() << 1,
	};
	for (int i = 0; i < NR_SLOTS; i++)
		g.slots[i].gmem = -1;

	ktap_header(NR_TESTS);
	diag("vcpus: %d", g.nr_vcpus);
	diag("stop_after: %s", stages[g.stop_after]);
	g.kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (g.kvm < 0) {
		snprintf(why, sizeof(why), "/dev/kvm: %s (kvm_intel not loaded?)", strerror(errno));
		for (int i = 0; i < NR_STAGES; i++)
			ktap_skip(names[i], why);
		for (unsigned int i = 0; i < NR_RUN_TESTS; i++)
			ktap_skip(run_tests[i], why);
		ktap_skip("teardown", why);
		return 0;
	}
	for (int i = 0; i < NR_STAGES; i++) {
		if (i > g.stop_after) {
			snprintf(why, sizeof(why), "stopped after %s", stages[g.stop_after]);
			ktap_skip(names[i], why);
			continue;
		}
		if (failed >= 0) {
			snprintf(why, sizeof(why), "%s failed", names[failed]);
			ktap_skip(names[i], why);
			continue;
		}
		if (i == ST_IMAGE) { /* the configuration the guest checks, measured with it */
			g.cfg.max_vcpus = (uint32_t)g.max_vcpus;
			g.cfg.attributes = g.init->attributes;
			g.cfg.xfam = g.init->xfam;
		}
		why[0] = '\0';
		if (fns[i](why, sizeof(why))) {
			if (i == ST_VM && g.vm < 0) { /* no TDX VMs here: not this test's failure */
				ktap_skip(names[i], why);
				failed = i;
				continue;
			}
			ktap_result(0, names[i], why);
			failed = i;
		} else {
			ktap_result(1, names[i], "");
			reached = i;
		}
	}
	if (reached == ST_RUN || (failed == ST_RUN)) {
		int lines = 0;

		for (int i = 0; i < g.nr_vcpus; i++)
			lines += g.vcpus[i].lines > 0;
		snprintf(why, sizeof(why), "console lines from %d of %d vCPUs", lines, g.nr_vcpus);
		ktap_result(lines == g.nr_vcpus, "td_console", why);
		snprintf(why, sizeof(why), "%d MMIO writes, %d reads", g.mmio_writes, g.mmio_reads);
		ktap_result(g.mmio_writes > 0 && g.mmio_reads > 0, "td_mmio", why);
		snprintf(why, sizeof(why), "%d to shared (%d punched), %d to private", g.to_shared,
			 g.punched, g.to_private);
		ktap_result(g.to_shared > 0 && g.punched > 0 && g.to_private > 0, "td_map_gpa",
			    why);
		ktap_result(g.report_ok, "td_shared_report",
			    g.report_why[0] ? g.report_why : "no report");
		diag("memory_fault_exits: %d", g.mem_faults);
		if (bench_exits && g.bench_end.tv_sec) {
			double us = (double)(g.bench_end.tv_sec - g.bench_start.tv_sec) * 1e6 +
				    (double)(g.bench_end.tv_nsec - g.bench_start.tv_nsec) / 1e3;

			diag("td_exit_round_trip: %d exits in %.0f us, %.0f/s", bench_exits, us,
			     us > 0 ? bench_exits / us * 1e6 : 0.0);
		}
	} else {
		snprintf(why, sizeof(why), "the TD did not run");
		for (unsigned int i = 0; i < NR_RUN_TESTS; i++)
			ktap_skip(run_tests[i], why);
	}
	why[0] = '\0';
	ktap_result(teardown(why, sizeof(why)) == 0, "teardown", why);
	return ktap_finish();
}
#endif
