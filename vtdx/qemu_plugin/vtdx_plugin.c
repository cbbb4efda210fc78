/*
 * vtdx TCG plugin: turns QEMU's x86-64 TCG CPU into a TDX-capable host CPU.
 *
 * - SEAMCALL (66 0F 01 CF) is sent to the vtdx daemon (one Unix-socket connection per
 *   vCPU, fixed-size frames, see wire.h and docs/protocol.md) and its result written back.
 * - The platform bits the Linux TDX host code checks and TCG lacks (CPUID bits, MSRs,
 *   CR4.VMXE, VMXON/VMXOFF, MOVDIR64B) are emulated from rows the daemon sends at
 *   connection time (vtdx/facade.py), so new platform facts are data, not C.
 *
 * Options (-plugin vtdx-plugin.so,sock=PATH[,timeout=S][,echo=N][,stats=PATH][,debug=1]):
 *   sock     the daemon's Unix socket (required)
 *   timeout  reply timeout in seconds (default 60; 0 = wait forever)
 *   echo     per vCPU, an echo frame after each of its first N SEAMCALLs: the socket floor
 *   stats    file written at exit with per-call latencies (scripts/bench)
 *   debug    1: say why VMXON raised #GP(0)
 *
 * RFLAGS and faults are produced by TCG itself from patched instruction bytes; see "code
 * patches" below and docs/protocol.md for what the guest can observe.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "qemu_api.h"
#include "wire.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 7;

/* ---------------------------------------------------------------- registers */

/* 0..15 in x86 encoding order (ModRM/REX numbering), then the others we use. */
enum {
    R_RAX, R_RCX, R_RDX, R_RBX, R_RSP, R_RBP, R_RSI, R_RDI,
    R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
    R_EFLAGS, R_CS, R_CR0, R_CR3, R_CR4, R_EFER, R_FS_BASE, R_GS_BASE, NREG
};
static const char *const reg_names[NREG] = {
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "eflags", "cs", "cr0", "cr3", "cr4", "efer", "fs_base", "gs_base",
};
/* Wire order (vtdx.regs.REG_NAMES) as x86 register numbers. */
static const int wire_regs[VTDX_NREGS] = {
    R_RAX, R_RCX, R_RDX, R_RBX, R_RSI, R_RDI, R_R8, R_R9,
    R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
};
static struct qemu_plugin_register *reg_handle[NREG];

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
#define MAX_PATCH 15

typedef struct {
    bool armed;
    uint64_t pc, rax, rcx;
} gadget_t;

typedef struct {
    int fd;
    uint64_t seq;
    bool vmx_on;
    bool cpuid_pending;
    uint64_t cpuid_next_pc;
    uint32_t cpuid_leaf, cpuid_sub;
    uint64_t *msr_store; /* this LP's value of every MSR row */
    GByteArray *buf;
    /* A fault patch this vCPU put in place, undone when the exception is delivered. */
    bool fault_patched;
    uint64_t fault_hwaddr;
    /* The flags patch this vCPU is executing (finish()). */
    gadget_t gad;
    bool in_gadget;
    /* statistics for scripts/bench */
    GArray *lat_ns;  /* uint64 per SEAMCALL (socket round trip incl. backend) */
    GArray *echo_ns; /* uint64 per echo frame */
    uint64_t first_ns, last_ns, rate_calls;
} vcpu_t;

static struct {
    char *sock_path;
    char *stats_path;
    int timeout_ms;
    unsigned echo_count;
    bool debug;
    unsigned nvcpus;
    vcpu_t *vcpus;
    /* platform profile from the daemon (read-only once the first vCPU is up) */
    struct vtdx_row cpuid_rows[MAX_ROWS];
    unsigned n_cpuid;
    struct vtdx_row msr_rows[MAX_ROWS];
    unsigned n_msr;
    bool seam, vmx, movdir64b;
    unsigned phys_bits;
    /* daemon liveness: once lost, every SEAMCALL gets VMfailInvalid */
    volatile int daemon_dead;
    pthread_mutex_t lock; /* patches, cpuid follower set, register lookup */
    GHashTable *cpuid_followers; /* vaddr of insn after a CPUID that ended its TB */
} g = {.timeout_ms = 60000, .lock = PTHREAD_MUTEX_INITIALIZER};

static void plog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void plog(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "vtdx-plugin: %s\n", line);
    fflush(stderr);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rd(vcpu_t *v, int r)
{
    uint64_t val = 0;
    g_byte_array_set_size(v->buf, 0);
    if (qemu_plugin_read_register(reg_handle[r], v->buf))
        memcpy(&val, v->buf->data, v->buf->len < 8 ? v->buf->len : 8);
    return val;
}

static void wr(vcpu_t *v, int r, uint64_t val)
{
    g_byte_array_set_size(v->buf, 0);
    g_byte_array_append(v->buf, (const guint8 *)&val, 8);
    if (!qemu_plugin_write_register(reg_handle[r], v->buf))
        plog("writing %s failed", reg_names[r]);
}

static unsigned cpl(vcpu_t *v) { return (unsigned)rd(v, R_CS) & 3; }

static bool long_mode(vcpu_t *v)
{
    /* CS.L is not visible to plugins: compatibility mode counts as 64-bit (see docs). */
    return (rd(v, R_CR0) & CR0_PE) && (rd(v, R_EFER) & EFER_LMA) && !(rd(v, R_EFLAGS) & FL_VM);
}

/* ---------------------------------------------------------------- code patches */

