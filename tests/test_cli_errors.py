"""A user's mistake is one readable line, a non-zero exit status and no traceback; ordinary
shell use (`| head`, following a trace that does not exist yet) just works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def vtdx(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtdx", *args], capture_output=True,
                          text=True, timeout=120, env=ENV, **kw)  # type: ignore[call-overload]


def one_line_error(r: subprocess.CompletedProcess[str], rc: int, *needles: str) -> str:
    """Assert exit status ``rc``, a stderr of exactly one line containing ``needles``."""
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _record(seq: int, lp: int = 0) -> str:
    return json.dumps({"seq": seq, "lp": lp, "leaf": 35, "name": "TDH.SYS.LP.INIT",
                       "status-name": "TDX_SUCCESS", "ok": True}) + "\n"


# --------------------------------------------------------------------------- vtdx run


@pytest.fixture
def kernel_file(tmp_path: Path) -> Path:
    """Any existing file: these errors come before anything boots."""
    k = tmp_path / "bzImage"
    k.write_bytes(b"\0" * 512)
    return k


@pytest.mark.parametrize("mem,needle", [
    ("100T", "--mem 100T: at most"),
    ("64T", "--mem 64T: at most"),  # physical addresses end at the keyid bits, 2^46
    ("100", "--mem 100M: need at least 256M"),
    ("lots", "invalid memory size 'lots'"),
])
def test_run_impossible_memory_sizes(kernel_file: Path, mem: str, needle: str) -> None:
    one_line_error(vtdx("run", "--kernel", str(kernel_file), "--mem", mem), 1, needle)


def test_run_unknown_check_lists_the_valid_ones(kernel_file: Path) -> None:
    line = one_line_error(vtdx("run", "--kernel", str(kernel_file), "--checks", "tdx,hotplg"),
                          1, "hotplg")
    assert "tdx" in line and "hotplug" in line and "none" in line


@pytest.mark.parametrize("args,needle", [
    (["--smp", "0"], "--smp 0: must be 1..64"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--expect-warn", "("], "--expect-warn '(': not a regular expression"),
    (["--inject", "NOT_A_STATUS:TDH.SYS.INIT"], "--inject"),
    (["--inject", "TDX_SYS_BUSY:TDH.NOPE"], "--inject"),
    (["--inject", "TDX_SYS_BUSY:TDH.SYS.INIT:bogus=1"], "--inject"),
    (["--gdb", "70000"], "--gdb 70000"),
    (["--put", "/nonexistent/tool"], "--put /nonexistent/tool: no such file or directory"),
    (["--put", "/etc/hostname=relative/path"], "the guest path must be absolute"),
])
def test_run_bad_options(kernel_file: Path, args: list[str], needle: str) -> None:
    one_line_error(vtdx("run", "--kernel", str(kernel_file), *args), 1, needle)


def test_run_unknown_profile_lists_each_profile_once(kernel_file: Path) -> None:
    line = one_line_error(vtdx("run", "--kernel", str(kernel_file), "--profile", "dpam"), 2,
                          "--profile", "dpam")
    listed = line[line.index("choose from"):]
    for name in ("default", "dpamt", "no-movdir64b", "one-keyid"):
        assert listed.count(f"'{name}'") == 1, line


@pytest.mark.parametrize("jobs", ["0", "many"])
def test_build_kernel_bad_jobs(jobs: str) -> None:
    one_line_error(vtdx("build-kernel", "--jobs", jobs), 2, "--jobs", "1..1024")


def test_run_missing_files() -> None:
    one_line_error(vtdx("run", "--kernel", "/nonexistent/bzImage"), 1, "/nonexistent/bzImage")


def test_run_kernel_directory_names_its_image(kernel_file: Path) -> None:
    """A kernel build directory (vtdx build-kernel's output) is not the image: say so."""
    one_line_error(vtdx("run", "--kernel", str(kernel_file.parent)), 1,
                   "is a directory", "(its bzImage)")
    one_line_error(vtdx("run", "--kernel", str(kernel_file), "--vmlinux",
                        str(kernel_file.parent)), 1, "vmlinux", "is a directory")


# --------------------------------------------------------------------------- vtdx trace


def test_trace_of_a_binary_file(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 8 + b"\n")
    one_line_error(vtdx("trace", str(f)), 1, "not a vtdx SEAMCALL trace", "binary data")


def test_trace_of_a_text_file_that_is_not_a_trace(tmp_path: Path) -> None:
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
    one_line_error(vtdx("trace", str(f)), 1, "not a vtdx SEAMCALL trace", "line 1")


def test_trace_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`vtdx trace | head -1`: the reader leaves early; no BrokenPipe traceback."""
    f = tmp_path / "trace.jsonl"
    f.write_text("".join(_record(i) for i in range(1, 20001)))
    r = subprocess.run(f"{shlex_q(sys.executable)} -m vtdx trace {shlex_q(str(f))} | head -1",
                       shell=True, capture_output=True, text=True, env=ENV, timeout=120,
                       executable=shutil.which("bash"))
    assert r.stdout.startswith("#1 lp0 TDH.SYS.LP.INIT")
    assert r.stderr == "", r.stderr


def shlex_q(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_trace_follow_waits_misses_nothing_and_ends_with_the_run(tmp_path: Path) -> None:
    """-f before the trace exists waits for it, prints every call including the last one
    written right before the run ends, and exits 0 when the run directory goes away."""
    run_dir = tmp_path / "vtdx-run-x"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vtdx", "trace", str(run_dir), "-f",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stderr is not None
        waiting = proc.stderr.readline()  # it announces that it waits, then waits
        assert waiting.strip() == f"vtdx trace: waiting for {run_dir / 'trace.jsonl'}"
        time.sleep(0.5)
        assert proc.poll() is None
        with open(run_dir / "trace.jsonl", "w") as f:
            f.write(_record(1))
            f.flush()
            time.sleep(0.5)
            f.write(_record(2, lp=1))
            f.write(_record(3, lp=1))  # the last call, written as the run ends
        shutil.rmtree(run_dir)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(ln)["seq"] for ln in out.splitlines()] == [1, 2, 3]
    assert err == ""  # nothing after the one waiting line


def test_trace_follow_of_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    one_line_error(vtdx("trace", str(tmp_path / "gone"), "-f"), 1, "does not exist")


# --------------------------------------------------------------------------- vtdx console


def test_console_after_the_machine_ended(tmp_path: Path) -> None:
    """The run directory of a finished run is gone: one line, exit 1."""
    one_line_error(vtdx("console", str(tmp_path / "vtdx-run-ended"), "-c", "status"), 1,
                   "no vtdx QMP socket")
