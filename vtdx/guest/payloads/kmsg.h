/* Kernel log access for payloads: the whole ring via syslog(2), or only the records
 * written after a point via /dev/kmsg, so a check sees what its own action caused. */
#ifndef VTDX_KMSG_H
#define VTDX_KMSG_H
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <unistd.h>

/* The whole kernel log as one malloc'd string (NULL on failure, errno set). */
static inline char *kmsg_read_all(void)
{
	int size = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
	char *buf;
	int n;

	if (size <= 0)
		size = 1 << 20;
	buf = malloc((size_t)size + 1);
	if (!buf)
		return NULL;
	n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, size);
	if (n < 0) {
		free(buf);
		return NULL;
	}
	buf[n] = '\0';
	return buf;
}

/* An fd positioned after the newest record: kmsg_drain() then returns only new ones. */
static inline int kmsg_open_at_end(void)
{
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	if (fd >= 0)
		lseek(fd, 0, SEEK_END);
	return fd;
}

/* Append the message text of every record not yet read to buf (NUL-terminated). */
static inline void kmsg_drain(int fd, char *buf, size_t cap)
{
	char rec[8192];
	size_t used = strlen(buf);

	for (;;) {
		ssize_t n = read(fd, rec, sizeof(rec) - 1);
		char *msg;

		if (n < 0 && errno == EPIPE)
			continue; /* records overwritten under us: keep reading */
		if (n <= 0)
			break;
		rec[n] = '\0';
		msg = strchr(rec, ';');
		msg = msg ? msg + 1 : rec;
		if (used + strlen(msg) + 1 < cap) {
			strcpy(buf + used, msg);
			used += strlen(msg);
		}
	}
}
#endif
