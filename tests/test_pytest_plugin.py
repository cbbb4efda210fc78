"""The CI pieces: guest agent protocol, payloads, KTAP, the pytest plugin and its example suite.

The agent protocol runs the real guest/initramfs/agent script with busybox sh on a pty (no
QEMU needed); the example suite and the failure report run as a user's CI would, through a
separate ``pytest --vtdx-kernel=default`` process (marked ``kernel``).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from vtdx.harness.guest_agent import (
    AGENT,
    GUEST_BIN,
    AgentError,
    GuestAgent,
    PayloadSet,
    agent_initramfs,
)
from vtdx.host.initramfs import _is_static
from vtdx.host.payloads import KtapResult, build_payloads, sources

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "ci"
BUSYBOX = Path("/bin/busybox")


def _pytest(*args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _default_kernel() -> Path | None:
    from vtdx.host import kernel as kernel_build

    art = kernel_build.default_kernel(None)
    return art.bzimage if art else None


needs_kernel = pytest.mark.skipif(_default_kernel() is None,
                                  reason="no default kernel (vtdx build-kernel)")


# --------------------------------------------------------------------------- agent


@pytest.fixture
def agent(tmp_path: Path):
    """The real agent script on the slave side of a pty, GuestAgent on the master."""
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox (busybox-static)")
    master, slave = os.openpty()
    proc = subprocess.Popen([str(BUSYBOX), "sh", str(AGENT), os.ttyname(slave)],
                            env={"VTDX_AGENT_DIR": str(tmp_path / "work"),
                                 "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    ag = GuestAgent(master)
    try:
        ag.wait_ready(20)
        yield ag, slave
    finally:
        proc.kill()
        proc.wait()
        ag.close()
        os.close(slave)


def test_agent_separates_status_stdout_stderr_and_keeps_bytes(agent) -> None:
    ag, _ = agent
    res = ag.run("echo out; echo err >&2; printf '\\000\\377VTDX-RC 1 0\\n'; exit 7")
    assert res.rc == 7
    assert res.stdout == "out\n\x00\ufffdVTDX-RC 1 0\n"  # 0xff is not UTF-8: replaced
    assert res.stderr == "err\n"
    rc, out = ag.run("seq 1 30000 | tail -n 1")  # unpacks as (rc, stdout)
    assert (rc, out) == (0, "30000\n")


def test_agent_timeout_kills_command_and_channel_survives(agent) -> None:
    ag, _ = agent
    t0 = time.monotonic()
    res = ag.run("sleep 30", timeout=1)
    assert res.timed_out and time.monotonic() - t0 < 10
    assert ag.run("echo alive").stdout == "alive\n"


def test_agent_ignores_noise_on_the_port(agent) -> None:
    ag, slave = agent
    # Anything written to the port that is not a frame (here from the guest side, as kernel
    # or firmware noise would be) must not be taken for a reply.
    os.write(slave, b"garbage\nVTDX-RC 999 0\nVTDX-OUT 5\n")
    assert ag.run("echo ok").stdout == "ok\n"
    assert ag.ping()


class LossyAgent(GuestAgent):
    """Drops bytes from the first N command frames, as an overrun guest tty would."""

    def __init__(self, fd: int, lose: int) -> None:
        super().__init__(fd)
        self.lose = lose
        self.frames = 0
        self.ack_timeout = 0.5

    def _send(self, line: str) -> None:
        if line.startswith("VTDX-CMD"):
            self.frames += 1
            if self.frames <= self.lose:
                line = line[:40] + line[50:]
        super()._send(line)


def test_agent_resends_a_frame_that_lost_bytes(agent, tmp_path: Path) -> None:
    ag, _ = agent
    lossy = LossyAgent(os.dup(ag.fd), lose=2)
    log = tmp_path / "ran"
    res = lossy.run(f"echo once >> {log}; echo {'x' * 100}")
    assert res.rc == 0 and res.stdout == "x" * 100 + "\n"
    assert lossy.frames == 3 and log.read_text() == "once\n"  # ran exactly once
    with pytest.raises(AgentError, match="did not take the command after 4 attempts"):
        LossyAgent(os.dup(ag.fd), lose=99).run("true")
    assert ag.run("echo fine").stdout == "fine\n"


def test_agent_runs_a_repeated_frame_once(agent, tmp_path: Path) -> None:
    ag, _ = agent
    log = tmp_path / "ran"
    script = base64.b64encode(f"echo run >> {log}".encode()).decode()
    frame = f"VTDX-CMD 900 5 {len(script)} {script}"
    ag._send(frame)
    ag._send(frame)  # as the host does when the first GOT came late
    assert ag.run(f"cat {log}").stdout == "run\n"


def test_agent_large_output(agent) -> None:
    ag, _ = agent
    res = ag.run("head -c 200000 /dev/zero | tr '\\0' x")
    assert res.rc == 0 and res.stdout == "x" * 200000


# --------------------------------------------------------------------------- payloads


def test_payloads_build_static_and_speak_ktap(tmp_path: Path) -> None:
    bins = build_payloads(tmp_path)
    assert set(bins) == set(sources()) >= {"tdx-state", "cpu-hotplug", "pfn-state"}
    for name, data in bins.items():
        assert _is_static(data), f"{name} is not static"
    exe = tmp_path / "pfn-state"
    exe.write_bytes(bins["pfn-state"])
    exe.chmod(0o755)
    usage = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr
    # Cached: the second call does not rebuild.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "payloads").rglob("*") if p.is_file()}
    build_payloads(tmp_path)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "payloads").rglob("*") if p.is_file()}
    assert before == after


def _build_in_a_process(cache: Path) -> list[str]:
    return sorted(build_payloads(cache))


def test_parallel_builders_share_one_payload_build(tmp_path: Path) -> None:
    """scripts/test runs a pytest worker per CPU, and each may find the payloads missing
    (a changed source): two processes building into one empty cache at once both get the
    payloads, and one build is left, with no temporary directory behind."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_build_in_a_process, [tmp_path, tmp_path])
    assert first == second == sorted(sources())
    assert len(list((tmp_path / "payloads").iterdir())) == 1


