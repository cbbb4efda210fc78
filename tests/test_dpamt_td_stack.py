"""Whole stack with Dynamic PAMT: a host kernel that carries the Dynamic PAMT series runs the
kvm-td payload's TD life on the ``dpamt`` profile, with 1 and 2 TD vCPUs.

Mainline Linux 7.3 has no Dynamic PAMT, so these tests need a kernel the user built with the
series applied (``vtdx build-kernel --source TREE``; README, "Bring a Dynamic PAMT kernel").
Point ``VTDX_DPAMT_KERNEL`` at its bzImage (or at the directory `vtdx build-kernel` printed,
which also holds ``vmlinux`` and ``info.json``); ``VTDX_DPAMT_VMLINUX`` and
``VTDX_DPAMT_KERNEL_SRC`` override the vmlinux next to it and the source tree recorded in
``info.json``. Without ``VTDX_DPAMT_KERNEL`` every test here is skipped.

What the kernel does with Dynamic PAMT (the v6 series, arch/x86/virt/vmx/tdx/tdx.c and
arch/x86/kvm/vmx/tdx.c): every 4KB page it gives the module -- TDR/TDCS at KVM_TDX_INIT_VM,
TDVPR/TDCX at KVM_TDX_INIT_VCPU (tdx_alloc_control_page), S-EPT pages and guest pages in
the fault path (tdx_pamt_get from tdx_sept_set_private_spte, before TDH.MEM.SEPT.ADD,
PAGE.ADD and PAGE.AUG) -- first takes a reference on its 2MB range; the 0 -> 1 reference
makes TDH.PHYMEM.PAMT.ADD with a fresh page pair, the 1 -> 0 one (tdx_pamt_put,
tdx_free_control_page) TDH.PHYMEM.PAMT.REMOVE, which hands the pair back. The module
(intel/tdx-module, Dynamic PAMT tree, tdh_phymem_pamt_add.c / tdh_phymem_pamt_remove.c,
and pamt_manager.c for the 4KB entries of PAGE.AUG/ADD and SEPT.ADD) refuses a 4KB page in
a range with no pair, so a missing ADD would fail the TD.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kvm_tolerated import passing_td_life

pytestmark = [pytest.mark.kernel, pytest.mark.stack]

ENV = "VTDX_DPAMT_KERNEL"
TROUBLE = re.compile(r"WARNING:|BUG:|Oops|Call Trace:|Kernel panic")
RANGE_2M = ~((2 << 20) - 1)
#: Leaves that hand the module a page it tracks at 4KB: the register holding the page
#: (tdx-module tdh_mem_page_aug.c, tdh_mem_page_add.c, tdh_mem_sept_add.c: R8;
#: tdh_mng_create.c, tdh_mng_addcx.c, tdh_vp_create.c, tdh_vp_addcx.c: RCX) and the page.
GIFTS = {"TDH.MNG.CREATE": ("rcx", "TDR"), "TDH.MNG.ADDCX": ("rcx", "TDCS"),
         "TDH.VP.CREATE": ("rcx", "TDVPR"), "TDH.VP.ADDCX": ("rcx", "TDCX"),
         "TDH.MEM.SEPT.ADD": ("r8", "S-EPT"), "TDH.MEM.PAGE.ADD": ("r8", "guest (ADD)"),
         "TDH.MEM.PAGE.AUG": ("r8", "guest (AUG)")}
CONTROL_PAGES = {"TDR", "TDCS", "TDVPR", "TDCX"}
FAULT_PAGES = {"S-EPT", "guest (ADD)", "guest (AUG)"}
#: (vCPUs, attribute() rows) of each TD life run here, for the test after them.
LIVES: list[tuple[int, list[tuple[int, str, str]]]] = []


@dataclass(frozen=True)
class DpamtKernel:
    bzimage: Path
    vmlinux: Path | None
    source: Path | None


def dpamt_kernel() -> DpamtKernel:
    """The kernel ``VTDX_DPAMT_KERNEL`` names; skip when unset, fail when it names nothing."""
    raw = os.environ.get(ENV)
    if not raw:
        pytest.skip(f"{ENV} is not set: these tests need a host kernel with the Dynamic PAMT "
                    "series (README, 'Bring a Dynamic PAMT kernel')")
    p = Path(raw).expanduser()
    bz = p / "bzImage" if p.is_dir() else p
    if not bz.is_file():
        pytest.fail(f"{ENV}={raw}: no bzImage there")
    vml = Path(os.environ["VTDX_DPAMT_VMLINUX"]) if os.environ.get("VTDX_DPAMT_VMLINUX") \
        else bz.parent / "vmlinux"
    src: Path | None = None
    if os.environ.get("VTDX_DPAMT_KERNEL_SRC"):
        src = Path(os.environ["VTDX_DPAMT_KERNEL_SRC"])
    else:
        try:
            src = Path(json.loads((bz.parent / "info.json").read_text())["path"])
        except (OSError, ValueError, KeyError):
            src = None
    return DpamtKernel(bz, vml if vml.is_file() else None, src)


@pytest.fixture(scope="module")
def dpamt_vm():  # noqa: ANN201 (a started Vm)
    from vtdx.harness.vm import BootSpec, Vm

    k = dpamt_kernel()
    if k.vmlinux is None:
        pytest.fail("no vmlinux next to the bzImage (or VTDX_DPAMT_VMLINUX): the callers of "
                    "PAMT.ADD/REMOVE cannot be named without it")
    if k.source is None:
        pytest.fail("no kernel source (info.json or VTDX_DPAMT_KERNEL_SRC): the kvm-td "
                    "payload is built against the kernel's UAPI headers")
    spec = BootSpec(kernel=k.bzimage, vmlinux=k.vmlinux, append="kvm_intel.tdx=1", smp=2,
                    kernel_src=k.source, profile="dpamt")
    vm = Vm(spec).start()
    try:
        yield vm
    finally:
        vm.stop()


def _stack(r: dict[str, Any]) -> str:
    return " ".join(s.split("+")[0] for s in r.get("stack") or [])


def _reg(r: dict[str, Any], side: str, name: str) -> int:
    """A register of a trace record ("in" lists the non-zero ones, "out" the changed ones)."""
    if side == "out" and name not in r["out"]:
        side = "in"
    return int(r[side].get(name, "0x0"), 16)


def attribute(recs: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(seq, callers, page) of each PAMT.ADD: its kernel callers (innermost first) and the
    first page of its 2MB range the module was given after it (GIFTS)."""
    rows = []
    for i, r in enumerate(recs):
        if r["name"] != "TDH.PHYMEM.PAMT.ADD":
            continue
        rng = _reg(r, "in", "rcx") & ~0xFFF
        page = next((GIFTS[g["name"]][1] for g in recs[i + 1:] if g["name"] in GIFTS
                     and _reg(g, "in", GIFTS[g["name"]][0]) & RANGE_2M == rng), "none")
        rows.append((r["seq"], _stack(r), page))
    return rows


