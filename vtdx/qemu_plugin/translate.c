/*
 * Translation: which guest instruction goes to which emulation (the TB translation
 * callback), and the operand decoder the emulations share.
 */
#include <string.h>

#include "vtdx.h"

/* ---------------------------------------------------------------- operand decoding */

/* Prefixes, escape and ModRM/SIB/displacement of the instruction at pc, read from guest
 * memory (TCG hands plugins a truncated copy of opcodes it does not implement). */
bool decode(vcpu_t *v, uint64_t pc, unsigned opcode_len, insn_t *in)
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

unsigned modrm_reg(const insn_t *in)
{
    return ((in->modrm >> 3) & 7) | ((in->rex & 4) << 1);
}

/* ---------------------------------------------------------------- translation */

void on_translate(struct qemu_plugin_tb *tb, void *ud G_GNUC_UNUSED)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (plugin.n_cpuid)
        cpuid_instrument_tb(tb, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint8_t d[16];
        size_t len = qemu_plugin_insn_data(insn, d, sizeof d), p = 0;
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        if (atomic_load(&plugin.n_sites) && gadget_site(insn, pc, d, len))
            continue;
        if (atomic_load(&plugin.n_fpatches) && fault_site(insn, pc, d, len))
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
        else if (op == 0xa2 && plugin.n_cpuid)
            cpuid_instrument(tb, i, n, insn, pc);
        else if (op == 0x32 && plugin.n_msr)
            cb = on_rdmsr;
        else if (op == 0x30 && plugin.n_msr)
            cb = on_wrmsr;
        else if (plugin.vmx && op == 0x22 && modrm >= 0 && (modrm >> 6) == 3 &&
                 ((modrm >> 3) & 7) == 4)
            cb = on_mov_cr4;
        else if (plugin.vmx && op == 0xc7 && pf3 && modrm >= 0 && ((modrm >> 3) & 7) == 6 &&
                 (modrm >> 6) != 3)
            cb = on_vmxon;
        else if (plugin.vmx && op == 0x01 && modrm == 0xc4 && !p66 && !pf3)
            cb = on_vmxoff;
        else if (plugin.movdir64b && op == 0x38 && p + 2 < len && d[p + 2] == 0xf8 && p66)
            cb = on_movdir64b;
        else if (plugin.vmx && op == 0x38 && p + 2 < len && d[p + 2] == 0x80 && p66)
            cb = on_invept;
        if (cb)
            qemu_plugin_register_vcpu_insn_exec_cb(insn, cb, QEMU_PLUGIN_CB_RW_REGS_PC, at);
    }
}