/*
 * RFLAGS. TCG computes arithmetic flags lazily from its last flag-setting operation, so a
 * write of "eflags" through the register API never reaches the guest. The RFLAGS result
 * of SEAMCALL/VMXON/VMXOFF is therefore produced by TCG itself: the first time a site
 * completes, its bytes are replaced for good by CMP EAX,ECX; NOP... (a "site"). Every
 * execution then runs the emulation in the CMP's callback, which loads EAX/ECX so that the
 * compare yields exactly VMsucceed (no flag) or VMfailInvalid (only CF); the first NOP's
 * callback puts the real RAX/RCX in place. The result depends only on the executing
 * vCPU's registers, so any number of vCPUs can run the same site at once, and no code is
 * rewritten per call. A site keeps its original bytes in the table (for decoding).
 *
 * Faults. #UD and #GP(0) are raised the same way, by bytes that fault under TCG: UD2, HLT
 * (CPL > 0), or 15 prefixes (an over-long instruction, #GP(0) at any CPL). These "fault
 * patches" are temporary: the bytes they replaced return when the exception is delivered
 * (discontinuity callback). The guest sees the fault at the instruction's own RIP. A vCPU
 * that reaches fault-patch bytes it is not faulting on re-executes them until they are
 * gone (on_fault_insn).
 */
typedef struct {
    uint64_t hwaddr, vaddr;
    unsigned len;
    bool active;
    vtdx_vcpu_cb_t handler; /* emulation of the original instruction */
    uint8_t orig[MAX_PATCH];
} site_t;

typedef struct {
    uint64_t hwaddr, vaddr;
    unsigned len, refs, kind;
    uint8_t saved[MAX_PATCH];
} fpatch_t;

enum { FAULT_GP = 13, FAULT_UD = 6 };

/* g.lock guards both tables and is never held across a QEMU call that may wait (a memory
 * write invalidates translations); patch_mu serialises changes to guest code. */
static site_t sites[256];
static volatile int n_sites;
static fpatch_t fpatches[64];
static volatile int n_fpatches;
static pthread_mutex_t patch_mu = PTHREAD_MUTEX_INITIALIZER;

static site_t *site_lookup_va(uint64_t va) /* g.lock held */
{
    for (int i = 0; i < n_sites; i++)
        if (sites[i].active && sites[i].vaddr == va)
            return &sites[i];
    return NULL;
}

/* Turn the instruction at pc into a flags site (idempotent). A listed site whose bytes are
 * no longer the compare (code reloaded, e.g. after a reset) is converted afresh. */
static bool site_convert(uint64_t pc, unsigned len, vtdx_vcpu_cb_t handler)
{
    uint64_t hw, hw_end;
    if (!qemu_plugin_translate_vaddr(pc, &hw) || !qemu_plugin_translate_vaddr(pc + len - 1, &hw_end))
        return false;
    uint8_t gadget[MAX_PATCH];
    memset(gadget, 0x90, sizeof gadget);
    gadget[0] = 0x39; /* cmp %ecx,%eax */
    gadget[1] = 0xc8;
    bool ok = false;
    pthread_mutex_lock(&patch_mu);
    GByteArray *b = g_byte_array_new();
    if (qemu_plugin_read_memory_vaddr(pc, b, len) && b->len >= len) {
        pthread_mutex_lock(&g.lock);
        site_t *old = site_lookup_va(pc);
        if (old && old->hwaddr == hw && old->len == len && !memcmp(b->data, gadget, len))
            ok = true; /* already a site */
        else if (old)
            old->active = false; /* stale */
        site_t *st = NULL;
        if (!ok && n_sites < (int)G_N_ELEMENTS(sites)) {
            st = &sites[n_sites];
            *st = (site_t){.hwaddr = hw, .vaddr = pc, .len = len, .active = true,
                           .handler = handler};
            memcpy(st->orig, b->data, len);
            __sync_synchronize();
            n_sites++; /* listed first: whoever translates the new bytes instruments them */
        }
        pthread_mutex_unlock(&g.lock);
        if (st) {
            g_byte_array_set_size(b, 0);
            g_byte_array_append(b, gadget, len);
            ok = qemu_plugin_write_memory_vaddr(pc, b);
            if (!ok) {
                pthread_mutex_lock(&g.lock);
                st->active = false;
                pthread_mutex_unlock(&g.lock);
            }
        }
    }
    g_byte_array_free(b, TRUE);
    pthread_mutex_unlock(&patch_mu);
    return ok;
}

/* Original bytes of an instruction that is now a flags site (for decoding). */
static void site_overlay(uint64_t pc, uint8_t *d, unsigned n)
{
    if (!n_sites)
        return;
    pthread_mutex_lock(&g.lock);
    site_t *st = site_lookup_va(pc);
    if (st)
        memcpy(d, st->orig, st->len < n ? st->len : n);
    pthread_mutex_unlock(&g.lock);
}

static bool fpatch_get(uint64_t pc, const uint8_t *bytes, unsigned len, unsigned kind,
                       uint64_t *hw_out)
{
    uint64_t hw, hw_end;
    if (!qemu_plugin_translate_vaddr(pc, &hw) || !qemu_plugin_translate_vaddr(pc + len - 1, &hw_end))
        return false;
    *hw_out = hw;
    bool ok = false;
    pthread_mutex_lock(&patch_mu);
    fpatch_t *p = NULL, *slot = NULL;
    pthread_mutex_lock(&g.lock);
    for (unsigned i = 0; i < G_N_ELEMENTS(fpatches); i++) {
        if (fpatches[i].refs && fpatches[i].hwaddr == hw)
            p = &fpatches[i];
        else if (!fpatches[i].refs && !slot)
            slot = &fpatches[i];
    }
    if (p && p->kind == kind && p->len == len) {
        p->refs++; /* another vCPU faults at the same place */
        ok = true;
    }
    pthread_mutex_unlock(&g.lock);
    if (!p && slot) {
        GByteArray *b = g_byte_array_new();
        if (qemu_plugin_read_memory_vaddr(pc, b, len) && b->len >= len) {
            fpatch_t np = {.hwaddr = hw, .vaddr = pc, .len = len, .refs = 1, .kind = kind};
            memcpy(np.saved, b->data, len);
            pthread_mutex_lock(&g.lock);
            *slot = np; /* listed first: other vCPUs translating the new bytes wait them out */
            pthread_mutex_unlock(&g.lock);
            __sync_fetch_and_add(&n_fpatches, 1);
            g_byte_array_set_size(b, 0);
            g_byte_array_append(b, bytes, len);
            ok = qemu_plugin_write_memory_vaddr(pc, b);
            if (!ok) {
                pthread_mutex_lock(&g.lock);
                slot->refs = 0;
                pthread_mutex_unlock(&g.lock);
                __sync_fetch_and_sub(&n_fpatches, 1);
            }
        }
        g_byte_array_free(b, TRUE);
    }
    pthread_mutex_unlock(&patch_mu);
    return ok;
}

