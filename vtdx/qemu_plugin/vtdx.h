/*
 * vtdx TCG plugin, internal header: the state every part shares and the entry points one
 * part offers the others. One plugin, several files, one job each:
 *
 *   plugin.c     install, options, the per-vCPU scoreboard, register handles, exit statistics
 *   translate.c  which instruction goes to which emulation; operand decoding
 *   transport.c  the daemon socket: frames per wire.h, HELLO/WELCOME, profile rows
 *   seamcall.c   SEAMCALL forwarded to the daemon, its result written back
 *   vmx.c        MOV to CR4 (VMXE), VMXON, VMXOFF
 *   cpuid_msr.c  CPUID bits and RDMSR/WRMSR from the daemon's rows
 *   movdir64b.c  MOVDIR64B
 *   patch.c      RFLAGS through `cmp; nop` sites, #GP/#UD through temporary fault bytes
 *
 * State is owned, not global-by-default: `struct vcpu` is touched only on its own vCPU
 * thread (and by the exit callback once vCPUs have stopped); `struct vtdx_plugin` holds
 * what is shared, each part under a comment naming its owner and the lock that guards it.
 * Flags read across threads without a lock are C11 atomics.
 */
#ifndef VTDX_PLUGIN_H
#define VTDX_PLUGIN_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "qemu_api.h"
#include "wire.h"

/* Everything declared below is internal to the shared object: only qemu_plugin_install and
 * qemu_plugin_version (QEMU_PLUGIN_EXPORT) are visible to QEMU, and a part that is missing
 * from the build fails the link instead of leaving an undefined symbol for QEMU's loader. */
#pragma GCC visibility push(hidden)

/* ---------------------------------------------------------------- registers */

/* 0..15 in x86 encoding order (ModRM/REX numbering), then the others the plugin uses. */
enum {
    R_RAX, R_RCX, R_RDX, R_RBX, R_RSP, R_RBP, R_RSI, R_RDI,
    R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
    R_EFLAGS, R_CS, R_CR0, R_CR3, R_CR4, R_EFER, R_FS_BASE, R_GS_BASE, NREG
};

#define FL_CF (1ull << 0)
#define FL_PF (1ull << 2)
#define FL_AF (1ull << 4)
#define FL_ZF (1ull << 6)
#define FL_SF (1ull << 7)
#define FL_OF (1ull << 11)
#define FL_VM (1ull << 17)
#define FL_ARITH (FL_CF | FL_PF | FL_AF | FL_ZF | FL_SF | FL_OF)
#define CR0_PE (1ull << 0)
#define CR4_VMXE (1ull << 13)
#define EFER_LMA (1ull << 10)

/* ---------------------------------------------------------------- state */

#define MAX_ROWS 256
#define MAX_PATCH 15 /* longest x86 instruction */
#define MAX_SITES 256
#define MAX_FAULT_PATCHES 64

enum { FAULT_GP = 13, FAULT_UD = 6 };

/* The flags site a vCPU is completing: the values finish() hands to the NOP's callback. */
typedef struct {
    bool armed;
    uint64_t pc, rax, rcx;
} gadget_t;

/* One vCPU (one logical processor of the TDX model). */
typedef struct vcpu {
    GByteArray *buf; /* scratch for register reads and writes */
    /* transport.c, seamcall.c: this vCPU's daemon connection (-1: none) */
    int fd;
    uint64_t seq;
    /* vmx.c: in VMX operation (VMXON done, no VMXOFF yet) */
    bool vmx_on;
    /* cpuid_msr.c: a CPUID whose result the next instruction's callback adjusts */
    bool cpuid_pending;
    uint64_t cpuid_next_pc;
    uint32_t cpuid_leaf, cpuid_sub;
    /* cpuid_msr.c: this LP's value of every MSR row */
    uint64_t *msr_store;
    /* patch.c: the fault patch this vCPU put in place, undone when the exception is
     * delivered, and the flags site it is completing */
    bool fault_patched;
    uint64_t fault_hwaddr;
    gadget_t gad;
    bool in_gadget;
    /* seamcall.c: statistics for scripts/bench, written out by plugin.c at exit */
    GArray *lat_ns;  /* uint64 per SEAMCALL (socket round trip incl. backend) */
    GArray *echo_ns; /* uint64 per echo frame */
    uint64_t first_ns, last_ns, rate_calls;
} vcpu_t;

/* A flags site: an instruction rewritten for good into `cmp %ecx,%eax; nop...` (patch.c).
 * vaddr, hwaddr, len, handler and orig never change once listed (callbacks hold a pointer). */
typedef struct {
    uint64_t hwaddr, vaddr;
    unsigned len;
    bool active;
    vtdx_vcpu_cb_t handler; /* emulation of the original instruction */
    uint8_t orig[MAX_PATCH];
} site_t;

/* A fault patch: bytes that make TCG raise the fault, with the bytes they replaced. */
typedef struct {
    uint64_t hwaddr, vaddr;
    unsigned len, refs, kind;
    uint8_t saved[MAX_PATCH];
} fpatch_t;

