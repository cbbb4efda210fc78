/*
 * MOVDIR64B, which TCG does not implement and Linux uses to reset pages that held TDX
 * private memory (arch/x86/virt/vmx/tdx/tdx.c). The profile's MOVDIR64B feature row turns
 * the emulation on; without it, TCG raises #UD.
 */
#include <inttypes.h>

#include "vtdx.h"

/* MOVDIR64B r64, m512 (66 0F 38 F8 /r): 64-byte store to [reg] from the memory operand. */
void on_movdir64b(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
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
