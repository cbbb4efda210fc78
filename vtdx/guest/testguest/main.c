/* vtdx test guest: starts every vCPU, turns VMX on the way Linux does (CR4.VMXE, VMXON) and
 * runs SEAMCALL tests chosen on the multiboot command line, e.g.
 *     smp=4 test=roundtrip,memory iters=1000 addrs=0x1234000,0x140000000
 * Results go to COM1 as one line each (see vtdx/testguest.py for the protocol):
 *     TG <test> cpu=<n> ok=<k> fail=<m> [key=value...]
 *     TG EXC cpu=<n> vec=<v> err=<e> rip=<hex>
 *     TG DONE                       (BSP, after every CPU finished; then isa-debug-exit)
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "testguest.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define LAPIC 0xFEE00000UL
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define CR4_VMXE (1UL << 13)
#define RFLAGS_CF 0x1
#define RFLAGS_ZF 0x40
#define RFLAGS_ARITH 0x8d5              /* CF PF AF ZF SF OF */
#define RFLAGS_FIXED 0x2
#define MSR_VMX_BASIC 0x480
#define MSR_FEATURE_CONTROL 0x3a
#define FC_LOCKED (1UL << 0)
#define FC_VMX_OUTSIDE_SMX (1UL << 2)
#define LEAF_ECHO 0xE000                /* echo backend: X_out = rotl64(X_in, 1) ^ (cpu << 56) */
#define LEAF_ECHO_MEM 0xE001            /* echo backend: RDX = [RCX]; [R9] = R8 */
#define MAX_ADDRS 16
#define SCRIPT_PA_DEFAULT 0x4000000UL   /* 64 MiB: vtdx.seamscript.SCRIPT_PA */

/* ---- assembly (boot.S) ---- */
struct sregs {                          /* layout known to seamcall_regs; vtdx.regs order */
    u64 r[14];                          /* rax rcx rdx rbx rsi rdi r8..r15 */
    u64 rflags;                         /* in: loaded just before SEAMCALL; out: after it */
};
struct guard {                          /* layout known to guard_call/guard_resume */
    u64 rbx, rbp, r12, r13, r14, r15, rsp;
    u64 vec, err, rip;
    struct guard *prev;
};
struct frame {                          /* what trap_common pushed, then the CPU's frame */
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};
extern char tramp_start[], tramp_end[], trap_stubs[], trap_user_done[], user_seamcall[];
extern char guard_resume[];
extern u64 gdt[];
extern u8 gdt_ptr[];
extern u64 ap_stack_top;
void seamcall_regs(struct sregs *r);
int guard_call(struct guard *g, void (*fn)(void *), void *arg);
void enter_user(u64 rip, u64 rsp);

static const char *const reg_names[14] = {
    "rax", "rcx", "rdx", "rbx", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};

/* ---- per-CPU state ---- */
struct tss {
    u32 rsv0;
    u64 rsp[3];
    u64 rsv1;
    u64 ist[7];
    u64 rsv2;
    u16 rsv3, iomap;
} __attribute__((packed));

struct cpu {
    struct guard *guard;                /* innermost guarded call, NULL outside tests */
    volatile int alive, done;
    int vmx_on;
    struct tss tss;
};

static struct cpu cpus[MAX_CPUS];
static u8 ap_stacks[MAX_CPUS][16384] __attribute__((aligned(16)));
static u8 trap_stacks[MAX_CPUS][8192] __attribute__((aligned(16)));   /* TSS.RSP0 */
static u8 user_stacks[MAX_CPUS][4096] __attribute__((aligned(4096)));
static u8 vmxon_regions[MAX_CPUS][4096] __attribute__((aligned(4096)));

struct idt_entry {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, rsv;
} __attribute__((packed));
static struct idt_entry idt[256];

/* ---- configuration from the command line ---- */
static struct {
    int smp;
    char tests[128];
    u64 iters;
    int iters_given;
    u64 addrs[MAX_ADDRS];
    int naddrs;
    u64 script;                         /* PA of the SEAMCALL script (test=script) */
} cfg = { .smp = 1, .iters = 1000, .script = SCRIPT_PA_DEFAULT };

static volatile int go;
static volatile int cpus_done;

/* ---- small libc ---- */
void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static int streq_n(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i] || !a[i])
            return a[i] == b[i];
    return 1;
}

/* ---- port I/O, MSRs, control registers, local APIC ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline u32 cpuid_ecx(u32 leaf)
{
    u32 a = leaf, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return c;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 read_cr4(void)
{
    u64 v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline int this_cpu(void) { return (int)(lapic_read(0x20) >> 24); }   /* APIC ID */
