"""Kernel symbolisation: a real ELF built with gcc, mapped into a synthetic guest at a KASLR
offset behind real 4-level page tables, resolved the way the daemon does for a SEAMCALL."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vtdx.errors import VtdxError
from vtdx.observe.symbols import CallerResolver, GuestVirt, SymbolTable
from vtdx.platform.memory import SparseMemory
from vtdx.platform.profile import GiB, Region

LINK_BASE = 0xFFFFFFFF81000000
SLIDE = 0x2A00000  # a KASLR slide: multiple of 2 MiB

KERNEL_C = r"""
struct args { unsigned long rcx, rdx; };
unsigned long __seamcall_ret(unsigned long fn, struct args *a);
__asm__(".text\n.globl __seamcall_ret\n.type __seamcall_ret,@function\n__seamcall_ret:\n"
        " push %rbx\n mov %rdi,%rax\n .byte 0x66,0x0f,0x01,0xcf\n pop %rbx\n ret\n"
        ".size __seamcall_ret,.-__seamcall_ret\n");
__attribute__((noinline)) unsigned long init_tdx_module(void)
{ struct args a = {1, 2}; return __seamcall_ret(33, &a) + 1; }
__attribute__((noinline)) unsigned long tdx_enable(void) { return init_tdx_module() + 2; }
void _start(void) { tdx_enable(); for (;;) ; }
"""


@pytest.fixture(scope="module")
def kernel_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("kelf")
    (d / "k.c").write_text(KERNEL_C)
    subprocess.run(
        ["gcc", "-O2", "-nostdlib", "-static", "-mcmodel=kernel", "-fno-pie", "-no-pie",
         "-fno-asynchronous-unwind-tables", f"-Wl,-Ttext={LINK_BASE:#x}",
         "-o", str(d / "vmlinux"), str(d / "k.c")],
        check=True,
    )
    nm = subprocess.run(["nm", "-n", str(d / "vmlinux")], check=True, capture_output=True,
                        text=True).stdout
    (d / "System.map").write_text(nm)
    return d / "vmlinux"


def text_bytes(elf: Path) -> tuple[int, bytes]:
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".text")
        return sec["sh_addr"], sec.data()


def call_site(addr: int, code: bytes, func: SymbolTable, caller: str, callee: str) -> int:
    """Return address of the ``call callee`` inside ``caller``, found in the machine code."""
    c, t = func.lookup(caller), func.lookup(callee)
    assert c and t
    for off in range(c.addr - addr, c.addr - addr + c.size - 4):
        if code[off] == 0xE8:
            ret = addr + off + 5
            rel = int.from_bytes(code[off + 1 : off + 5], "little", signed=True)
            if ret + rel == t.addr:
                return ret
    raise AssertionError(f"no call {caller} -> {callee}")


class PageTables:
    """Builds x86-64 4- or 5-level tables in guest RAM, allocating table pages bottom-up."""

    def __init__(self, mem: SparseMemory, next_free: int, levels: int = 4) -> None:
        self.mem = mem
        self.next = next_free
        self.shifts = (48, 39, 30, 21)[5 - levels:]
        self.cr3 = self._alloc()

    def _alloc(self) -> int:
        pa = self.next
        self.next += 4096
        self.mem.zero(pa, 4096)
        return pa

    def map(self, va: int, pa: int) -> None:
        table = self.cr3
        for shift in self.shifts:
            slot = table + ((va >> shift) & 0x1FF) * 8
            entry = self.mem.read_u64(slot)
            if not entry & 1:
                entry = self._alloc() | 0x3
                self.mem.write_u64(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        self.mem.write_u64(table + ((va >> 12) & 0x1FF) * 8, pa | 0x3)


@pytest.fixture(params=[4, 5], ids=["4-level", "5-level"])
def guest(kernel_elf: Path, request: pytest.FixtureRequest):
    """Kernel text mapped at LINK_BASE + SLIDE and a stack page, with 4- or 5-level paging
    (the resolver has to find out which, as with a guest that may set CR4.LA57)."""
    mem = SparseMemory((Region(0, GiB),))
    pt = PageTables(mem, 0x100000, request.param)
    addr, code = text_bytes(kernel_elf)
    text_pa = 0x1000000
    mem.write(text_pa, code)
    for off in range(0, len(code) + 4095, 4096):
        pt.map(addr + SLIDE + off, text_pa + off)
    stack_va, stack_pa = 0xFFFFC90000010000, 0x2000000
    pt.map(stack_va, stack_pa)
    return mem, pt, addr, code, stack_va, stack_pa


def test_vmlinux_symbols_resolve(kernel_elf: Path):
    syms = SymbolTable.from_vmlinux(kernel_elf)
    init = syms.lookup("init_tdx_module")
    assert init is not None and init.size > 0
    assert syms.resolve(init.addr + 3) == f"init_tdx_module+0x3/0x{init.size:x}"
    assert syms.resolve(LINK_BASE - 1) is None
    # System.map gives the same names with sizes derived from the next symbol.
    smap = SymbolTable.from_system_map(kernel_elf.with_name("System.map"))
    assert smap.resolve(init.addr + 3).startswith("init_tdx_module+0x3/")
    assert SymbolTable.load(kernel_elf.parent).source.endswith("vmlinux")


def test_kaslr_offset_from_seamcall_rip(kernel_elf: Path):
    syms = SymbolTable.from_vmlinux(kernel_elf)
    stub = syms.lookup("__seamcall_ret")
    assert stub is not None
    rip = stub.addr + 4 + SLIDE  # the SEAMCALL instruction, runtime address
    assert syms.set_kaslr_from_seamcall(rip) == SLIDE
    assert syms.resolve(rip) == f"__seamcall_ret+0x4/0x{stub.size:x}"
    # A RIP outside every stub gives no offset.
    other = SymbolTable.from_vmlinux(kernel_elf)
    assert other.set_kaslr_from_seamcall(syms.lookup("tdx_enable").addr + SLIDE) is None


def test_caller_from_guest_stack(kernel_elf: Path, guest):
    mem, pt, addr, code, stack_va, stack_pa = guest
    syms = SymbolTable.from_vmlinux(kernel_elf)
    ret_init = call_site(addr, code, syms, "init_tdx_module", "__seamcall_ret") + SLIDE
    ret_enable = call_site(addr, code, syms, "tdx_enable", "init_tdx_module") + SLIDE
    decoy = syms.lookup("init_tdx_module").addr + 4 + SLIDE  # in text, not after a CALL
    # Stack at the SEAMCALL: pushed rbx, return into init_tdx_module, its locals, a stale
    # text pointer, then the return into tdx_enable.
    words = [0xFFFF888000001234, ret_init, 1, 2, decoy, ret_enable]
    rsp = stack_va + 0x800
    mem.write(stack_pa + 0x800, b"".join(w.to_bytes(8, "little") for w in words))
    rip = syms.lookup("__seamcall_ret").addr + 4 + SLIDE
    res = CallerResolver(syms, GuestVirt(mem))
    describe = res.capture(rip, rsp, pt.cr3)
    # The stack is read at capture (the vCPU still waits); the guest may reuse it after.
    mem.write(stack_pa + 0x800, bytes(8 * len(words)))
    info = describe()
    assert info["kaslr"] == hex(SLIDE)
    assert info["site"].startswith("__seamcall_ret+0x4/")
    assert info["caller"].startswith("init_tdx_module+0x")
    assert [s.split("+")[0] for s in info["stack"]] == ["init_tdx_module", "tdx_enable"]


def test_unmapped_stack_is_not_an_error(kernel_elf: Path, guest):
    mem, pt, *_ = guest
    syms = SymbolTable.from_vmlinux(kernel_elf)
    rip = syms.lookup("__seamcall_ret").addr + 4
    info = CallerResolver(syms, GuestVirt(mem)).capture(rip, 0xFFFFC90000400000, pt.cr3)()
    assert info["caller"] is None and info["stack"] == []


def test_large_page_walk():
    mem = SparseMemory((Region(0, GiB),))
    pt = PageTables(mem, 0x100000)
    # A 2 MiB mapping made by hand at the PD level.
    va = 0xFFFFFFFF80000000
    table = pt.cr3
    for shift in (39, 30):
        slot = table + ((va >> shift) & 0x1FF) * 8
        entry = pt._alloc() | 3
        mem.write_u64(slot, entry)
        table = entry & ~0xFFF
    mem.write_u64(table + ((va >> 21) & 0x1FF) * 8, 0x400000 | 0x83)
    mem.write(0x400000 + 0x12345, b"hello")
    assert GuestVirt(mem).read(pt.cr3, va + 0x12345, 5) == b"hello"
    assert GuestVirt(mem).translate(pt.cr3, va + 0x400000) is None


def test_cached_table_is_the_parsed_one_until_vmlinux_changes(kernel_elf: Path,
                                                             tmp_path: Path, monkeypatch):
    """SymbolTable.load with a cache: the second load reads the cache, not the ELF file, and
    answers the same; a rewritten vmlinux or a damaged entry is parsed again."""
    elf = tmp_path / "vmlinux"
    elf.write_bytes(kernel_elf.read_bytes())
    cache = tmp_path / "symbols"
    parsed = SymbolTable.load(elf, cache)
    (entry,) = cache.iterdir()
    real = SymbolTable.from_vmlinux
    parses: list[Path] = []

    def counted(path):
        parses.append(Path(path))
        return real(path)

    monkeypatch.setattr(SymbolTable, "from_vmlinux", counted)
    cached = SymbolTable.load(elf, cache)
    assert parses == []
    assert cached.symbols == parsed.symbols and cached.source == str(elf)
    init = parsed.lookup("init_tdx_module")
    assert init is not None and cached.lookup("init_tdx_module") == init
    assert cached.resolve(init.addr + 3) == parsed.resolve(init.addr + 3)
    assert (cached.text_start, cached.text_end) == (parsed.text_start, parsed.text_end)
    # The same file, rewritten (new mtime): a new entry, parsed again.
    os.utime(elf, ns=(entry.stat().st_mtime_ns, entry.stat().st_mtime_ns + 10**9))
    assert SymbolTable.load(elf, cache).symbols == parsed.symbols
    assert parses == [elf] and len(list(cache.iterdir())) == 2
    # A damaged entry is a miss, not an error.
    for e in cache.iterdir():
        e.write_bytes(b"\x00garbage")
    assert SymbolTable.load(elf, cache).symbols == parsed.symbols and len(parses) == 2


def test_bad_files(tmp_path: Path):
    (tmp_path / "vmlinux").write_bytes(b"not an elf")
    with pytest.raises(VtdxError):
        SymbolTable.from_vmlinux(tmp_path / "vmlinux")
    with pytest.raises(VtdxError):
        SymbolTable.load(tmp_path / "nowhere")
    (tmp_path / "System.map").write_text("garbage\n")
    with pytest.raises(VtdxError):
        SymbolTable.from_system_map(tmp_path / "System.map")


@pytest.mark.kernel
def test_real_vmlinux_and_system_map_agree():
    """The built kernel: pyelftools on vmlinux and the System.map fallback give the same
    function for addresses inside the TDX host code, at any KASLR slide."""
    from vtdx.host import kernel as kernel_build

    art = kernel_build.default_kernel()
    if art is None:
        pytest.skip("no kernel built")
    elf = SymbolTable.from_vmlinux(art.vmlinux)
    smap = SymbolTable.from_system_map(art.system_map)
    for name in ("__seamcall", "__seamcall_ret", "__seamcall_saved_ret", "tdx_cpu_enable"):
        sym = elf.lookup(name)
        assert sym is not None and sym.size > 0
        for table in (elf, smap):
            table.offset = 0
            assert table.set_kaslr_from_seamcall(elf.lookup("__seamcall").addr + 0x1A
                                                 + SLIDE) == SLIDE
            assert table.resolve(sym.addr + SLIDE + sym.size // 2).startswith(f"{name}+")