static void fpatch_put(uint64_t hw)
{
    pthread_mutex_lock(&patch_mu);
    pthread_mutex_lock(&g.lock);
    fpatch_t *p = NULL;
    for (unsigned i = 0; i < G_N_ELEMENTS(fpatches) && !p; i++)
        if (fpatches[i].refs && fpatches[i].hwaddr == hw)
            p = &fpatches[i];
    bool last = p && p->refs == 1;
    fpatch_t copy = p ? *p : (fpatch_t){0};
    pthread_mutex_unlock(&g.lock);
    if (last) {
        GByteArray *b = g_byte_array_new();
        g_byte_array_append(b, copy.saved, copy.len);
        uint64_t now = 0;
        bool ok = qemu_plugin_translate_vaddr(copy.vaddr, &now) && now == hw
                      ? qemu_plugin_write_memory_vaddr(copy.vaddr, b)
                      : qemu_plugin_write_memory_hwaddr(hw, b) == 0;
        if (!ok)
            plog("cannot restore the code patched at %#" PRIx64, copy.vaddr);
        g_byte_array_free(b, TRUE);
    }
    if (p) {
        pthread_mutex_lock(&g.lock);
        p->refs--;
        pthread_mutex_unlock(&g.lock);
        if (last)
            __sync_fetch_and_sub(&n_fpatches, 1);
    }
    pthread_mutex_unlock(&patch_mu);
}

static void on_exception(unsigned int vcpu, enum qemu_plugin_discon_type type, uint64_t from,
                         uint64_t to, void *ud)
{
    if (vcpu >= g.nvcpus || !g.vcpus[vcpu].fault_patched)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    v->fault_patched = false;
    fpatch_put(v->fault_hwaddr);
}

/* Fault-patch bytes reached by a vCPU that is not faulting there (it runs the same code):
 * wait, re-executing the instruction until the patch is gone, instead of faulting. */
static void on_fault_insn(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud, hw;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (v->fault_patched && qemu_plugin_translate_vaddr(pc, &hw) && hw == v->fault_hwaddr)
        return; /* ours: fault */
    qemu_plugin_set_pc(pc);
}

static bool fault_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len)
{
    if (!len || !(d[0] == 0xf4 || d[0] == 0x66 || (len >= 2 && d[0] == 0x0f && d[1] == 0x0b)))
        return false;
    bool listed = false;
    pthread_mutex_lock(&g.lock);
    for (unsigned i = 0; i < G_N_ELEMENTS(fpatches) && !listed; i++)
        listed = fpatches[i].refs && fpatches[i].vaddr == pc;
    pthread_mutex_unlock(&g.lock);
    if (listed)
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_fault_insn, QEMU_PLUGIN_CB_RW_REGS_PC,
                                               (void *)(uintptr_t)pc);
    return listed;
}

/* Make TCG raise #GP(0) or #UD at pc. Returns only if that is impossible. */
static void inject_fault(vcpu_t *v, uint64_t pc, unsigned kind)
{
    unsigned len = kind == FAULT_UD ? 2 : cpl(v) > 0 ? 1 : MAX_PATCH;
    uint8_t bytes[MAX_PATCH];
    memset(bytes, 0x66, sizeof bytes);
    if (kind == FAULT_UD) {
        bytes[0] = 0x0f; /* ud2 */
        bytes[1] = 0x0b;
    } else if (len == 1) {
        bytes[0] = 0xf4; /* hlt: #GP(0) at CPL > 0 */
    }
    v->in_gadget = false;
    if (!fpatch_get(pc, bytes, len, kind, &v->fault_hwaddr)) {
        plog("cannot raise %s at %#" PRIx64, kind == FAULT_UD ? "#UD" : "#GP(0)", pc);
        return;
    }
    v->fault_patched = true;
    qemu_plugin_set_pc(pc); /* re-execute: the patched bytes fault */
}

static void inject_gp(vcpu_t *v, uint64_t pc) { inject_fault(v, pc, FAULT_GP); }

/* ---------------------------------------------------------------- VMsucceed / VMfailInvalid */

/* End an emulated instruction with VMsucceed (fail=false) or VMfailInvalid (fail=true) and
 * final RAX/RCX values (the other registers are already written). See "RFLAGS" above. */
static void finish(vcpu_t *v, uint64_t pc, unsigned len, bool fail, uint64_t rax, uint64_t rcx,
                   vtdx_vcpu_cb_t handler)
{
    v->gad = (gadget_t){.armed = true, .pc = pc, .rax = rax, .rcx = rcx};
    wr(v, R_RAX, fail ? 0 : 1);             /* 1 - 0: no flag set */
    wr(v, R_RCX, fail ? 0x80000020ull : 0); /* 0 - 0x80000020: CF only */
    if (v->in_gadget) {
        v->in_gadget = false;
        return; /* the compare runs next */
    }
    if (!site_convert(pc, len, handler)) {
        static int warned;
        if (!warned++)
            plog("cannot convert %#" PRIx64 " to a flags site; RFLAGS may be stale", pc);
        v->gad.armed = false;
        wr(v, R_RAX, rax);
        wr(v, R_RCX, rcx);
        uint64_t fl = rd(v, R_EFLAGS) & ~FL_ARITH;
        wr(v, R_EFLAGS, fail ? fl | FL_CF : fl);
        qemu_plugin_set_pc(pc + len);
    }
    qemu_plugin_set_pc(pc); /* run the compare */
}

