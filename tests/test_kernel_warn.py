"""Whole stack: the default kernel WARNs in its TDX code and vtdx says so.

The fault: TDH.MNG.CREATE returns TDX_OPERAND_INVALID when KVM creates a TD. Linux 7.3's
__tdx_td_init (arch/x86/kvm/vmx/tdx.c, ~line 2559) retries only TDX_RND_NO_ENTROPY; any
other error goes through TDX_BUG_ON(err, TDH_MNG_CREATE, kvm), a WARN_ON_ONCE followed by
"SEAMCALL TDH_MNG_CREATE failed". With tinyconfig's CONFIG_BUG=n that WARN compiled to
nothing; the default fragment keeps CONFIG_BUG, so the report must reach `vtdx run` (fails
the run, shows the report) and the pytest plugin (fails the test unless declared expected).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vtdx.host import kernel as kernel_build

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
FAULT = "TDX_OPERAND_INVALID:TDH.MNG.CREATE"

pytestmark = [
    pytest.mark.stack, pytest.mark.kernel,
    pytest.mark.skipif(kernel_build.default_kernel() is None,
                       reason="no default kernel (vtdx build-kernel)"),
]


def test_default_kernel_keeps_bug_and_warn() -> None:
    art = kernel_build.default_kernel()
    assert art is not None
    config = art.config.read_text()
    assert kernel_build.missing_for_vtdx(config) == []
    assert "CONFIG_BUG=y" in config.splitlines()


def _vtdx_run(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtdx", "run", "--checks", "tdx,kvm",
                           "--inject", FAULT, *extra], capture_output=True, text=True,
                          timeout=600, env=ENV)


def test_vtdx_run_fails_on_the_kernels_warning_and_shows_it() -> None:
    r = _vtdx_run()
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vtdx run: kernel reported a bug: WARNING: ")
    assert "arch/x86/kvm/vmx/tdx.c:" in last
    assert "  kernel report, FAILS the run:" in r.stdout
    assert "Call Trace:" in r.stdout  # the report itself, not just its first line
    assert "TDH.MNG.CREATE             1 (lp" in r.stdout and "1 failed" in r.stdout


def test_vtdx_run_expected_warning_is_shown_but_does_not_decide() -> None:
    r = _vtdx_run("--expect-warn", r"kvm/vmx/tdx\.c")
    # KVM_TDX_INIT_VM failed, so the in-guest KVM check fails; the WARN is not the verdict.
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "vtdx run: in-guest check failed: kvm_td"
    assert "  kernel report, expected (--expect-warn):" in r.stdout


SUITE = textwrap.dedent("""
    import pytest
    from vtdx.harness.vm import Fault

    FAULTS = [Fault("TDX_OPERAND_INVALID", "TDH.MNG.CREATE")]

    @pytest.mark.vtdx(append="kvm_intel.tdx=1", faults=FAULTS, scope="function")
    def test_td_create_unexpected_warning(vtdx_vm):
        vtdx_vm.payload("kvm-tdx")

    @pytest.mark.vtdx(append="kvm_intel.tdx=1", faults=FAULTS, scope="function",
                      expect_warnings=[r"kvm/vmx/tdx\\.c"])
    def test_td_create_expected_warning(vtdx_vm):
        ktap = vtdx_vm.payload("kvm-tdx")
        assert not ktap.ok  # KVM_TDX_INIT_VM failed with -EIO, as the kernel decided
""")


@pytest.mark.slow
def test_pytest_plugin_fails_the_test_that_made_the_kernel_warn(tmp_path: Path) -> None:
    (tmp_path / "test_warn.py").write_text(SUITE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        "--vtdx-kernel=default", "-rA", str(tmp_path / "test_warn.py")],
                       capture_output=True, text=True, timeout=900, env=ENV, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    assert "FAILED test_warn.py::test_td_create_unexpected_warning" in out, out[-4000:]
    assert "PASSED test_warn.py::test_td_create_expected_warning" in out, out[-4000:]
    assert "vtdx: the kernel reported 1 bug(s) during this test" in out
    assert "WARNING: " in out and "arch/x86/kvm/vmx/tdx.c:" in out
