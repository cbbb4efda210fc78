"""Kernel build pieces: archive index, source download/verify/unpack, config fragment checks."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from vtdx.errors import VtdxError
from vtdx.host import kernel as kb

INDEX = """\
Package: linux-source-7.3
Version: 7.3.2-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.3_7.3.2-1~bpo13+1_all.deb
Size: 10
SHA256: {a}

Package: rtla
Version: 7.3.4-1~bpo13+1
Filename: pool/main/l/linux/rtla_7.3.4-1~bpo13+1_amd64.deb
Size: 10
SHA256: {a}

Package: linux-source-7.3
Version: 7.3.10-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.3_7.3.10-1~bpo13+1_all.deb
Size: 10
SHA256: {b}
"""


def test_index_picks_newest_by_debian_version_rules() -> None:
    text = INDEX.format(a="a" * 64, b="b" * 64)
    pkgs = kb.parse_packages_index(text, "linux-source-7.3")
    assert [p.version for p in pkgs] == ["7.3.2-1~bpo13+1", "7.3.10-1~bpo13+1"]
    # 7.3.10 > 7.3.2 only under dpkg's ordering (a string sort gets it wrong).
    assert kb.newest(pkgs).version == "7.3.10-1~bpo13+1"
    assert kb.newest([]) is None
    assert kb._compare_versions("7.3.4-1~bpo13+1", "7.3.4-1") < 0  # ~ sorts first


def test_fragment_parse_and_mismatch() -> None:
    frag = kb.parse_fragment("# c\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n")
    assert frag == {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": None}
    good = "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n"
    assert kb.config_mismatches(frag, good) == []
    # olddefconfig dropping A (unmet dependency) and turning C on must both be reported.
    bad = "# CONFIG_A is not set\nCONFIG_B=m\nCONFIG_C=y\n"
    assert kb.config_mismatches(frag, bad) == ["CONFIG_A=y (got unset)", "CONFIG_C off (got y)"]


def test_repo_fragment_has_what_a_tdx_host_needs() -> None:
    frag = kb.parse_fragment(kb.FRAGMENT.read_text())
    for opt in ("INTEL_TDX_HOST", "KVM", "KVM_INTEL", "KVM_INTEL_TDX", "X86_X2APIC", "X86_MCE",
                "CONTIG_ALLOC", "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "RD_GZIP", "KALLSYMS",
                "HOTPLUG_CPU", "DEVTMPFS", "PROC_FS", "SYSFS", "SMP", "ACPI"):
        assert frag.get(f"CONFIG_{opt}") == "y", opt
    assert frag["CONFIG_HIBERNATION"] is None
    # The kernel reports its own bugs: WARN_ON/BUG_ON/KVM_BUG_ON need CONFIG_BUG.
    for opt in ("BUG", "DEBUG_BUGVERBOSE", "KVM_PROVE_MMU"):
        assert frag.get(f"CONFIG_{opt}") == "y", opt


def test_debug_flavour_is_a_kernel_of_its_own(tmp_path: Path) -> None:
    src = kb.KernelSource(tmp_path, "debian:linux-source-7.3=1", True)
    base = kb.KernelBuilder(tmp_path, lambda m: None)
    debug = kb.KernelBuilder(tmp_path, lambda m: None, debug=True)
    assert debug.key(src) != base.key(src)
    for opt in ("PROVE_LOCKING", "DEBUG_ATOMIC_SLEEP", "DEBUG_LIST", "BUG", "INTEL_TDX_HOST"):
        assert debug.fragment.get(f"CONFIG_{opt}") == "y", opt


def test_make_runs_as_many_jobs_as_cpus_unless_told_and_jobs_do_not_change_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert kb.JOBS == len(os.sched_getaffinity(0))
    seen: list[list[str]] = []

    def popen(argv: list[str], **kw: object) -> None:
        seen.append(argv)
        raise OSError("recorded")

    monkeypatch.setattr(kb.subprocess, "Popen", popen)
    src = kb.KernelSource(tmp_path, "debian:linux-source-7.3=1", True)
    default, three = kb.KernelBuilder(tmp_path, lambda m: None), \
        kb.KernelBuilder(tmp_path, lambda m: None, jobs=3)
    for builder in (default, three):
        with pytest.raises(VtdxError, match="cannot run make"):
            builder._make(src, tmp_path / "out", "bzImage")
    assert [a for a in seen[0] if a.startswith("-j")] == [f"-j{kb.JOBS}"]
    assert [a for a in seen[1] if a.startswith("-j")] == ["-j3"]
    assert default.key(src) == three.key(src)


def test_a_users_config_is_checked_for_what_vtdx_relies_on() -> None:
    cfg = kb.FRAGMENT.read_text()
    assert kb.missing_for_vtdx(cfg) == []
    tiny = cfg.replace("CONFIG_BUG=y", "# CONFIG_BUG is not set").replace(
        "CONFIG_KVM_INTEL_TDX=y", "")
    missing = kb.missing_for_vtdx(tiny)
    assert [m.split()[0] for m in missing] == ["CONFIG_KVM_INTEL_TDX", "CONFIG_BUG"]
    assert "compile to nothing" in missing[1]


def test_find_config_beside_the_image_or_in_the_build_tree(tmp_path: Path) -> None:
    boot = tmp_path / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(b"k")
    assert kb.find_config(boot / "bzImage") is None
    (tmp_path / ".config").write_text("CONFIG_BUG=y\n")
    assert kb.find_config(None, boot / "bzImage") == tmp_path / ".config"


def test_build_key_depends_on_source_and_fragment(tmp_path: Path) -> None:
    a = kb.KernelSource(tmp_path, "debian:linux-source-7.3=1", True)
    b = kb.KernelSource(tmp_path, "debian:linux-source-7.3=2", True)
    assert kb.build_key(a, "CONFIG_X=y\n") != kb.build_key(b, "CONFIG_X=y\n")
    assert kb.build_key(a, "CONFIG_X=y\n") != kb.build_key(a, "CONFIG_X=n\n")
    assert kb.build_key(a, "CONFIG_X=y\n") == kb.build_key(a, "CONFIG_X=y\n")


def _fake_archive(root: Path, version: str) -> tuple[str, Path]:
    """A file:// Debian archive holding a tiny linux-source-7.3 .deb (real dpkg-deb format)."""
    pkg = root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: linux-source-7.3\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: t <t@example.invalid>\nDescription: test\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in (("Makefile", b"VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 9\n"),
                           ("Kconfig", b"")):
            info = tarfile.TarInfo(f"linux-source-7.3/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (pkg / "usr" / "src").mkdir(parents=True)
    (pkg / "usr" / "src" / "linux-source-7.3.tar.xz").write_bytes(buf.getvalue())
    rel = f"pool/main/l/linux/linux-source-7.3_{version}_all.deb"
    deb = root / "mirror" / rel
    deb.parent.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-Zxz", "--root-owner-group", "-b", str(pkg), str(deb)],
                   check=True, capture_output=True)
    sha = hashlib.sha256(deb.read_bytes()).hexdigest()
    index = (f"Package: linux-source-7.3\nVersion: {version}\nFilename: {rel}\n"
             f"Size: {deb.stat().st_size}\nSHA256: {sha}\n")
    for arch in kb.ARCHES:
        d = root / "mirror" / "dists" / kb.SUITE / "main" / f"binary-{arch}"
        d.mkdir(parents=True)
        (d / "Packages.xz").write_bytes(lzma.compress(index.encode()))
    return f"file://{root / 'mirror'}", deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_source_download_verify_unpack(tmp_path: Path) -> None:
    mirror, deb = _fake_archive(tmp_path, "7.3.9-1")
    logs: list[str] = []
    src = kb.DebianSource(tmp_path / "cache", logs.append, mirror=mirror)
    assert src.cached() is None
    got = src.get()
    assert got.immutable and (got.path / "Makefile").is_file()
    assert got.identity.startswith("debian:linux-source-7.3=7.3.9-1 sha256:")
    assert kb.kernel_version(got.path) == "7.3.9"
    # Second use needs no archive at all.
    shutil.rmtree(tmp_path / "mirror")
    assert kb.DebianSource(tmp_path / "cache", logs.append, mirror=mirror).get() == got


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_source_rejects_tampered_download(tmp_path: Path) -> None:
    mirror, deb = _fake_archive(tmp_path, "7.3.9-1")
    deb.write_bytes(deb.read_bytes() + b"x")
    src = kb.DebianSource(tmp_path / "cache", lambda m: None, mirror=mirror)
    with pytest.raises(VtdxError, match="SHA256 .* does not match"):
        src.get()
    assert src.cached() is None


