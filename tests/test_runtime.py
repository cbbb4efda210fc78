"""QEMU runtime: version parsing, mirror discovery, the provisioned QEMU, plugin build + load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vtdx.errors import VtdxError
from vtdx.host import qemu as qr
from vtdx.resources import patched_unicorn_dir
from vtdx.testing import testguest

# A self-contained plugin (not the vtdx one, which needs a daemon): proves that a plugin
# built by setup loads into the provisioned QEMU and that its API calls resolve.
PROBE_PLUGIN = r"""
#include <glib.h>
#include <stdint.h>
#include <stdio.h>
typedef uint64_t qemu_plugin_id_t;
__attribute__((visibility("default"))) int qemu_plugin_version = 7;
int qemu_plugin_num_vcpus(void);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *),
                                    void *);
static void bye(qemu_plugin_id_t id, void *p) { fprintf(stderr, "probe-plugin exit\n"); }
__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv)
{
    GString *s = g_string_new("probe-plugin loaded");
    fprintf(stderr, "%s argc=%d\n", s->str, argc);
    g_string_free(s, TRUE);
    qemu_plugin_register_atexit_cb(id, bye, NULL);
    return 0;
}
"""


def _runtime() -> qr.QemuRuntime:
    try:
        return qr.QemuRuntime.find()
    except VtdxError as e:
        pytest.fail(f"{e} (scripts/bootstrap does this)")


# --- pure parsing -------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)\nCopyright", (11, 1, 3)),
    ("QEMU emulator version 9.2.0\n", (9, 2, 0)),
    ("QEMU emulator version 10.0 (v10.0-dirty)", (10, 0, 0)),
])
def test_parse_qemu_version(text, want):
    assert qr.parse_qemu_version(text) == want


def test_parse_qemu_version_garbage():
    with pytest.raises(VtdxError, match="cannot parse"):
        qr.parse_qemu_version("qemu-system-x86_64: command not found")


def _apt_tree(tmp_path: Path, sources: dict[str, str], sources_list: str | None) -> tuple:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    for name, text in sources.items():
        (d / name).write_text(text)
    lst = tmp_path / "sources.list"
    if sources_list is not None:
        lst.write_text(sources_list)
    return d, lst


DEB822 = """\
Types: deb
# http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.net/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.net/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822(tmp_path):
    d, lst = _apt_tree(tmp_path, {"debian.sources": DEB822}, None)
    assert qr.debian_mirror(d, lst) == "http://mirror.example.net/debian"


def test_mirror_skips_security_disabled_and_deb_src(tmp_path):
    first = """\
Types: deb
URIs: http://sec.example.net/debian-security/
Suites: trixie-security
Components: main

Types: deb-src
URIs: http://src.example.net/debian
Suites: trixie

Enabled: no
Types: deb
URIs: http://off.example.net/debian
Suites: trixie
"""
    d, lst = _apt_tree(tmp_path, {"a.sources": first, "b.sources": DEB822}, None)
    assert qr.debian_mirror(d, lst) == "http://mirror.example.net/debian"


def test_mirror_from_one_line_sources_list(tmp_path):
    text = ("# comment\n"
            "deb http://security.example.org/debian-security bookworm-security main\n"
            "deb-src http://src.example.org/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example.org/debian/ bookworm main\n")
    d, lst = _apt_tree(tmp_path, {}, text)
    assert qr.debian_mirror(d, lst) == "https://mirror.example.org/debian"


def test_mirror_missing_is_one_readable_error(tmp_path):
    d, lst = _apt_tree(tmp_path, {"x.sources": "Types: deb\nURIs: http://s.example/debian-security"
                                                "\nSuites: trixie-security\n"}, None)
    with pytest.raises(VtdxError, match="no Debian archive"):
        qr.debian_mirror(d, lst)


def test_machine_mirror_is_found():
    """The machine's own apt configuration yields a non-security http(s) archive."""
    uri = qr.debian_mirror()
    assert uri.startswith(("http://", "https://")) and "security" not in uri


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VTDX_CACHE", str(tmp_path / "c"))
    assert qr.cache_dir() == tmp_path / "c"
    assert qr.cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("VTDX_CACHE")
    assert qr.cache_dir() == Path.home() / ".cache" / "vtdx"


