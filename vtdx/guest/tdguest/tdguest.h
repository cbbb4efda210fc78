/* The contract between the kvm-td VMM payload (guest/payloads/kvm-td.c) and its TD guest
 * (this directory): guest-physical layout, the ports the guest talks through, and the two
 * blocks they exchange.
 *
 * The configuration block is the first page of the boot image. The VMM fills it in before
 * KVM_TDX_INIT_MEM_REGION, so it is measured into MRTD with the code, and passes its GPA as
 * the vCPU's initial RCX (KVM_TDX_INIT_VCPU data, which TDH.VP.INIT puts in RCX and R8, as
 * TDVF receives its TD HOB). The report block is written by the guest into a page it has
 * converted to shared (TDVMCALL MapGPA), for the VMM to read; the VMM answers in the same
 * page. Both sides compile this header: the guest freestanding, the VMM against libc. */
#ifndef VTDX_TDGUEST_H
#define VTDX_TDGUEST_H

#ifdef __ASSEMBLER__
#define TDG_U64(x) x
#else
#include <stdint.h>
#define TDG_U64(x) x##ULL
#endif

/* Guest-physical layout. The boot image ends at 4 GiB so that the reset vector
 * (0xFFFFFFF0) is its last 16 bytes; RAM is [0, 2 MiB), private, and never added before
 * the TD runs: the guest accepts the pages it uses and KVM maps them on the EPT violation
 * (TDH.MEM.SEPT.ADD + TDH.MEM.PAGE.AUG). */
#define TDG_IMAGE_SIZE		TDG_U64(0x10000)
#define TDG_IMAGE_GPA		(TDG_U64(0x100000000) - TDG_IMAGE_SIZE)
#define TDG_CONFIG_GPA		TDG_IMAGE_GPA
#define TDG_RAM_GPA		TDG_U64(0)
#define TDG_RAM_SIZE		TDG_U64(0x200000)
#define TDG_MAX_VCPUS		2
/* Private pages each vCPU accepts and fills, and the page vCPU 0 shares with the VMM. */
#define TDG_ACCEPT_GPA(vcpu)	(TDG_U64(0x100000) + (uint64_t)(vcpu) * TDG_U64(0x20000))
#define TDG_ACCEPT_PAGES(vcpu)	((vcpu) ? 4 : 16)
#define TDG_SHARED_GPA		TDG_U64(0x180000)
/* Guest-virtual window onto the shared alias of RAM: VA TDG_SHARED_VA + x maps GPA
 * x | shared bit (one 2 MiB guest page). */
#define TDG_SHARED_VA		TDG_U64(0x200000)
/* An MMIO register the VMM emulates (TDVMCALL<#VE.RequestMMIO> on its shared GPA). */
#define TDG_MMIO_GPA		TDG_U64(0xFEB00000)

/* Ports (TDVMCALL<Instruction.IO>). */
#define TDG_PORT_CONSOLE	0x3F8	/* out, 1 byte: a character of the console */
#define TDG_PORT_DOORBELL	0x510	/* out, 4 bytes: the report in the shared page is ready */
#define TDG_PORT_DONE		0x511	/* out, 4 bytes: TDG_DONE_PASS or the failed check's id */
#define TDG_PORT_CONFIG		0x512	/* in, 4 bytes: the VMM's TDG_CONFIG_MAGIC low half */
#define TDG_PORT_BENCH		0x513	/* out, 4 bytes: 1 = exit loop starts, 2 = it ended */
#define TDG_DONE_PASS		0x600D

/* TDG.VM.RD field ids of the TD-scope fields the guest checks (TDX ABI metadata ids, the
 * ones KVM reads with TDH.MNG.RD). */
#define TDG_FIELD_ATTRIBUTES	TDG_U64(0x1110000300000000)
#define TDG_FIELD_XFAM		TDG_U64(0x1110000300000001)
#define TDG_FIELD_MAX_VCPUS	TDG_U64(0x1110000200000003)

#define TDG_CONFIG_MAGIC	TDG_U64(0x4746433154445456)	/* "VTDT1CFG" */
#define TDG_REPORT_MAGIC	TDG_U64(0x5045523154445456)	/* "VTDT1REP" */

#ifndef __ASSEMBLER__
/* Written by the VMM into the first page of the image (measured). */
struct tdg_config {
	uint64_t magic;
	uint32_t nr_vcpus;	/* vCPUs the VMM creates and initialises */
	uint32_t max_vcpus;	/* KVM's max_vcpus for the VM (TD_PARAMS.MAX_VCPUS) */
	uint64_t attributes;	/* TD attributes the VMM asked for in KVM_TDX_INIT_VM */
	uint64_t xfam;		/* XFAM it asked for (the module may add its fixed-1 bits) */
	uint32_t gpaw;		/* guest physical address width: 48 or 52 */
	uint32_t bench_exits;	/* vCPU 0 makes this many TDVMCALL<CPUID> exits (0: none) */
	uint64_t secret;	/* written into private memory: must never reach the VMM */
	uint64_t cookie;	/* the guest echoes it in its report */
};

/* Written by vCPU 0 into the shared page; the VMM answers in vmm_ack. */
struct tdg_report {
	uint64_t magic;
	uint32_t vcpu;
	uint32_t checks;	/* bit i set: guest check i passed */
	uint64_t init_rcx;	/* RCX and R8 at the reset vector (TDH.VP.INIT) */
	uint64_t init_r8;
	uint64_t vp_info[4];	/* TDG.VP.INFO: RCX (GPAW), RDX (attributes), R8, R9 */
	uint64_t vm_attributes;	/* TDG.VM.RD */
	uint64_t vm_xfam;
	uint64_t vm_max_vcpus;
	uint64_t accepted;	/* pages accepted by this vCPU */
	uint64_t sum;		/* checksum of what it wrote into them and read back */
	uint64_t cookie;	/* tdg_config.cookie */
	uint64_t mmio_read;	/* what the VMM's MMIO register returned */
	uint64_t vmm_ack;	/* the VMM writes ~cookie here before answering the doorbell */
};
#endif
#endif
