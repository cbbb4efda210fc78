/* tdx-state: what the booted kernel says about TDX, checked against an expectation.
 *
 *   tdx-state [--expect initialized|failed]
 *
 * Reads the kernel log (the "virt/tdx: " lines of arch/x86/virt/vmx/tdx/tdx.c) and
 * /proc/cpuinfo and reports KTAP. Diagnostics carry the facts (PAMT KB, KeyID range, the
 * kernel's error lines) so the host can compare them with vtdx's own accounting. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmsg.h"
#include "ktap.h"

/* Print every log line containing needle as a diagnostic; return how many. */
static int diag_lines(const char *log, const char *needle, const char *key)
{
	const char *p = log;
	int n = 0;

	while ((p = strstr(p, needle))) {
		const char *start = p, *end = strchr(p, '\n');
		int len;

		while (start > log && start[-1] != '\n')
			start--;
		len = end ? (int)(end - start) : (int)strlen(start);
		ktap_diag("%s: %.*s", key, len, start);
		n++;
		p = end ? end : p + strlen(p);
	}
	return n;
}

static int count_cpuinfo(const char *field_prefix, const char *flag)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[4096];
	int n = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, field_prefix, strlen(field_prefix)))
			continue;
		if (!flag || strstr(line, flag))
			n++;
	}
	fclose(f);
	return n;
}

int main(int argc, char **argv)
{
	const char *expect = "initialized";
	char *log, why[256];
	const char *p;
	unsigned long pamt_kb = 0;
	unsigned int k0, k1;
	int inited, failed, bad, cpus, vmx;

	for (int i = 1; i < argc; i++) {
		if (!strncmp(argv[i], "--expect=", 9))
			expect = argv[i] + 9;
		else if (!strcmp(argv[i], "--expect") && i + 1 < argc)
			expect = argv[++i];
	}
	if (strcmp(expect, "initialized") && strcmp(expect, "failed")) {
		fprintf(stderr, "usage: tdx-state [--expect initialized|failed]\n");
		return 2;
	}
	ktap_header(5);
	ktap_diag("expect: %s", expect);
	log = kmsg_read_all();
	ktap_result(log != NULL, "kernel_log_readable", log ? "" : "syslog(2) failed");
	if (!log)
		log = "";

	ktap_result(strstr(log, "virt/tdx: ") != NULL, "tdx_host_code_ran",
		    "no \"virt/tdx: \" line: TDX host support not built in?");

	inited = strstr(log, "virt/tdx: TDX-Module initialized") != NULL;
	failed = strstr(log, "virt/tdx: TDX-Module initialization failed") != NULL;
	bad = diag_lines(log, "virt/tdx: SEAMCALL", "seamcall_error");
	diag_lines(log, "virt/tdx: TDX-Module initialization failed", "init_error");
	diag_lines(log, "virt/tdx: initialization failed", "init_error");
	if ((p = strstr(log, " KB allocated for PAMT"))) {
		while (p > log && p[-1] >= '0' && p[-1] <= '9')
			p--;
		pamt_kb = strtoul(p, NULL, 10);
		ktap_diag("pamt_kb: %lu", pamt_kb);
	}
	if ((p = strstr(log, "private KeyID range [")) &&
	    sscanf(p, "private KeyID range [%u, %u)", &k0, &k1) == 2)
		ktap_diag("keyid_range: %u %u", k0, k1);
	ktap_diag("module_initialized: %d", inited);
	ktap_diag("seamcall_errors: %d", bad);

	if (!strcmp(expect, "initialized")) {
		snprintf(why, sizeof(why), "initialized=%d init_failed=%d seamcall_errors=%d",
			 inited, failed, bad);
		ktap_result(inited && !failed && !bad, "tdx_module_state", why);
		snprintf(why, sizeof(why), "PAMT %lu KB", pamt_kb);
		ktap_result(pamt_kb > 0, "pamt_allocated", why);
	} else {
		snprintf(why, sizeof(why), "initialized=%d seamcall_errors=%d", inited, bad);
		ktap_result(!inited && bad > 0, "tdx_module_state", why);
		/* tdx.c prints the PAMT size only after every TDMR is initialized. */
		snprintf(why, sizeof(why), "PAMT line %s", pamt_kb ? "present" : "absent");
		ktap_result(pamt_kb == 0, "pamt_not_kept", why);
	}

	cpus = count_cpuinfo("processor", NULL);
	vmx = count_cpuinfo("flags", " vmx");
	ktap_diag("cpus: %d vmx: %d", cpus, vmx);
	snprintf(why, sizeof(why), "%d of %d online CPUs have vmx", vmx, cpus);
	ktap_result(cpus > 0 && vmx == cpus, "vmx_on_all_cpus", why);
	return ktap_finish();
}
