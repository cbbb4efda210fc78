/* Minimal KTAP v1 output (Documentation/dev-tools/ktap.rst) for vtdx's in-guest payloads:
 * kernel developers read the results the way they read kselftest/KUnit output, and the
 * host side (vtdx/payloads.py) parses the same lines. */
#ifndef VTDX_KTAP_H
#define VTDX_KTAP_H
#include <stdarg.h>
#include <stdio.h>

static int ktap_num, ktap_failed;

static inline void ktap_header(int planned)
{
	printf("KTAP version 1\n1..%d\n", planned);
	fflush(stdout);
}

/* A diagnostic line: "# key: value" (the host turns these into a dict). */
static inline void __attribute__((format(printf, 1, 2))) ktap_diag(const char *fmt, ...)
{
	va_list ap;

	fputs("# ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static inline void ktap_result(int ok, const char *name, const char *why)
{
	ktap_num++;
	if (!ok)
		ktap_failed++;
	printf("%s %d %s", ok ? "ok" : "not ok", ktap_num, name);
	if (!ok && why && *why) /* the reason; facts for passing tests go in diagnostics */
		printf(" # %s", why);
	putchar('\n');
	fflush(stdout);
}

static inline void ktap_skip(const char *name, const char *why)
{
	ktap_num++;
	printf("ok %d %s # SKIP %s\n", ktap_num, name, why);
	fflush(stdout);
}

/* Exit status: 0 all passed, 1 something failed (kselftest's KSFT_PASS / KSFT_FAIL). */
static inline int ktap_finish(void)
{
	return ktap_failed ? 1 : 0;
}
#endif
