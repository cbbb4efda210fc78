/*
 * CPUID and RDMSR/WRMSR answered from the daemon's profile rows (docs/protocol.md, ROW).
 *
 * CPUID runs in TCG; the callback of the instruction after it adjusts the result registers.
 * When CPUID ends its translation block, that next instruction starts another block, so its
 * address is remembered (a "follower") and instrumented when that block is translated.
 *
 * An MSR with a row is answered here at CPL 0 (per-LP value, write behaviour from the row's
 * flags); any other MSR, and any access at CPL > 0, is left to TCG.
 */
#include "vtdx.h"

static void on_cpuid_pre(unsigned int vcpu, void *ud)
{
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    v->cpuid_leaf = (uint32_t)rd(v, R_RAX);
    v->cpuid_sub = (uint32_t)rd(v, R_RCX);
    v->cpuid_next_pc = (uintptr_t)ud;
    v->cpuid_pending = true;
}

/* Runs on the instruction after CPUID: patch the bits the profile sets or clears. */
static void on_cpuid_post(unsigned int vcpu, void *ud)
{
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    if (!v->cpuid_pending || v->cpuid_next_pc != (uintptr_t)ud)
        return;
    v->cpuid_pending = false;
    static const int out_reg[4] = {R_RAX, R_RBX, R_RCX, R_RDX};
    for (unsigned i = 0; i < plugin.n_cpuid; i++) {
        const struct vtdx_row *r = &plugin.cpuid_rows[i];
        if (r->a != v->cpuid_leaf || (r->b != 0xffffffffu && r->b != v->cpuid_sub) || r->c > 3)
            continue;
        uint64_t val = rd(v, out_reg[r->c]) & 0xffffffffull;
        val = ((val & ~r->e) | r->d) & 0xffffffffull;
        wr(v, out_reg[r->c], val);
    }
}

/* A block that starts at a follower: its first instruction completes that CPUID. */
void cpuid_instrument_tb(struct qemu_plugin_tb *tb, size_t n)
{
    if (!n)
        return;
    if (!atomic_load(&plugin.n_cpuid_followers))
        return; /* the common case: no lock, no lookup for every block translated */
    uint64_t start = qemu_plugin_tb_vaddr(tb);
    pthread_mutex_lock(&plugin.cpuid_mu);
    bool follower = g_hash_table_contains(plugin.cpuid_followers, GUINT_TO_POINTER(start));
    pthread_mutex_unlock(&plugin.cpuid_mu);
    if (follower)
        qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, 0), on_cpuid_post,
                                               QEMU_PLUGIN_CB_RW_REGS, (void *)(uintptr_t)start);
}

/* CPUID, instruction i of n in tb at pc. */
void cpuid_instrument(struct qemu_plugin_tb *tb, size_t i, size_t n,
                      struct qemu_plugin_insn *insn, uint64_t pc)
{
    uint64_t next = pc + qemu_plugin_insn_size(insn);
    qemu_plugin_register_vcpu_insn_exec_cb(insn, on_cpuid_pre, QEMU_PLUGIN_CB_R_REGS,
                                           (void *)(uintptr_t)next);
    if (i + 1 < n) {
        qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, i + 1), on_cpuid_post,
                                               QEMU_PLUGIN_CB_RW_REGS, (void *)(uintptr_t)next);
    } else {
        pthread_mutex_lock(&plugin.cpuid_mu);
        if (g_hash_table_add(plugin.cpuid_followers, GUINT_TO_POINTER(next)))
            atomic_fetch_add(&plugin.n_cpuid_followers, 1);
        pthread_mutex_unlock(&plugin.cpuid_mu);
    }
}

/* ---------------------------------------------------------------- MSRs */

static int msr_row(uint32_t index)
{
    for (unsigned i = 0; i < plugin.n_msr; i++)
        if (plugin.msr_rows[i].a == index)
            return (int)i;
    return -1;
}

/* The vCPU of an RDMSR/WRMSR the profile answers, its row in *row; NULL leaves the
 * instruction to TCG: an MSR without a row is not ours, and at CPL > 0 TCG raises #GP(0). */
static vcpu_t *msr_site(unsigned int vcpu, int *row)
{
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return NULL;
    *row = msr_row((uint32_t)rd(v, R_RCX));
    return *row < 0 || cpl(v) > 0 ? NULL : v;
}

void on_rdmsr(unsigned int vcpu, void *ud)
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

void on_wrmsr(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    int i;
    vcpu_t *v = msr_site(vcpu, &i);
    if (!v)
        return;
    switch (plugin.msr_rows[i].flags) {
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

/* This LP's value of an MSR, or dflt if the profile has no row for it. */
uint64_t msr_value(vcpu_t *v, uint32_t index, uint64_t dflt)
{
    int i = msr_row(index);
    return i < 0 ? dflt : v->msr_store[i];
}
