"""Kernel symbols for the trace: which kernel function issued a SEAMCALL.

The daemon sees the guest's RIP, RSP and CR3 at every SEAMCALL. RIP lies in one of the
kernel's SEAMCALL stubs (``__seamcall*`` in arch/x86/virt/vmx/tdx/seamcall.S); the C
function that called the stub is found by walking the guest page tables to read the stack
and taking the first word that is a return address (it points just after a CALL).

Symbols come from vmlinux (pyelftools) or, without it, System.map. KASLR moves the kernel
by a multiple of 2 MiB (CONFIG_PHYSICAL_ALIGN on x86-64), so the offset follows from one
known runtime address: the SEAMCALL RIP must land inside a ``__seamcall*`` stub.
"""

from __future__ import annotations

import bisect
import hashlib
import marshal
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vtdx.errors import VtdxError

#: Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64.
_SYM64 = struct.Struct("<IBBHQQ")
_STT_NOTYPE, _STT_FUNC = 0, 2

KASLR_ALIGN = 0x200000
#: The kernel's SEAMCALL stubs; every TDX call goes through one of them.
SEAMCALL_STUBS = ("__seamcall", "__seamcall_ret", "__seamcall_saved_ret")
_TEXT_TYPES = set("tTwW")
SEAMCALL_OPCODE = bytes((0x66, 0x0F, 0x01, 0xCF))
#: Directory of the vtdx cache that keeps vmlinux symbol tables (``SymbolTable.load``).
SYMBOL_CACHE = "symbols"


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    addr: int
    size: int


