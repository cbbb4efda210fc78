"""Whole stack: the default Linux 7.3 kernel on the default profile (generation "1.5",
intel/tdx-module 1.5.06) sees that module: it prints its version (tdx_global_metadata.c
121-125, "%u.%u.%02u"), and KVM sizes a TD from its TDCS_BASE_SIZE / TDVPS_BASE_SIZE
(kvm/vmx/tdx.c 2506-2508: 6 TDCS pages, 6 - 1 TDVPX pages) with every TDH.MNG.* /
TDH.VP.* call of KVM_TDX_INIT_VM / KVM_TDX_INIT_VCPU succeeding under the module's
metadata and association rules (tdh_vp_rd_wr.c, metadata_vp.c)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from vtdx.platform.profile import GENERATIONS


@pytest.fixture(scope="module")
def vm():  # noqa: ANN201 (a started vtdx.harness.vm.Vm)
    from vtdx.harness.vm import BootSpec, Vm  # the harness is only needed for stack tests
    from vtdx.host import kernel as kernel_build

    art = kernel_build.default_kernel(None)
    if art is None:
        pytest.skip("no default kernel (vtdx build-kernel)")
    spec = BootSpec(kernel=art.bzimage, vmlinux=art.vmlinux, append="kvm_intel.tdx=1",
                    smp=2, kernel_src=Path(str(art.info()["path"])))
    machine = Vm(spec).start()
    try:
        yield machine
    finally:
        machine.stop()


@pytest.mark.kernel
@pytest.mark.stack
def test_kernel_prints_the_generations_version(vm) -> None:  # noqa: ANN001
    want = GENERATIONS["1.5"].version_string
    assert f"Module version: {want}" in vm.dmesg()


@pytest.mark.kernel
@pytest.mark.stack
def test_kvm_sizes_the_td_from_the_generation(vm) -> None:  # noqa: ANN001
    gen = GENERATIONS["1.5"]
    mark = vm.trace.mark()
    vm.payload("kvm-td", "--stop-after", "vcpus").assert_ok()
    recs = vm.trace.since(mark)
    names = collections.Counter(r["name"] for r in recs)
    assert names["TDH.MNG.ADDCX"] == gen.tdcs_pages
    assert names["TDH.VP.ADDCX"] == gen.tdvps_pages - 1
    vp = [r for r in recs if r["name"] in ("TDH.VP.WR", "TDH.VP.RD", "TDH.VP.INIT",
                                           "TDH.VP.FLUSH")]
    assert vp and all(r["ok"] for r in vp), vm.trace.format(vp)
