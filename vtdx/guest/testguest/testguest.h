/* Constants shared by boot.S and main.c. */
#ifndef TESTGUEST_H
#define TESTGUEST_H

#define MAX_CPUS   64
#define KCODE      0x08
#define KDATA      0x10
#define UDATA      0x1b                 /* user data selector | RPL 3 */
#define UCODE      0x23                 /* user code selector | RPL 3 */
#define KCODE32    0x28
#define TSS_SEL(cpu) (0x30 + 16 * (cpu))
#define TRAMPOLINE 0x8000               /* AP real-mode entry (SIPI vector 0x08) */
#define USER_DONE_VECTOR 0x81           /* ring-3 code signals "no exception" with int $0x81 */

#endif
