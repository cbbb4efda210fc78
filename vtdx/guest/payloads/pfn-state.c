/* pfn-state: who owns a range of physical pages, from /proc/kpageflags.
 *
 *   pfn-state START_PFN NPAGES --expect held|released
 *
 * Used on the PAMT the kernel allocated for TDX: while TDX is up the PAMT pages are
 * allocated and carry no page-allocator flags ("held"); when module initialization fails,
 * tdx.c must free them (tdmrs_free_pamt_all), so many show up free in the buddy allocator
 * or reused by ordinary users (slab, page cache, anonymous memory...): "released". */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ktap.h"

/* include/uapi/linux/kernel-page-flags.h */
#define KPF_LRU 5
#define KPF_SLAB 7
#define KPF_BUDDY 10
#define KPF_MMAP 11
#define KPF_ANON 12
#define KPF_SWAPBACKED 14
#define KPF_COMPOUND_HEAD 15
#define KPF_COMPOUND_TAIL 16
#define KPF_UNEVICTABLE 18
#define KPF_NOPAGE 20
#define KPF_PGTABLE 26

int main(int argc, char **argv)
{
	const uint64_t in_use = 1ull << KPF_LRU | 1ull << KPF_SLAB | 1ull << KPF_MMAP |
				1ull << KPF_ANON | 1ull << KPF_SWAPBACKED |
				1ull << KPF_COMPOUND_HEAD | 1ull << KPF_COMPOUND_TAIL |
				1ull << KPF_UNEVICTABLE | 1ull << KPF_PGTABLE;
	unsigned long start, npages, buddy = 0, used = 0, held = 0, nopage = 0;
	const char *expect = NULL;
	char why[160];
	int fd;

	if (argc == 5 && !strcmp(argv[3], "--expect"))
		expect = argv[4];
	if (!expect || (strcmp(expect, "held") && strcmp(expect, "released"))) {
		fprintf(stderr, "usage: pfn-state START_PFN NPAGES --expect held|released\n");
		return 2;
	}
	start = strtoul(argv[1], NULL, 0);
	npages = strtoul(argv[2], NULL, 0);
	ktap_header(1);
	ktap_diag("range: pfn %#lx + %lu pages", start, npages);
	fd = open("/proc/kpageflags", O_RDONLY);
	if (fd < 0) {
		ktap_result(0, "pages_readable", "/proc/kpageflags (CONFIG_PROC_PAGE_MONITOR)");
		return ktap_finish();
	}
	for (unsigned long i = 0; i < npages; i++) {
		uint64_t f = 0;

		if (pread(fd, &f, sizeof(f), (off_t)((start + i) * 8)) != sizeof(f) ||
		    f & 1ull << KPF_NOPAGE)
			nopage++;
		else if (f & 1ull << KPF_BUDDY)
			buddy++;
		else if (f & in_use)
			used++;
		else
			held++;
	}
	close(fd);
	ktap_diag("free: %lu in_use: %lu held: %lu nopage: %lu", buddy, used, held, nopage);
	/* A page kept by its owner shows no allocator flag, so "held" means all of them. A
	 * freed page is soon taken again, often by an allocation that sets no flag either
	 * (kernel stacks, vmalloc), so a freed range never looks entirely free: after a failed
	 * TDX init on vtdx's default 2G machine 50-85 % of the old PAMT was free or in ordinary
	 * use, against exactly none while TDX keeps it. "released" asks for a tenth. */
	snprintf(why, sizeof(why), "%lu of %lu pages free or in ordinary use, %lu held",
		 buddy + used, npages, held);
	if (!strcmp(expect, "held"))
		ktap_result(npages && held == npages, "pages_held", why);
	else
		ktap_result(npages && nopage == 0 && (buddy + used) * 10 >= npages,
			    "pages_released", why);
	return ktap_finish();
}