struct vtdx_plugin {
    /* plugin.c: options, set by qemu_plugin_install before any vCPU runs */
    char *sock_path;
    char *stats_path;
    int timeout_ms;
    unsigned echo_count;
    bool debug;

    /* plugin.c: the scoreboard, one entry per possible vCPU (max_vcpus) */
    unsigned nvcpus;
    vcpu_t *vcpus;

    /* plugin.c: register handles, looked up on the first vCPU thread under regs_mu, then
     * read-only */
    pthread_mutex_t regs_mu;
    struct qemu_plugin_register *reg_handle[NREG];

    /* transport.c: the platform profile from the daemon's rows; read-only once installed */
    struct vtdx_row cpuid_rows[MAX_ROWS];
    unsigned n_cpuid;
    struct vtdx_row msr_rows[MAX_ROWS];
    unsigned n_msr;
    bool seam, vmx, movdir64b;
    unsigned phys_bits;

    /* transport.c: once the daemon is lost, every SEAMCALL ends in VMfailInvalid */
    atomic_bool daemon_dead;

    /* cpuid_msr.c: vaddr of each instruction after a CPUID that ended its TB, under
     * cpuid_mu; their count is read without the lock by the translation fast path */
    pthread_mutex_t cpuid_mu;
    GHashTable *cpuid_followers;
    atomic_uint n_cpuid_followers;

    /* patch.c: both tables under table_mu, which is never held across a QEMU call that may
     * wait (a memory write invalidates translations); code_mu serialises changes to guest
     * code and is taken before table_mu. The counts are read without a lock by the
     * translation fast path. */
    pthread_mutex_t table_mu;
    pthread_mutex_t code_mu;
    site_t sites[MAX_SITES];
    atomic_int n_sites;
    fpatch_t fpatches[MAX_FAULT_PATCHES];
    atomic_int n_fpatches;
    atomic_flag site_warned; /* "cannot convert to a flags site" said once */
};

extern struct vtdx_plugin plugin;

/* ---------------------------------------------------------------- plugin.c */

void plog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t now_ns(void);

/* The vCPU with this index, or NULL beyond the announced ones. */
static inline vcpu_t *vcpu_get(unsigned int vcpu)
{
    return vcpu < plugin.nvcpus ? &plugin.vcpus[vcpu] : NULL;
}

uint64_t rd(vcpu_t *v, int r);
void wr(vcpu_t *v, int r, uint64_t val);
unsigned cpl(vcpu_t *v);
bool long_mode(vcpu_t *v);

/* ---------------------------------------------------------------- translate.c */

typedef struct {
    unsigned len;   /* whole instruction */
    unsigned rex;   /* REX byte or 0 */
    bool p66, pf3, addr32;
    int seg;        /* 4 = FS, 5 = GS, -1 = none (others have base 0 in 64-bit mode) */
    unsigned op_at; /* offset of the 0F escape */
    uint8_t modrm;
    bool is_mem;
    uint64_t ea;    /* effective address of a memory operand */
} insn_t;

bool decode(vcpu_t *v, uint64_t pc, unsigned opcode_len, insn_t *in);
unsigned modrm_reg(const insn_t *in);
void on_translate(struct qemu_plugin_tb *tb, void *ud);

/* ---------------------------------------------------------------- transport.c */

bool load_profile(void);
void transport_connect(unsigned int vcpu, vcpu_t *v);
bool transport_round_trip(int fd, const struct vtdx_call *c, struct vtdx_ret *r,
                          const char **why);
void daemon_lost(const char *why);

/* ---------------------------------------------------------------- seamcall.c */

void on_seamcall(unsigned int vcpu, void *ud);

/* ---------------------------------------------------------------- vmx.c */

void on_mov_cr4(unsigned int vcpu, void *ud);
void on_vmxon(unsigned int vcpu, void *ud);
void on_vmxoff(unsigned int vcpu, void *ud);
void on_invept(unsigned int vcpu, void *ud);

/* ---------------------------------------------------------------- cpuid_msr.c */

void cpuid_instrument_tb(struct qemu_plugin_tb *tb, size_t n);
void cpuid_instrument(struct qemu_plugin_tb *tb, size_t i, size_t n,
                      struct qemu_plugin_insn *insn, uint64_t pc);
void on_rdmsr(unsigned int vcpu, void *ud);
void on_wrmsr(unsigned int vcpu, void *ud);
uint64_t msr_value(vcpu_t *v, uint32_t index, uint64_t dflt);

/* ---------------------------------------------------------------- movdir64b.c */

void on_movdir64b(unsigned int vcpu, void *ud);

/* ---------------------------------------------------------------- patch.c */

void site_overlay(uint64_t pc, uint8_t *d, unsigned n);
bool gadget_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len);
bool fault_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len);
void on_exception(unsigned int vcpu, enum qemu_plugin_discon_type type, uint64_t from,
                  uint64_t to, void *ud);
void inject_fault(vcpu_t *v, uint64_t pc, unsigned kind);
void inject_gp(vcpu_t *v, uint64_t pc);
void finish(vcpu_t *v, uint64_t pc, unsigned len, bool fail, uint64_t rax, uint64_t rcx,
            vtdx_vcpu_cb_t handler);

#pragma GCC visibility pop

#endif
