/*
 * The subset of QEMU's TCG plugin API (version 7, QEMU 11.1) that vtdx uses.
 *
 * Debian ships no qemu-plugin.h, so these declarations are written by hand. Each one was
 * checked against the QEMU 11.1.3 binary with a probe plugin (argument order of every
 * callback type, userdata as the last argument of every register call, register
 * descriptor layout, the discontinuity callback). The build checks that every
 * qemu_plugin_* symbol used here is exported by the QEMU binary (vtdx.host.qemu).
 */
#ifndef VTDX_QEMU_API_H
#define VTDX_QEMU_API_H

#include <glib.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_register;

typedef struct {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;

typedef struct {
    struct qemu_plugin_register *handle;
    const char *name;
    const char *feature;
    bool is_readonly;
} qemu_plugin_reg_descriptor;

/* Callback flags: RW_REGS_PC is required for qemu_plugin_set_pc(). */
enum qemu_plugin_cb_flags {
    QEMU_PLUGIN_CB_NO_REGS,
    QEMU_PLUGIN_CB_R_REGS,
    QEMU_PLUGIN_CB_RW_REGS,
    QEMU_PLUGIN_CB_RW_REGS_PC,
};

enum qemu_plugin_discon_type {
    QEMU_PLUGIN_DISCON_INTERRUPT = 1,
    QEMU_PLUGIN_DISCON_EXCEPTION = 2,
    QEMU_PLUGIN_DISCON_HOSTCALL = 4,
};

typedef void (*vtdx_vcpu_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*vtdx_tb_trans_cb_t)(struct qemu_plugin_tb *tb, void *userdata);
typedef void (*vtdx_udata_cb_t)(void *userdata);
typedef void (*vtdx_discon_cb_t)(unsigned int vcpu_index, enum qemu_plugin_discon_type type,
                                 uint64_t from_pc, uint64_t to_pc, void *userdata);

void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, vtdx_vcpu_cb_t cb, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, vtdx_tb_trans_cb_t cb,
                                           void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, vtdx_udata_cb_t cb, void *userdata);
void qemu_plugin_register_vcpu_discon_cb(qemu_plugin_id_t id, enum qemu_plugin_discon_type type,
                                         vtdx_discon_cb_t cb, void *userdata);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, vtdx_vcpu_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);

size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
size_t qemu_plugin_insn_data(const struct qemu_plugin_insn *insn, void *dest, size_t len);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);

GArray *qemu_plugin_get_registers(void);
bool qemu_plugin_read_register(struct qemu_plugin_register *handle, GByteArray *buf);
bool qemu_plugin_write_register(struct qemu_plugin_register *handle, GByteArray *buf);
void qemu_plugin_set_pc(uint64_t vaddr); /* does not return when it succeeds */

bool qemu_plugin_read_memory_vaddr(uint64_t addr, GByteArray *data, size_t len);
bool qemu_plugin_write_memory_vaddr(uint64_t addr, GByteArray *data);
bool qemu_plugin_translate_vaddr(uint64_t vaddr, uint64_t *hwaddr);
int qemu_plugin_read_memory_hwaddr(uint64_t addr, GByteArray *data, size_t len); /* 0 = ok */
int qemu_plugin_write_memory_hwaddr(uint64_t addr, GByteArray *data);            /* 0 = ok */

#endif