def test_find_without_setup_says_run_setup(tmp_path):
    with pytest.raises(VtdxError, match=r"run `vtdx setup`"):
        qr.QemuRuntime.find(tmp_path)


# --- the provisioned QEMU ------------------------------------------------------------------


def test_provisioned_qemu_runs():
    rt = _runtime()
    assert rt.version[:2] >= qr.MIN_VERSION
    p = subprocess.run([*rt.command(), "--version"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **rt.env()})
    assert p.returncode == 0, p.stderr
    assert qr.parse_qemu_version(p.stdout) == rt.version
    assert "qemu_plugin_set_pc" in qr.dynamic_symbols(rt.qemu, undefined=False)
    if rt.root is not None:
        stamp = json.loads((rt.root / qr.STAMP_NAME).read_text())
        assert tuple(stamp["version"]) == rt.version


def test_validate_root_rejects_broken(tmp_path):
    broken = tmp_path / "qemu-root"
    (broken / "usr/lib64").mkdir(parents=True)
    (broken / "usr/lib64/ld-linux-x86-64.so.2").write_text("not a loader")
    (broken / "usr/bin").mkdir(parents=True)
    (broken / "usr/bin/qemu-system-x86_64").write_text("#!/bin/false\n")
    assert qr.validate_root(broken) is None
    assert qr.validate_root(tmp_path / "missing") is None


def _adopting_cache(tmp_path: Path) -> Path:
    """A fresh cache whose qemu-root is the provisioned one (symlink: adopt, no debootstrap)
    and whose patched unicorn is the one built already (no second build)."""
    rt = _runtime()
    if rt.root is None:
        pytest.skip("system QEMU in use: no private root to adopt")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / qr.ROOT_NAME).symlink_to(rt.root)
    (cache / "unicorn").symlink_to(patched_unicorn_dir().parent)
    return cache


def test_setup_adopts_root_builds_plugin_and_is_idempotent(tmp_path):
    cache = _adopting_cache(tmp_path)
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "probe.c").write_text(PROBE_PLUGIN)
    log: list[str] = []
    rt = qr.setup(cache, log.append, plugin_src=src, use_system=False)
    assert any("OK (QEMU" in m for m in log)
    assert not any("debootstrap" in m for m in log)
    assert rt.plugin_path is not None and rt.plugin_path.is_file()
    assert rt.plugin_path.parent.parent == cache / "plugin"

    # warm: nothing rebuilt, same answer, find() agrees
    log.clear()
    mtime = rt.plugin_path.stat().st_mtime_ns
    t0 = time.monotonic()
    rt2 = qr.setup(cache, log.append, plugin_src=src, use_system=False)
    assert time.monotonic() - t0 < 10  # ~0.2 s idle; generous for a loaded 2-core box
    assert rt2 == rt and rt.plugin_path.stat().st_mtime_ns == mtime
    assert any("up to date" in m for m in log)
    assert qr.QemuRuntime.find(cache) == rt

    # the plugin loads into that QEMU (through the root's loader) and its calls resolve
    elf = testguest.build(cache=cache)
    res, rc, _ = testguest.boot(rt.command(), elf, "test=novmx", smp=1,
                                extra=rt.plugin_args("a=1"), env=rt.env())
    assert rc == testguest.EXIT_STATUS_DONE and res.done

    # editing the source gives a new plugin path; find() rebuilds it on its own
    (src / "probe.c").write_text(PROBE_PLUGIN.replace("loaded", "loaded v2"))
    rt3 = qr.QemuRuntime.find(cache, log=log.append)
    assert rt3.plugin_path != rt.plugin_path and rt3.plugin_path.is_file()


