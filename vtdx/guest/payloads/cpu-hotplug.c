/* cpu-hotplug: offline/online CPUs in a loop and check the TDX cpuhp callbacks held up.
 *
 *   cpu-hotplug [-n ITERATIONS] [CPU...]      (default: 3 iterations of every CPU but 0)
 *
 * Each offline+online cycle of a CPU is one KTAP test. It fails when the sysfs write fails,
 * the CPU does not reach the requested state, or the kernel logged a TDX error
 * ("virt/tdx: ... failed", "SEAMCALL") or a WARNING/BUG while it ran. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kmsg.h"
#include "ktap.h"

static int cpu_path(char *buf, size_t n, int cpu)
{
	return snprintf(buf, n, "/sys/devices/system/cpu/cpu%d/online", cpu);
}

/* Write "0"/"1"; returns 0 or -errno. */
static int set_online(int cpu, int on)
{
	char path[96];
	int fd, ret = 0;

	cpu_path(path, sizeof(path), cpu);
	fd = open(path, O_WRONLY);
	if (fd < 0)
		return -errno;
	if (write(fd, on ? "1" : "0", 1) != 1)
		ret = -errno;
	close(fd);
	return ret;
}

static int get_online(int cpu)
{
	char path[96], c = '?';
	int fd;

	cpu_path(path, sizeof(path), cpu);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	if (read(fd, &c, 1) != 1)
		c = '?';
	close(fd);
	return c == '1' ? 1 : c == '0' ? 0 : -1;
}

static const char *first_problem(const char *log)
{
	static const char *const bad[] = { "SEAMCALL", "WARNING:", "BUG:", "Oops", NULL };
	const char *p;

	for (int i = 0; bad[i]; i++)
		if ((p = strstr(log, bad[i])))
			return p;
	if ((p = strstr(log, "virt/tdx:")) && strstr(p, "failed"))
		return p;
	return NULL;
}

int main(int argc, char **argv)
{
	int iterations = 3, cpus[256], ncpu = 0, opt;
	long nconf = sysconf(_SC_NPROCESSORS_CONF);
	static char log[1 << 16];

	while ((opt = getopt(argc, argv, "n:")) != -1) {
		if (opt == 'n')
			iterations = atoi(optarg);
		else {
			fprintf(stderr, "usage: cpu-hotplug [-n ITERATIONS] [CPU...]\n");
			return 2;
		}
	}
	for (int i = optind; i < argc && ncpu < 256; i++)
		cpus[ncpu++] = atoi(argv[i]);
	if (!ncpu)
		for (int c = 1; c < nconf && c < 256; c++)
			cpus[ncpu++] = c;
	ktap_header(ncpu ? iterations * ncpu : 1);
	ktap_diag("cpus_configured: %ld iterations: %d", nconf, iterations);
	if (!ncpu) {
		ktap_skip("cpu_hotplug", "only one CPU");
		return 0;
	}
	for (int it = 1; it <= iterations; it++) {
		for (int i = 0; i < ncpu; i++) {
			int cpu = cpus[i], kfd = kmsg_open_at_end(), off, on;
			char name[64], why[512];
			const char *problem;

			snprintf(name, sizeof(name), "cpu%d_cycle_%d", cpu, it);
			log[0] = '\0';
			off = set_online(cpu, 0);
			if (!off && get_online(cpu) != 0)
				off = -EAGAIN;
			on = set_online(cpu, 1);
			if (!on && get_online(cpu) != 1)
				on = -EAGAIN;
			if (kfd >= 0) {
				kmsg_drain(kfd, log, sizeof(log));
				close(kfd);
			}
			problem = first_problem(log);
			if (off || on)
				snprintf(why, sizeof(why), "offline: %s, online: %s",
					 off ? strerror(-off) : "ok", on ? strerror(-on) : "ok");
			else if (problem)
				snprintf(why, sizeof(why), "kernel: %.200s", problem);
			else
				why[0] = '\0';
			for (char *p = why; *p; p++)
				if (*p == '\n')
					*p = ' ';
			ktap_result(!off && !on && !problem, name, why);
		}
	}
	return ktap_finish();
}
