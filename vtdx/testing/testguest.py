"""Build, boot arguments and output parser for the freestanding SEAMCALL test guest.

The guest (guest/testguest/) is a multiboot v1 ELF that QEMU's ``-kernel`` loads directly:
it enters long mode, starts every vCPU, turns VMX on like Linux (CR4.VMXE, VMXON) and runs
the SEAMCALL tests named on its command line, on all CPUs at once. It needs only the host's
gcc/as/ld, builds in well under a second and is cached by source hash, so whole-stack tests
can exercise the plugin and daemon without a Linux kernel.

Command line (``-append``): ``smp=N test=a,b,... [iters=K] [addrs=PA,PA,...] [script=PA]``

===========  ================================================================================
test         what every CPU does
===========  ================================================================================
roundtrip    ``iters`` SEAMCALLs, RAX=0xE000, RCX..R15 = pattern(cpu, i, reg); expects RAX=0,
             CF=ZF=0 and X_out = rotl64(X_in, 1) ^ (cpu << 56) for the 13 registers
memory       per PA in ``addrs``: uses PA' = PA + 16*cpu; writes a pattern at PA', zero at
             PA'+8, SEAMCALL RAX=0xE001 RCX=PA' R8=new R9=PA'+8; expects RDX = pattern and
             new at PA'+8
ring3        SEAMCALL at CPL3 after VMXON; ok when it raised #GP(0) (``vec=13 err=0``)
novmx        SEAMCALL at CPL0 before VMXON; ok when it raised #UD (``vec=6``)
nomodule     SEAMCALL(0xE000) until one returns CF=1 (VMfailInvalid); ``ok`` = calls that
             succeeded before it (``iters`` caps the loop if given)
script       replays the SEAMCALL script at ``script`` (default 64 MiB, vtdx.testing.seamscript):
             each CPU issues the records of its LP in sequence order, copying their memory
             images first; ``ok``/``fail`` count records whose 14 output registers (and
             VMsucceed) match; the first mismatch adds ``seq= reg= got= want=``; a CPU
             that ran REENTER records adds ``reenters=`` (time-slice exits re-entered)
===========  ================================================================================

Output on COM1, one line each::

    TG BOOT cpus=<started> smp=<n> tests=<list> iters=<k>
    TG <test> cpu=<n> ok=<k> fail=<m> [key=value ...]
    TG EXC cpu=<n> vec=<v> err=<e> rip=<hex>      (unexpected exception inside a test)
    TG WARN cpu=<n> did_not_start=1
    TG ERROR cpu=<n> unknown_test=<name>
    TG DONE                                       (then isa-debug-exit: QEMU exit status 1)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host.qemu import cache_dir
from vtdx.resources import asset

SOURCE_DIR = asset("guest", "testguest")
ELF_NAME = "testguest.elf"
CFLAGS = (
    "-O2", "-g", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone",
    "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-Wall", "-Wextra",
)
LDFLAGS = ("-nostdlib", "-static", "-z", "max-page-size=0x1000", "--no-warn-rwx-segments",
           "--build-id=none")
#: isa-debug-exit turns the guest's final `out 0 -> 0xf4` into this QEMU exit status.
EXIT_STATUS_DONE = 1


def _sources(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in {".c", ".S", ".h", ".ld"})


def source_hash(src: Path = SOURCE_DIR) -> str:
    """Hash of the guest sources and build flags: the cache key."""
    h = hashlib.sha256()
    for p in _sources(src):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise VtdxError(f"{what}: {argv[0]} not found (apt-get install gcc binutils)") from None
    if p.returncode != 0:
        lines = (p.stderr.strip() or p.stdout.strip()).splitlines() or ["no output"]
        line = next((ln for ln in lines if "error" in ln.lower()), lines[0])
        raise VtdxError(f"{what} failed: {line.strip()}")


def _compile(src: Path, out: Path) -> None:
    """gcc/as/ld a 64-bit image, then relabel it ELF32 so QEMU's multiboot loader takes it."""
    with tempfile.TemporaryDirectory(prefix="vtdx-testguest-") as tmp:
        t = Path(tmp)
        objs = []
        for s in _sources(src):
            if s.suffix not in {".c", ".S"}:
                continue
            obj = t / (s.stem + ".o")
            flags = CFLAGS if s.suffix == ".c" else ()
            _run(["gcc", "-c", *flags, f"-I{src}", "-o", str(obj), str(s)], f"compiling {s.name}")
            objs.append(str(obj))
        elf64 = t / "testguest64.elf"
        _run(["ld", *LDFLAGS, "-T", str(src / "link.ld"), "-o", str(elf64), *objs],
             "linking the test guest")
        _run(["objcopy", "-O", "elf32-i386", str(elf64), str(t / ELF_NAME)],
             "objcopy to elf32-i386")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(t / ELF_NAME, tmp_out)
        tmp_out.replace(out)