def test_kernel_enables_dynamic_pamt(dpamt_vm) -> None:
    """The kernel saw FEATURES0.DYNAMIC_PAMT, configured the module with it (TDH.SYS.CONFIG
    R8 bit 16) and allocated only the 2M/1G PAMT levels plus the 4K bitmap -- what vtdx
    accounts."""
    log = dpamt_vm.tdx_log()
    assert "virt/tdx: Enable Dynamic PAMT" in log, log
    assert "virt/tdx: TDX-Module initialized" in log, log
    kb = next(int(m[1]) for ln in log if (m := re.search(r"(\d+) KB allocated for PAMT", ln)))
    with dpamt_vm.module.cond:
        pamt = dpamt_vm.module.gd.pamt
        assert pamt.dynamic
        assert pamt.pamt_bytes_total() // 1024 == kb
    config = dpamt_vm.trace.since(0, leaf="TDH.SYS.CONFIG")
    assert len(config) == 1 and _reg(config[0], "in", "r8") & (1 << 16)


@pytest.mark.parametrize("nr_vcpus", [1, 2])
def test_td_life_with_dynamic_pamt(dpamt_vm, nr_vcpus: int) -> None:
    vm = dpamt_vm
    _, recs = passing_td_life(vm, nr_vcpus, ("td_run", "td_map_gpa", "teardown"), timeout=900)
    names = collections.Counter(r["name"] for r in recs)
    assert names["TDH.VP.CREATE"] == nr_vcpus and names["TDH.MNG.KEY.FREEID"] == 1

    adds = [r for r in recs if r["name"] == "TDH.PHYMEM.PAMT.ADD"]
    removes = [r for r in recs if r["name"] == "TDH.PHYMEM.PAMT.REMOVE"]
    # Every 2MB range that got a pair lost it again, and REMOVE handed back ADD's pair.
    assert len(adds) == len(removes) > 0
    live: dict[int, tuple[int, int]] = {}
    for r in sorted(adds + removes, key=lambda r: r["seq"]):
        rng = _reg(r, "in", "rcx") & ~0xFFF
        assert _reg(r, "in", "rcx") & 0xFFF == 1  # the 2MB level
        if r["name"] == "TDH.PHYMEM.PAMT.ADD":
            assert rng not in live, vm.trace.format([r])
            live[rng] = (_reg(r, "in", "rdx"), _reg(r, "in", "r8"))
        else:
            assert live.pop(rng) == (_reg(r, "out", "rdx"), _reg(r, "out", "r8"))
    assert live == {}

    # Who asked for each pair (tdx.c of the series): a control page through
    # tdx_alloc_control_page, or KVM's fault path through tdx_pamt_get called from
    # tdx_sept_set_private_spte. The first page the module is then given in that 2MB range
    # names the page it was for: TDR/TDCS (KVM_TDX_INIT_VM), TDVPR/TDCX (KVM_TDX_INIT_VCPU),
    # an S-EPT page or a guest page (TDH.MEM.SEPT.ADD, PAGE.ADD, PAGE.AUG).
    rows = attribute(recs)
    LIVES.append((nr_vcpus, rows))
    for seq, caller, page in rows:
        want = FAULT_PAGES if "tdx_sept_set_private_spte" in caller else CONTROL_PAGES
        assert "tdx_pamt_get" in caller and page in want, (seq, caller, page)
    # Each life starts with no pair installed, so the TDR's range always needs one.
    assert rows[0][1].endswith("tdx_alloc_control_page") and rows[0][2] == "TDR", rows
    rm_stacks = [_stack(r) for r in removes]
    assert all(s.endswith(("tdx_pamt_put tdx_free_control_page",
                           "tdx_pamt_put tdx_sept_set_private_spte")) for s in rm_stacks), \
        rm_stacks

    # Each page the module was handed at 4KB lay in a range whose pair was in place: the
    # last PAMT.ADD/REMOVE of its 2MB range before the call was an ADD.
    events: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for r in adds + removes:
        events[_reg(r, "in", "rcx") & ~0xFFF].append((r["seq"], r["name"]))
    gifts = [r for r in recs if r["name"] in GIFTS]
    for r in gifts:
        rng = _reg(r, "in", GIFTS[r["name"]][0]) & RANGE_2M
        before = [n for s, n in sorted(events[rng]) if s < r["seq"]]
        assert before and before[-1] == "TDH.PHYMEM.PAMT.ADD", vm.trace.format([r])
    assert {"TDH.MEM.PAGE.AUG", "TDH.VP.CREATE", "TDH.VP.ADDCX"} <= {r["name"] for r in gifts}

    # Teardown: no TD, every PAMT entry free (PT_NDA) or reserved, no DPAMT pair or bitmap
    # bit left, the invariants hold and no TDX lock is held.
    from vtdx.testing.invariants import check_invariants, pamt_owned

    assert vm.vtdx.tds() == []
    with vm.module.cond:
        pamt = vm.module.gd.pamt
        left = pamt_owned(vm.module)
        nodes, bits = dict(pamt.nodes), set(pamt.bitmap)
        problems = check_invariants(vm.module, expect_no_locks=True)
    assert left == {} and nodes == {} and bits == set() and problems == [], \
        (list(left.items())[:10], list(nodes)[:10], sorted(bits)[:10], problems[:10])


