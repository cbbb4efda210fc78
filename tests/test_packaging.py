"""vtdx as a built wheel works outside a checkout: its assets (guest sources, the plugin's C
sources) are package data found through importlib.resources, and ``vtdx setup`` from the wheel
provisions QEMU and builds the plugin from the wheel's own sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vtdx.host.qemu import ROOT_NAME, STATE_NAME, cache_dir

REPO = Path(__file__).resolve().parent.parent


def _wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the checkout's files (tracked and new, not ignored), so
    a setuptools ``build/`` left in the checkout can never leak stale files into it."""
    src = tmp / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp), str(src)], check=True,
                   capture_output=True, text=True)
    (wheel,) = tmp.glob("vtdx-*.whl")
    return wheel


def _install(wheel: Path, target: Path) -> dict[str, str]:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    return env


def test_wheel_carries_the_assets(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(_wheel(tmp_path)).namelist())
    for want in ("vtdx/guest/kernel/tdx-host.config", "vtdx/guest/initramfs/init",
                 "vtdx/guest/initramfs/agent", "vtdx/guest/testguest/boot.S",
                 "vtdx/qemu_plugin/wire.h", "vtdx/py.typed",
                 "vtdx/unicorn/unicorn-2.1.4-vtdx.patch"):
        assert want in names, want
    assert any(n.startswith("vtdx/guest/payloads/") and n.endswith(".c") for n in names)
    assert any(n.startswith("vtdx/qemu_plugin/") and n.endswith(".c") for n in names)
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


@pytest.mark.stack
def test_setup_from_an_installed_wheel(tmp_path: Path, runtime: object) -> None:
    """Outside the checkout (cwd elsewhere, the wheel first on the path), `vtdx setup` finds
    the plugin sources inside the installed package and builds the plugin from them.

    It runs against a private cache that borrows the provisioned QEMU root and unicorn
    build (both found through the wheel's own package data), so the shared
    cache's record of which sources to build the plugin from is never touched."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ROOT_NAME).symlink_to(cache_dir() / ROOT_NAME)
    (cache / "unicorn").symlink_to(cache_dir() / "unicorn")
    target = tmp_path / "site"
    env = _install(_wheel(tmp_path / "dist"), target)
    where = subprocess.run([sys.executable, "-c", "import vtdx.resources as r; "
                            "print(r.asset('qemu_plugin'))"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target), where
    p = subprocess.run([sys.executable, "-m", "vtdx", "setup", "--cache", str(cache)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert f"plugin {cache}/plugin/" in p.stdout and "Traceback" not in p.stderr
    assert "patched unicorn up to date" in p.stderr  # the borrowed build was found
    assert "debootstrap" not in p.stderr  # the borrowed root was adopted
    state = (cache / STATE_NAME).read_text()
    assert str(target / "vtdx" / "qemu_plugin") in state
