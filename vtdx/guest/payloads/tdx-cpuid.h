/*
 * The CPUID configuration both KVM payloads give KVM_TDX_INIT_VM: the host's values limited
 * to the bits the module lets a VMM configure (KVM_TDX_CAPABILITIES' entries are masks of
 * configurable bits), each entry matched by subleaf, and a 48-bit guest physical address
 * width. A leaf above the host's maximum of its range is configured as all-0, as a VMM
 * leaves out what the host lacks (the CPU would answer it with its highest base leaf; all-0
 * leaf 0x1F tells the module to use the platform's topology). Include after <linux/kvm.h>
 * and <cpuid.h>, where the TDX UAPI exists.
 */
#ifndef VTDX_TDX_CPUID_H
#define VTDX_TDX_CPUID_H

static inline void tdx_cpuid_from_caps(const struct kvm_tdx_capabilities *caps,
				       struct kvm_tdx_init_vm *init)
{
	unsigned int nent = caps->cpuid.nent;
	unsigned int max_base = __get_cpuid_max(0, NULL);
	unsigned int max_ext = __get_cpuid_max(0x80000000, NULL);

	init->cpuid.nent = nent;
	for (unsigned int i = 0; i < nent; i++) {
		const struct kvm_cpuid_entry2 *mask = &caps->cpuid.entries[i];
		struct kvm_cpuid_entry2 *e = &init->cpuid.entries[i];
		unsigned int a, b, c, d;

		if (mask->function > (mask->function & 0x80000000 ? max_ext : max_base))
			a = b = c = d = 0;
		else
			__cpuid_count(mask->function, mask->index, a, b, c, d);
		*e = *mask;
		/* The capability leaves flags to userspace; without it KVM matches (0xd, 1) with
		 * the (0xd, 0) entry. Index 0 of the no-subleaf leaves still matches. */
		e->flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
		e->eax = a & mask->eax;
		e->ebx = b & mask->ebx;
		e->ecx = c & mask->ecx;
		e->edx = d & mask->edx;
		if (e->function == 0x80000008)
			e->eax = (e->eax & ~0xff0000u) | 48u << 16; /* GPAW 48 */
	}
}

#endif