/* The compare of a flags site is about to run on this vCPU: emulate the instruction. */
static void on_gadget_cmp(unsigned int vcpu, void *ud)
{
    const site_t *st = ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (v->gad.armed && v->gad.pc == st->vaddr)
        return; /* finish() already ran for this execution */
    v->in_gadget = true;
    st->handler(vcpu, (void *)(uintptr_t)st->vaddr);
    if (v->in_gadget) /* the emulation left it to TCG, which raises #UD for these opcodes */
        inject_fault(v, st->vaddr, FAULT_UD);
    v->in_gadget = false;
}

/* The compare has run: put the instruction's real RAX/RCX in place. */
static void on_gadget_nop(unsigned int vcpu, void *ud)
{
    const site_t *st = ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (!v->gad.armed || v->gad.pc != st->vaddr)
        return;
    wr(v, R_RAX, v->gad.rax);
    wr(v, R_RCX, v->gad.rcx);
    v->gad.armed = false;
}

/* ---------------------------------------------------------------- instruction decoding */

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

/* Prefixes, escape and ModRM/SIB/displacement of the instruction at pc, read from guest
 * memory (TCG hands plugins a truncated copy of opcodes it does not implement). */
static bool decode(vcpu_t *v, uint64_t pc, unsigned opcode_len, insn_t *in)
{
    GByteArray *b = g_byte_array_new();
    bool ok = qemu_plugin_read_memory_vaddr(pc, b, 16) && b->len == 16;
    if (!ok) {
        g_byte_array_free(b, TRUE);
        return false;
    }
    uint8_t *d = b->data;
    site_overlay(pc, d, 16);
    unsigned p = 0;
    *in = (insn_t){.seg = -1};
    for (;; p++) {
        uint8_t c = d[p];
        if (c == 0x66) in->p66 = true;
        else if (c == 0xf3) in->pf3 = true;
        else if (c == 0x67) in->addr32 = true;
        else if (c == 0x64) in->seg = 4;
        else if (c == 0x65) in->seg = 5;
        else if (c == 0xf2 || c == 0x2e || c == 0x3e || c == 0x26 || c == 0x36) ;
        else break;
        if (p >= 14) break;
    }
    if ((d[p] & 0xf0) == 0x40)
        in->rex = d[p++];
    in->op_at = p;
    p += opcode_len;
    in->modrm = d[p++];
    unsigned mod = in->modrm >> 6, rm = (in->modrm & 7) | ((in->rex & 1) << 3);
    in->is_mem = mod != 3;
    if (in->is_mem) {
        uint64_t ea = 0;
        int64_t disp = 0;
        bool riprel = false;
        if ((in->modrm & 7) == 4) {
            uint8_t sib = d[p++];
            unsigned base = (sib & 7) | ((in->rex & 1) << 3);
            unsigned index = ((sib >> 3) & 7) | ((in->rex & 2) << 2);
            if (index != 4)
                ea += rd(v, (int)index) << (sib >> 6);
            if ((sib & 7) == 5 && mod == 0) {
                disp = (int32_t)(d[p] | d[p + 1] << 8 | d[p + 2] << 16 | (uint32_t)d[p + 3] << 24);
                p += 4;
            } else {
                ea += rd(v, (int)base);
            }
        } else if ((in->modrm & 7) == 5 && mod == 0) {
            riprel = true;
            disp = (int32_t)(d[p] | d[p + 1] << 8 | d[p + 2] << 16 | (uint32_t)d[p + 3] << 24);
            p += 4;
        } else {
            ea += rd(v, (int)rm);
        }
        if (mod == 1) {
            disp = (int8_t)d[p];
            p += 1;
        } else if (mod == 2) {
            disp = (int32_t)(d[p] | d[p + 1] << 8 | d[p + 2] << 16 | (uint32_t)d[p + 3] << 24);
            p += 4;
        }
        in->len = p;
        ea = riprel ? pc + p + (uint64_t)disp : ea + (uint64_t)disp;
        if (in->addr32)
            ea &= 0xffffffffull;
        if (in->seg == 4) ea += rd(v, R_FS_BASE);
        if (in->seg == 5) ea += rd(v, R_GS_BASE);
        in->ea = ea;
    } else {
        in->len = p;
    }
    g_byte_array_free(b, TRUE);
    return true;
}

static unsigned modrm_reg(const insn_t *in)
{
    return ((in->modrm >> 3) & 7) | ((in->rex & 4) << 1);
}

/* ---------------------------------------------------------------- daemon connection */

