/*
 * VMX operation as far as the Linux TDX host code needs it: CR4.VMXE (MOV to CR4), VMXON,
 * VMXOFF and INVEPT, with the checks of the SDM's operation sections. Inputs such as the VMCS revision
 * id and the CR0/CR4 fixed bits come from the MSR rows (cpuid_msr.c).
 */
#include <inttypes.h>
#include <string.h>

#include "vtdx.h"

/* MOV to CR4 (0F 22 /4): TCG rejects VMXE because its CPUID has no VMX. */
void on_mov_cr4(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
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
void on_vmxon(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
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
        if (plugin.debug)
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
    unsigned pbits = plugin.phys_bits ? plugin.phys_bits : 46;
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
void on_vmxoff(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    if (!v->vmx_on || !long_mode(v))
        return; /* #UD */
    if (cpl(v) > 0) {
        inject_gp(v, pc);
        return;
    }
    v->vmx_on = false;
    finish(v, pc, 3, false, rd(v, R_RAX), rd(v, R_RCX), on_vmxoff);
}

/* INVEPT r64, m128 (66 0F 38 80 /r). No EPT exists outside the model (TD memory is translated
 * by the daemon), so there is nothing to flush: the instruction only has to succeed the way
 * the SDM says for the invalidation types IA32_VMX_EPT_VPID_CAP reports. KVM issues it when
 * it loads a TD vCPU's MMU (arch/x86/kvm/vmx/vmx_ops.h __invept: #UD is a spurious-fault BUG,
 * VMfail a WARN). */
void on_invept(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    insn_t in;
    if (!v->vmx_on || !long_mode(v) || !decode(v, pc, 3, &in) || !in.is_mem)
        return; /* #UD (TCG) */
    if (cpl(v) > 0) {
        inject_gp(v, pc);
        return;
    }
    /* Type 1 (single-context) needs EPT_VPID_CAP bit 25, type 2 (all-context) bit 26;
     * anything else is VMfailInvalid (no current VMCS to report VMfailValid through). */
    uint64_t type = rd(v, (int)modrm_reg(&in));
    uint64_t cap = msr_value(v, 0x48c, 0);
    bool ok = (type == 1 && (cap & (1ull << 25))) || (type == 2 && (cap & (1ull << 26)));
    finish(v, pc, in.len, !ok, rd(v, R_RAX), rd(v, R_RCX), on_invept);
}