def build(out_dir: Path | None = None, *, cache: Path | None = None,
          src: Path = SOURCE_DIR) -> Path:
    """Path of testguest.elf for the current sources, built if not cached.

    With ``out_dir`` the image is also copied there and that copy is returned.
    """
    if not (src / "link.ld").is_file():
        raise VtdxError(f"test guest sources not found in {src}")
    cached = cache_dir(cache) / "testguest" / source_hash(src) / ELF_NAME
    if not cached.is_file():
        _compile(src, cached)
    if out_dir is None:
        return cached
    out = Path(out_dir) / ELF_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out


#: The device the guest's final `out 0 -> 0xf4` goes to (ends QEMU with EXIT_STATUS_DONE).
EXIT_DEVICE = ("-device", "isa-debug-exit,iobase=0xf4,iosize=4")


def qemu_args(elf: Path, append: str, *, smp: int = 1, mem: str = "256M") -> list[str]:
    """QEMU arguments (after the runtime's command prefix) that boot the guest."""
    if not any(tok.startswith("smp=") for tok in append.split()):
        append = f"smp={smp} {append}"
    return ["-M", "q35", "-cpu", "max", "-smp", str(smp), "-m", mem,
            "-kernel", str(elf), "-append", append,
            "-serial", "stdio", "-display", "none", "-monitor", "none", "-no-reboot",
            *EXIT_DEVICE]


_LINE = re.compile(r"^TG (\S+)((?: \S+=\S*)*)\s*$")


@dataclass
class TgLine:
    """One ``TG`` line: kind (test name, EXC, BOOT, WARN, ERROR) and its key=value fields."""

    kind: str
    fields: dict[str, str] = field(default_factory=dict)

    def num(self, key: str) -> int:
        return int(self.fields[key], 0)


@dataclass
class TgResult:
    """Everything the guest reported; ``done`` only if the BSP printed ``TG DONE``."""

    lines: list[TgLine]
    done: bool
    output: str = ""                    #: the serial output as received
    stderr: str = ""                    #: QEMU's (and the plugin's) stderr, for diagnostics

    def results(self, test: str) -> dict[int, TgLine]:
        """Per-CPU result line of one test."""
        return {ln.num("cpu"): ln for ln in self.lines if ln.kind == test}

    def exceptions(self) -> list[TgLine]:
        return [ln for ln in self.lines if ln.kind == "EXC"]

    def totals(self, test: str) -> tuple[int, int]:
        """(ok, fail) summed over CPUs."""
        rs = self.results(test).values()
        return sum(r.num("ok") for r in rs), sum(r.num("fail") for r in rs)


def parse_output(text: str) -> TgResult:
    """Parse the guest's serial output (other lines, e.g. from QEMU, are ignored)."""
    lines, done = [], False
    for raw in text.splitlines():
        raw = raw.strip()
        if raw == "TG DONE":
            done = True
            continue
        m = _LINE.match(raw)
        if m:
            kv = dict(part.split("=", 1) for part in m[2].split())
            lines.append(TgLine(m[1], kv))
    return TgResult(lines, done, text)


def boot(runtime_cmd: list[str], elf: Path, append: str, *, smp: int = 1, mem: str = "256M",
         extra: list[str] | None = None, env: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[TgResult, int, float]:
    """Boot the guest under QEMU; (parsed output, QEMU exit status, wall seconds)."""
    argv = [*runtime_cmd, *qemu_args(elf, append, smp=smp, mem=mem), *(extra or [])]
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        raise VtdxError(f"test guest did not finish in {timeout:.0f} s; output so far:\n"
                        f"{out[-2000:]}") from None
    result = parse_output(p.stdout)
    result.stderr = p.stderr
    return result, p.returncode, time.monotonic() - t0
