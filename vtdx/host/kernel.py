"""Build the slim Linux TDX-host kernel that vtdx boots.

The default source is Debian's ``linux-source-7.3`` package from trixie-backports, fetched
from the mirror this machine's apt already uses (so CI and offline caches behave alike); any
other tree can be named instead. Builds are out of tree under ccache, configured as
tinyconfig + ``guest/kernel/tdx-host.config`` + olddefconfig, and the result is checked
option by option because olddefconfig silently drops options whose dependencies are unmet.

Cache layout (under ``vtdx.host.qemu.cache_dir()``)::

    downloads/<package>_<version>_all.deb     verified against the archive's SHA256
    src/linux-source-7.3/                     unpacked tree (+ .vtdx-source identity stamp)
    build/<key>/                              out-of-tree objects (incremental)
    ccache/                                   compiler cache shared by all keys
    kernels/<key>/{bzImage,vmlinux,System.map,config,modules/,info.json}
    kernels/default -> <key>                  the last build of the default source

``key`` hashes the source identity and the config fragment, so a changed fragment or a new
package version gets its own build directory and never reuses stale objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vtdx.errors import VtdxError
from vtdx.host.qemu import _deb822_stanzas, cache_dir, debian_mirror
from vtdx.resources import asset

Log = Callable[[str], None]

FRAGMENT = asset("guest", "kernel", "tdx-host.config")
#: Added on top of FRAGMENT by ``vtdx build-kernel --debug``: lockdep, atomic-sleep and list
#: checks. Its own cache key; never the default kernel.
DEBUG_FRAGMENT = asset("guest", "kernel", "tdx-host-debug.config")
#: Options of FRAGMENT a kernel built elsewhere (``--kernel``, ``--vtdx-kernel``) is checked
#: for, with what is lost without each: named in one line, never silently ignored.
USER_CONFIG_NEEDS: dict[str, str] = {
    "CONFIG_INTEL_TDX_HOST": "no TDX host code: the kernel never initialises TDX",
    "CONFIG_KVM_INTEL_TDX": "KVM cannot create TDs",
    "CONFIG_BUG": "WARN_ON/BUG_ON/KVM_BUG_ON compile to nothing: kernel bugs pass silently",
    "CONFIG_SERIAL_8250_CONSOLE": "no console on ttyS0: vtdx sees nothing",
    "CONFIG_BLK_DEV_INITRD": "the initramfs cannot be used",
    "CONFIG_KALLSYMS": "oops and WARN backtraces carry no symbols",
    "CONFIG_HOTPLUG_CPU": "the CPU hotplug check cannot run",
}
PACKAGE = "linux-source-7.3"
SUITE = "trixie-backports"
#: Architecture indexes searched for the (architecture "all") source package.
ARCHES = ("all", "amd64")
#: Bumped when the build recipe changes in a way that invalidates cached kernels.
RECIPE = "1"
#: make's default -j: the CPUs this process may run on (2 on the CI machine, all of a
#: workstation's); ``vtdx build-kernel --jobs`` sets another.
JOBS = len(os.sched_getaffinity(0)) or 1
STAMP = ".vtdx-source"
ARTIFACTS = ("bzImage", "vmlinux", "System.map", "config")


# --- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSource:
    """A kernel tree and the identity that keys its builds."""

    path: Path
    identity: str
    #: Immutable (a Debian package): cached artifacts for its key can be reused without make.
    immutable: bool


@dataclass(frozen=True)
class DebPackage:
    """One entry of an archive ``Packages`` index."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int


def parse_packages_index(text: str, name: str) -> list[DebPackage]:
    """Entries for package ``name`` in a Debian ``Packages`` file."""
    out = []
    for st in _deb822_stanzas(text):
        if st.get("package") != name:
            continue
        try:
            out.append(DebPackage(name, st["version"], st["filename"], st["sha256"],
                                  int(st.get("size", "0"))))
        except KeyError as e:
            raise VtdxError(f"Packages index entry for {name} lacks field {e}") from None
    return out


def _compare_versions(a: str, b: str) -> int:
    """Debian version ordering (dpkg's own rules, via dpkg)."""
    if a == b:
        return 0
    r = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
    return -1 if r.returncode == 0 else 1