def test_ktap_parser() -> None:
    text = ("KTAP version 1\n1..3\n# pamt_kb: 8212\nok 1 a\nnot ok 2 b # kernel: oops\n"
            "ok 3 c # SKIP only one CPU\n")
    r = KtapResult.parse("x", 1, text)
    assert r.planned == 3 and [c.name for c in r.cases] == ["a", "b", "c"]
    assert r.diag == {"pamt_kb": "8212"}
    assert [c.name for c in r.failed] == ["b"] and r.case("c").skipped and not r.ok
    with pytest.raises(AssertionError, match=r"(?s)payload failed \(b\).*not ok 2 b"):
        r.assert_ok()
    truncated = KtapResult.parse("x", 0, "KTAP version 1\n1..2\nok 1 a\n")
    assert not truncated.ok  # a payload that died half way is a failure


def test_agent_initramfs_appends_agent_and_payloads(tmp_path: Path) -> None:
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox")
    out = agent_initramfs(tmp_path, PayloadSet({"hello": b"\x7fELF-not-really"}))
    # Two gzip members: vtdx's initramfs, then the agent's (the kernel unpacks both).
    data, members = out.read_bytes(), []
    while data.strip(b"\0"):
        d = zlib.decompressobj(wbits=31)
        members.append(d.decompress(data.lstrip(b"\0")))
        data = d.unused_data
    assert len(members) == 2
    first, second = members
    assert b"init\0" in first and b"bin/busybox\0" in first
    assert f"{GUEST_BIN}/hello\0".encode() in second and b"agent\0" in second
    assert b"TRAILER!!!" in second
    assert agent_initramfs(tmp_path, PayloadSet({"hello": b"\x7fELF-not-really"})) == out