static bool send_all(int fd, const void *buf, size_t n, const char **why)
{
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            *why = k < 0 && errno != EPIPE && errno != ECONNRESET ? strerror(errno)
                                                                  : "daemon closed the connection";
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* Receive exactly n bytes; on failure *why names the cause. */
static bool recv_all(int fd, void *buf, size_t n, const char **why)
{
    char *p = buf;
    while (n) {
        if (g.timeout_ms > 0) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            int r = poll(&pfd, 1, g.timeout_ms);
            if (r < 0 && errno == EINTR)
                continue;
            if (r == 0) {
                *why = "no reply within the timeout";
                return false;
            }
        }
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k == 0) {
            *why = "daemon closed the connection";
            return false;
        }
        if (k < 0) {
            *why = strerror(errno);
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

static void daemon_lost(const char *why)
{
    if (__sync_bool_compare_and_swap(&g.daemon_dead, 0, 1))
        plog("daemon connection lost (%s); SEAMCALL now fails with VMfailInvalid", why);
}

/* Connect and say HELLO; returns the fd (WELCOME header in *w) or -1 with *why set. */
static int dial(uint32_t vcpu, struct vtdx_welcome *w, const char **why)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    if (strlen(g.sock_path) >= sizeof sa.sun_path) {
        *why = "socket path too long";
        close(fd);
        return -1;
    }
    strcpy(sa.sun_path, g.sock_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        *why = strerror(errno);
        close(fd);
        return -1;
    }
    struct vtdx_hello h = {.magic = VTDX_MAGIC, .version = VTDX_PROTO_VERSION,
                           .kind = VTDX_HELLO, .vcpu = vcpu, .nvcpus = g.nvcpus,
                           .pid = (uint64_t)getpid()};
    if (!send_all(fd, &h, sizeof h, why)) {
        close(fd);
        return -1;
    }
    if (!recv_all(fd, w, sizeof *w, why)) {
        close(fd);
        return -1;
    }
    if (w->magic != VTDX_MAGIC || w->kind != VTDX_WELCOME || w->status != VTDX_OK) {
        *why = w->status == VTDX_BAD_VERSION ? "protocol version mismatch"
               : w->status == VTDX_BAD_VCPU ? "daemon rejected the vCPU index"
                                            : "bad WELCOME frame";
        close(fd);
        return -1;
    }
    return fd;
}

/* The platform profile: fetched once, at install time, on a control connection. */
static bool load_profile(void)
{
    struct vtdx_welcome w;
    const char *why = "?";
    int fd = dial(VTDX_CONTROL_VCPU, &w, &why);
    if (fd < 0) {
        plog("cannot reach the vtdx daemon at %s: %s", g.sock_path, why);
        return false;
    }
    bool ok = w.row_size == sizeof(struct vtdx_row);
    for (uint32_t i = 0; ok && i < w.nrows; i++) {
        struct vtdx_row r;
        ok = recv_all(fd, &r, sizeof r, &why);
        if (!ok)
            break;
        if (r.type == VTDX_ROW_CPUID && g.n_cpuid < MAX_ROWS)
            g.cpuid_rows[g.n_cpuid++] = r;
        else if (r.type == VTDX_ROW_MSR && g.n_msr < MAX_ROWS)
            g.msr_rows[g.n_msr++] = r;
        else if (r.type == VTDX_ROW_FEATURE) {
            if (r.a == VTDX_F_SEAM) g.seam = r.d != 0;
            if (r.a == VTDX_F_VMX) g.vmx = r.d != 0;
            if (r.a == VTDX_F_MOVDIR64B) g.movdir64b = r.d != 0;
            if (r.a == VTDX_F_PHYS_BITS) g.phys_bits = (unsigned)r.d;
        } else {
            ok = false;
            why = "bad profile row";
        }
    }
    close(fd);
    if (!ok)
        plog("bad platform profile from the daemon: %s", why);
    return ok;
}

static void vcpu_init(unsigned int vcpu, void *ud)
{
    if (vcpu >= g.nvcpus) {
        plog("vCPU %u beyond the %u announced; it gets no TDX module", vcpu, g.nvcpus);
        return;
    }
    vcpu_t *v = &g.vcpus[vcpu];
    pthread_mutex_lock(&g.lock);
    if (!reg_handle[R_RAX]) {
        GArray *regs = qemu_plugin_get_registers(); /* only valid on a vCPU thread */
        for (guint i = 0; i < regs->len; i++) {
            qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
            for (int r = 0; r < NREG; r++)
                if (!strcmp(d->name, reg_names[r]))
                    reg_handle[r] = d->handle;
        }
        g_array_free(regs, TRUE);
        for (int r = 0; r < NREG; r++)
            if (!reg_handle[r])
                plog("QEMU exposes no register '%s'", reg_names[r]);
    }
    pthread_mutex_unlock(&g.lock);
    v->buf = g_byte_array_sized_new(64);
    v->lat_ns = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    v->echo_ns = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    v->msr_store = g_new0(uint64_t, g.n_msr ? g.n_msr : 1);
    for (unsigned i = 0; i < g.n_msr; i++)
        v->msr_store[i] = g.msr_rows[i].d;
    v->fd = -1;
    if (!g.seam)
        return;
    struct vtdx_welcome w;
    const char *why = "?";
    v->fd = dial(vcpu, &w, &why);
    if (v->fd < 0) {
        daemon_lost(why);
        return;
    }
}

/* ---------------------------------------------------------------- SEAMCALL */

/* Floor for scripts/bench: one echo frame of the same sizes on the same socket and daemon
 * thread, without the backend, after each of a vCPU's first `echo` SEAMCALLs, so floor and
 * SEAMCALLs are sampled under the same conditions (other vCPUs running too). */
static void echo_once(unsigned int vcpu, vcpu_t *v)
{
    struct vtdx_call c = {.kind = VTDX_ECHO, .vcpu = vcpu, .seq = ++v->seq};
    struct vtdx_ret r;
    const char *why = "?";
    uint64_t t0 = now_ns();
    if (!send_all(v->fd, &c, sizeof c, &why) || !recv_all(v->fd, &r, sizeof r, &why)) {
        daemon_lost(why);
        return;
    }
    uint64_t dt = now_ns() - t0;
    g_array_append_val(v->echo_ns, dt);
}

static void on_seamcall(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (!v->vmx_on || !long_mode(v))
        return; /* #UD, raised by TCG (it does not know the opcode) */
    if (cpl(v) > 0) {
        inject_gp(v, pc);
        return; /* could not patch: TCG raises #UD */
    }
    struct vtdx_call c = {.kind = VTDX_CALL, .vcpu = vcpu, .seq = ++v->seq};
    for (int i = 0; i < VTDX_NREGS; i++)
        c.regs[i] = rd(v, wire_regs[i]);
    if (!g.seam || g.daemon_dead || v->fd < 0) {
        finish(v, pc, 4, true, c.regs[0], c.regs[1], on_seamcall); /* no SEAM module */
        return;
    }
    c.rflags = rd(v, R_EFLAGS);
    c.rip = pc;
    c.rsp = rd(v, R_RSP);
    c.cr3 = rd(v, R_CR3);
    struct vtdx_ret r;
    const char *why = "?";
    uint64_t t0 = now_ns();
    bool ok = send_all(v->fd, &c, sizeof c, &why) && recv_all(v->fd, &r, sizeof r, &why);
    if (ok && (r.kind != VTDX_RET || r.seq != c.seq)) {
        ok = false;
        why = "out-of-sequence reply";
    }
    if (!ok) {
        daemon_lost(why);
        close(v->fd);
        v->fd = -1;
        finish(v, pc, 4, true, c.regs[0], c.regs[1], on_seamcall);
        return;
    }
    uint64_t t1 = now_ns();
    uint64_t dt = t1 - t0;
    g_array_append_val(v->lat_ns, dt);
    if (v->echo_ns->len < g.echo_count) {
        echo_once(vcpu, v);
    } else { /* the aggregate rate counts the calls after the floor phase */
        if (!v->rate_calls++)
            v->first_ns = t0;
        v->last_ns = t1;
    }
    bool fail = r.result != VTDX_VMSUCCEED;
    if (!fail) /* RAX and RCX go in through finish() */
        for (int i = 2; i < VTDX_NREGS; i++)
            if (r.regs[i] != c.regs[i])
                wr(v, wire_regs[i], r.regs[i]);
    finish(v, pc, 4, fail, fail ? c.regs[0] : r.regs[0], fail ? c.regs[1] : r.regs[1],
           on_seamcall);
}

/* ---------------------------------------------------------------- CPUID */

static void on_cpuid_pre(unsigned int vcpu, void *ud)
{
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    v->cpuid_leaf = (uint32_t)rd(v, R_RAX);
    v->cpuid_sub = (uint32_t)rd(v, R_RCX);
    v->cpuid_next_pc = (uintptr_t)ud;
    v->cpuid_pending = true;
}

/* Runs on the instruction after CPUID: patch the bits the profile sets or clears. */
static void on_cpuid_post(unsigned int vcpu, void *ud)
{
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (!v->cpuid_pending || v->cpuid_next_pc != (uintptr_t)ud)
        return;
    v->cpuid_pending = false;
    static const int out_reg[4] = {R_RAX, R_RBX, R_RCX, R_RDX};
    for (unsigned i = 0; i < g.n_cpuid; i++) {
        const struct vtdx_row *r = &g.cpuid_rows[i];
        if (r->a != v->cpuid_leaf || (r->b != 0xffffffffu && r->b != v->cpuid_sub) || r->c > 3)
            continue;
        uint64_t val = rd(v, out_reg[r->c]) & 0xffffffffull;
        val = ((val & ~r->e) | r->d) & 0xffffffffull;
        wr(v, out_reg[r->c], val);
    }
}

/* ---------------------------------------------------------------- MSRs */

static int msr_row(uint32_t index)
{
    for (unsigned i = 0; i < g.n_msr; i++)
        if (g.msr_rows[i].a == index)
            return (int)i;
    return -1;
}

/* The vCPU of an RDMSR/WRMSR the facade answers, its row in *row; NULL leaves the
 * instruction to TCG: an MSR without a row is not ours, and at CPL > 0 TCG raises #GP(0). */
static vcpu_t *msr_site(unsigned int vcpu, int *row)
{
    if (vcpu >= g.nvcpus)
        return NULL;
    vcpu_t *v = &g.vcpus[vcpu];
    *row = msr_row((uint32_t)rd(v, R_RCX));
    return *row < 0 || cpl(v) > 0 ? NULL : v;
}

static void on_rdmsr(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    int i;
    vcpu_t *v = msr_site(vcpu, &i);
    if (!v)
        return;
    uint64_t val = v->msr_store[i];
    wr(v, R_RAX, val & 0xffffffffull);
    wr(v, R_RDX, val >> 32);
    qemu_plugin_set_pc(pc + 2);
}

static void on_wrmsr(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    int i;
    vcpu_t *v = msr_site(vcpu, &i);
    if (!v)
        return;
    switch (g.msr_rows[i].flags) {
    case VTDX_MSR_STORE:
        v->msr_store[i] = (rd(v, R_RDX) << 32) | (rd(v, R_RAX) & 0xffffffffull);
        break;
    case VTDX_MSR_GP:
        inject_gp(v, pc);
        return;
    default:
        break;
    }
    qemu_plugin_set_pc(pc + 2);
}

static uint64_t msr_value(vcpu_t *v, uint32_t index, uint64_t dflt)
{
    int i = msr_row(index);
    return i < 0 ? dflt : v->msr_store[i];
}

/* ---------------------------------------------------------------- CR4.VMXE, VMXON, VMXOFF */

/* MOV to CR4 (0F 22 /4): TCG rejects VMXE because its CPUID has no VMX. */
static void on_mov_cr4(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    insn_t in;
    if (cpl(v) > 0 || !decode(v, pc, 2, &in))
        return; /* CPL > 0: TCG raises #GP(0) */
    uint64_t val = rd(v, (int)((in.modrm & 7) | ((in.rex & 1) << 3)));
    if (!(val & CR4_VMXE)) {
        if (v->vmx_on)
            inject_gp(v, pc); /* CR4.VMXE is fixed to 1 in VMX operation */
        return;               /* TCG does the write */
    }
    wr(v, R_CR4, val);
    qemu_plugin_set_pc(pc + in.len);
}

static bool cr_fixed_ok(vcpu_t *v)
{
    uint64_t cr0 = rd(v, R_CR0), cr4 = rd(v, R_CR4);
    uint64_t f0 = msr_value(v, 0x486, 0), f1 = msr_value(v, 0x487, ~0ull);
    uint64_t f40 = msr_value(v, 0x488, CR4_VMXE), f41 = msr_value(v, 0x489, ~0ull);
    return (cr0 & f0) == f0 && !(cr0 & ~f1 & 0xffffffffull) && (cr4 & f40) == f40 &&
           !(cr4 & ~f41);
}

/* VMXON m64 (F3 0F C7 /6), with the checks of the SDM's operation section. */
static void on_vmxon(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    insn_t in;
    if (!decode(v, pc, 2, &in) || !in.is_mem || !(rd(v, R_CR4) & CR4_VMXE) || !long_mode(v))
        return; /* #UD (TCG); protected-mode VMXON is not modelled */
    if (v->vmx_on) {
        if (cpl(v) > 0) {
            inject_gp(v, pc);
            return;
        }
        /* VMfail with no current VMCS = VMfailInvalid */
        finish(v, pc, in.len, true, rd(v, R_RAX), rd(v, R_RCX), on_vmxon);
        return;
    }
    uint64_t feat = msr_value(v, 0x3a, 0);
    if (cpl(v) > 0 || !(feat & 1) || !(feat & 4) || !cr_fixed_ok(v)) {
        if (g.debug)
            plog("vCPU %u: VMXON #GP(0): CPL %u CR0 %#" PRIx64 " CR4 %#" PRIx64
                 " FEAT_CTL %#" PRIx64, vcpu, cpl(v), rd(v, R_CR0), rd(v, R_CR4), feat);
        inject_gp(v, pc);
        return;
    }
    GByteArray *b = g_byte_array_new();
    bool ok = qemu_plugin_read_memory_vaddr(in.ea, b, 8) && b->len == 8;
    uint64_t addr = 0;
    if (ok)
        memcpy(&addr, b->data, 8);
    g_byte_array_free(b, TRUE);
    if (!ok) {
        plog("VMXON operand at %#" PRIx64 " unreadable (a #PF is not modelled)", in.ea);
        return;
    }
    unsigned pbits = g.phys_bits ? g.phys_bits : 46;
    bool fail = (addr & 0xfff) || (pbits < 64 && (addr >> pbits));
    if (!fail) {
        GByteArray *r = g_byte_array_new();
        uint32_t rev = 0;
        fail = qemu_plugin_read_memory_hwaddr(addr, r, 4) != 0 || r->len < 4;
        if (!fail)
            memcpy(&rev, r->data, 4);
        g_byte_array_free(r, TRUE);
        uint32_t want = (uint32_t)msr_value(v, 0x480, 0) & 0x7fffffffu;
        fail = fail || (rev & 0x80000000u) || (rev & 0x7fffffffu) != want;
    }
    if (!fail)
        v->vmx_on = true;
    finish(v, pc, in.len, fail, rd(v, R_RAX), rd(v, R_RCX), on_vmxon);
}

/* VMXOFF (0F 01 C4). */
static void on_vmxoff(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    if (!v->vmx_on || !long_mode(v))
        return; /* #UD */
    if (cpl(v) > 0) {
        inject_gp(v, pc);
        return;
    }
    v->vmx_on = false;
    finish(v, pc, 3, false, rd(v, R_RAX), rd(v, R_RCX), on_vmxoff);
}

/* ---------------------------------------------------------------- MOVDIR64B */

/* MOVDIR64B r64, m512 (66 0F 38 F8 /r): 64-byte store to [reg] from the memory operand. */
static void on_movdir64b(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    if (vcpu >= g.nvcpus)
        return;
    vcpu_t *v = &g.vcpus[vcpu];
    insn_t in;
    if (!decode(v, pc, 3, &in) || !in.is_mem || !long_mode(v))
        return;
    uint64_t dst = rd(v, (int)modrm_reg(&in));
    if (in.addr32)
        dst &= 0xffffffffull;
    if (dst & 63) {
        inject_gp(v, pc); /* destination not 64-byte aligned */
        return;
    }
    GByteArray *b = g_byte_array_new();
    bool ok = qemu_plugin_read_memory_vaddr(in.ea, b, 64) && b->len == 64 &&
              qemu_plugin_write_memory_vaddr(dst, b);
    g_byte_array_free(b, TRUE);
    if (!ok) {
        plog("MOVDIR64B %#" PRIx64 " <- %#" PRIx64 ": unmapped (a #PF is not modelled)", dst,
             in.ea);
        return;
    }
    qemu_plugin_set_pc(pc + in.len);
}

/* ---------------------------------------------------------------- translation */

/* Instrument the compare and the first NOP of a flags site. */
static bool gadget_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len)
{
    bool is_cmp = len >= 2 && d[0] == 0x39 && d[1] == 0xc8;
    if (!is_cmp && !(len >= 1 && d[0] == 0x90))
        return false;
    pthread_mutex_lock(&g.lock);
    site_t *st = site_lookup_va(is_cmp ? pc : pc - 2);
    pthread_mutex_unlock(&g.lock);
    uint64_t hw;
    /* Same virtual address but other physical code (e.g. after a module unload): not ours. */
    if (!st || !qemu_plugin_translate_vaddr(st->vaddr, &hw) || hw != st->hwaddr)
        return false;
    if (is_cmp)
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_gadget_cmp, QEMU_PLUGIN_CB_RW_REGS_PC, st);
    else
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_gadget_nop, QEMU_PLUGIN_CB_RW_REGS, st);
    return true;
}