def newest(packages: Iterable[DebPackage]) -> DebPackage | None:
    pkgs = list(packages)
    if not pkgs:
        return None
    def cmp(x: DebPackage, y: DebPackage) -> int:
        return _compare_versions(x.version, y.version)

    return max(pkgs, key=functools.cmp_to_key(cmp))


def _fetch(url: str, dest: Path | None = None, timeout: float = 60) -> bytes:
    """GET ``url`` into memory, or stream it into ``dest``; errors become one line.

    urllib is imported here: with http.client, email and ssl it costs ~40 ms of every
    `vtdx run` start, which never downloads."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if dest is None:
                return resp.read()
            with open(dest, "wb") as f:
                shutil.copyfileobj(resp, f, 1 << 20)
            return b""
    except (urllib.error.URLError, OSError) as e:
        raise VtdxError(f"download of {url} failed: {e}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DebianSource:
    """Debian's ``linux-source-7.3``: resolve in the archive index, download, verify, unpack."""

    def __init__(self, cache: Path, log: Log, mirror: str | None = None,
                 package: str = PACKAGE, suite: str = SUITE) -> None:
        self.cache = cache
        self.log = log
        self._mirror = mirror
        self.package = package
        self.suite = suite
        self.tree = cache / "src" / package

    def cached(self) -> KernelSource | None:
        """The unpacked tree if a previous run left a complete one (no network needed)."""
        stamp = self.tree / STAMP
        if stamp.is_file() and (self.tree / "Makefile").is_file():
            return KernelSource(self.tree, stamp.read_text().strip(), immutable=True)
        return None

    def resolve(self) -> DebPackage:
        """The newest ``package`` in the suite's main indexes on the apt mirror."""
        mirror = self._mirror or debian_mirror()
        found: list[DebPackage] = []
        for arch in ARCHES:
            url = f"{mirror}/dists/{self.suite}/main/binary-{arch}/Packages.xz"
            try:
                text = lzma.decompress(_fetch(url)).decode("utf-8", "replace")
            except VtdxError:
                continue
            except lzma.LZMAError as e:
                raise VtdxError(f"{url}: corrupt index ({e})") from None
            found += parse_packages_index(text, self.package)
        pkg = newest(found)
        if pkg is None:
            raise VtdxError(f"{self.package} not found in {mirror}/dists/{self.suite}/main "
                            f"(binary-{'/'.join(ARCHES)})")
        return pkg

    def get(self, refresh: bool = False) -> KernelSource:
        """The source tree, downloading and unpacking it on first use (or ``refresh``)."""
        have = self.cached()
        if have and not refresh:
            return have
        with _locked(self.tree.with_name(self.tree.name + ".lock"), self.log, "unpacking"):
            return self._get(refresh)

    def _get(self, refresh: bool) -> KernelSource:
        have = self.cached()
        if have and not refresh:
            return have
        pkg = self.resolve()
        identity = f"debian:{pkg.name}={pkg.version} sha256:{pkg.sha256}"
        if have and have.identity == identity:
            return have
        mirror = self._mirror or debian_mirror()
        deb = self.cache / "downloads" / Path(pkg.filename).name
        deb.parent.mkdir(parents=True, exist_ok=True)
        if not deb.is_file() or _sha256_file(deb) != pkg.sha256:
            self.log(f"downloading {pkg.name} {pkg.version} ({pkg.size >> 20} MiB)")
            part = deb.with_name(deb.name + ".part")
            _fetch(f"{mirror}/{pkg.filename}", part, timeout=600)
            got = _sha256_file(part)
            if got != pkg.sha256:
                part.unlink()
                raise VtdxError(f"{pkg.filename}: SHA256 {got} does not match the archive "
                                f"index ({pkg.sha256})")
            part.rename(deb)
        self.log(f"unpacking {deb.name}")
        self._unpack(deb, identity)
        src = self.cached()
        assert src is not None
        return src

    def _unpack(self, deb: Path, identity: str) -> None:
        """dpkg-deb -x the package, then extract the kernel tarball it ships."""
        self.tree.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.tree.parent) as tmp:
            pkgdir = Path(tmp) / "deb"
            _run(["dpkg-deb", "-x", str(deb), str(pkgdir)], "dpkg-deb -x")
            tarballs = sorted((pkgdir / "usr" / "src").glob("linux-source-*.tar.*"))
            if not tarballs:
                raise VtdxError(f"{deb.name} contains no /usr/src/linux-source-*.tar.*")
            _run(["tar", "-xf", str(tarballs[0]), "-C", tmp], f"tar -xf {tarballs[0].name}")
            top = Path(tmp) / tarballs[0].name.split(".tar.")[0]
            if not (top / "Makefile").is_file():
                raise VtdxError(f"{tarballs[0].name}: no kernel tree at {top.name}/")
            (top / STAMP).write_text(identity + "\n")
            if self.tree.exists():
                shutil.rmtree(self.tree)
            top.rename(self.tree)


