"""Locate or provision the QEMU that runs vtdx guests, and build the TCG plugin for it.

vtdx needs QEMU >= 11.1 whose plugin API exports ``qemu_plugin_set_pc`` (the plugin skips
the emulated instruction with it). A system QEMU that qualifies is used as is; otherwise
``setup`` builds a private Debian trixie root (debootstrap minbase + qemu-system-x86 from
trixie-backports) under the cache and runs that QEMU through the root's own dynamic loader,
so nothing is installed on the host. ``setup`` records its choice in ``runtime.json`` so
``QemuRuntime.find`` is cheap and never provisions anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.resources import asset, cache_root

MIN_VERSION = (11, 1)
SUITE = "trixie"
BACKPORTS = f"{SUITE}-backports"
QEMU_PACKAGE = "qemu-system-x86"
ROOT_NAME = "qemu-root"
STAMP_NAME = ".vtdx-stamp"
STATE_NAME = "runtime.json"
PLUGIN_NAME = "vtdx-plugin.so"
#: Where the plugin sources live: every *.c there is one part of the plugin, compiled together
#: into one shared object; the *.h there (the internal vtdx.h, wire.h, qemu_api.h) are theirs.
PLUGIN_SRC = asset("qemu_plugin")
PLUGIN_CFLAGS = ("-shared", "-fPIC", "-O2", "-g", "-Wall", "-Wextra")

# Paths inside a provisioned root.
_LOADER = "usr/lib64/ld-linux-x86-64.so.2"
_LIBDIR = "usr/lib/x86_64-linux-gnu"
_QEMU = "usr/bin/qemu-system-x86_64"
_FIRMWARE = ("usr/share/seabios", "usr/share/qemu")
_MODULES = "usr/lib/x86_64-linux-gnu/qemu"

Log = Callable[[str], None]


#: The vtdx cache (``cache`` if given, else $VTDX_CACHE, else ~/.cache/vtdx), under the name
#: the host tooling uses.
cache_dir = cache_root


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) from ``qemu-system-x86_64 --version`` output."""
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise VtdxError(f"cannot parse QEMU version from {text.strip()[:80]!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


# --- mirror discovery ----------------------------------------------------------------------


def _deb822_stanzas(text: str) -> Iterable[dict[str, str]]:
    """Stanzas of a deb822 file as {lower-case field: value}; comments and folding handled."""
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def _apt_entries(sources_dir: Path, sources_list: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) for every enabled binary ``deb`` source in the apt configuration."""
    entries: list[tuple[str, list[str]]] = []
    for f in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for st in _deb822_stanzas(f.read_text(errors="replace")):
            if "deb" not in st.get("types", "").split() or st.get("enabled", "yes") == "no":
                continue
            for uri in st.get("uris", "").split():
                entries.append((uri, st.get("suites", "").split()))
    lists = [sources_list] + (sorted(sources_dir.glob("*.list")) if sources_dir.is_dir() else [])
    for f in lists:
        if not f.is_file():
            continue
        for text in f.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", " ", text.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    return entries


def debian_mirror(
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
    sources_list: Path = Path("/etc/apt/sources.list"),
) -> str:
    """The Debian archive URI this machine's apt uses (not the security archive)."""
    candidates = [
        uri.rstrip("/")
        for uri, suites in _apt_entries(sources_dir, sources_list)
        if uri.startswith(("http://", "https://", "file:/"))
        and "security" not in uri
        and not any(s.endswith("-security") or "/updates" in s for s in suites)
    ]
    # Prefer a URI that looks like the main archive (path ending in /debian).
    candidates.sort(key=lambda u: not u.endswith("/debian"))
    if not candidates:
        raise VtdxError(
            f"no Debian archive found in {sources_dir}/*.sources or {sources_list}; "
            "configure apt first"
        )
    return candidates[0]


# --- the runtime ----------------------------------------------------------------------


@dataclass(frozen=True)
class QemuRuntime:
    """A usable QEMU (system binary or private root) plus the plugin built for it."""

    qemu: Path
    version: tuple[int, int, int]
    root: Path | None = None
    plugin_path: Path | None = None

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def command(self) -> list[str]:
        """argv prefix that starts this QEMU (loader and firmware dirs included)."""
        if self.root is None:
            return [str(self.qemu)]
        r = self.root
        argv = [str(r / _LOADER), "--library-path", str(r / _LIBDIR), str(self.qemu)]
        for d in _FIRMWARE:
            argv += ["-L", str(r / d)]
        return argv

    def env(self) -> dict[str, str]:
        """Extra environment for QEMU: its loadable modules live inside the private root."""
        return {} if self.root is None else {"QEMU_MODULE_DIR": str(self.root / _MODULES)}

    def plugin_args(self, *options: str) -> list[str]:
        """``-plugin`` arguments loading the vtdx plugin with ``key=value`` options."""
        if self.plugin_path is None:
            raise VtdxError("the vtdx TCG plugin is not built; run `vtdx setup`")
        return ["-plugin", ",".join([str(self.plugin_path), *options])]

    @classmethod
    def find(cls, cache: Path | None = None, *, log: Log | None = None) -> QemuRuntime:
        """The runtime ``vtdx setup`` provisioned; raises VtdxError if there is none.

        If the plugin sources changed since setup, the plugin is rebuilt here (seconds), so
        editing qemu_plugin/ never runs a stale plugin.
        """
        c = cache_dir(cache)
        try:
            state = json.loads((c / STATE_NAME).read_text())
            qemu = Path(state["qemu"])
            root = Path(state["root"]) if state.get("root") else None
            version = tuple(int(v) for v in state["version"])
            recorded = Path(state["plugin_src"]) if state.get("plugin_src") else None
        except (OSError, ValueError, KeyError, TypeError):
            raise VtdxError(f"QEMU runtime not provisioned in {c}; run `vtdx setup`") from None
        if not qemu.is_file() or (root is not None and not (root / _LOADER).is_file()):
            raise VtdxError(f"QEMU runtime in {c} is missing {qemu}; run `vtdx setup`")
        # The sources `vtdx setup` was given; if that installation is gone (a removed wheel or
        # checkout), the sources shipped with the vtdx that is running now.
        src = recorded if recorded is not None and recorded.is_dir() else PLUGIN_SRC
        plugin = plugin_output(c, src)
        if plugin is not None and not plugin.is_file():
            plugin = build_plugin(c, qemu, log or _stderr_log, src)
        return cls(qemu, version, root, plugin)  # type: ignore[arg-type]


def _stderr_log(msg: str) -> None:
    print(f"vtdx: {msg}", file=sys.stderr, flush=True)


def run_step(argv: list[str], what: str, *, timeout: float = 1800, **kw) -> str:
    """Run a step; on failure raise one readable line with the tail of its output."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except OSError as e:
        raise VtdxError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise VtdxError(f"{what}: timed out after {timeout:.0f} s") from None
    if p.returncode != 0:
        lines = (p.stderr.strip() or p.stdout.strip()).splitlines() or ["no output"]
        line = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        raise VtdxError(f"{what} failed (exit {p.returncode}): {line.strip()}")
    return p.stdout


def _probe(runtime: QemuRuntime) -> tuple[int, int, int]:
    """Run QEMU --version through the runtime's argv; the check that the result works."""
    out = run_step([*runtime.command(), "--version"],
               f"{runtime.qemu} --version", timeout=60, env={**os.environ, **runtime.env()})
    return parse_qemu_version(out)


def dynamic_symbols(binary: Path, *, undefined: bool) -> set[str]:
    """Names in the dynamic symbol table (``nm -D``), defined or undefined ones."""
    flag = "--undefined-only" if undefined else "--defined-only"
    out = run_step(["nm", "-D", flag, str(binary)], f"nm -D {binary}", timeout=60)
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def system_qemu(log: Log) -> QemuRuntime | None:
    """The system QEMU if it is new enough and exports qemu_plugin_set_pc, else None."""
    path = shutil.which("qemu-system-x86_64")
    if not path:
        log("no system qemu-system-x86_64")
        return None
    rt = QemuRuntime(Path(path), (0, 0, 0))
    try:
        version = _probe(rt)
        has_set_pc = "qemu_plugin_set_pc" in dynamic_symbols(Path(path), undefined=False)
    except VtdxError as e:
        log(f"system QEMU {path} unusable: {e}")
        return None
    if version[:2] < MIN_VERSION or not has_set_pc:
        log(f"system QEMU {path} is {'.'.join(map(str, version))}"
            f"{'' if has_set_pc else ' without qemu_plugin_set_pc'}; need >= 11.1 with it")
        return None
    return QemuRuntime(Path(path), version)


# --- private root ----------------------------------------------------------------------


def _root_runtime(root: Path) -> QemuRuntime:
    return QemuRuntime(root / _QEMU, (0, 0, 0), root)


def validate_root(root: Path) -> QemuRuntime | None:
    """The root's runtime if its QEMU runs and is new enough, else None."""
    if not (root / _LOADER).is_file() or not (root / _QEMU).is_file():
        return None
    try:
        version = _probe(_root_runtime(root))
    except VtdxError:
        return None
    if version[:2] < MIN_VERSION:
        return None
    return QemuRuntime(root / _QEMU, version, root)


def _write_stamp(root: Path, version: tuple[int, int, int], mirror: str | None) -> None:
    stamp = {"version": list(version), "mirror": mirror, "suite": BACKPORTS,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (root / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")


def _remove_root(root: Path) -> None:
    """rm -rf a root, first unmounting anything a failed debootstrap left mounted in it."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    prefix = str(root.resolve()) + "/"
    inside = [m.split()[1] for m in mounts if len(m.split()) > 1
              and m.split()[1].startswith(prefix)]
    for mnt in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def build_root(root: Path, mirror: str, log: Log) -> QemuRuntime:
    """debootstrap a trixie root with backports QEMU into root.tmp, then rename it to root."""
    if os.geteuid() != 0:
        raise VtdxError("provisioning the QEMU root needs root (debootstrap, chroot); "
                        "run `sudo vtdx setup` or install QEMU >= 11.1")
    if not shutil.which("debootstrap"):
        raise VtdxError("debootstrap not found; apt-get install debootstrap")
    tmp = root.with_name(root.name + ".tmp")
    _remove_root(tmp)
    root.parent.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, list[str]]] = [
        (f"debootstrap --variant=minbase {SUITE} from {mirror}",
         ["debootstrap", "--variant=minbase", SUITE, str(tmp), mirror]),
        ("apt-get update (trixie + trixie-backports)",
         ["chroot", str(tmp), "apt-get", "update", "-q"]),
        (f"apt-get install {QEMU_PACKAGE} from {BACKPORTS}",
         ["chroot", str(tmp), "apt-get", "install", "-y", "-q", "--no-install-recommends",
          "-t", BACKPORTS, QEMU_PACKAGE]),
    ]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    try:
        for i, (what, argv) in enumerate(steps):
            t0 = time.monotonic()
            log(f"[{i + 1}/{len(steps)}] {what}")
            run_step(argv, what, env=env)
            if i == 0:
                with (tmp / "etc/apt/sources.list").open("a") as f:
                    f.write(f"deb {mirror} {BACKPORTS} main\n")
            log(f"      done in {time.monotonic() - t0:.1f} s")
    except BaseException:
        _remove_root(tmp)  # a half-built root is never adopted anyway
        raise
    # The chroot apt cache is 100+ MB of .debs nobody needs again.
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    rt = validate_root(tmp)
    if rt is None:
        raise VtdxError(f"the QEMU in {tmp} does not run or is older than 11.1")
    _write_stamp(tmp, rt.version, mirror)
    if root.exists():
        old = root.with_name(root.name + ".old")
        _remove_root(old)
        root.rename(old)
        _remove_root(old)
    tmp.rename(root)
    return validate_root(root) or rt


def ensure_root(cache: Path, log: Log, mirror: str | None = None) -> QemuRuntime:
    """Adopt a valid root under cache, or (re)build it."""
    root = cache / ROOT_NAME
    if root.exists():
        rt = validate_root(root)
        if rt is not None:
            if not (root / STAMP_NAME).is_file():
                _write_stamp(root, rt.version, None)
            log(f"QEMU root {root} OK (QEMU {rt.version_str})")
            return rt
        log(f"QEMU root {root} is broken or too old; rebuilding")
    mirror = mirror or debian_mirror()
    return build_root(root, mirror, log)


# --- plugin ----------------------------------------------------------------------


def plugin_sources(src: Path = PLUGIN_SRC) -> list[Path]:
    """Every C source and header of the plugin: the build compiles the *.c, the cache key
    covers all of them (a header edit rebuilds too)."""
    return sorted(p for p in src.glob("*.[ch]") if p.is_file()) if src.is_dir() else []


def _plugin_hash(sources: list[Path], cflags: list[str]) -> str:
    h = hashlib.sha256()
    for p in sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(cflags).encode())
    return h.hexdigest()[:16]


def _glib_cflags() -> list[str]:
    return run_step(["pkg-config", "--cflags", "glib-2.0"], "pkg-config --cflags glib-2.0 "
                "(apt-get install libglib2.0-dev pkg-config)", timeout=60).split()


def plugin_output(cache: Path, src: Path = PLUGIN_SRC) -> Path | None:
    """Where the plugin for the current sources is (or would be) built; None if no sources."""
    sources = plugin_sources(src)
    if not any(p.suffix == ".c" for p in sources):
        return None
    flags = list(PLUGIN_CFLAGS) + sorted(os.environ.get("VTDX_PLUGIN_CFLAGS", "").split())
    return cache / "plugin" / _plugin_hash(sources, flags) / PLUGIN_NAME


def build_plugin(cache: Path, qemu: Path, log: Log, src: Path = PLUGIN_SRC) -> Path:
    """Compile the plugin (cached by source hash) and check its imports against QEMU."""
    out = plugin_output(cache, src)
    if out is None:
        raise VtdxError(f"no plugin sources (*.c) in {src}")
    if out.is_file():
        log(f"plugin up to date: {out}")
    else:
        t0 = time.monotonic()
        sources = [p for p in plugin_sources(src) if p.suffix == ".c"]
        extra = os.environ.get("VTDX_PLUGIN_CFLAGS", "").split()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        argv = ["gcc", *PLUGIN_CFLAGS, *extra, *_glib_cflags(), f"-I{src}", "-o", str(tmp),
                *map(str, sources)]
        log(f"building plugin from {src} -> {out}")
        try:
            run_step(argv, "compiling the TCG plugin", timeout=300)
            tmp.rename(out)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"      done in {time.monotonic() - t0:.1f} s")
    check_plugin_symbols(out, qemu)
    return out


def check_plugin_symbols(plugin: Path, qemu: Path) -> None:
    """Every qemu_plugin_* the plugin imports must be exported by this QEMU binary."""
    wanted = {s for s in dynamic_symbols(plugin, undefined=True) if s.startswith("qemu_plugin_")}
    missing = wanted - dynamic_symbols(qemu, undefined=False)
    if missing:
        raise VtdxError(f"{qemu} does not export {', '.join(sorted(missing))} used by {plugin}")


# --- setup ----------------------------------------------------------------------


def setup(cache: Path | None, log: Log, *, mirror: str | None = None,
          plugin_src: Path = PLUGIN_SRC, use_system: bool = True) -> QemuRuntime:
    """Make the runtime usable (idempotent): QEMU, version check, plugin; record the result."""
    c = cache_dir(cache)
    c.mkdir(parents=True, exist_ok=True)
    rt = system_qemu(log) if use_system else None
    if rt is not None:
        log(f"using system QEMU {rt.qemu} ({rt.version_str})")
    else:
        rt = ensure_root(c, log, mirror)
    if plugin_output(c, plugin_src) is None:
        log(f"WARNING: no plugin sources (*.c) in {plugin_src}; QEMU only, no vtdx plugin")
        plugin = None
    else:
        plugin = build_plugin(c, rt.qemu, log, plugin_src)
    rt = QemuRuntime(rt.qemu, rt.version, rt.root, plugin)
    state = {"qemu": str(rt.qemu), "root": str(rt.root) if rt.root else None,
             "version": list(rt.version), "plugin_src": str(plugin_src)}
    tmp = c / f".{STATE_NAME}.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(c / STATE_NAME)
    log(f"QEMU {rt.version_str} ready: {' '.join(rt.command())}")
    return rt