# --------------------------------------------------------------------------- plugin


def test_plugin_is_inert_without_a_kernel() -> None:
    t0 = time.monotonic()
    r = _pytest(str(EXAMPLES), "-q", "-rs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b14 skipped\b", r.stdout), r.stdout
    assert "no --vtdx-kernel given" in r.stdout
    assert time.monotonic() - t0 < 60


def test_plugin_rejects_a_missing_kernel_in_one_line(tmp_path: Path) -> None:
    r = _pytest(str(EXAMPLES), "-q", f"--vtdx-kernel={tmp_path}/bzImage")
    assert r.returncode == 4  # pytest's usage error
    assert f"--vtdx-kernel: {tmp_path}/bzImage not found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mem,needle", [("100T", "--vtdx-mem 100T: at most"),
                                        ("lots", "invalid memory size 'lots'")])
def test_plugin_rejects_an_impossible_memory_size_in_one_line(tmp_path: Path, mem: str,
                                                              needle: str) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    r = _pytest(str(EXAMPLES), "-q", f"--vtdx-kernel={kernel}", f"--vtdx-mem={mem}")
    assert r.returncode == 4  # pytest's usage error
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.kernel
@needs_kernel
def test_example_suite_green_on_the_default_kernel() -> None:
    """The acceptance run: the example suite, as a user's CI job runs it."""
    t0 = time.monotonic()
    r = _pytest(str(EXAMPLES), "--vtdx-kernel=default", "-v")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    # All pass; the kvm-tdx example would skip (not fail) on a platform without KVM TDX VMs.
    passed = re.search(r"\b(\d+) passed\b", r.stdout)
    assert passed and int(passed[1]) == 14 and " failed" not in r.stdout, r.stdout[-3000:]
    # One shared boot for test_tdx_host.py, one each for its KVM and 4-CPU tests, one per
    # fault scenario (4).
    boots = re.search(r"vtdx: (\d+) machine boot\(s\)", r.stdout)
    assert boots and int(boots[1]) == 7, r.stdout[-2000:]
    print(f"example suite: {took:.1f} s wall; {boots[0]}")


BROKEN = '''
from vtdx.harness.vm import Vm


def test_expects_three_lp_inits(vtdx_vm: Vm) -> None:
    vtdx_vm.run("echo VTDX-CI-MARKER-$((6 * 7)) > /dev/kmsg", check=True)
    # Deliberately wrong: a 2-vCPU machine makes one TDH.SYS.LP.INIT per CPU.
    assert vtdx_vm.trace.count("TDH.SYS.LP.INIT") == 3
'''


@pytest.mark.kernel
@needs_kernel
def test_broken_expectation_shows_console_tail_and_seamcalls(tmp_path: Path) -> None:
    (tmp_path / "test_broken.py").write_text(BROKEN)
    r = _pytest(str(tmp_path), "--vtdx-kernel=default", "-q", cwd=tmp_path, timeout=600)
    out = r.stdout
    assert r.returncode == 1, out[-4000:] + r.stderr[-2000:]
    assert "assert 2 == 3" in out
    console = out.split("vtdx guest console, last 40 lines", 1)
    assert len(console) == 2, out[-4000:]
    assert "VTDX-CI-MARKER-42" in console[1]  # the kernel printed it on the console
    assert "vtdx SEAMCALLs: none during this test; the run's" in out
    assert re.search(r"calls: TDH\.SYS\.INIT 1, TDH\.SYS\.LP\.INIT 2, ", out)
    # The symbolised excerpt, with the TDMR.INIT loop folded into one line.
    assert re.search(r"#\d+ lp\d TDH\.SYS\.TDMR\.INIT -> TDX_SUCCESS .* from init_tdmr\S* +"
                     r"\(x\d+: #\d+\.\.#\d+\)", out), out[-3000:]
    assert "vtdx guest commands" in out and "VTDX-CI-MARKER" in out
