/*
 * vtdx TCG plugin: turns QEMU's x86-64 TCG CPU into a TDX-capable host CPU.
 *
 * - SEAMCALL (66 0F 01 CF) is sent to the vtdx daemon (one Unix-socket connection per
 *   vCPU, fixed-size frames, see wire.h and docs/protocol.md) and its result written back.
 * - The platform bits the Linux TDX host code checks and TCG lacks (CPUID bits, MSRs,
 *   CR4.VMXE, VMXON/VMXOFF, MOVDIR64B) are emulated from rows the daemon sends at
 *   connection time (vtdx/runtime/platform_rows.py), so new platform facts are data, not C.
 *
 * Options (-plugin vtdx-plugin.so,sock=PATH[,timeout=S][,echo=N][,stats=PATH][,debug=1]):
 *   sock     the daemon's Unix socket (required)
 *   timeout  reply timeout in seconds (default 60; 0 = wait forever)
 *   echo     per vCPU, an echo frame after each of its first N SEAMCALLs: the socket floor
 *   stats    file written at exit with per-call latencies (scripts/bench)
 *   debug    1: say why VMXON raised #GP(0)
 *
 * RFLAGS and faults are produced by TCG itself from patched instruction bytes (patch.c).
 * This file: install and options, the per-vCPU scoreboard, register access, statistics at
 * exit. vtdx.h lists the other parts.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vtdx.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 7;

struct vtdx_plugin plugin = {
    .timeout_ms = 60000,
    .regs_mu = PTHREAD_MUTEX_INITIALIZER,
    .cpuid_mu = PTHREAD_MUTEX_INITIALIZER,
    .table_mu = PTHREAD_MUTEX_INITIALIZER,
    .code_mu = PTHREAD_MUTEX_INITIALIZER,
    .site_warned = ATOMIC_FLAG_INIT,
};

static const char *const reg_names[NREG] = {
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "eflags", "cs", "cr0", "cr3", "cr4", "efer", "fs_base", "gs_base",
};

void plog(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "vtdx-plugin: %s\n", line);
    fflush(stderr);
}

uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- registers */

uint64_t rd(vcpu_t *v, int r)
{
    uint64_t val = 0;
    g_byte_array_set_size(v->buf, 0);
    if (qemu_plugin_read_register(plugin.reg_handle[r], v->buf))
        memcpy(&val, v->buf->data, v->buf->len < 8 ? v->buf->len : 8);
    return val;
}

void wr(vcpu_t *v, int r, uint64_t val)
{
    g_byte_array_set_size(v->buf, 0);
    g_byte_array_append(v->buf, (const guint8 *)&val, 8);
    if (!qemu_plugin_write_register(plugin.reg_handle[r], v->buf))
        plog("writing %s failed", reg_names[r]);
}

unsigned cpl(vcpu_t *v) { return (unsigned)rd(v, R_CS) & 3; }

bool long_mode(vcpu_t *v)
{
    /* CS.L is not visible to plugins: compatibility mode counts as 64-bit (see docs). */
    return (rd(v, R_CR0) & CR0_PE) && (rd(v, R_EFER) & EFER_LMA) && !(rd(v, R_EFLAGS) & FL_VM);
}

/* The register list is only valid on a vCPU thread: the first vCPU to start looks it up. */
static void lookup_registers(void)
{
    pthread_mutex_lock(&plugin.regs_mu);
    if (!plugin.reg_handle[R_RAX]) {
        GArray *regs = qemu_plugin_get_registers();
        for (guint i = 0; i < regs->len; i++) {
            qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
            for (int r = 0; r < NREG; r++)
                if (!strcmp(d->name, reg_names[r]))
                    plugin.reg_handle[r] = d->handle;
        }
        g_array_free(regs, TRUE);
        for (int r = 0; r < NREG; r++)
            if (!plugin.reg_handle[r])
                plog("QEMU exposes no register '%s'", reg_names[r]);
    }
    pthread_mutex_unlock(&plugin.regs_mu);
}