def test_plugin_load_output(tmp_path):
    """QEMU really runs the plugin's install and atexit callbacks."""
    cache = _adopting_cache(tmp_path)
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "probe.c").write_text(PROBE_PLUGIN)
    rt = qr.setup(cache, lambda m: None, plugin_src=src, use_system=False)
    elf = testguest.build(cache=cache)
    argv = [*rt.command(), *testguest.qemu_args(elf, "test=novmx"), *rt.plugin_args("x=y")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == testguest.EXIT_STATUS_DONE, p.stderr
    assert "probe-plugin loaded argc=1" in p.stderr and "probe-plugin exit" in p.stderr


def test_plugin_symbol_check_rejects_unknown_api(tmp_path):
    rt = _runtime()
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "bad.c").write_text(PROBE_PLUGIN.replace(
        "return 0;\n}", "qemu_plugin_not_in_this_qemu(); return 0;\n}").replace(
        "int qemu_plugin_num_vcpus(void);", "void qemu_plugin_not_in_this_qemu(void);"))
    with pytest.raises(VtdxError, match="does not export qemu_plugin_not_in_this_qemu"):
        qr.build_plugin(tmp_path / "cache", rt.qemu, lambda m: None, src)


def test_plugin_compile_error_is_one_line(tmp_path):
    rt = _runtime()
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "broken.c").write_text("int x = ;\n")
    with pytest.raises(VtdxError, match="compiling the TCG plugin failed") as e:
        qr.build_plugin(tmp_path / "cache", rt.qemu, lambda m: None, src)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_repo_plugin_builds_against_provisioned_qemu(tmp_path, monkeypatch):
    """vtdx's qemu_plugin/ compiles with no warning (-Wall -Wextra, here as errors), imports only
    what this QEMU exports, and shows QEMU nothing but the two symbols QEMU looks up: its parts
    call each other through the internal header, never through the dynamic symbol table."""
    parts = {p.name for p in qr.plugin_sources() if p.suffix == ".c"}
    assert {"plugin.c", "transport.c", "seamcall.c", "patch.c"} <= parts
    monkeypatch.setenv("VTDX_PLUGIN_CFLAGS", "-Werror")
    rt = _runtime()
    so = qr.build_plugin(tmp_path, rt.qemu, lambda m: None)
    assert so.is_file()
    exported = {s for s in qr.dynamic_symbols(so, undefined=False) if not s.startswith("_")}
    assert exported == {"qemu_plugin_install", "qemu_plugin_version"}


def test_plugin_cache_key_covers_every_source_and_header(tmp_path):
    """Editing any part of the plugin, header included, or adding a part, gives a new build."""
    src = tmp_path / "qemu_plugin"
    shutil.copytree(qr.PLUGIN_SRC, src)
    seen = {qr.plugin_output(tmp_path, src)}
    files = qr.plugin_sources(src)
    assert {"vtdx.h", "wire.h", "qemu_api.h"} <= {p.name for p in files}
    for p in files:
        p.write_text(p.read_text() + "/* edited */\n")
        seen.add(qr.plugin_output(tmp_path, src))
    (src / "extra.c").write_text("int vtdx_extra_part;\n")
    seen.add(qr.plugin_output(tmp_path, src))
    assert None not in seen and len(seen) == len(files) + 2


def test_setup_cli_adopts(tmp_path, capsys):
    from vtdx.cli.main import main

    cache = _adopting_cache(tmp_path)
    assert main(["setup", "--cache", str(cache), "--no-system-qemu"]) == 0
    out = capsys.readouterr()
    assert "QEMU 11." in out.out and "ready" in out.err


@pytest.mark.skipif(not os.environ.get("VTDX_TEST_PROVISION"),
                    reason="cold debootstrap (~25 s, 500 MB): set VTDX_TEST_PROVISION=1")
def test_cold_provision_and_rebuild_broken(tmp_path):
    """Real debootstrap into an empty cache, then a broken root is detected and rebuilt."""
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("needs root and debootstrap")
    log: list[str] = []
    rt = qr.ensure_root(tmp_path, log.append)
    assert rt.version[:2] >= qr.MIN_VERSION and (rt.root / qr.STAMP_NAME).is_file()
    assert any("debootstrap" in m for m in log)
    (rt.qemu).unlink()
    log.clear()
    rt2 = qr.ensure_root(tmp_path, log.append)
    assert any("broken" in m for m in log) and rt2.qemu.is_file()
    assert not (tmp_path / "qemu-root.tmp").exists()
    shutil.rmtree(rt2.root)  # ~500 MB: don't leave it to pytest's basetemp rotation
