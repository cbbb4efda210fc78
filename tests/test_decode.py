"""vtdx/module/engine/decode.py: which instructions read and write their memory operand.

The encodings come from the GNU assembler, not from the decoder's own tables: each line
below is assembled for 64-bit (and, where marked, 32-bit) code and the decoder is asked
about the bytes. Expectations follow the Intel SDM's instruction descriptions (Vol. 2)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vtdx.module.engine.decode import is_memory_rmw

#: (instruction, reads and writes its memory operand)
CASES_64 = [
    ("addl $5, 0x30000", True), ("add %eax, (%rdi)", True), ("add (%rdi), %eax", False),
    ("orq $1, 8(%rsp)", True), ("adc %rbx, (%rax,%rcx,8)", True), ("sbb %al, (%rdx)", True),
    ("and %r9d, 0x10(%r12)", True), ("sub %ax, (%rsi)", True), ("xor %r8, (%rbp)", True),
    ("cmp %eax, (%rdi)", False), ("cmpl $1, (%rdi)", False), ("test %eax, (%rdi)", False),
    ("xchg %eax, (%rdi)", True), ("incl 0x622200", True), ("decq (%rax)", True),
    ("incl %eax", False), ("notl (%rdi)", True), ("negq (%rdi)", True),
    ("mull (%rdi)", False), ("divl (%rdi)", False), ("shll $3, (%rdi)", True),
    ("rorq (%rdi)", True), ("sarl %cl, (%rdi)", True), ("shll $3, %edi", False),
    ("mov %eax, (%rdi)", False), ("mov (%rdi), %eax", False), ("push (%rdi)", False),
    ("pop (%rdi)", False), ("call *(%rax)", False), ("movsq", False),
    ("btsl $3, (%rdi)", True), ("btrq %rax, (%rdi)", True), ("btc %eax, (%rdi)", True),
    ("btl $3, (%rdi)", False), ("bt %eax, (%rdi)", False),
    ("shld $4, %eax, (%rdi)", True), ("shrd %cl, %rax, (%rdi)", True),
    ("cmpxchg %ecx, (%rdi)", True), ("cmpxchg16b (%rdi)", True), ("cmpxchg8b (%rdi)", True),
    ("xadd %eax, (%rdi)", True), ("lock incl (%rdi)", True), ("lock xadd %eax, (%rdi)", True),
    ("movw $1, %fs:(%rax)", False), ("addw $1, %gs:0x10", True), ("addl $1, 0x10(%eax)", True),
    ("vpaddd (%rdi), %ymm1, %ymm2", False), ("fadds (%rdi)", False), ("nop", False),
    ("cpuid", False), ("rdrand %eax", False), ("setc (%rdi)", False),
]
CASES_32 = [("incl (%eax)", True), ("inc %eax", False), ("addl $1, (%ebx)", True),
            ("les (%eax), %ecx", False)]


def _assemble(lines: list[str], code64: bool, tmp: Path) -> list[bytes]:
    """Each line's bytes: the lines are assembled between labels, one object file."""
    src = [".code64" if code64 else ".code32"]
    for i, ln in enumerate(lines):
        src += [f"l{i}:", f"  {ln}"]
    src.append(f"l{len(lines)}:")
    (tmp / "t.s").write_text("\n".join(src) + "\n")
    subprocess.run(["as", "--64", "-o", str(tmp / "t.o"), str(tmp / "t.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp / "t.o"),
                    str(tmp / "t.bin")], check=True)
    syms = subprocess.run(["nm", str(tmp / "t.o")], check=True, capture_output=True,
                          text=True).stdout
    at = {n: int(a, 16) for a, _, n in (s.split() for s in syms.splitlines())}
    text = (tmp / "t.bin").read_bytes()
    return [text[at[f"l{i}"]:at[f"l{i + 1}"]] for i in range(len(lines))]


@pytest.fixture(scope="module")
def gas() -> None:
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils not installed")


@pytest.mark.parametrize("code64,cases", [(True, CASES_64), (False, CASES_32)],
                         ids=["64-bit", "32-bit"])
def test_rmw_of_memory_as_the_assembler_encodes_it(gas, tmp_path, code64, cases) -> None:
    encoded = _assemble([c for c, _ in cases], code64, tmp_path)
    wrong = [(insn, code.hex(), want) for (insn, want), code in zip(cases, encoded, strict=True)
             if is_memory_rmw(code + b"\x90" * 8, code64) != want]
    assert wrong == []


def test_truncated_or_prefix_only_bytes_are_no() -> None:
    assert not is_memory_rmw(b"", True)
    assert not is_memory_rmw(b"\x83", True)             # no ModRM
    assert not is_memory_rmw(b"\x0f\xc7", True)
    assert not is_memory_rmw(b"\x66" * 15 + b"\x01\x07", True)  # past the 15-byte limit
    assert is_memory_rmw(b"\xf0\x48\x01\x07", True)     # lock add %rax, (%rdi)