static void on_translate(struct qemu_plugin_tb *tb, void *ud)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (n && g.n_cpuid) {
        uint64_t start = qemu_plugin_tb_vaddr(tb);
        pthread_mutex_lock(&g.lock);
        bool follower = g_hash_table_contains(g.cpuid_followers, GUINT_TO_POINTER(start));
        pthread_mutex_unlock(&g.lock);
        if (follower)
            qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, 0), on_cpuid_post,
                                                   QEMU_PLUGIN_CB_RW_REGS,
                                                   (void *)(uintptr_t)start);
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint8_t d[16];
        size_t len = qemu_plugin_insn_data(insn, d, sizeof d), p = 0;
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        if (n_sites && gadget_site(insn, pc, d, len))
            continue;
        if (n_fpatches && fault_site(insn, pc, d, len))
            continue;
        bool p66 = false, pf3 = false;
        while (p < len && (d[p] == 0x66 || d[p] == 0xf3 || d[p] == 0xf2 || d[p] == 0x67 ||
                           d[p] == 0x2e || d[p] == 0x3e || d[p] == 0x26 || d[p] == 0x36 ||
                           d[p] == 0x64 || d[p] == 0x65)) {
            p66 |= d[p] == 0x66;
            pf3 |= d[p] == 0xf3;
            p++;
        }
        if (p < len && (d[p] & 0xf0) == 0x40)
            p++;
        if (p + 1 >= len || d[p] != 0x0f)
            continue;
        uint8_t op = d[p + 1];
        int modrm = p + 2 < len ? d[p + 2] : -1;
        void *at = (void *)(uintptr_t)pc;
        vtdx_vcpu_cb_t cb = NULL;
        if (op == 0x01 && modrm == 0xcf && p66 && p == 1)
            cb = on_seamcall;
        else if (op == 0xa2 && g.n_cpuid) {
            uint64_t next = pc + qemu_plugin_insn_size(insn);
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_cpuid_pre, QEMU_PLUGIN_CB_R_REGS,
                                                   (void *)(uintptr_t)next);
            if (i + 1 < n) {
                qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, i + 1),
                                                       on_cpuid_post, QEMU_PLUGIN_CB_RW_REGS,
                                                       (void *)(uintptr_t)next);
            } else {
                pthread_mutex_lock(&g.lock);
                g_hash_table_add(g.cpuid_followers, GUINT_TO_POINTER(next));
                pthread_mutex_unlock(&g.lock);
            }
        } else if (op == 0x32 && g.n_msr)
            cb = on_rdmsr;
        else if (op == 0x30 && g.n_msr)
            cb = on_wrmsr;
        else if (g.vmx && op == 0x22 && modrm >= 0 && (modrm >> 6) == 3 && ((modrm >> 3) & 7) == 4)
            cb = on_mov_cr4;
        else if (g.vmx && op == 0xc7 && pf3 && modrm >= 0 && ((modrm >> 3) & 7) == 6 &&
                 (modrm >> 6) != 3)
            cb = on_vmxon;
        else if (g.vmx && op == 0x01 && modrm == 0xc4 && !p66 && !pf3)
            cb = on_vmxoff;
        else if (g.movdir64b && op == 0x38 && p + 2 < len && d[p + 2] == 0xf8 && p66)
            cb = on_movdir64b;
        if (cb)
            qemu_plugin_register_vcpu_insn_exec_cb(insn, cb, QEMU_PLUGIN_CB_RW_REGS_PC, at);
    }
}

