/*
 * The daemon socket: fixed-size frames (wire.h, docs/protocol.md) on one Unix stream
 * connection per vCPU, plus the control connection at install that brings the platform
 * profile rows. A lost daemon is said once and turns every later SEAMCALL into
 * VMfailInvalid (seamcall.c checks plugin.daemon_dead).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "vtdx.h"

static bool send_all(int fd, const void *buf, size_t n, const char **why)
{
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            *why = k < 0 && errno != EPIPE && errno != ECONNRESET ? strerror(errno)
                                                                  : "daemon closed the connection";
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* Receive exactly n bytes; on failure *why names the cause. */
static bool recv_all(int fd, void *buf, size_t n, const char **why)
{
    char *p = buf;
    while (n) {
        if (plugin.timeout_ms > 0) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            int r = poll(&pfd, 1, plugin.timeout_ms);
            if (r < 0 && errno == EINTR)
                continue;
            if (r == 0) {
                *why = "no reply within the timeout";
                return false;
            }
        }
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k == 0) {
            *why = "daemon closed the connection";
            return false;
        }
        if (k < 0) {
            *why = strerror(errno);
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* One CALL (or ECHO) frame out, its RET (or ECHO_RET) frame in. */
bool transport_round_trip(int fd, const struct vtdx_call *c, struct vtdx_ret *r,
                          const char **why)
{
    return send_all(fd, c, sizeof *c, why) && recv_all(fd, r, sizeof *r, why);
}

void daemon_lost(const char *why)
{
    bool alive = false;
    if (atomic_compare_exchange_strong(&plugin.daemon_dead, &alive, true))
        plog("daemon connection lost (%s); SEAMCALL now fails with VMfailInvalid", why);
}

/* Connect and say HELLO; returns the fd (WELCOME header in *w) or -1 with *why set. */
static int dial(uint32_t vcpu, struct vtdx_welcome *w, const char **why)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    if (strlen(plugin.sock_path) >= sizeof sa.sun_path) {
        *why = "socket path too long";
        close(fd);
        return -1;
    }
    strcpy(sa.sun_path, plugin.sock_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        *why = strerror(errno);
        close(fd);
        return -1;
    }
    struct vtdx_hello h = {.magic = VTDX_MAGIC, .version = VTDX_PROTO_VERSION,
                           .kind = VTDX_HELLO, .vcpu = vcpu, .nvcpus = plugin.nvcpus,
                           .pid = (uint64_t)getpid()};
    if (!send_all(fd, &h, sizeof h, why)) {
        close(fd);
        return -1;
    }
    if (!recv_all(fd, w, sizeof *w, why)) {
        close(fd);
        return -1;
    }
    if (w->magic != VTDX_MAGIC || w->kind != VTDX_WELCOME || w->status != VTDX_OK) {
        *why = w->status == VTDX_BAD_VERSION ? "protocol version mismatch"
               : w->status == VTDX_BAD_VCPU ? "daemon rejected the vCPU index"
                                            : "bad WELCOME frame";
        close(fd);
        return -1;
    }
    return fd;
}

/* The platform profile: fetched once, at install time, on a control connection. */
bool load_profile(void)
{
    struct vtdx_welcome w;
    const char *why = "?";
    int fd = dial(VTDX_CONTROL_VCPU, &w, &why);
    if (fd < 0) {
        plog("cannot reach the vtdx daemon at %s: %s", plugin.sock_path, why);
        return false;
    }
    bool ok = w.row_size == sizeof(struct vtdx_row);
    for (uint32_t i = 0; ok && i < w.nrows; i++) {
        struct vtdx_row r;
        ok = recv_all(fd, &r, sizeof r, &why);
        if (!ok)
            break;
        if (r.type == VTDX_ROW_CPUID && plugin.n_cpuid < MAX_ROWS)
            plugin.cpuid_rows[plugin.n_cpuid++] = r;
        else if (r.type == VTDX_ROW_MSR && plugin.n_msr < MAX_ROWS)
            plugin.msr_rows[plugin.n_msr++] = r;
        else if (r.type == VTDX_ROW_FEATURE) {
            if (r.a == VTDX_F_SEAM) plugin.seam = r.d != 0;
            if (r.a == VTDX_F_VMX) plugin.vmx = r.d != 0;
            if (r.a == VTDX_F_MOVDIR64B) plugin.movdir64b = r.d != 0;
            if (r.a == VTDX_F_PHYS_BITS) plugin.phys_bits = (unsigned)r.d;
        } else {
            ok = false;
            why = "bad profile row";
        }
    }
    close(fd);
    if (!ok)
        plog("bad platform profile from the daemon: %s", why);
    return ok;
}

/* This vCPU's own connection (v->fd stays -1 if it cannot be had: the daemon is lost). */
void transport_connect(unsigned int vcpu, vcpu_t *v)
{
    struct vtdx_welcome w;
    const char *why = "?";
    v->fd = dial(vcpu, &w, &why);
    if (v->fd < 0)
        daemon_lost(why);
}
