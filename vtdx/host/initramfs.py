"""Build the guest initramfs: busybox-static from the host plus vtdx's ``/init``.

Written as a newc cpio directly (no root, no ``cpio`` tool, no fakeroot): that is how we
get a ``/dev/console`` device node into the archive, which the kernel needs to give ``/init``
its stdin/stdout before devtmpfs is mounted. The result is cached by content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host.qemu import cache_dir
from vtdx.resources import asset

Log = Callable[[str], None]

INIT = asset("guest", "initramfs", "init")
BUSYBOX = Path("/bin/busybox")
#: Bumped when the archive layout changes.
LAYOUT = "1"
DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc",
        "root", "run")


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Cpio:
    """A newc ("070701") archive writer, enough for an initramfs."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def dir(self, name: str, perm: int = 0o755) -> None:
        self.entries.append(_Entry(name, stat.S_IFDIR | perm))

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.entries.append(_Entry(name, stat.S_IFREG | perm, data))

    def symlink(self, name: str, target: str) -> None:
        self.entries.append(_Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.entries.append(_Entry(name, stat.S_IFCHR | perm, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        for ino, e in enumerate([*self.entries, _Entry("TRAILER!!!", 0)], start=1):
            name = e.name.encode() + b"\0"
            fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                      len(name), 0)
            out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
            out.write(name)
            out.write(b"\0" * (-(110 + len(name)) % 4))
            out.write(e.data)
            out.write(b"\0" * (-len(e.data) % 4))
        return out.getvalue()


def _is_static(elf: bytes) -> bool:
    """True if an ELF64 file has no PT_INTERP program header (runs without a loader)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(elf[off:off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/sh`` ...) as the busybox binary itself lists them."""
    r = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise VtdxError(f"{busybox} --list-full failed: {r.stderr.strip()[:100]}")
    return [a.strip() for a in r.stdout.split() if a.strip()]


def build(init: Path = INIT, busybox: Path = BUSYBOX) -> bytes:
    """The gzip-compressed newc archive."""
    try:
        bb = busybox.read_bytes()
        init_text = init.read_bytes()
    except OSError as e:
        hint = " (install busybox-static)" if busybox.name == "busybox" else ""
        raise VtdxError(f"initramfs: {e}{hint}") from None
    if not _is_static(bb):
        raise VtdxError(f"{busybox} is not a static x86-64 binary (install busybox-static)")
    arc = Cpio()
    for d in DIRS:
        arc.dir(d)
    arc.chardev("dev/console", 5, 1)
    arc.chardev("dev/null", 1, 3, 0o666)
    arc.file("bin/busybox", bb, 0o755)
    for path in applets(busybox):
        if path != "bin/busybox" and "/" in path:
            arc.symlink(path, "/bin/busybox")
    arc.file("init", init_text, 0o755)
    return gzip.compress(arc.to_bytes(), compresslevel=6, mtime=0)


def ensure_initramfs(cache: Path | None = None, log: Log | None = None,
                     init: Path = INIT, busybox: Path = BUSYBOX) -> Path:
    """Path of the cached initramfs for the current init script and busybox; build if new."""
    h = hashlib.sha256(LAYOUT.encode())
    for p in (init, busybox):
        try:
            h.update(p.read_bytes())
        except OSError as e:
            raise VtdxError(f"initramfs: {e}") from None
    out = cache_dir(cache) / "initramfs" / f"vtdx-{h.hexdigest()[:16]}.cpio.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")   # parallel builders write their own
        tmp.write_bytes(build(init, busybox))
        tmp.replace(out)
        if log:
            log(f"initramfs built: {out}")
    return out


def with_files(base: Path, files: dict[str, bytes], cache: Path | None = None,
               tag: str = "extra") -> Path:
    """``base`` with ``files`` (path in the guest -> contents, executable) appended as a
    second cpio archive, cached by content.

    Linux unpacks concatenated archives one after the other into the same rootfs, so the
    first is neither rebuilt nor changed. Used for the in-guest payloads ``vtdx run
    --checks kvm`` runs.
    """
    h = hashlib.sha256(base.name.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    out = cache_dir(cache) / "initramfs" / f"{tag}-{h.hexdigest()[:16]}.cpio.gz"
    if out.is_file():
        return out
    arc = Cpio()
    made: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                arc.dir(d)
                made.add(d)
        arc.file(name, files[name], 0o755)
    first = base.read_bytes()
    first += b"\0" * (-len(first) % 4)  # the unpacker skips zero padding between archives
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(first + gzip.compress(arc.to_bytes(), compresslevel=6, mtime=0))
    tmp.rename(out)
    return out
