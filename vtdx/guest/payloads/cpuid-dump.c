/* cpuid-dump: the host's own CPUID as the booted kernel's CPU 0 answers it.
 *
 *   cpuid-dump
 *
 * Pins itself to CPU 0 and prints every non-zero (leaf, subleaf) of the base and extended
 * ranges as "# cpuid.<leaf>.<subleaf>: <eax> <ebx> <ecx> <edx>" (hex), subleaves 0..63 for
 * the leaves whose values depend on ECX. The host compares them with the table the module
 * model samples as its native CPUID (vtdx/platform/cpuid.py), so a QEMU whose CPU model
 * changed is caught where it starts, not in a TD's CPUID later. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <sched.h>
#include <stdio.h>

#include "ktap.h"

/* vtdx/platform/cpuid.py SUBLEAF_LEAVES */
static int has_subleaves(unsigned int leaf)
{
	static const unsigned int leaves[] = { 0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17,
					       0x18, 0x1A, 0x1B, 0x1D, 0x1F, 0x20, 0x23, 0x24 };

	for (unsigned int i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++)
		if (leaves[i] == leaf)
			return 1;
	return 0;
}

static int dump_range(unsigned int first)
{
	unsigned int a, b, c, d, last, n = 0;

	__cpuid_count(first, 0, last, b, c, d);
	for (unsigned int leaf = first; leaf <= last && leaf - first < 0x100; leaf++) {
		unsigned int subs = has_subleaves(leaf) ? 64 : 1;

		for (unsigned int sub = 0; sub < subs; sub++) {
			__cpuid_count(leaf, sub, a, b, c, d);
			if (!(a | b | c | d))
				continue;
			ktap_diag("cpuid.%#x.%#x: %#010x %#010x %#010x %#010x", leaf, sub, a, b, c, d);
			n++;
		}
	}
	return (int)n;
}

int main(void)
{
	cpu_set_t set;
	int pinned, n;

	CPU_ZERO(&set);
	CPU_SET(0, &set);
	pinned = sched_setaffinity(0, sizeof(set), &set) == 0;
	ktap_header(2);
	ktap_result(pinned, "on_cpu0", pinned ? "" : "sched_setaffinity failed");
	n = dump_range(0) + dump_range(0x80000000);
	ktap_diag("leaves: %d", n);
	ktap_result(n > 0, "dump", "");
	return ktap_finish();
}
