/*
 * vtdx wire protocol, C side. docs/protocol.md is the description; vtdx/runtime/protocol.py
 * is the Python side and tests/test_transport.py checks both agree (sizes, constants).
 * All integers little-endian; every frame has a fixed size.
 */
#ifndef VTDX_WIRE_H
#define VTDX_WIRE_H

#include <stdint.h>

#define VTDX_MAGIC 0x58445456u /* "VTDX" */
#define VTDX_PROTO_VERSION 1
#define VTDX_CONTROL_VCPU 0xffffffffu
#define VTDX_NREGS 14 /* RAX RCX RDX RBX RSI RDI R8..R15 (vtdx.abi.regs.REG_NAMES) */

enum vtdx_kind {
    VTDX_HELLO = 1,    /* plugin -> daemon, once per connection */
    VTDX_WELCOME = 2,  /* daemon -> plugin, followed by nrows rows */
    VTDX_CALL = 3,     /* plugin -> daemon: one SEAMCALL */
    VTDX_RET = 4,      /* daemon -> plugin: its result */
    VTDX_ECHO = 5,     /* plugin -> daemon: floor measurement, no backend */
    VTDX_ECHO_RET = 6, /* daemon -> plugin: answer to ECHO */
};

enum vtdx_welcome_status { VTDX_OK = 0, VTDX_BAD_VERSION = 1, VTDX_BAD_VCPU = 2 };

enum vtdx_result { VTDX_VMSUCCEED = 0, VTDX_VMFAILINVALID = 1 };

enum vtdx_row_type { VTDX_ROW_CPUID = 1, VTDX_ROW_MSR = 2, VTDX_ROW_FEATURE = 3 };

enum vtdx_msr_write { VTDX_MSR_IGNORE = 0, VTDX_MSR_STORE = 1, VTDX_MSR_GP = 2 };

enum vtdx_feature {
    VTDX_F_SEAM = 1,      /* a TDX module is loaded: SEAMCALL goes to the daemon */
    VTDX_F_VMX = 2,       /* emulate CR4.VMXE, VMXON, VMXOFF */
    VTDX_F_MOVDIR64B = 3, /* emulate MOVDIR64B */
    VTDX_F_PHYS_BITS = 4, /* MAXPHYADDR for the VMXON pointer check */
};

struct vtdx_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t vcpu;
    uint32_t nvcpus;
    uint32_t flags;
    uint32_t reserved;
    uint64_t pid;
} __attribute__((packed));

struct vtdx_welcome {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t status;
    uint32_t nrows;
    uint32_t row_size;
    uint32_t reserved;
    uint64_t reserved2;
} __attribute__((packed));

struct vtdx_row {
    uint16_t type;
    uint16_t flags; /* MSR: write behaviour */
    uint32_t a;     /* CPUID leaf / MSR index / feature id */
    uint32_t b;     /* CPUID subleaf (0xffffffff: any) */
    uint32_t c;     /* CPUID register: 0 EAX, 1 EBX, 2 ECX, 3 EDX */
    uint64_t d;     /* CPUID bits to set / MSR value / feature value */
    uint64_t e;     /* CPUID bits to clear */
} __attribute__((packed));

struct vtdx_call {
    uint32_t kind;
    uint32_t vcpu;
    uint64_t seq;
    uint64_t regs[VTDX_NREGS];
    uint64_t rflags, rip, rsp, cr3;
} __attribute__((packed));

struct vtdx_ret {
    uint32_t kind;
    uint32_t result;
    uint64_t seq;
    uint64_t regs[VTDX_NREGS];
} __attribute__((packed));

_Static_assert(sizeof(struct vtdx_hello) == 32, "hello size");
_Static_assert(sizeof(struct vtdx_welcome) == 32, "welcome size");
_Static_assert(sizeof(struct vtdx_row) == 32, "row size");
_Static_assert(sizeof(struct vtdx_call) == 160, "call size");
_Static_assert(sizeof(struct vtdx_ret) == 128, "ret size");

#endif