/* ---------------------------------------------------------------- lifecycle */

static void vcpu_init(unsigned int vcpu, void *ud G_GNUC_UNUSED)
{
    vcpu_t *v = vcpu_get(vcpu);
    if (!v) {
        plog("vCPU %u beyond the %u announced; it gets no TDX module", vcpu, plugin.nvcpus);
        return;
    }
    lookup_registers();
    v->buf = g_byte_array_sized_new(64);
    v->lat_ns = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    v->echo_ns = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    v->msr_store = g_new0(uint64_t, plugin.n_msr ? plugin.n_msr : 1);
    for (unsigned i = 0; i < plugin.n_msr; i++)
        v->msr_store[i] = plugin.msr_rows[i].d;
    v->fd = -1;
    if (plugin.seam)
        transport_connect(vcpu, v);
}

static void write_stats(void)
{
    FILE *f = fopen(plugin.stats_path, "w");
    if (!f) {
        plog("cannot write %s: %s", plugin.stats_path, strerror(errno));
        return;
    }
    for (unsigned i = 0; i < plugin.nvcpus; i++) {
        vcpu_t *v = &plugin.vcpus[i];
        if (!v->lat_ns)
            continue;
        fprintf(f, "vcpu %u calls %u echo %u first_ns %" PRIu64 " last_ns %" PRIu64
                " rate_calls %" PRIu64 "\n", i, v->lat_ns->len, v->echo_ns->len, v->first_ns,
                v->last_ns, v->rate_calls);
        for (guint k = 0; k < v->echo_ns->len; k++)
            fprintf(f, "e %u %" PRIu64 "\n", i, g_array_index(v->echo_ns, uint64_t, k));
        for (guint k = 0; k < v->lat_ns->len; k++)
            fprintf(f, "c %u %" PRIu64 "\n", i, g_array_index(v->lat_ns, uint64_t, k));
    }
    fclose(f);
}

static void at_exit(void *ud G_GNUC_UNUSED)
{
    if (plugin.stats_path)
        write_stats();
}

/* key=value options; false (after one line on stderr) for an unknown key. */
static bool parse_options(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        const char *val = eq ? eq + 1 : "";
        size_t klen = eq ? (size_t)(eq - argv[i]) : strlen(argv[i]);
        if (!strncmp(argv[i], "sock", klen) && klen == 4)
            plugin.sock_path = g_strdup(val);
        else if (!strncmp(argv[i], "timeout", klen) && klen == 7)
            plugin.timeout_ms = (int)(strtod(val, NULL) * 1000);
        else if (!strncmp(argv[i], "echo", klen) && klen == 4)
            plugin.echo_count = (unsigned)strtoul(val, NULL, 0);
        else if (!strncmp(argv[i], "debug", klen) && klen == 5)
            plugin.debug = strtoul(val, NULL, 0) != 0;
        else if (!strncmp(argv[i], "stats", klen) && klen == 5)
            plugin.stats_path = g_strdup(val);
        else {
            plog("unknown option '%s' (sock=, timeout=, echo=, stats=, debug=)", argv[i]);
            return false;
        }
    }
    return true;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        plog("needs qemu-system-x86_64 (got %s)", info->target_name);
        return -1;
    }
    if (!parse_options(argc, argv))
        return -1;
    if (!plugin.sock_path) {
        plog("missing option sock=PATH (the vtdx daemon's socket)");
        return -1;
    }
    plugin.nvcpus = (unsigned)info->system.max_vcpus;
    plugin.vcpus = g_new0(vcpu_t, plugin.nvcpus);
    plugin.cpuid_followers = g_hash_table_new(g_direct_hash, g_direct_equal);
    if (!load_profile())
        return -1;
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init, NULL);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate, NULL);
    qemu_plugin_register_vcpu_discon_cb(id, QEMU_PLUGIN_DISCON_EXCEPTION, on_exception, NULL);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