def test_kernel_log_clean_after_dpamt_td_runs(dpamt_vm) -> None:
    """No WARNING/BUG: tdx_pamt_get/put WARN on any PAMT.ADD/REMOVE status but success."""
    assert [ln for ln in dpamt_vm.dmesg().splitlines() if TROUBLE.search(ln)] == []


def test_vtdx_run_profile_dpamt_checks_kvm_td() -> None:
    """What a user runs: `vtdx run --profile dpamt --checks tdx,kvm-td` with the kernel passes
    (both TDs PASS, PAMT matches, no kernel report) and its summary counts as many
    PAMT.REMOVE as PAMT.ADD."""
    k = dpamt_kernel()
    argv = [sys.executable, "-m", "vtdx", "run", "--kernel", str(k.bzimage), "--profile",
            "dpamt", "--checks", "tdx,kvm-td", "--timeout", "240"]
    if k.vmlinux is not None:
        argv += ["--vmlinux", str(k.vmlinux)]
    if k.source is not None:
        argv += ["--kernel-src", str(k.source)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    out = r.stdout + r.stderr
    # The console is streamed (no --quiet), so a failure shows where the guest stopped.
    assert r.returncode == 0, out[-12000:]
    assert "kvm_td_1vcpu=ok" in out and "kvm_td_2vcpu=ok" in out, out[-12000:]
    counts = {m[1]: int(m[2]) for m in re.finditer(
        r"^\s+(TDH\.PHYMEM\.PAMT\.(?:ADD|REMOVE))\s+(\d+) ", out, re.M)}
    assert counts.get("TDH.PHYMEM.PAMT.ADD", 0) > 0, out
    assert counts["TDH.PHYMEM.PAMT.ADD"] == counts.get("TDH.PHYMEM.PAMT.REMOVE"), out


def test_fault_path_installs_pairs(dpamt_vm, record_property: Any) -> None:
    """KVM's fault path installs pairs too, not only the control-page allocator.

    Which page of a life first lands in an unbacked 2MB range depends on where the page
    allocator puts it (only the 0 -> 1 reference makes a SEAMCALL), so one life need not
    show every kind: measured lives showed the TDR's range every time, a guest or S-EPT page
    in most 2-vCPU lives, a TDCX page now and then. This takes the lives above and, while
    none had a fault-path PAMT.ADD, runs a few more 2-vCPU lives."""
    lives = list(LIVES)
    for _ in range(8):  # a worker of its own (pytest-xdist) starts with no lives
        if any(page in FAULT_PAGES for _, rows in lives for _, _, page in rows):
            break
        mark = dpamt_vm.trace.mark()
        dpamt_vm.payload("kvm-td", "--vcpus", "2", timeout=900).assert_ok()
        lives.append((2, attribute(dpamt_vm.trace.since(mark))))
    seen = collections.Counter(page for _, rows in lives for _, _, page in rows)
    record_property("pamt_add_pages", dict(seen))
    fault = [(seq, caller) for _, rows in lives for seq, caller, page in rows
             if page in FAULT_PAGES]
    assert fault and all(c.endswith("tdx_pamt_get tdx_sept_set_private_spte")
                         for _, c in fault), lives
