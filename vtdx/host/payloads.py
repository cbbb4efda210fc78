"""In-guest test programs (guest/payloads/*.c): static builds and their KTAP results.

The guest has no compiler and no libc beyond busybox, so each payload is linked statically
with the host gcc and placed in the agent's initramfs (``/vtdx/bin``). Builds are cached by
the content of the sources and the compiler version. Results are KTAP v1 (the format of
kselftest and KUnit), parsed here so a pytest assertion can show the kernel developer the
exact lines they would read on a console.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host.kernel import kernel_version
from vtdx.host.qemu import cache_dir
from vtdx.resources import asset

PAYLOAD_SRC = asset("guest", "payloads")
TDGUEST_SRC = asset("guest", "tdguest")
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-pthread")
#: The TD guest runs on bare (virtual) metal in a TD: no libc, no SSE until it enables it
#: (TDH.VP.INIT leaves CR4.OSFXSR clear), position-independent code at a fixed address.
TDGUEST_CFLAGS = ("-m64", "-ffreestanding", "-fno-builtin", "-nostdlib", "-fpie",
                  "-fvisibility=hidden", "-mno-red-zone", "-mgeneral-regs-only",
                  "-fno-stack-protector", "-fcf-protection=none",
                  "-fno-asynchronous-unwind-tables", "-Os", "-Wall", "-Wextra")
#: guest/tdguest/tdguest.h: TDG_IMAGE_SIZE, the bytes the VMM adds below 4 GiB.
TDGUEST_IMAGE_SIZE = 0x10000


def sources(src_dir: Path = PAYLOAD_SRC) -> dict[str, Path]:
    """Payload name -> its .c file (headers in the same directory are shared)."""
    return {p.stem: p for p in sorted(src_dir.glob("*.c"))}


def build_payloads(cache: Path | None = None, src_dir: Path = PAYLOAD_SRC,
                   headers: Path | None = None, cc: str = "gcc") -> dict[str, bytes]:
    """Build every payload (or reuse the cached build); name -> static ELF bytes.

    ``headers``: an installed kernel header tree (``make headers_install``) for payloads
    that use the booted kernel's UAPI (KVM ioctls); default: the host's /usr/include.
    """

    if shutil.which(cc) is None:
        raise VtdxError(f"{cc} not found: the in-guest payloads need a C compiler "
                        "(install gcc and libc6-dev)")
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True,
                         check=False).stdout.splitlines()[:1]
    h = hashlib.sha256("\0".join([*ver, *CFLAGS, *TDGUEST_CFLAGS, str(headers or "")])
                       .encode())
    for p in sorted([*src_dir.glob("*.c"), *src_dir.glob("*.h"), *_tdguest_sources()]):
        h.update(p.name.encode() + p.read_bytes())
    out_dir = cache_dir(cache) / "payloads" / h.hexdigest()[:16]
    srcs = sources(src_dir)
    if not all((out_dir / n).is_file() for n in srcs):
        # A directory of this process's own: parallel test workers may build at once.
        tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        image = build_tdguest(tmp / "tdguest", cc)
        (tmp / "tdguest_image.h").write_text(image_header(image))
        inc = ["-isystem", str(headers / "include")] if headers else []
        inc += ["-I", str(TDGUEST_SRC), "-I", str(tmp)]
        for name, src in srcs.items():
            r = subprocess.run([cc, *CFLAGS, *inc, "-I", str(src_dir), "-o", str(tmp / name),
                                str(src)], capture_output=True, text=True, check=False)
            if r.returncode:
                err = (r.stderr.strip().splitlines() or ["?"])[-1]
                hint = " (static libc missing? install libc6-dev)" if "-lc" in r.stderr else ""
                raise VtdxError(f"building payload {name}: {err}{hint}")
        _publish(tmp, out_dir, srcs)
    return {n: (out_dir / n).read_bytes() for n in srcs}


def _publish(tmp: Path, out_dir: Path, names: Iterable[str]) -> None:
    """Move a finished build into place, unless another builder's complete one is there."""
    def complete() -> bool:
        return all((out_dir / n).is_file() for n in names)

    if not complete():
        shutil.rmtree(out_dir, ignore_errors=True)   # a crashed build's leftovers
        try:
            tmp.rename(out_dir)
            return
        except OSError:
            if not complete():
                raise
    shutil.rmtree(tmp, ignore_errors=True)


def _tdguest_sources() -> list[Path]:
    return sorted(p for p in TDGUEST_SRC.iterdir() if p.suffix in (".c", ".S", ".h", ".ld"))


