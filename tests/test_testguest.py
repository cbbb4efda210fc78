"""The freestanding test guest: build/caching, image format, and boots under real QEMU.

Without a SEAMCALL-emulating plugin, TCG behaves like hardware for the paths that need no
TDX: SEAMCALL outside VMX operation is #UD on every CPU, and a CPU without VMX is reported
(CPUID.1:ECX.VMX clear) instead of touching CR4.VMXE. The whole-stack runs (plugin + daemon
echo backend) live in tests/test_stack_*.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from vtdx.errors import VtdxError
from vtdx.testing import testguest

#: The project's platform spike, in the shared/ folder that sits beside the checkout.
SPIKE = Path(__file__).resolve().parents[2] / "shared" / "spikes" / "tdx-platform-spike.c"



@pytest.fixture(scope="module")
def elf(tmp_path_factory) -> Path:
    return testguest.build(cache=tmp_path_factory.mktemp("cache"))


def _boot(runtime, elf, append, smp, extra=None, mem="256M"):
    res, rc, secs = testguest.boot(runtime.command(), elf, append, smp=smp, mem=mem,
                                   extra=extra, env=runtime.env(), timeout=60)
    assert rc == testguest.EXIT_STATUS_DONE and res.done, res
    return res, secs


def test_build_is_cached_and_fast(tmp_path):
    t0 = time.monotonic()
    a = testguest.build(cache=tmp_path)
    cold = time.monotonic() - t0
    mtime = a.stat().st_mtime_ns
    b = testguest.build(cache=tmp_path)
    assert a == b and a.stat().st_mtime_ns == mtime          # cached: not rebuilt
    assert cold < 30
    assert a.parent.name == testguest.source_hash()
    out = testguest.build(tmp_path / "out", cache=tmp_path)
    assert out == tmp_path / "out" / "testguest.elf" and out.read_bytes() == a.read_bytes()


def test_source_change_changes_cache_key(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(testguest.SOURCE_DIR, src)
    before = testguest.source_hash(src)
    with (src / "main.c").open("a") as f:
        f.write("\n/* edited */\n")
    assert testguest.source_hash(src) != before
    assert testguest.build(cache=tmp_path / "c", src=src).parent.name == testguest.source_hash(src)


def test_build_error_is_one_line(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(testguest.SOURCE_DIR, src)
    (src / "main.c").write_text("this is not C\n")
    with pytest.raises(VtdxError, match="compiling main.c failed") as e:
        testguest.build(cache=tmp_path / "c", src=src)
    assert "\n" not in str(e.value)


def test_image_is_multiboot_elf32(elf):
    """QEMU's multiboot loader refuses x86-64 ELF: the image must say EM_386 + multiboot."""
    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1                  # ELFCLASS32
    assert struct.unpack_from("<H", data, 18)[0] == 3                # EM_386
    entry = struct.unpack_from("<I", data, 24)[0]
    assert 0x100000 <= entry < 0x200000
    for off in range(0, min(len(data), 8192) - 12, 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic == 0x1BADB002:
            assert (magic + flags + csum) & 0xFFFFFFFF == 0
            assert not flags & 0x10000                               # ELF, not a.out kludge
            break
    else:
        pytest.fail("no multiboot header in the first 8 KiB")


def test_all_cpus_start_and_seamcall_without_vmx_is_ud(runtime, elf):
    res, secs = _boot(runtime, elf, "test=novmx", smp=4)
    boot = [ln for ln in res.lines if ln.kind == "BOOT"]
    assert boot and boot[0].num("cpus") == 4
    per_cpu = res.results("novmx")
    assert sorted(per_cpu) == [0, 1, 2, 3]
    for line in per_cpu.values():
        assert line.fields["vec"] == "6" and line.num("ok") == 1 and line.num("fail") == 0
    assert res.exceptions() == []
    assert secs < 20


def test_missing_vmx_is_reported_not_hung(runtime, elf):
    """TCG has no VMX: every VMX test reports vmx=absent on every CPU and the run finishes."""
    res, _ = _boot(runtime, elf, "test=roundtrip,memory,ring3,nomodule addrs=0x1234000", smp=2)
    for test in ("roundtrip", "memory", "ring3", "nomodule"):
        lines = res.results(test)
        assert sorted(lines) == [0, 1]
        assert all(ln.fields.get("vmx") == "absent" and ln.num("fail") == 1
                   for ln in lines.values()), lines


def test_unknown_test_is_reported(runtime, elf):
    res, _ = _boot(runtime, elf, "test=bogus", smp=1)
    assert [ln.kind for ln in res.lines] == ["BOOT", "ERROR"]
    assert res.lines[1].fields == {"cpu": "0", "unknown_test": "bogus"}


def test_parse_output_ignores_noise():
    text = ("SeaBIOS noise\nTG BOOT cpus=2 smp=2 tests=roundtrip iters=5\n"
            "TG roundtrip cpu=1 ok=5 fail=0\nTG EXC cpu=0 vec=14 err=2 rip=0x100123\n"
            "TG roundtrip cpu=0 ok=4 fail=1 first_iter=3 reg=r9 got=0x1 want=0x2\nTG DONE\n")
    r = testguest.parse_output(text)
    assert r.done and r.totals("roundtrip") == (9, 1)
    assert r.results("roundtrip")[0].fields["reg"] == "r9"
    assert r.exceptions()[0].num("rip") == 0x100123
    assert not testguest.parse_output("TG roundtrip cpu=0 ok=1 fail=0\n").done


@pytest.mark.skipif(not SPIKE.is_file(), reason="platform spike not on this machine")
def test_guest_detects_a_backend_that_does_not_echo(runtime, elf, tmp_path):
    """With the platform spike (VMX emulated, SEAMCALL answered with RAX=0 and registers left
    alone) VMXON works, and the guest's checks catch the missing echo on every CPU."""
    so = tmp_path / "spike.so"
    cflags = subprocess.run(["pkg-config", "--cflags", "glib-2.0"], capture_output=True,
                            text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *cflags, "-o", str(so), str(SPIKE)],
                   check=True, capture_output=True)
    res, _ = _boot(runtime, elf, "test=roundtrip,memory iters=20 addrs=0x1234000", smp=2,
                   extra=["-plugin", str(so)])
    rt = res.results("roundtrip")
    assert sorted(rt) == [0, 1]
    assert all(ln.num("ok") == 0 and ln.num("fail") == 20 and "vmx" not in ln.fields
               for ln in rt.values()), rt
    mem = res.results("memory")
    assert all(ln.num("fail") == 1 for ln in mem.values()), mem
