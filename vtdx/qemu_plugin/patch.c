/*
 * Code patches: how an emulated instruction ends with the RFLAGS or the fault hardware gives.
 *
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
 *
 * The tables live in struct vtdx_plugin (vtdx.h says which lock guards what).
 */
#include <inttypes.h>
#include <string.h>

#include "vtdx.h"

static site_t *site_lookup_va(uint64_t va) /* table_mu held */
{
    int n = atomic_load(&plugin.n_sites);
    for (int i = 0; i < n; i++)
        if (plugin.sites[i].active && plugin.sites[i].vaddr == va)
            return &plugin.sites[i];
    return NULL;
}

/* Turn the instruction at pc into a flags site (idempotent). A listed site whose bytes are
 * no longer the compare (code reloaded, e.g. after a reset) is converted afresh. */
static bool site_convert(uint64_t pc, unsigned len, vtdx_vcpu_cb_t handler)
{
    uint64_t hw, hw_end;
    if (!qemu_plugin_translate_vaddr(pc, &hw) ||
        !qemu_plugin_translate_vaddr(pc + len - 1, &hw_end))
        return false;
    uint8_t gadget[MAX_PATCH];
    memset(gadget, 0x90, sizeof gadget);
    gadget[0] = 0x39; /* cmp %ecx,%eax */
    gadget[1] = 0xc8;
    bool ok = false;
    pthread_mutex_lock(&plugin.code_mu);
    GByteArray *b = g_byte_array_new();
    if (qemu_plugin_read_memory_vaddr(pc, b, len) && b->len >= len) {
        pthread_mutex_lock(&plugin.table_mu);
        site_t *old = site_lookup_va(pc);
        if (old && old->hwaddr == hw && old->len == len && !memcmp(b->data, gadget, len))
            ok = true; /* already a site */
        else if (old)
            old->active = false; /* stale */
        site_t *st = NULL;
        int n = atomic_load(&plugin.n_sites);
        if (!ok && n < MAX_SITES) {
            st = &plugin.sites[n];
            *st = (site_t){.hwaddr = hw, .vaddr = pc, .len = len, .active = true,
                           .handler = handler};
            memcpy(st->orig, b->data, len);
            /* listed first: whoever translates the new bytes instruments them */
            atomic_fetch_add(&plugin.n_sites, 1);
        }
        pthread_mutex_unlock(&plugin.table_mu);
        if (st) {
            g_byte_array_set_size(b, 0);
            g_byte_array_append(b, gadget, len);
            ok = qemu_plugin_write_memory_vaddr(pc, b);
            if (!ok) {
                pthread_mutex_lock(&plugin.table_mu);
                st->active = false;
                pthread_mutex_unlock(&plugin.table_mu);
            }
        }
    }
    g_byte_array_free(b, TRUE);
    pthread_mutex_unlock(&plugin.code_mu);
    return ok;
}

/* Original bytes at pc, for decoding: under a flags site or under a fault patch. */
void site_overlay(uint64_t pc, uint8_t *d, unsigned n)
{
    if (!atomic_load(&plugin.n_sites) && !atomic_load(&plugin.n_fpatches))
        return;
    pthread_mutex_lock(&plugin.table_mu);
    site_t *st = site_lookup_va(pc);
    if (st)
        memcpy(d, st->orig, st->len < n ? st->len : n);
    /* Another vCPU's fault patch may cover these bytes while this vCPU emulates the
     * instruction it translated before the patch: decode what the guest really has there. */
    for (unsigned i = 0; i < MAX_FAULT_PATCHES; i++) {
        const fpatch_t *f = &plugin.fpatches[i];
        if (!f->refs || f->vaddr >= pc + n || f->vaddr + f->len <= pc)
            continue;
        for (unsigned k = 0; k < f->len; k++) {
            uint64_t at = f->vaddr + k;
            if (at >= pc && at < pc + n)
                d[at - pc] = f->saved[k];
        }
    }
    pthread_mutex_unlock(&plugin.table_mu);
}

static bool fpatch_get(uint64_t pc, const uint8_t *bytes, unsigned len, unsigned kind,
                       uint64_t *hw_out)
{
    uint64_t hw, hw_end;
    if (!qemu_plugin_translate_vaddr(pc, &hw) ||
        !qemu_plugin_translate_vaddr(pc + len - 1, &hw_end))
        return false;
    *hw_out = hw;
    bool ok = false;
    pthread_mutex_lock(&plugin.code_mu);
    fpatch_t *p = NULL, *slot = NULL;
    pthread_mutex_lock(&plugin.table_mu);
    for (unsigned i = 0; i < MAX_FAULT_PATCHES; i++) {
        fpatch_t *f = &plugin.fpatches[i];
        if (f->refs && f->hwaddr == hw)
            p = f;
        else if (!f->refs && !slot)
            slot = f;
    }
    if (p && p->kind == kind && p->len == len) {
        p->refs++; /* another vCPU faults at the same place */
        ok = true;
    }
    pthread_mutex_unlock(&plugin.table_mu);
    if (!p && slot) {
        GByteArray *b = g_byte_array_new();
        if (qemu_plugin_read_memory_vaddr(pc, b, len) && b->len >= len) {
            fpatch_t np = {.hwaddr = hw, .vaddr = pc, .len = len, .refs = 1, .kind = kind};
            memcpy(np.saved, b->data, len);
            pthread_mutex_lock(&plugin.table_mu);
            *slot = np; /* listed first: other vCPUs translating the new bytes wait them out */
            pthread_mutex_unlock(&plugin.table_mu);
            atomic_fetch_add(&plugin.n_fpatches, 1);
            g_byte_array_set_size(b, 0);
            g_byte_array_append(b, bytes, len);
            ok = qemu_plugin_write_memory_vaddr(pc, b);
            if (!ok) {
                pthread_mutex_lock(&plugin.table_mu);
                slot->refs = 0;
                pthread_mutex_unlock(&plugin.table_mu);
                atomic_fetch_sub(&plugin.n_fpatches, 1);
            }
        }
        g_byte_array_free(b, TRUE);
    }
    pthread_mutex_unlock(&plugin.code_mu);
    return ok;
}

