/*
 * SEAMCALL (66 0F 01 CF): checked the way the CPU checks it, sent to the daemon as one CALL
 * frame, and finished from the RET frame (registers written back, RFLAGS through
 * finish() in patch.c). The round trip is timed here for scripts/bench.
 */
#include <unistd.h>

#include "vtdx.h"

/* Floor for scripts/bench: one echo frame of the same sizes on the same socket and daemon
 * thread, without the backend, after each of a vCPU's first `echo` SEAMCALLs, so floor and
 * SEAMCALLs are sampled under the same conditions (other vCPUs running too). */
static void echo_once(unsigned int vcpu, vcpu_t *v)
{
    struct vtdx_call c = {.kind = VTDX_ECHO, .vcpu = vcpu, .seq = ++v->seq};
    struct vtdx_ret r;
    const char *why = "?";
    uint64_t t0 = now_ns();
    if (!transport_round_trip(v->fd, &c, &r, &why)) {
        daemon_lost(why);
        return;
    }
    uint64_t dt = now_ns() - t0;
    g_array_append_val(v->echo_ns, dt);
}

void on_seamcall(unsigned int vcpu, void *ud)
{
    uint64_t pc = (uintptr_t)ud;
    /* Wire order (vtdx.abi.regs.REG_NAMES) as x86 register numbers. */
    static const int wire_regs[VTDX_NREGS] = {
        R_RAX, R_RCX, R_RDX, R_RBX, R_RSI, R_RDI, R_R8, R_R9,
        R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
    };
    vcpu_t *v = vcpu_get(vcpu);
    if (!v)
        return;
    if (!v->vmx_on || !long_mode(v))
        return; /* #UD, raised by TCG (it does not know the opcode) */
    if (cpl(v) > 0) {
        inject_gp(v, pc);
        return; /* could not patch: TCG raises #UD */
    }
    struct vtdx_call c = {.kind = VTDX_CALL, .vcpu = vcpu, .seq = ++v->seq};
    for (int i = 0; i < VTDX_NREGS; i++)
        c.regs[i] = rd(v, wire_regs[i]);
    if (!plugin.seam || atomic_load(&plugin.daemon_dead) || v->fd < 0) {
        finish(v, pc, 4, true, c.regs[0], c.regs[1], on_seamcall); /* no SEAM module */
        return;
    }
    c.rflags = rd(v, R_EFLAGS);
    c.rip = pc;
    c.rsp = rd(v, R_RSP);
    c.cr3 = rd(v, R_CR3);
    struct vtdx_ret r;
    const char *why = "?";
    uint64_t t0 = now_ns();
    bool ok = transport_round_trip(v->fd, &c, &r, &why);
    if (ok && (r.kind != VTDX_RET || r.seq != c.seq)) {
        ok = false;
        why = "out-of-sequence reply";
    }
    if (!ok) {
        daemon_lost(why);
        close(v->fd);
        v->fd = -1;
        finish(v, pc, 4, true, c.regs[0], c.regs[1], on_seamcall);
        return;
    }
    uint64_t t1 = now_ns();
    uint64_t dt = t1 - t0;
    g_array_append_val(v->lat_ns, dt);
    if (v->echo_ns->len < plugin.echo_count) {
        echo_once(vcpu, v);
    } else { /* the aggregate rate counts the calls after the floor phase */
        if (!v->rate_calls++)
            v->first_ns = t0;
        v->last_ns = t1;
    }
    bool fail = r.result != VTDX_VMSUCCEED;
    if (!fail) /* RAX and RCX go in through finish() */
        for (int i = 2; i < VTDX_NREGS; i++)
            if (r.regs[i] != c.regs[i])
                wr(v, wire_regs[i], r.regs[i]);
    finish(v, pc, 4, fail, fail ? c.regs[0] : r.regs[0], fail ? c.regs[1] : r.regs[1],
           on_seamcall);
}