static inline u64 rotl64(u64 x, int n) { return (x << n) | (x >> (64 - n)); }

static void __attribute__((noreturn)) halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- serial output: whole lines under one spinlock ---- */
static volatile u32 serial_lock;

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);               /* no interrupts */
    outb(COM1 + 3, 0x80);               /* DLAB */
    outb(COM1 + 0, 0x01);               /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);               /* 8N1 */
    outb(COM1 + 2, 0xC7);               /* FIFO */
}

static void serial_write(const char *s)
{
    while (__atomic_exchange_n(&serial_lock, 1, __ATOMIC_ACQUIRE))
        while (serial_lock)
            cpu_relax();
    for (; *s; s++) {
        while (!(inb(COM1 + 5) & 0x20))
            cpu_relax();
        outb(COM1, (u8)*s);
    }
    __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE);
}

/* Tiny formatter: %d (int), %u (u64 decimal), %x (u64 as 0x...), %s. */
static size_t vfmt(char *buf, size_t size, const char *f, va_list ap)
{
    size_t n = 0;
#define PUT(c) do { if (n + 1 < size) buf[n] = (c); n++; } while (0)
    for (; *f; f++) {
        if (*f != '%') {
            PUT(*f);
            continue;
        }
        char tmp[24];
        int t = 0;
        switch (*++f) {
        case 'd': {
            int v = va_arg(ap, int);
            u64 u = v < 0 ? -(u64)v : (u64)v;
            if (v < 0)
                PUT('-');
            do tmp[t++] = (char)('0' + u % 10); while (u /= 10);
            break;
        }
        case 'u': {
            u64 u = va_arg(ap, u64);
            do tmp[t++] = (char)('0' + u % 10); while (u /= 10);
            break;
        }
        case 'x': {
            u64 u = va_arg(ap, u64);
            do tmp[t++] = "0123456789abcdef"[u & 15]; while (u >>= 4);
            tmp[t++] = 'x';
            tmp[t++] = '0';
            break;
        }
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                PUT(*s);
            break;
        default:
            PUT(*f);
        }
        while (t)
            PUT(tmp[--t]);
    }
    buf[n < size ? n : size - 1] = 0;
    return n < size ? n : size - 1;
#undef PUT
}

static void say(const char *f, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, f);
    vfmt(line, sizeof(line), f, ap);
    va_end(ap);
    serial_write(line);
}

/* ---- GDT/TSS/IDT ---- */
static void set_gate(int vec, void *handler, int dpl)
{
    u64 a = (u64)handler;
    idt[vec] = (struct idt_entry){
        .off0 = (u16)a, .sel = KCODE, .ist = 0, .attr = (u8)(0x8E | (dpl << 5)),
        .off1 = (u16)(a >> 16), .off2 = (u32)(a >> 32),
    };
}

static void idt_init(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, trap_stubs + 16 * v, 0);
    set_gate(USER_DONE_VECTOR, trap_user_done, 3);
}