def build_tdguest(out_dir: Path, cc: str = "gcc") -> bytes:
    """Build the kvm-td payload's TD guest (guest/tdguest/): its flat image, the
    ``TDGUEST_IMAGE_SIZE`` bytes that end at 4 GiB with the reset vector. ``out_dir`` keeps
    the objects, ``tdguest.elf`` (for a disassembly) and ``tdguest.bin``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in sorted([*TDGUEST_SRC.glob("*.S"), *TDGUEST_SRC.glob("*.c")]):
        obj = out_dir / (src.name + ".o")
        _run_tool([cc, *TDGUEST_CFLAGS, "-I", str(TDGUEST_SRC), "-c", str(src), "-o", str(obj)],
                  f"building TD guest {src.name}")
        objs.append(str(obj))
    elf, flat = out_dir / "tdguest.elf", out_dir / "tdguest.bin"
    _run_tool([cc, "-m64", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
               "-Wl,-T," + str(TDGUEST_SRC / "tdguest.ld"), "-o", str(elf), *objs],
              "linking the TD guest")
    _run_tool(["objcopy", "-O", "binary", str(elf), str(flat)], "objcopy of the TD guest")
    image = flat.read_bytes()
    if len(image) != TDGUEST_IMAGE_SIZE or image[-16] != 0xE9:
        raise VtdxError(f"TD guest image: {len(image)} bytes, expected {TDGUEST_IMAGE_SIZE} "
                        "ending in the reset vector's jmp")
    return image


def _run_tool(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode:
        err = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise VtdxError(f"{what}: {err}")


def image_header(image: bytes) -> str:
    """The TD guest image as a C header for the VMM payload: page-aligned, since KVM's
    KVM_TDX_INIT_MEM_REGION wants a page-aligned source (the payload copies it anyway)."""
    rows = (", ".join(f"0x{b:02x}" for b in image[i:i + 16]) for i in range(0, len(image), 16))
    body = ",\n\t".join(rows)
    return ("/* Generated by vtdx.host.payloads from guest/tdguest: do not edit. */\n"
            "static const unsigned char tdguest_image[] __attribute__((aligned(4096))) = {\n"
            f"\t{body}\n}};\n")


def kernel_headers(src: Path, cache: Path | None = None) -> Path:
    """The UAPI headers of a kernel tree (``make headers``, cached): the directory to pass
    as ``build_payloads(headers=...)``. Payloads then see the booted kernel's KVM ABI, not
    the host distribution's older one."""

    src = src.resolve()
    if not (src / "Makefile").is_file() or not (src / "include" / "uapi").is_dir():
        raise VtdxError(f"{src}: not a Linux source tree (no Makefile / include/uapi)")
    key = hashlib.sha256(f"{src}\0{kernel_version(src)}".encode()).hexdigest()[:16]
    out = cache_dir(cache) / "headers" / key
    if not (out / "usr" / "include" / "linux" / "kvm.h").is_file():
        out.mkdir(parents=True, exist_ok=True)
        # `headers` (not headers_install, which needs rsync) leaves them in O=/usr/include.
        r = subprocess.run(["make", "-s", "-C", str(src), f"O={out}", "headers"],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise VtdxError(f"make headers in {src}: {err}")
    return out / "usr"


# --------------------------------------------------------------------------- KTAP

_RESULT = re.compile(r"^\s*(ok|not ok) (\d+)(?: -)? ?([^#]*?)\s*(?:#\s*(.*))?$")
_DIAG = re.compile(r"^\s*#\s*([\w.-]+):\s*(.*)$")


@dataclass
class KtapCase:
    ok: bool
    number: int
    name: str
    directive: str = ""

    @property
    def skipped(self) -> bool:
        return self.directive.upper().startswith("SKIP")


@dataclass
class KtapResult:
    """One payload run: its exit status, KTAP test lines and ``# key: value`` diagnostics."""

    cmd: str
    rc: int
    text: str
    cases: list[KtapCase] = field(default_factory=list)
    diag: dict[str, str] = field(default_factory=dict)
    planned: int | None = None
    stderr: str = ""

    @classmethod
    def parse(cls, cmd: str, rc: int, text: str, stderr: str = "") -> KtapResult:
        res = cls(cmd, rc, text, stderr=stderr)
        for line in text.splitlines():
            if m := _RESULT.match(line):
                res.cases.append(KtapCase(m[1] == "ok", int(m[2]), m[3], m[4] or ""))
            elif m := re.match(r"^\s*1\.\.(\d+)", line):
                res.planned = int(m[1])
            elif m := _DIAG.match(line):
                res.diag.setdefault(m[1], m[2])
        return res

    @property
    def failed(self) -> list[KtapCase]:
        return [c for c in self.cases if not c.ok]

    @property
    def ok(self) -> bool:
        """Every planned test ran and passed, and the program exited 0."""
        complete = self.planned is None or len(self.cases) == self.planned
        return self.rc == 0 and bool(self.cases) and complete and not self.failed

    def case(self, name: str) -> KtapCase:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"no KTAP test {name!r} in {self.cmd!r}")

    def describe(self) -> str:
        head = f"$ {self.cmd}  (exit status {self.rc})"
        tail = f"\n[stderr]\n{self.stderr}" if self.stderr else ""
        return f"{head}\n{self.text.rstrip()}{tail}\n"

    def assert_ok(self) -> KtapResult:
        """Raise AssertionError carrying the full KTAP output unless everything passed."""
        if not self.ok:
            bad = ", ".join(c.name for c in self.failed) or "incomplete run"
            raise AssertionError(f"in-guest payload failed ({bad}):\n{self.describe()}")
        return self