/* ---------------------------------------------------------------- statistics, setup */

static void write_stats(void)
{
    FILE *f = fopen(g.stats_path, "w");
    if (!f) {
        plog("cannot write %s: %s", g.stats_path, strerror(errno));
        return;
    }
    for (unsigned i = 0; i < g.nvcpus; i++) {
        vcpu_t *v = &g.vcpus[i];
        if (!v->lat_ns)
            continue;
        fprintf(f, "vcpu %u calls %u echo %u first_ns %" PRIu64 " last_ns %" PRIu64
                " rate_calls %" PRIu64 "\n", i, v->lat_ns->len, v->echo_ns->len, v->first_ns,
                v->last_ns, v->rate_calls);
        for (guint k = 0; k < v->echo_ns->len; k++)
            fprintf(f, "e %u %" PRIu64 "\n", i, g_array_index(v->echo_ns, uint64_t, k));
        for (guint k = 0; k < v->lat_ns->len; k++)
            fprintf(f, "c %u %" PRIu64 "\n", i, g_array_index(v->lat_ns, uint64_t, k));
    }
    fclose(f);
}

static void at_exit(void *ud)
{
    if (g.stats_path)
        write_stats();
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        plog("needs qemu-system-x86_64 (got %s)", info->target_name);
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        const char *val = eq ? eq + 1 : "";
        size_t klen = eq ? (size_t)(eq - argv[i]) : strlen(argv[i]);
        if (!strncmp(argv[i], "sock", klen) && klen == 4)
            g.sock_path = g_strdup(val);
        else if (!strncmp(argv[i], "timeout", klen) && klen == 7)
            g.timeout_ms = (int)(strtod(val, NULL) * 1000);
        else if (!strncmp(argv[i], "echo", klen) && klen == 4)
            g.echo_count = (unsigned)strtoul(val, NULL, 0);
        else if (!strncmp(argv[i], "debug", klen) && klen == 5)
            g.debug = strtoul(val, NULL, 0) != 0;
        else if (!strncmp(argv[i], "stats", klen) && klen == 5)
            g.stats_path = g_strdup(val);
        else {
            plog("unknown option '%s' (sock=, timeout=, echo=, stats=, debug=)", argv[i]);
            return -1;
        }
    }
    if (!g.sock_path) {
        plog("missing option sock=PATH (the vtdx daemon's socket)");
        return -1;
    }
    g.nvcpus = (unsigned)info->system.max_vcpus;
    g.vcpus = g_new0(vcpu_t, g.nvcpus);
    g.cpuid_followers = g_hash_table_new(g_direct_hash, g_direct_equal);
    if (!load_profile())
        return -1;
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init, NULL);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate, NULL);
    qemu_plugin_register_vcpu_discon_cb(id, QEMU_PLUGIN_DISCON_EXCEPTION, on_exception, NULL);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