/* Load GDT, IDT and this CPU's TSS (RSP0 = its trap stack, used when a ring-3 test faults). */
static void cpu_init(int cpu)
{
    struct tss *t = &cpus[cpu].tss;
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    t->rsp[0] = (u64)(trap_stacks[cpu] + sizeof(trap_stacks[cpu]));
    t->iomap = sizeof(*t);
    u64 *d = &gdt[TSS_SEL(cpu) / 8];
    d[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
           (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    d[1] = base >> 32;
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lgdt (%0); lidt (%1); ltr %w2"
                     :: "r"(gdt_ptr), "r"(&idtr), "r"(TSS_SEL(cpu)) : "memory");
}

/* Called by trap_common for every exception (and int $0x81 from ring 3). Inside a guarded
 * call the fault is recorded and execution resumes at guard_resume on the guard's stack;
 * outside one it is reported and the CPU stops. */
void trap(struct frame *f)
{
    int cpu = this_cpu();
    struct guard *g = cpu < MAX_CPUS ? cpus[cpu].guard : NULL;
    if (!g) {
        say("TG EXC cpu=%d vec=%u err=%u rip=%x\n", cpu, f->vec, f->err, f->rip);
        if (cpu < MAX_CPUS) {
            cpus[cpu].done = 1;
            __atomic_add_fetch(&cpus_done, 1, __ATOMIC_SEQ_CST);
        }
        halt();
    }
    g->vec = f->vec;
    g->err = f->err;
    g->rip = f->rip;
    f->rip = (u64)guard_resume;
    f->cs = KCODE;
    f->ss = KDATA;
    f->rsp = g->rsp;
    f->rflags = 0x2;
    f->rdi = (u64)g;
}

/* Run fn(arg); returns 1 if an exception (or int $0x81) ended it, details in *g. */
static int guarded(int cpu, struct guard *g, void (*fn)(void *), void *arg)
{
    g->prev = cpus[cpu].guard;
    cpus[cpu].guard = g;
    int faulted = guard_call(g, fn, arg);
    cpus[cpu].guard = g->prev;
    return faulted;
}

/* ---- VMX on, as Linux does: CPUID.1:ECX.VMX, CR4.VMXE, then VMXON on a region stamped with
 * the revision id from IA32_VMX_BASIC. Returns 0, -1 on VMfail (CF or ZF), -2 without VMX
 * (plain TCG would otherwise spin on the CR4 write), -3 if IA32_FEATURE_CONTROL forbids it. */
static int vmx_on(int cpu)
{
    if (cpus[cpu].vmx_on)
        return 0;
    if (!(cpuid_ecx(1) & (1 << 5)))
        return -2;
    /* IA32_FEATURE_CONTROL: lock it with VMX-outside-SMX on if firmware did not (as Linux's
     * init_ia32_feat_ctl does); locked without it means VMX is disabled. */
    u64 fc = rdmsr(MSR_FEATURE_CONTROL);
    if (!(fc & FC_LOCKED)) {
        fc |= FC_LOCKED | FC_VMX_OUTSIDE_SMX;
        wrmsr(MSR_FEATURE_CONTROL, fc);
    }
    if (!(fc & FC_VMX_OUTSIDE_SMX))
        return -3;
    u64 basic = rdmsr(MSR_VMX_BASIC);
    *(volatile u32 *)vmxon_regions[cpu] = (u32)basic & 0x7fffffff;
    write_cr4(read_cr4() | CR4_VMXE);
    u64 pa = (u64)vmxon_regions[cpu];
    u8 cf, zf;
    /* Flags cleared first, so CF/ZF afterwards can only come from VMXON itself. */
    __asm__ volatile("push %3; popfq; vmxon %2; setc %0; setz %1"
                     : "=qm"(cf), "=qm"(zf) : "m"(pa), "i"(RFLAGS_FIXED) : "cc", "memory");
    if (cf || zf)
        return -1;
    cpus[cpu].vmx_on = 1;
    return 0;
}

/* ---- tests ---- */
struct result {
    int cpu;
    u64 ok, fail;
    char extra[160];
    size_t len;
};

static void note(struct result *r, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    r->len += vfmt(r->extra + r->len, sizeof(r->extra) - r->len, f, ap);
    va_end(ap);
}

static int need_vmx(struct result *r)
{
    int err = vmx_on(r->cpu);
    if (err == 0)
        return 0;
    r->fail++;
    note(r, err == -2 ? " vmx=absent" : err == -3 ? " vmx=disabled" : " vmxon=fail");
    return -1;
}

static u64 mix(u64 x)                   /* splitmix64 finaliser: distinct per cpu/iter/reg */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9UL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

static u64 pattern(int cpu, u64 iter, int reg)
{
    return mix(((u64)cpu << 48) ^ ((u64)reg << 40) ^ iter ^ 0x5eaca11UL);
}

static void test_roundtrip(void *arg)
{
    struct result *r = arg;
    if (need_vmx(r))
        return;
    for (u64 i = 0; i < cfg.iters; i++) {
        struct sregs s, in;
        s.r[0] = LEAF_ECHO;
        s.rflags = RFLAGS_FIXED | RFLAGS_ARITH; /* VMsucceed must clear all six */
        for (int k = 1; k < 14; k++)
            s.r[k] = pattern(r->cpu, i, k);
        in = s;
        seamcall_regs(&s);
        int bad = s.r[0] != 0 ? 0 : -1; /* registers first, then VMsucceed's CF=ZF=0 */
        u64 want = 0;
        for (int k = 1; k < 14 && bad < 0; k++) {
            want = rotl64(in.r[k], 1) ^ ((u64)r->cpu << 56);
            if (s.r[k] != want)
                bad = k;
        }
        if (bad < 0 && (s.rflags & RFLAGS_ARITH))
            bad = 14;
        if (bad < 0) {
            r->ok++;
            continue;
        }
        if (!r->fail++) {
            if (bad == 14)
                note(r, " first_iter=%u rflags=%x", i, s.rflags);
            else
                note(r, " first_iter=%u reg=%s got=%x want=%x", i, reg_names[bad], s.r[bad],
                     bad ? want : 0UL);
        }
    }
}

static void test_memory(void *arg)
{
    struct result *r = arg;
    if (need_vmx(r))
        return;
    for (int a = 0; a < cfg.naddrs; a++) {
        /* CPUs run concurrently: each uses its own 16 bytes at addr + 16 * cpu. */
        u64 pa = cfg.addrs[a] + 16 * (u64)r->cpu;
        volatile u64 *p = (volatile u64 *)pa;
        u64 old = pattern(r->cpu, pa, 0), val = ~old ^ (u64)r->cpu;
        p[0] = old;
        p[1] = 0;
        struct sregs s = { .r = { LEAF_ECHO_MEM }, .rflags = RFLAGS_FIXED | RFLAGS_ARITH };
        s.r[1] = pa;                    /* rcx: address to read */
        s.r[6] = val;                   /* r8: value to write */
        s.r[7] = pa + 8;                /* r9: address to write */
        seamcall_regs(&s);
        u64 back = p[1];
        if (!(s.rflags & RFLAGS_ARITH) && s.r[0] == 0 && s.r[2] == old && back == val) {
            r->ok++;
        } else if (!r->fail++) {
            note(r, " addr=%x rax=%x rdx=%x want=%x wrote=%x rflags=%x", pa, s.r[0], s.r[2], old,
                 back, s.rflags);
        }
    }
}

static void user_mode(void *arg)
{
    int cpu = *(int *)arg;
    enter_user((u64)user_seamcall, (u64)(user_stacks[cpu] + sizeof(user_stacks[cpu])));
}

static void plain_seamcall(void *arg)
{
    (void)arg;
    struct sregs s = { .r = { LEAF_ECHO }, .rflags = RFLAGS_FIXED };
    seamcall_regs(&s);
}

/* Report which exception a SEAMCALL raised: ok when it is `want_vec` with error code 0. */
static void expect_fault(struct result *r, void (*fn)(void *), u64 want_vec)
{
    struct guard g;
    if (!guarded(r->cpu, &g, fn, &r->cpu) || g.vec == USER_DONE_VECTOR) {
        r->fail++;
        note(r, " vec=none");
        return;
    }
    if (g.vec == want_vec && g.err == 0)
        r->ok++;
    else
        r->fail++;
    note(r, " vec=%u err=%u rip=%x", g.vec, g.err, g.rip);
}

static void test_ring3(void *arg)
{
    struct result *r = arg;
    if (need_vmx(r))
        return;
    expect_fault(r, user_mode, 13);     /* SEAMCALL at CPL > 0: #GP(0) */
}

static void test_novmx(void *arg)
{
    struct result *r = arg;
    if (cpus[r->cpu].vmx_on) {
        r->fail++;
        note(r, " error=vmx_already_on");
        return;
    }
    expect_fault(r, plain_seamcall, 6); /* SEAMCALL outside VMX operation: #UD */
}


static u8 md_src[MAX_CPUS][64] __attribute__((aligned(64)));
static u8 md_dst[MAX_CPUS][128] __attribute__((aligned(64)));
static void md_bad(void *arg)
{
    int cpu = *(int *)arg;
    u8 *d = md_dst[cpu] + 8;
    __asm__ volatile("movdir64b (%1), %0" :: "r"(d), "r"(md_src[cpu]) : "memory");
}
static void test_movdir64b(void *arg)
{
    struct result *r = arg;
    int cpu = r->cpu;
    for (int i = 0; i < 64; i++) { md_src[cpu][i] = (u8)(i * 7 + cpu); }
    for (int i = 0; i < 128; i++) md_dst[cpu][i] = 0xee;
    u8 *d = md_dst[cpu];
    __asm__ volatile("movdir64b (%1), %0" :: "r"(d), "r"(md_src[cpu]) : "memory");
    int good = 1;
    for (int i = 0; i < 64; i++) if (md_dst[cpu][i] != (u8)(i * 7 + cpu)) good = 0;
    for (int i = 64; i < 128; i++) if (md_dst[cpu][i] != 0xee) good = 0;
    if (good) r->ok++; else r->fail++;
    expect_fault(r, md_bad, 13);
}

static u8 bad_region[MAX_CPUS][4096] __attribute__((aligned(4096)));
static int vmxon_pa(u64 pa, u64 fl)
{
    u8 cf, zf;
    __asm__ volatile("push %3; popfq; vmxon %2; setc %0; setz %1"
                     : "=qm"(cf), "=qm"(zf) : "m"(pa), "r"(fl) : "cc", "memory");
    return cf ? 1 : zf ? 2 : 0;
}
static int vmxoff_(u64 fl)
{
    u8 cf, zf;
    __asm__ volatile("push %2; popfq; vmxoff; setc %0; setz %1"
                     : "=qm"(cf), "=qm"(zf) : "r"(fl) : "cc", "memory");
    return cf ? 1 : zf ? 2 : 0;
}
static void do_vmxoff(void *arg) { (void)arg; vmxoff_(0x2); }
#define ALLF 0x8d7
static void test_vmxcheck(void *arg)
{
    struct result *r = arg;
    int cpu = r->cpu;
    struct guard g;
    if (need_vmx(r))
        return;
    if (vmxon_pa((u64)vmxon_regions[cpu], 0x2) == 1) r->ok++; else { r->fail++; note(r, " again"); }
    if (vmxoff_(ALLF) == 0) r->ok++; else { r->fail++; note(r, " off"); }
    cpus[cpu].vmx_on = 0;
    if (guarded(cpu, &g, do_vmxoff, 0) && g.vec == 6) r->ok++; else { r->fail++; note(r, " off2=%u", g.vec); }
    if (guarded(cpu, &g, plain_seamcall, 0) && g.vec == 6) r->ok++; else { r->fail++; note(r, " sc=%u", g.vec); }
    *(volatile u32 *)bad_region[cpu] = 0x12345;
    if (vmxon_pa((u64)bad_region[cpu], 0x2) == 1) r->ok++; else { r->fail++; note(r, " rev"); }
    if (vmxon_pa((u64)vmxon_regions[cpu] + 8, 0x2) == 1) r->ok++; else { r->fail++; note(r, " align"); }
    if (vmxon_pa((u64)vmxon_regions[cpu], ALLF) == 0) { r->ok++; cpus[cpu].vmx_on = 1; } else { r->fail++; note(r, " on"); }
}

static void test_nomodule(void *arg)
{
    struct result *r = arg;
    if (need_vmx(r))
        return;
    u64 limit = cfg.iters_given ? cfg.iters : ~0UL;
    for (u64 i = 0; i < limit; i++) {
        struct sregs s = { .r = { LEAF_ECHO }, .rflags = RFLAGS_FIXED }; /* CF/ZF must come
                                                                          from the SEAMCALL */
        seamcall_regs(&s);
        if (s.rflags & (RFLAGS_CF | RFLAGS_ZF)) {
            int cf = (s.rflags & RFLAGS_CF) != 0, zf = (s.rflags & RFLAGS_ZF) != 0;
            if (!cf || zf)
                r->fail++;              /* VMfailInvalid is CF=1, ZF=0 */
            note(r, " cf=%d zf=%d rax=%x", cf, zf, s.r[0]);
            return;
        }
        r->ok++;
    }
    r->fail++;
    note(r, " cf=0 limit=%u", limit);
}

/* ---- test=script: replay a SEAMCALL script recorded in-process (vtdx/seamscript.py has
 * the layout and the ordering rules; keep the two in step) ---- */
#define SCRIPT_MAGIC 0x3152435358445456UL /* "VTDXSCR1" */
#define SCRIPT_VERSION 1
#define SCRIPT_CONCURRENT 1               /* later records may start while this one runs */
#define SCRIPT_WAIT_GO 2                  /* wait for the host's go[rec->go] */
#define SCRIPT_BARRIER 4                  /* wait until every earlier record completed */
#define SCRIPT_LOOP 8                     /* loop phase: see script_loop() */
#define SCRIPT_REENTER 16                 /* again while it returns the time-slice exit */
#define TIME_SLICE_EXIT 6UL               /* TDH.VP.ENTER RAX: TDX_SUCCESS | OTHER_SMI */
#define TDX_OPERAND_BUSY_CLASS 0x80000200UL /* status bits 63:32 of TDX_OPERAND_BUSY */
enum { PH_TURN = 1, PH_GO = 2, PH_CALL = 3, PH_DONE = 4 };

struct script_hdr {
    u64 magic;
    u32 version, nrecords;
    u32 records_off, results_off;
    u32 total_size, rsv0;
    u64 frontier;                       /* seq of the next record allowed to start */
    u64 completed;                      /* records that finished */
    u64 rsv1[2];
    u64 go[8];                          /* set by the host */
    u64 progress[MAX_CPUS];             /* (seq + 1) << 8 | phase, read by the host */
};
struct script_rec {
    u32 size, seq;
    u16 lp, flags, cmp_mask;
    u8 go, nwrites;
    u64 in[14], out[14];
};
struct script_write {
    u64 pa;
    u32 len, datalen;                   /* then datalen bytes, padded to 8; rest is zero */
};
struct script_result {
    u64 state, rflags, r[14];
};
_Static_assert(sizeof(struct script_hdr) == 0x280, "seamscript.HEADER_SIZE");
_Static_assert(sizeof(struct script_rec) == 240, "seamscript._REC");
_Static_assert(sizeof(struct script_write) == 16, "seamscript._WRITE");
_Static_assert(sizeof(struct script_result) == 128, "seamscript.RESULT_SIZE");

static inline u64 load64(u64 *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store64(u64 *p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static void script_progress(struct script_hdr *h, int cpu, u64 seq, int phase)
{
    store64(&h->progress[cpu], ((seq + 1) << 8) | (u64)phase);
}

/* Copy the memory images the host wrote before this SEAMCALL when it was recorded. */
static void script_writes(const struct script_rec *rec)
{
    const u8 *p = (const u8 *)(rec + 1);
    for (int i = 0; i < rec->nwrites; i++) {
        const struct script_write *w = (const void *)p;
        u8 *dst = (u8 *)w->pa;
        memcpy(dst, w + 1, w->datalen);
        memset(dst + w->datalen, 0, w->len - w->datalen);
        p += sizeof(*w) + ((w->datalen + 7) & ~7U);
    }
}

/* The loop phase: the LOOP records (the script's tail) run without ordering between CPUs,
 * once every earlier record completed. Each CPU runs its own LOOP records in sequence,
 * iters times; a call is retried while it returns TDX_OPERAND_BUSY (any operand id), as
 * the kernel's retry loops do. Counted: calls and BUSY statuses; any other error stops
 * this CPU's loop. The last outputs of each record are stored like any record's. */
static void script_loop(struct script_hdr *h, struct script_result *res, const u8 *p,
                        u32 first, struct result *r)
{
    int cpu = r->cpu;
    u64 calls = 0, busy = 0;
    while (load64(&h->completed) < first)
        cpu_relax();
    script_progress(h, cpu, first, PH_CALL);
    for (u64 it = 0; it < cfg.iters; it++) {
        const u8 *q = p;
        for (u32 i = first; i < h->nrecords; i++, q += ((const struct script_rec *)q)->size) {
            const struct script_rec *rec = (const void *)q;
            if (rec->lp != cpu)
                continue;
            struct sregs s;
            for (;;) {
                s = (struct sregs){ .rflags = RFLAGS_FIXED | RFLAGS_ARITH };
                for (int k = 0; k < 14; k++)
                    s.r[k] = rec->in[k];
                seamcall_regs(&s);
                calls++;
                if ((s.r[0] >> 32) != TDX_OPERAND_BUSY_CLASS)
                    break;
                busy++;
            }
            struct script_result *out = &res[i];
            out->rflags = s.rflags;
            for (int k = 0; k < 14; k++)
                out->r[k] = s.r[k];
            store64(&out->state, 1);
            if (s.r[0] >> 63) {
                r->fail++;
                note(r, " loop_error_seq=%u status=%x", (u64)rec->seq, s.r[0]);
                note(r, " loop_calls=%u loop_busy=%u", calls, busy);
                return;
            }
            r->ok++;
        }
    }
    note(r, " loop_calls=%u loop_busy=%u", calls, busy);
}

static void test_script(void *arg)
{
    struct result *r = arg;
    int cpu = r->cpu;
    if (need_vmx(r))
        return;
    struct script_hdr *h = (struct script_hdr *)cfg.script;
    if (h->magic != SCRIPT_MAGIC || h->version != SCRIPT_VERSION) {
        r->fail++;
        note(r, " error=no_script pa=%x", cfg.script);
        return;
    }
    struct script_result *res = (struct script_result *)((u8 *)h + h->results_off);
    const u8 *p = (const u8 *)h + h->records_off;
    /* Every CPU checks the whole script first, so a bad one stops all of them instead of
     * leaving some spinning for a record no CPU will run. */
    for (u32 i = 0; i < h->nrecords; i++) {
        const struct script_rec *rec = (const void *)p;
        const char *err = rec->size < sizeof(*rec) || rec->seq != i ? "bad_record"
                          : rec->lp >= cfg.smp ? "no_cpu_for_lp" : NULL;
        if (err) {
            r->fail++;
            note(r, " error=%s seq=%u lp=%u", err, (u64)i, (u64)rec->lp);
            return;
        }
        p += rec->size;
    }
    p = (const u8 *)h + h->records_off;
    u64 reenters = 0;
    int reentering = 0;
    for (u32 i = 0; i < h->nrecords; i++, p += ((const struct script_rec *)p)->size) {
        const struct script_rec *rec = (const void *)p;
        if (rec->flags & SCRIPT_LOOP) {
            script_loop(h, res, p, i, r);
            break;
        }
        if (rec->lp != cpu)
            continue;
        script_progress(h, cpu, rec->seq, PH_TURN);
        while (load64(&h->frontier) != rec->seq)
            cpu_relax();
        if (rec->flags & SCRIPT_BARRIER)
            while (load64(&h->completed) < rec->seq)
                cpu_relax();
        if (rec->flags & SCRIPT_WAIT_GO) {
            script_progress(h, cpu, rec->seq, PH_GO);
            while (!load64(&h->go[rec->go & 7]))
                cpu_relax();
        }
        script_writes(rec);
        struct sregs s = { .rflags = RFLAGS_FIXED | RFLAGS_ARITH }; /* VMsucceed clears all */
        for (int k = 0; k < 14; k++)
            s.r[k] = rec->in[k];
        script_progress(h, cpu, rec->seq, PH_CALL);
        if (rec->flags & SCRIPT_CONCURRENT)
            store64(&h->frontier, rec->seq + 1);
        seamcall_regs(&s);
        if (rec->flags & SCRIPT_REENTER) {
            reentering = 1;
            while (s.r[0] == TIME_SLICE_EXIT && !(s.rflags & RFLAGS_ARITH)) {
                reenters++;
                s = (struct sregs){ .rflags = RFLAGS_FIXED | RFLAGS_ARITH };
                for (int k = 0; k < 14; k++)
                    s.r[k] = rec->in[k];
                seamcall_regs(&s);
            }
        }
        struct script_result *out = &res[i];
        out->rflags = s.rflags;
        for (int k = 0; k < 14; k++)
            out->r[k] = s.r[k];
        store64(&out->state, 1);
        int bad = (s.rflags & RFLAGS_ARITH) ? 14 : -1;
        for (int k = 0; k < 14 && bad < 0; k++)
            if ((rec->cmp_mask >> k & 1) && s.r[k] != rec->out[k])
                bad = k;
        if (bad < 0) {
            r->ok++;
        } else if (!r->fail++) {
            if (bad == 14)
                note(r, " seq=%u reg=rflags got=%x want=%x", (u64)rec->seq, s.rflags,
                     s.rflags & ~(u64)RFLAGS_ARITH);
            else
                note(r, " seq=%u reg=%s got=%x want=%x", (u64)rec->seq, reg_names[bad],
                     s.r[bad], rec->out[bad]);
        }
        __atomic_add_fetch(&h->completed, 1, __ATOMIC_SEQ_CST);
        if (!(rec->flags & SCRIPT_CONCURRENT))
            store64(&h->frontier, rec->seq + 1);
    }
    if (reentering)
        note(r, " reenters=%u", reenters);
    script_progress(h, cpu, h->nrecords, PH_DONE);
}

static const struct test {
    const char *name;
    void (*fn)(void *);
} tests[] = {
    { "roundtrip", test_roundtrip },
    { "memory", test_memory },
    { "ring3", test_ring3 },
    { "novmx", test_novmx },
    { "nomodule", test_nomodule },
    { "vmxcheck", test_vmxcheck },
    { "movdir64b", test_movdir64b },
    { "script", test_script },
};

static void run_test(int cpu, const char *name, size_t len)
{
    struct result r = { .cpu = cpu };
    const struct test *t = NULL;
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
        if (streq_n(tests[i].name, name, len) && !tests[i].name[len])
            t = &tests[i];
    if (!t) {
        char bad[32];
        size_t n = len < sizeof(bad) - 1 ? len : sizeof(bad) - 1;
        memcpy(bad, name, n);
        bad[n] = 0;
        say("TG ERROR cpu=%d unknown_test=%s\n", cpu, bad);
        return;
    }
    struct guard g;
    if (guarded(cpu, &g, t->fn, &r)) {
        say("TG EXC cpu=%d vec=%u err=%u rip=%x\n", cpu, g.vec, g.err, g.rip);
        r.fail++;
        note(&r, " exc=%u", g.vec);
    }
    say("TG %s cpu=%d ok=%u fail=%u%s\n", t->name, cpu, r.ok, r.fail, r.extra);
}

/* Every CPU: wait for the BSP's go, run the test list, mark done. */
static void run_tests(int cpu)
{
    while (!go)
        cpu_relax();
    const char *p = cfg.tests;
    while (*p) {
        size_t n = 0;
        while (p[n] && p[n] != ',')
            n++;
        if (n)
            run_test(cpu, p, n);
        p += n + (p[n] == ',');
    }
    cpus[cpu].done = 1;
    __atomic_add_fetch(&cpus_done, 1, __ATOMIC_SEQ_CST);
}

/* ---- command line ---- */
struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

static u64 parse_num(const char **s)
{
    const char *p = *s;
    u64 v = 0;
    int base = 10;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    for (;; p++) {
        int d;
        if (*p >= '0' && *p <= '9')
            d = *p - '0';
        else if (base == 16 && (*p | 0x20) >= 'a' && (*p | 0x20) <= 'f')
            d = (*p | 0x20) - 'a' + 10;
        else
            break;
        v = v * base + d;
    }
    *s = p;
    return v;
}

static void parse_cmdline(const char *c)
{
    while (*c) {
        while (*c == ' ')
            c++;
        const char *v = c;
        while (*v && *v != ' ' && *v != '=')
            v++;
        size_t klen = v - c;
        if (*v != '=') {                /* e.g. the kernel file name QEMU puts first */
            c = v;
            continue;
        }
        v++;
        if (klen == 3 && streq_n(c, "smp", 3)) {
            cfg.smp = (int)parse_num(&v);
        } else if (klen == 5 && streq_n(c, "iters", 5)) {
            cfg.iters = parse_num(&v);
            cfg.iters_given = 1;
        } else if (klen == 4 && streq_n(c, "test", 4)) {
            size_t n = 0;
            while (v[n] && v[n] != ' ' && n + 1 < sizeof(cfg.tests)) {
                cfg.tests[n] = v[n];
                n++;
            }
            cfg.tests[n] = 0;
            v += n;
        } else if (klen == 6 && streq_n(c, "script", 6)) {
            cfg.script = parse_num(&v);
        } else if (klen == 5 && streq_n(c, "addrs", 5)) {
            while (cfg.naddrs < MAX_ADDRS) {
                cfg.addrs[cfg.naddrs++] = parse_num(&v);
                if (*v != ',')
                    break;
                v++;
            }
        }
        while (*v && *v != ' ')
            v++;
        c = v;
    }
    if (cfg.smp < 1)
        cfg.smp = 1;
    if (cfg.smp > MAX_CPUS)
        cfg.smp = MAX_CPUS;
}

/* ---- SMP bring-up ---- */
static void send_ipi(int apic_id, u32 icr)
{
    lapic_write(0x310, (u32)apic_id << 24);
    lapic_write(0x300, icr);
    while (lapic_read(0x300) & (1 << 12))   /* delivery status */
        cpu_relax();
}

static int wait_alive(int cpu, u64 spins)
{
    while (spins-- && !cpus[cpu].alive)
        cpu_relax();
    return cpus[cpu].alive;
}

/* INIT, SIPI, SIPI (the second only if the AP is not up yet); one AP at a time so each
 * gets its own stack through ap_stack_top. */
static int start_ap(int cpu)
{
    ap_stack_top = (u64)(ap_stacks[cpu] + sizeof(ap_stacks[cpu]));
    send_ipi(cpu, 0x4500);              /* INIT, level assert */
    for (volatile int i = 0; i < 100000; i++)
        cpu_relax();
    for (int sipi = 0; sipi < 2; sipi++) {
        send_ipi(cpu, 0x4600 | (TRAMPOLINE >> 12));
        if (wait_alive(cpu, sipi ? 400000000UL : 2000000UL))
            return 1;
    }
    return 0;
}

void ap_main(void)
{
    int cpu = this_cpu();
    if (cpu >= MAX_CPUS)
        halt();
    cpu_init(cpu);
    cpus[cpu].alive = 1;
    run_tests(cpu);
    halt();
}

void kmain(u32 mbi_pa)
{
    const struct mb_info *mbi = (const struct mb_info *)(u64)mbi_pa;
    serial_init();
    if (mbi->flags & (1 << 2))
        parse_cmdline((const char *)(u64)mbi->cmdline);
    idt_init();
    int bsp = this_cpu();
    cpu_init(bsp);
    cpus[bsp].alive = 1;
    lapic_write(0xF0, 0x1FF);           /* spurious vector register: APIC software-enabled */
    memcpy((void *)TRAMPOLINE, tramp_start, (size_t)(tramp_end - tramp_start));
    int started = 1;
    for (int cpu = 0; cpu < cfg.smp; cpu++) {
        if (cpu == bsp)
            continue;
        if (start_ap(cpu))
            started++;
        else
            say("TG WARN cpu=%d did_not_start=1\n", cpu);
    }
    say("TG BOOT cpus=%d smp=%d tests=%s iters=%u\n", started, cfg.smp, cfg.tests, cfg.iters);
    go = 1;
    run_tests(bsp);
    while (cpus_done < started)
        cpu_relax();
    say("TG DONE\n");
    outb(DEBUG_EXIT_PORT, 0);           /* isa-debug-exit: QEMU exits with status 1 */
    halt();
}