def test_missing_package_is_one_line(tmp_path: Path) -> None:
    mirror, _ = _fake_archive(tmp_path, "7.3.9-1")
    src = kb.DebianSource(tmp_path / "cache", lambda m: None, mirror=mirror,
                          package="linux-source-9.9")
    with pytest.raises(VtdxError, match="linux-source-9.9 not found"):
        src.get()


def test_local_source_must_be_a_kernel_tree(tmp_path: Path) -> None:
    with pytest.raises(VtdxError, match="not an x86 Linux source tree"):
        kb.local_source(tmp_path)


def _kernel_tree() -> Path | None:
    tree = kb.cache_dir() / "src" / kb.PACKAGE
    return tree if (tree / "Makefile").is_file() and (tree / kb.STAMP).is_file() else None


@pytest.mark.slow
@pytest.mark.kernel
@pytest.mark.skipif(_kernel_tree() is None, reason="linux-source-7.3 not unpacked yet "
                    "(run `vtdx build-kernel`)")
def test_configure_fails_loudly_on_unmet_dependency(tmp_path: Path) -> None:
    """INTEL_TDX_HOST depends on X86_MCE: asking for the first without the second is an error,
    not a kernel silently built without TDX."""
    frag = tmp_path / "bad.config"
    frag.write_text(kb.FRAGMENT.read_text().replace("CONFIG_X86_MCE=y",
                                                    "# CONFIG_X86_MCE is not set"))
    builder = kb.KernelBuilder(tmp_path / "cache", lambda m: None, fragment=frag)
    src = kb.DebianSource(kb.cache_dir(), lambda m: None).cached()
    assert src is not None
    out = tmp_path / "build"
    out.mkdir()
    with pytest.raises(VtdxError, match=r"CONFIG_INTEL_TDX_HOST=y \(got unset\)"):
        builder.configure(src, out)


