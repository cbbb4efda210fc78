/* kvm-tdx: can userspace get a TDX VM from this kernel's KVM?
 *
 *   kvm-tdx
 *
 * Opens /dev/kvm, asks for the TDX VM type (KVM_CAP_VM_TYPES), creates a TDX VM, reads
 * KVM_TDX_CAPABILITIES and initialises the TD with KVM_TDX_INIT_VM (through
 * KVM_MEMORY_ENCRYPT_OP): the first steps of every TDX VMM. The TD is created in the TDX
 * module by INIT_VM (TDH.MNG.CREATE, KEY.CONFIG, ADDCX, INIT) and torn down on close.
 * Needs the booted kernel's UAPI headers (vtdx builds them with `make headers`); built
 * against older headers it reports SKIP instead of guessing structure layouts. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <cpuid.h>
#include <unistd.h>

#include "ktap.h"

#ifdef KVM_X86_TDX_VM
#include "tdx-cpuid.h"

/* KVM_TDX_INIT_VM with the host's CPUID limited to what the module lets a VMM configure
 * (the capability's entries are masks of configurable bits), a 48-bit guest physical
 * address width, and XFAM/attributes left at what the module fixes to 1. */
static int init_vm(int vm, const struct kvm_tdx_capabilities *caps, char *why, size_t n)
{
	unsigned int nent = caps->cpuid.nent;
	struct kvm_tdx_init_vm *init;
	struct kvm_tdx_cmd cmd;
	int ret;

	init = calloc(1, sizeof(*init) + nent * sizeof(struct kvm_cpuid_entry2));
	tdx_cpuid_from_caps(caps, init);
	memset(&cmd, 0, sizeof(cmd));
	cmd.id = KVM_TDX_INIT_VM;
	cmd.data = (unsigned long)init;
	ret = ioctl(vm, KVM_MEMORY_ENCRYPT_OP, &cmd);
	snprintf(why, n, "KVM_TDX_INIT_VM: %s, hw_error %#llx", ret ? strerror(errno) : "ok",
		 (unsigned long long)cmd.hw_error);
	free(init);
	return ret;
}
#endif

int main(void)
{
#ifndef KVM_X86_TDX_VM
	ktap_header(1);
	ktap_skip("kvm_tdx", "built without TDX KVM UAPI headers (--vtdx-kernel-src)");
	return 0;
#else
	struct kvm_tdx_capabilities *caps;
	struct kvm_tdx_cmd cmd;
	int kvm, vm, types, ret, nent = 256;
	char why[160];

	ktap_header(5);
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		snprintf(why, sizeof(why), "/dev/kvm: %s (kvm_intel not loaded?)", strerror(errno));
		ktap_skip("dev_kvm", why);
		ktap_skip("tdx_vm_type", "no /dev/kvm");
		ktap_skip("create_tdx_vm", "no /dev/kvm");
		ktap_skip("tdx_capabilities", "no /dev/kvm");
		ktap_skip("init_tdx_vm", "no /dev/kvm");
		return 0;
	}
	ret = ioctl(kvm, KVM_GET_API_VERSION, 0);
	snprintf(why, sizeof(why), "KVM_GET_API_VERSION = %d", ret);
	ktap_result(ret == KVM_API_VERSION, "dev_kvm", why);

	types = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
	ktap_diag("vm_types: %#x", types < 0 ? 0 : types);
	if (types < 0 || !(types & (1 << KVM_X86_TDX_VM))) {
		ktap_skip("tdx_vm_type", "KVM offers no TDX VM type (kvm_intel.tdx=1? TDX up?)");
		ktap_skip("create_tdx_vm", "no TDX VM type");
		ktap_skip("tdx_capabilities", "no TDX VM type");
		ktap_skip("init_tdx_vm", "no TDX VM type");
		return ktap_finish();
	}
	ktap_result(1, "tdx_vm_type", "");

	vm = ioctl(kvm, KVM_CREATE_VM, KVM_X86_TDX_VM);
	snprintf(why, sizeof(why), "KVM_CREATE_VM(KVM_X86_TDX_VM): %s", strerror(errno));
	ktap_result(vm >= 0, "create_tdx_vm", why);
	if (vm < 0) {
		ktap_skip("tdx_capabilities", "no VM");
		ktap_skip("init_tdx_vm", "no VM");
		return ktap_finish();
	}
	caps = calloc(1, sizeof(*caps) + nent * sizeof(struct kvm_cpuid_entry2));
	caps->cpuid.nent = nent;
	memset(&cmd, 0, sizeof(cmd));
	cmd.id = KVM_TDX_CAPABILITIES;
	cmd.data = (unsigned long)caps;
	ret = ioctl(vm, KVM_MEMORY_ENCRYPT_OP, &cmd);
	snprintf(why, sizeof(why), "KVM_TDX_CAPABILITIES: %s, hw_error %#llx",
		 ret ? strerror(errno) : "ok", (unsigned long long)cmd.hw_error);
	ktap_result(ret == 0, "tdx_capabilities", why);
	if (!ret) {
		ktap_diag("supported_attrs: %#llx supported_xfam: %#llx cpuid_entries: %u",
			  (unsigned long long)caps->supported_attrs,
			  (unsigned long long)caps->supported_xfam, caps->cpuid.nent);
		for (unsigned int i = 0; i < caps->cpuid.nent; i++) {
			const struct kvm_cpuid_entry2 *e = &caps->cpuid.entries[i];

			ktap_diag("cpuid_config_%u: %#x.%#x eax %#x ebx %#x ecx %#x edx %#x", i,
				  e->function, e->index, e->eax, e->ebx, e->ecx, e->edx);
		}
	}
	if (ret)
		ktap_skip("init_tdx_vm", "no capabilities");
	else
		ktap_result(init_vm(vm, caps, why, sizeof(why)) == 0, "init_tdx_vm", why);
	close(vm); /* KVM reclaims the TD: TDH.MNG.VPFLUSHDONE, KEY.FREEID, PAGE.RECLAIM... */
	close(kvm);
	return ktap_finish();
#endif
}