static void fpatch_put(uint64_t hw)
{
    pthread_mutex_lock(&plugin.code_mu);
    pthread_mutex_lock(&plugin.table_mu);
    fpatch_t *p = NULL;
    for (unsigned i = 0; i < MAX_FAULT_PATCHES && !p; i++)
        if (plugin.fpatches[i].refs && plugin.fpatches[i].hwaddr == hw)
            p = &plugin.fpatches[i];
    bool last = p && p->refs == 1;
    fpatch_t copy = p ? *p : (fpatch_t){0};
    pthread_mutex_unlock(&plugin.table_mu);
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
        pthread_mutex_lock(&plugin.table_mu);
        p->refs--;
        pthread_mutex_unlock(&plugin.table_mu);
        if (last)
            atomic_fetch_sub(&plugin.n_fpatches, 1);
    }
    pthread_mutex_unlock(&plugin.code_mu);
}

/* The exception a fault patch raised is being delivered: put the original bytes back. */
void on_exception(unsigned int vcpu, enum qemu_plugin_discon_type type G_GNUC_UNUSED,
                  uint64_t from G_GNUC_UNUSED, uint64_t to G_GNUC_UNUSED, void *ud G_GNUC_UNUSED)
{
    vcpu_t *v = vcpu_get(vcpu);
    if (!v || !v->fault_patched)
        return;
    v->fault_patched = false;
    fpatch_put(v->fault_hwaddr);
}

/* Fault-patch bytes reached by a vCPU that is not faulting there (it runs the same code):
 * wait, re-executing the instruction until the patch is gone, instead of faulting. */
static void on_fault_insn(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud, hw;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    if (v->fault_patched && qemu_plugin_translate_vaddr(pc, &hw) && hw == v->fault_hwaddr)
        return; /* ours: fault */
    qemu_plugin_set_pc(pc);
}

/* Instrument fault-patch bytes being translated; false if pc holds none. A #GP(0) patch at
 * CPL 0 is longer than the instruction it replaces (15 prefixes), so another vCPU can reach
 * patch bytes at any address inside it, e.g. the instruction after its own completed one:
 * every instruction that starts inside a patch waits it out, not only the one at its start. */
bool fault_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len)
{
    if (!len || !(d[0] == 0xf4 || d[0] == 0x66 || (len >= 2 && d[0] == 0x0f && d[1] == 0x0b)))
        return false;
    bool listed = false;
    pthread_mutex_lock(&plugin.table_mu);
    for (unsigned i = 0; i < MAX_FAULT_PATCHES && !listed; i++) {
        const fpatch_t *f = &plugin.fpatches[i];
        listed = f->refs && pc >= f->vaddr && pc < f->vaddr + f->len;
    }
    pthread_mutex_unlock(&plugin.table_mu);
    if (listed)
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_fault_insn, QEMU_PLUGIN_CB_RW_REGS_PC,
                                               (void *)(uintptr_t)pc);
    return listed;
}

/* Make TCG raise #GP(0) or #UD at pc. Returns only if that is impossible. */
void inject_fault(vcpu_t *v, uint64_t pc, unsigned kind)
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

void inject_gp(vcpu_t *v, uint64_t pc) { inject_fault(v, pc, FAULT_GP); }

/* ---------------------------------------------------------------- VMsucceed / VMfailInvalid */

/* End an emulated instruction with VMsucceed (fail=false) or VMfailInvalid (fail=true) and
 * final RAX/RCX values (the other registers are already written). See "RFLAGS" above. */
void finish(vcpu_t *v, uint64_t pc, unsigned len, bool fail, uint64_t rax, uint64_t rcx,
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
        if (!atomic_flag_test_and_set(&plugin.site_warned))
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
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
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
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    if (!v->gad.armed || v->gad.pc != st->vaddr)
        return;
    wr(v, R_RAX, v->gad.rax);
    wr(v, R_RCX, v->gad.rcx);
    v->gad.armed = false;
}

/* Instrument the compare and the first NOP of a flags site; false if pc is not one. */
bool gadget_site(struct qemu_plugin_insn *insn, uint64_t pc, const uint8_t *d, size_t len)
{
    bool is_cmp = len >= 2 && d[0] == 0x39 && d[1] == 0xc8;
    if (!is_cmp && !(len >= 1 && d[0] == 0x90))
        return false;
    pthread_mutex_lock(&plugin.table_mu);
    site_t *st = site_lookup_va(is_cmp ? pc : pc - 2);
    pthread_mutex_unlock(&plugin.table_mu);
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