@contextlib.contextmanager
def _locked(path: Path, log: Log, what: str):  # noqa: ANN202 - generator context manager
    """Exclusive lock file: a second `vtdx build-kernel` waits instead of racing make."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another vtdx process to finish {what}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def kernel_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL from the top Makefile (no make needed)."""
    try:
        head = (tree / "Makefile").read_text(errors="replace")[:2000]
    except OSError as e:
        raise VtdxError(f"{tree} is not a kernel tree: {e}") from None
    parts = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d+)", head, re.M))
    if len(parts) < 3:
        raise VtdxError(f"{tree}/Makefile: cannot read the kernel version")
    return f"{parts['VERSION']}.{parts['PATCHLEVEL']}.{parts['SUBLEVEL']}"


def local_source(path: Path) -> KernelSource:
    """A user-named tree; identity is its location and version (make handles its edits)."""
    tree = Path(path).expanduser().resolve()
    if not (tree / "Kconfig").is_file() or not (tree / "arch" / "x86").is_dir():
        raise VtdxError(f"{path}: not an x86 Linux source tree (no Kconfig / arch/x86)")
    return KernelSource(tree, f"local:{tree}:{kernel_version(tree)}", immutable=False)


# --- config -----------------------------------------------------------------------------------


def parse_fragment(text: str) -> dict[str, str | None]:
    """{CONFIG_X: value} for ``CONFIG_X=value`` lines, None for ``# CONFIG_X is not set``."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            out[m[1]] = None
    return out


def config_mismatches(fragment: dict[str, str | None], config_text: str) -> list[str]:
    """Fragment options the final .config does not honour, as ``CONFIG_X=want (got ...)``."""
    have = parse_fragment(config_text)
    bad = []
    for opt, want in fragment.items():
        got = have.get(opt)
        if want is None:
            if got not in (None, "n"):
                bad.append(f"{opt} off (got {got})")
        elif got != want:
            bad.append(f"{opt}={want} (got {'unset' if got is None else got})")
    return bad


def missing_for_vtdx(config_text: str) -> list[str]:
    """``CONFIG_X (what is lost)`` for each option of USER_CONFIG_NEEDS a .config lacks."""
    have = parse_fragment(config_text)
    return [f"{opt} ({why})" for opt, why in USER_CONFIG_NEEDS.items()
            if have.get(opt) not in ("y", "m")]


def find_config(*places: Path | None) -> Path | None:
    """The .config of a kernel built elsewhere: in its tree, beside its image or vmlinux, or
    at the top of its build tree (the directory holding arch/x86/boot/bzImage)."""
    for p in places:
        if p is None:
            continue
        p = Path(p)
        top = p.parents[3] if len(p.parents) > 3 else p.parent
        for cand in (p / ".config", p.parent / ".config", p.parent / "config",
                     top / ".config"):
            if cand.is_file():
                return cand
    return None


def build_key(src: KernelSource, fragment_text: str) -> str:
    blob = json.dumps({"source": src.identity, "fragment": fragment_text, "recipe": RECIPE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- build ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelArtifacts:
    """A built kernel in the cache."""

    dir: Path

    @property
    def bzimage(self) -> Path:
        return self.dir / "bzImage"

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def system_map(self) -> Path:
        return self.dir / "System.map"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def modules(self) -> Path:
        return self.dir / "modules"

    def info(self) -> dict[str, object]:
        try:
            return json.loads((self.dir / "info.json").read_text())
        except (OSError, ValueError):
            return {}

    def complete(self) -> bool:
        return all((self.dir / a).is_file() for a in ARTIFACTS) and bool(self.info())


def _run(argv: list[str], what: str, **kw) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise VtdxError(f"{what} failed (exit {r.returncode}): {tail[0]}")


def _first_error(log: Path) -> str:
    """The most telling line of a failed make log, for a one-line report."""
    lines = log.read_text(errors="replace").splitlines()
    for pat in (r"\berror:", r"\*\*\*", r"Error \d+"):
        for line in lines:
            if re.search(pat, line):
                return line.strip()
    return lines[-1].strip() if lines else "(empty log)"


class KernelBuilder:
    """tinyconfig + fragment + olddefconfig, verified; make under ccache; cache the result."""

    def __init__(self, cache: Path | None = None, log: Log = print,
                 fragment: Path = FRAGMENT, jobs: int = JOBS, debug: bool = False) -> None:
        self.cache = cache_dir(cache)
        self.log = log
        self.fragment_path = fragment
        self.jobs = max(1, jobs)
        self.debug = debug
        try:
            self.fragment_text = fragment.read_text()
            if debug:  # later lines win: the debug options are applied over the base ones
                self.fragment_text += DEBUG_FRAGMENT.read_text()
        except OSError as e:
            raise VtdxError(f"kernel config fragment: {e}") from None
        self.fragment = parse_fragment(self.fragment_text)

    def key(self, src: KernelSource) -> str:
        return build_key(src, self.fragment_text)

    def artifacts(self, src: KernelSource) -> KernelArtifacts:
        return KernelArtifacts(self.cache / "kernels" / self.key(src))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CCACHE_DIR"] = str(self.cache / "ccache")
        # Paths under the cache become relative, so every build/<key> shares ccache hits.
        env["CCACHE_BASEDIR"] = str(self.cache)
        env.setdefault("CCACHE_MAXSIZE", "5G")
        env["KBUILD_BUILD_TIMESTAMP"] = "vtdx"
        env["KBUILD_BUILD_USER"] = "vtdx"
        env["KBUILD_BUILD_HOST"] = "vtdx"
        return env

    def _make(self, src: KernelSource, out: Path, *targets: str, log: Path | None = None,
              progress: bool = False, extra: Iterable[str] = ()) -> None:
        argv = ["make", "-C", str(src.path), f"O={out}", f"-j{self.jobs}", "CC=ccache gcc",
                "HOSTCC=gcc", *extra, *targets]
        logf = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=self.env())
        except OSError as e:
            raise VtdxError(f"cannot run make: {e}") from None
        assert proc.stdout is not None
        tail: list[str] = []
        units, t0, last = 0, time.monotonic(), time.monotonic()
        with proc:
            for line in proc.stdout:
                if not isinstance(logf, int):
                    logf.write(line)
                tail = (tail + [line])[-40:]
                if line.startswith(("  CC ", "  AS ")):
                    units += 1
                if progress and time.monotonic() - last >= 20:
                    last = time.monotonic()
                    self.log(f"  {time.monotonic() - t0:4.0f} s, {units} units compiled, "
                             f"now {line.strip()[:70]}")
        if not isinstance(logf, int):
            logf.close()
        if proc.returncode:
            where = f" (log: {log})" if log else ""
            msg = _first_error(log) if log else (tail[-1].strip() if tail else "")
            raise VtdxError(f"make {' '.join(targets)} failed: {msg}{where}")

    def configure(self, src: KernelSource, out: Path) -> None:
        """Write and verify ``out/.config``; reconfigure only if the check fails."""
        cfg = out / ".config"
        if cfg.is_file() and not config_mismatches(self.fragment, cfg.read_text()):
            return
        extra = " + tdx-host-debug.config" if self.debug else ""
        self.log(f"configuring: tinyconfig + guest/kernel/tdx-host.config{extra} + olddefconfig")
        log = out / "build.log"
        self._make(src, out, "tinyconfig", log=log)
        merged = cfg.read_text()
        # Fragment lines win: drop what the fragment sets, then append it (merge_config.sh's rule).
        names = set(self.fragment)
        kept = [ln for ln in merged.splitlines()
                if not any(re.match(rf"(# )?{n}[= ]", ln) for n in names)]
        cfg.write_text("\n".join(kept) + "\n" + self.fragment_text)
        self._make(src, out, "olddefconfig", log=log)
        bad = config_mismatches(self.fragment, cfg.read_text())
        if bad:
            raise VtdxError("kernel config: olddefconfig dropped required options "
                            f"(unmet dependencies?): {', '.join(bad)}")

    def build(self, src: KernelSource, force: bool = False) -> KernelArtifacts:
        """Build (or reuse) the kernel for ``src``; returns its cached artifacts."""
        lock = self.cache / "build" / f"{self.key(src)}.lock"
        with _locked(lock, self.log, "this kernel build"):
            return self._build(src, force)

    def _build(self, src: KernelSource, force: bool) -> KernelArtifacts:
        art = self.artifacts(src)
        if art.complete() and src.immutable and not force:
            self.log(f"kernel cached: {art.dir}")
            return art
        key = art.dir.name
        out = self.cache / "build" / key
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        self.log(f"building Linux {kernel_version(src.path)} from {src.path} in {out}")
        t0 = time.monotonic()
        self.configure(src, out)
        t_cfg = time.monotonic() - t0
        self.log(f"compiling (make -j{self.jobs} bzImage modules, ccache in "
                 f"{self.cache / 'ccache'}); log: {out / 'build.log'}")
        self._make(src, out, "bzImage", "modules", log=out / "build.log", progress=True)
        t_build = time.monotonic() - t0
        self._install(src, out, art, t_cfg, t_build)
        self.log(f"kernel built in {t_build:.0f} s: {art.dir}")
        return art

    def _install(self, src: KernelSource, out: Path, art: KernelArtifacts,
                 t_cfg: float, t_build: float) -> None:
        tmp = art.dir.with_name(art.dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shutil.copy2(out / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
        shutil.copy2(out / "vmlinux", tmp / "vmlinux")
        shutil.copy2(out / "System.map", tmp / "System.map")
        shutil.copy2(out / ".config", tmp / "config")
        self._make(src, out, "modules_install", log=out / "build.log",
                   extra=(f"INSTALL_MOD_PATH={tmp / 'modules'}", "INSTALL_MOD_STRIP=1",
                          "DEPMOD=true"))
        release = (out / "include" / "config" / "kernel.release").read_text().strip()
        info = {"key": art.dir.name, "source": src.identity, "path": str(src.path),
                "release": release, "fragment": str(self.fragment_path),
                "flavour": "debug" if self.debug else "default",
                "configure_s": round(t_cfg, 1), "build_s": round(t_build, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        if art.dir.exists():
            shutil.rmtree(art.dir)
        tmp.rename(art.dir)


def default_link(cache: Path | None = None) -> Path:
    return cache_dir(cache) / "kernels" / "default"


def set_default(art: KernelArtifacts) -> None:
    """Point ``kernels/default`` at ``art`` (atomically) so ``vtdx run`` finds it offline."""
    link = art.dir.parent / "default"
    tmp = art.dir.parent / ".default.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(art.dir.name)
    os.replace(tmp, link)


def default_kernel(cache: Path | None = None) -> KernelArtifacts | None:
    """The kernel ``vtdx build-kernel`` built from the default source with the current
    fragment; None if there is none (or only one built from an older fragment)."""
    src = DebianSource(cache_dir(cache), lambda m: None).cached()
    if src is None:
        return None
    # By key, not only through the link: trees with different fragments share one cache and
    # the link names whichever was built last.
    art = KernelBuilder(cache, lambda m: None).artifacts(src)
    return art if art.complete() else None


def build_kernel(source: Path | None = None, *, force: bool = False, refresh: bool = False,
                 cache: Path | None = None, log: Log = print,
                 debug: bool = False, jobs: int = JOBS) -> KernelArtifacts:
    """The ``vtdx build-kernel`` flow: pick the source, build or reuse, record the default
    (the debug flavour is never the default)."""
    builder = KernelBuilder(cache, log, debug=debug, jobs=jobs)
    if source is None:
        src = DebianSource(builder.cache, log).get(refresh=refresh)
    else:
        src = local_source(source)
    art = builder.build(src, force=force)
    if source is None and not debug:
        set_default(art)
    return art