@pytest.mark.slow
@pytest.mark.kernel
@pytest.mark.skipif(_kernel_tree() is None, reason="linux-source-7.3 not unpacked yet "
                    "(run `vtdx build-kernel`)")
def test_debug_flavour_configuration_survives_olddefconfig(tmp_path: Path) -> None:
    """Configure only (no compile): lockdep, atomic-sleep and list checks are all honoured."""
    builder = kb.KernelBuilder(tmp_path / "cache", lambda m: None, debug=True)
    src = kb.DebianSource(kb.cache_dir(), lambda m: None).cached()
    assert src is not None
    out = tmp_path / "build"
    out.mkdir()
    builder.configure(src, out)
    have = kb.parse_fragment((out / ".config").read_text())
    for opt in ("PROVE_LOCKING", "LOCKDEP", "DEBUG_ATOMIC_SLEEP", "DEBUG_LIST", "BUG",
                "INTEL_TDX_HOST", "KVM_INTEL_TDX"):
        assert have.get(f"CONFIG_{opt}") == "y", opt


@pytest.mark.kernel
def test_built_default_kernel_has_the_fragment() -> None:
    art = kb.default_kernel()
    if art is None:
        pytest.skip("default kernel not built (run `vtdx build-kernel`)")
    frag = kb.parse_fragment(kb.FRAGMENT.read_text())
    assert kb.config_mismatches(frag, art.config.read_text()) == []
    assert art.info()["source"].startswith("debian:linux-source-7.3=")
    # The TDX host entry points are in the image.
    syms = art.system_map.read_text()
    for sym in ("tdx_enable", "tdx_init", "__seamcall"):
        assert f" {sym}\n" in syms, sym