class SymbolTable:
    """Sorted function symbols with ``resolve(addr) -> "func+0x12/0x80"``.

    ``offset`` is the KASLR slide (runtime minus link-time address); ``resolve`` takes
    runtime addresses. The table is three parallel lists (address, name, size) rather than
    one object per symbol: it is built once per `vtdx run` start, from the on-disk cache
    when one exists (``load``), and a list of ~25,000 objects cost more than the lookups.
    """

    def __init__(self, symbols: Iterable[Symbol], source: str = "") -> None:
        syms = sorted(
            {(s.addr, s.name): s for s in symbols}.values(),
            key=lambda s: (s.addr, s.size != 0),  # among aliases, the sized one is found first
        )
        # Give size-less symbols (System.map, asm labels) the gap to the next symbol.
        addrs = sorted({s.addr for s in syms})
        following = dict(zip(addrs, addrs[1:], strict=False))
        self._init([s.addr for s in syms], [s.name for s in syms],
                   [s.size or following.get(s.addr, s.addr) - s.addr for s in syms], source)

    def _init(self, addrs: list[int], names: list[str], sizes: list[int], source: str) -> None:
        """Take the sorted, sized lists as they are (``__init__`` and the cache)."""
        self._addrs, self._names, self._sizes = addrs, names, sizes
        self._by_name: dict[str, int] | None = None
        self.source = source
        self.offset = 0
        self.text_start = addrs[0] if addrs else 0
        self.text_end = max(map(sum, zip(addrs, sizes, strict=True)), default=0)

    @classmethod
    def _from_lists(cls, addrs: list[int], names: list[str], sizes: list[int],
                    source: str) -> SymbolTable:
        table = cls.__new__(cls)
        table._init(addrs, names, sizes, source)
        return table

    @property
    def symbols(self) -> list[Symbol]:
        """Every symbol, by address (built on demand: callers look symbols up instead)."""
        return [Symbol(n, a, z) for a, n, z in zip(self._addrs, self._names, self._sizes,
                                                   strict=True)]

    def __len__(self) -> int:
        return len(self._addrs)

    def lookup(self, name: str) -> Symbol | None:
        if self._by_name is None:
            # Later aliases win, as a dict built in address order would have it.
            self._by_name = {n: i for i, n in enumerate(self._names)}
        i = self._by_name.get(name)
        return None if i is None else self._symbol(i)

    def _symbol(self, i: int) -> Symbol:
        return Symbol(self._names[i], self._addrs[i], self._sizes[i])

    def find(self, addr: int) -> tuple[Symbol, int] | None:
        """Symbol containing runtime ``addr`` and the offset into it, or None."""
        link = addr - self.offset
        i = bisect.bisect_right(self._addrs, link) - 1
        if i < 0:
            return None
        addrs, sizes = self._addrs, self._sizes
        while i >= 0:  # aliases share an address; any of them may carry the size
            addr = addrs[i]
            if link < addr + max(sizes[i], 1):
                return self._symbol(i), link - addr
            if i == 0 or addrs[i - 1] != addr:
                return None
            i -= 1
        return None

    def resolve(self, addr: int) -> str | None:
        hit = self.find(addr)
        if hit is None:
            return None
        sym, off = hit
        return f"{sym.name}+0x{off:x}/0x{sym.size:x}"

    def in_text(self, addr: int) -> bool:
        return self.text_start <= addr - self.offset < self.text_end

    def set_kaslr_from_seamcall(self, rip: int) -> int | None:
        """Set ``offset`` from the RIP of a SEAMCALL; returns the offset or None.

        Among the stubs, the one for which ``rip - offset`` falls inside it with a
        2 MiB-aligned ``offset`` wins (stubs are far smaller than 2 MiB, so at most one
        link-time address per stub qualifies).
        """
        for name in SEAMCALL_STUBS:
            s = self.lookup(name)
            if s is None:
                continue
            link = s.addr + ((rip - s.addr) % KASLR_ALIGN)
            if link < s.addr + max(s.size, 1):
                self.offset = rip - link
                return self.offset
        return None

    # -- loaders

    @classmethod
    def from_vmlinux(cls, path: str | os.PathLike[str]) -> SymbolTable:
        """Function symbols of an ELF file's .symtab.

        pyelftools locates the sections; the symbol entries themselves are unpacked in bulk
        (Elf64_Sym, 24 bytes each): a Linux vmlinux has ~50,000 of them and parsing them one
        by one through pyelftools took ~2 s of every `vtdx run` start. pyelftools is imported
        here, on a cache miss only: importing it costs ~25 ms of every start.
        """
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                symtab = elf.get_section_by_name(".symtab")
                if not isinstance(symtab, SymbolTableSection):
                    raise VtdxError(f"{path}: no symbol table (stripped?)")
                if elf.elfclass != 64 or symtab["sh_entsize"] != _SYM64.size:
                    raise VtdxError(f"{path}: not a 64-bit ELF symbol table")
                exec_secs = {
                    i for i, sec in enumerate(elf.iter_sections())
                    if sec["sh_flags"] & 0x4  # SHF_EXECINSTR
                }
                strtab = elf.get_section(symtab["sh_link"]).data()
                raw = symtab.data()
        except (OSError, ELFError) as e:
            raise VtdxError(f"cannot read symbols from {path}: {e}") from e
        order = "<" if elf.little_endian else ">"
        unpack = struct.Struct(order + _SYM64.format[1:]).iter_unpack
        syms = []
        for name_off, info, _other, shndx, value, size in unpack(raw):
            if info & 0xF not in (_STT_NOTYPE, _STT_FUNC) or shndx not in exec_secs:
                continue
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off:end].decode("utf-8", "replace")
            if not name or name.startswith((".L", "$")):
                continue
            syms.append(Symbol(name, value, size))
        if not syms:
            raise VtdxError(f"{path}: no function symbols")
        return cls(syms, source=str(path))

    @classmethod
    def from_system_map(cls, path: str | os.PathLike[str]) -> SymbolTable:
        """Text symbols of a System.map (``addr type name`` lines)."""
        syms = []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                        continue
                    try:
                        addr = int(parts[0], 16)
                    except ValueError:
                        continue
                    syms.append(Symbol(parts[2], addr, 0))
        except OSError as e:
            raise VtdxError(f"cannot read {path}: {e}") from e
        if not syms:
            raise VtdxError(f"{path}: no text symbols")
        return cls(syms, source=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], cache: Path | None = None) -> SymbolTable:
        """A vmlinux or System.map file, or a directory holding one (vmlinux preferred).

        With ``cache`` (a directory), a vmlinux's table is kept there after its first load,
        keyed by the file's path, size and modification time: reading ~25,000 symbols out of
        the ELF file took 0.13-0.17 s of every `vtdx run` start before QEMU could be started,
        the cached lists load in a few milliseconds."""
        p = Path(path)
        if p.is_dir():
            for name in ("vmlinux", "System.map"):
                if (p / name).is_file():
                    return cls.load(p / name, cache)
            raise VtdxError(f"{p}: neither vmlinux nor System.map found")
        if not p.is_file():
            raise VtdxError(f"{p}: no such file")
        with open(p, "rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
        if not is_elf:
            return cls.from_system_map(p)
        if cache is None:
            return cls.from_vmlinux(p)
        entry = _cache_entry(cache, p)
        hit = _read_cached(entry, str(p))
        if hit is not None:
            return hit
        table = cls.from_vmlinux(p)
        _write_cached(entry, table)
        return table


#: Version of the cached table's layout; a change makes old entries misses.
_CACHE_FORMAT = 1


def _cache_entry(cache: Path, path: Path) -> Path:
    st = path.stat()
    key = f"{_CACHE_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".marshal")


def _read_cached(entry: Path, source: str) -> SymbolTable | None:
    """The table cached in ``entry``; None when there is none or it cannot be used."""
    try:
        fmt, addrs, names, sizes = marshal.loads(entry.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if fmt != _CACHE_FORMAT or not len(addrs) == len(names) == len(sizes):
        return None
    return SymbolTable._from_lists(addrs, names, sizes, source)


def _write_cached(entry: Path, table: SymbolTable) -> None:
    """Publish the table atomically (parallel runs may load one vmlinux at once); a cache
    that cannot be written only costs the next run the slow load."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(marshal.dumps((_CACHE_FORMAT, table._addrs, table._names,
                                       table._sizes)))
        os.replace(tmp, entry)
    except OSError:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- guest memory


class _PhysReader(Protocol):
    def read(self, pa: int, size: int) -> bytes: ...


PAGE = 4096
_PTE_P = 1
_PTE_PS = 1 << 7
_ADDR_MASK = 0x000F_FFFF_FFFF_F000


class GuestVirt:
    """Read guest-virtual memory by walking x86-64 page tables (4- or 5-level) in guest RAM.

    Kernel text translations are cached: the kernel half of every CR3 is the same and
    the text mapping never moves after boot. ``levels`` is 4 unless the guest runs with
    CR4.LA57; ``CallerResolver`` finds out by reading the SEAMCALL opcode at RIP.
    """

    def __init__(self, phys: _PhysReader, levels: int = 4, max_pa_bits: int = 52) -> None:
        self.phys = phys
        self.levels = levels
        self._pa_mask = _ADDR_MASK & ((1 << max_pa_bits) - 1)
        self._cache: dict[int, int] = {}
        self.cache_range = (0, 0)

    def set_levels(self, levels: int) -> None:
        if levels != self.levels:
            self.levels = levels
            self._cache.clear()

    def translate(self, cr3: int, va: int) -> int | None:
        page = va & ~(PAGE - 1)
        hit = self._cache.get(page)
        if hit is not None:
            return hit | (va & (PAGE - 1))
        table = cr3 & self._pa_mask
        shifts = (48, 39, 30, 21, 12)[5 - self.levels:]
        pa = None
        for shift in shifts:
            idx = (va >> shift) & 0x1FF
            try:
                entry = int.from_bytes(self.phys.read(table + idx * 8, 8), "little")
            except Exception:
                return None
            if not entry & _PTE_P:
                return None
            if shift in (30, 21) and entry & _PTE_PS:  # 1 GiB / 2 MiB page
                size = 1 << shift
                pa = (entry & self._pa_mask & ~(size - 1)) | (va & (size - 1))
                break
            table = entry & self._pa_mask
        if pa is None:
            pa = table | (va & (PAGE - 1))
        lo, hi = self.cache_range
        if lo <= va < hi:  # kernel text: identical in every address space, never remapped
            self._cache[page] = pa & ~(PAGE - 1)
        return pa

    def read(self, cr3: int, va: int, size: int) -> bytes | None:
        out = bytearray()
        while size > 0:
            n = min(size, PAGE - (va & (PAGE - 1)))
            pa = self.translate(cr3, va)
            if pa is None:
                return None
            try:
                out += self.phys.read(pa, n)
            except Exception:
                return None
            va += n
            size -= n
        return bytes(out)


def _is_call_before(code: bytes) -> bool:
    """Do the bytes just before a candidate return address end in a CALL instruction?

    ``code`` is the 7 bytes preceding it. Accepts call rel32 (E8) and the common
    indirect forms: call *%reg, call *%r8-15, call *disp32(%rip), call *disp8(%reg).
    """
    if len(code) < 7:
        return False
    if code[-5] == 0xE8:
        return True
    if code[-2] == 0xFF and 0xD0 <= code[-1] <= 0xD7:
        return True
    if code[-3] == 0x41 and code[-2] == 0xFF and 0xD0 <= code[-1] <= 0xD7:
        return True
    if code[-6] == 0xFF and code[-5] == 0x15:
        return True
    return code[-3] == 0xFF and (code[-2] & 0xF8) == 0x50


class CallerResolver:
    """Turn (RIP, RSP, CR3) of a SEAMCALL into kernel function names."""

    #: Descriptions kept per (RIP, stack words): a loop of calls from one kernel path (a vCPU
    #: entering its TD again and again) repeats the same stack.
    DESCRIBED_MAX = 4096

    def __init__(self, symbols: SymbolTable, mem: GuestVirt, stack_words: int = 48) -> None:
        self.symbols = symbols
        self.mem = mem
        self.stack_words = stack_words
        self._kaslr_known = False
        self._described: dict[tuple[int, bytes], dict[str, object]] = {}

    def _learn(self, rip: int, cr3: int) -> None:
        """Once: KASLR offset from RIP, paging depth from the SEAMCALL opcode at RIP."""
        if self.symbols.set_kaslr_from_seamcall(rip) is None:
            return
        for levels in (4, 5):
            self.mem.set_levels(levels)
            code = self.mem.read(cr3, rip - 4, 8) or b""
            if SEAMCALL_OPCODE in (code[4:], code[:4]):  # RIP at or just after SEAMCALL
                break
        else:
            self.mem.set_levels(4)
            return
        off = self.symbols.offset
        self.mem.cache_range = (self.symbols.text_start + off, self.symbols.text_end + off)
        self._kaslr_known = True

    def _stack(self, rip: int, rsp: int, cr3: int) -> bytes | None:
        if not self._kaslr_known:
            self._learn(rip, cr3)
        return self.mem.read(cr3, rsp, self.stack_words * 8)

    def _returns(self, raw: bytes | None, cr3: int, depth: int = 3) -> list[int]:
        """Candidate return addresses in ``raw`` (stack words) that follow a CALL in the
        kernel text (text does not change, so it may be read after the call returned)."""
        if raw is None:
            return []
        found: list[int] = []
        for i in range(0, len(raw), 8):
            ret = int.from_bytes(raw[i : i + 8], "little")
            if not self.symbols.in_text(ret):
                continue
            code = self.mem.read(cr3, ret - 7, 7)
            if code is None or not _is_call_before(code):
                continue
            found.append(ret)
            if len(found) >= depth:
                break
        return found

    def capture(self, rip: int, rsp: int, cr3: int) -> Callable[[], dict[str, object]]:
        """Read the caller's stack now (while the vCPU waits on its SEAMCALL) and return
        the function that symbolises it later (``observe.trace.Symboliser``)."""
        raw = self._stack(rip, rsp, cr3)

        def describe() -> dict[str, object]:
            if raw is None:
                return self._describe(rip, [])
            key = (rip, raw)
            hit = self._described.get(key)
            if hit is None:
                # The return addresses found depend only on the stack words and the kernel
                # text, which does not change once KASLR is known.
                hit = self._describe(rip, self._returns(raw, cr3))
                if self._kaslr_known:
                    if len(self._described) >= self.DESCRIBED_MAX:
                        self._described.clear()
                    self._described[key] = hit
            return dict(hit)
        return describe

    def _describe(self, rip: int, rets: list[int]) -> dict[str, object]:
        return {
            "site": self.symbols.resolve(rip),
            "caller": self.symbols.resolve(rets[0]) if rets else None,
            "stack": [self.symbols.resolve(r) or f"0x{r:x}" for r in rets],
            "kaslr": f"0x{self.symbols.offset:x}" if self._kaslr_known else None,
        }
