"""Just enough x86 decoding to tell a read-modify-write of a memory operand.

TCG runs an instruction such as ``add %eax, (%rdi)`` as a load and then a store, so when the
page is not mapped the first TLB fill the engine sees is a read. The processor treats the
whole instruction as a write: the Intel SDM (Vol. 3C, "Exit Qualification for EPT
Violations") says an EPT violation caused by a read-modify-write operation sets bit 1 (data
write) of the qualification -- bit 0 too on some implementations -- and a page fault's error
code has W/R set. KVM reads that bit (``EPT_VIOLATION_ACC_WRITE`` in arch/x86/kvm/vmx) to
decide whether the fault is a write, so the engine decodes the faulting instruction when a
data read faults and reports a write when it is one of these. A ``LOCK``-prefixed one needs
no decoding: under CF_PARALLEL TCG probes it for writing first.

The decoder reads prefixes, the opcode and the ModRM byte; it does not need the operand's
address, only that the ModRM names memory (mod != 3).
"""

from __future__ import annotations

#: One-byte opcodes whose ModRM r/m operand is read and written, whatever the reg field:
#: ADD, OR, ADC, SBB, AND, SUB, XOR (CMP only reads); XCHG; the shift/rotate group 2.
_RMW_1BYTE = frozenset({0x00, 0x01, 0x08, 0x09, 0x10, 0x11, 0x18, 0x19, 0x20, 0x21,
                        0x28, 0x29, 0x30, 0x31, 0x86, 0x87,
                        0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3})
#: One-byte group opcodes: the ModRM reg values that read and write r/m.
_RMW_1BYTE_GROUP = {
    0x80: frozenset(range(7)), 0x81: frozenset(range(7)), 0x83: frozenset(range(7)),  # /7 CMP
    0xF6: frozenset({2, 3}), 0xF7: frozenset({2, 3}),                             # NOT, NEG
    0xFE: frozenset({0, 1}), 0xFF: frozenset({0, 1}),                             # INC, DEC
}
#: 0F opcodes: SHLD, SHRD, BTS, BTR, BTC, CMPXCHG, XADD.
_RMW_0F = frozenset({0xA4, 0xA5, 0xAC, 0xAD, 0xAB, 0xB3, 0xBB, 0xB0, 0xB1, 0xC0, 0xC1})
#: 0F group opcodes: group 8 BTS/BTR/BTC (/4 BT only reads); group 9 CMPXCHG8B/16B.
_RMW_0F_GROUP = {0xBA: frozenset({5, 6, 7}), 0xC7: frozenset({1})}

_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65,
                              0x66, 0x67})
#: The architectural limit of an instruction's length.
MAX_INSN = 15


def is_memory_rmw(code: bytes, long_mode: bool) -> bool:
    """Does the instruction at the start of ``code`` read and write a memory operand?

    ``long_mode``: 64-bit code, where 40-4F are REX prefixes (elsewhere INC/DEC of a
    register). VEX/EVEX-encoded and x87 instructions are never reported: none of them is a
    read-modify-write of memory. Too few bytes for the ModRM is "no"."""
    i, n = 0, min(len(code), MAX_INSN)
    while i < n and code[i] in _LEGACY_PREFIXES:
        i += 1
    if long_mode and i < n and 0x40 <= code[i] <= 0x4F:
        i += 1
    if i >= n:
        return False
    if code[i] == 0x0F:                  # two-byte opcode map
        i += 1
        whole, groups = _RMW_0F, _RMW_0F_GROUP
    else:
        whole, groups = _RMW_1BYTE, _RMW_1BYTE_GROUP
    if i + 1 >= n:
        return False
    op, modrm = code[i], code[i + 1]
    if modrm >> 6 == 3:                  # a register operand
        return False
    regs = groups.get(op)
    return op in whole or (regs is not None and (modrm >> 3) & 7 in regs)
