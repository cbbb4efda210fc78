"""``vtdx run``: boot a Linux TDX-host kernel on vtdx and judge the result.

The machine (run directory, shared guest RAM, daemon with the TDX module, QEMU with the
plugin, cleanup) is ``vtdx.session.machine.Machine``; this module adds what a person running a
kernel wants: the console streamed live, a verdict (TDX initialised / the kernel's own reason
for refusing TDX / panic or oops / timeout) and a summary of the module's state that puts the
kernel's claims next to vtdx's own accounting (PAMT KB, keyids, SEAMCALLs per leaf and LP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vtdx.abi.leaves import Leaf, leaf_name
from vtdx.abi.regs import Regs
from vtdx.abi.status import is_error
from vtdx.errors import VtdxError
from vtdx.host import initramfs, payloads
from vtdx.module.control import POINTS
from vtdx.module.engine.exits import exit_reason_name
from vtdx.module.stats import CallStats
from vtdx.module.timing import requested
from vtdx.observe.console.format import table
from vtdx.observe.inspect import summarise
from vtdx.observe.qmp.commands import parse_status
from vtdx.observe.trace import parse_leaf
from vtdx.platform.profile import PROFILES, GiB, KiB, MiB, Profile
from vtdx.session.machine import KERNEL_APPEND, Machine, Terminated, on_signals
from vtdx.units import format_size

if TYPE_CHECKING:
    from vtdx.module.core import TdxModule

#: A TDX host is an Intel machine: with TCG's default (AMD) vendor the kernel never sets
#: X86_FEATURE_MSR_IA32_FEAT_CTL (init_ia32_feat_ctl runs for Intel/Centaur/Zhaoxin only) and
#: kvm_intel refuses to load ("VMX not enabled (by BIOS) in MSR_IA32_FEAT_CTL").
CPU_MODEL = "max,vendor=GenuineIntel"

#: Command line every run gets: serial console, no hibernation (the kernel refuses TDX while
#: hibernation is possible), reboot at once on panic (QEMU runs with -no-reboot, so it exits).

EXIT_OK = 0
EXIT_FAILED = 1
#: The kernel booted cleanly but refused (or failed) to initialise TDX.
EXIT_TDX_REFUSED = 3

# --- the console ------------------------------------------------------------------------------

_TS = r"(?:\[\s*[\d.]+\]\s*)?"
TDX_OK = re.compile(_TS + r"virt/tdx: TDX-Module initialized")
PAMT_KB = re.compile(_TS + r"virt/tdx: (\d+) KB allocated for PAMT")
KEYID_RANGE = re.compile(_TS + r"virt/tdx: BIOS enabled: private KeyID range \[(\d+), (\d+)\)")
#: Every way arch/x86/virt/vmx/tdx/tdx.c (Linux 7.3) says it will not use TDX: tdx_init's
#: "initialization failed: too few private KeyIDs available." / "... Hibernation support is
#: enabled", tdx_enable's "<FEATURE> is required for TDX" / "TDX not supported by the host
#: platform" / "TDX-Module initialization failed (%d)", "module not loaded", and a failed
#: SEAMCALL ("SEAMCALL (0x..) failed: ...").
TDX_REFUSAL = re.compile(
    _TS + r"(virt/tdx: (?:initialization failed: .*|.* is required for TDX|"
    r"TDX not supported by the host platform|TDX-Module initialization failed.*|"
    r"module not loaded|SEAMCALL .*failed.*))$")
#: A line that ends the kernel (the run stops waiting for the init script).
FATAL = re.compile(_TS + r"(Kernel panic - not syncing.*|Oops: .*|"
                   r"general protection fault.*|kernel BUG at .*)")
#: The first line of a kernel report that something is wrong: WARN_ON (and KVM_BUG_ON,
#: TDX_BUG_ON), BUG_ON, lockdep ("WARNING: possible circular locking dependency detected"),
#: DEBUG_ATOMIC_SLEEP ("BUG: sleeping function called from invalid context"), DEBUG_LIST
#: (its WARN), UBSAN, an oops. A run or a test fails on any such report unless expected.
SPLAT = re.compile(_TS + r"((?:WARNING|BUG|UBSAN|KASAN): .*|Oops: .*|kernel BUG at .*|"
                   r"general protection fault.*|Kernel panic - not syncing.*)")
#: The line that closes a report (lib/bug.c, kernel/panic.c: "---[ end trace <id> ]---").
SPLAT_END = re.compile(r"---\[ end (?:trace|Kernel panic)")
#: Lines kept per report (header, registers, call trace).
SPLAT_LINES = 60
RESULT = re.compile(r"VTDX-RESULT (\w+)=(.*)$")
POWER_DOWN = re.compile(_TS + r"reboot: (Power down|Restarting system)")


@dataclass
class Splat:
    """One kernel report (WARNING/BUG/oops...): its first line and the lines that follow."""

    header: str
    lines: list[str] = field(default_factory=list)
    closed: bool = False
    expected: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def split_splats(lines: list[str], expect: tuple[str, ...] = ()) -> list[Splat]:
    """The kernel reports in console ``lines``; ``expect`` regexes mark the ones a test or a
    run declared expected (a pattern found anywhere in the report's text)."""
    log = ConsoleLog(expect=expect)
    for line in lines:
        log.feed(line)
    return log.splats


@dataclass
class ConsoleLog:
    """What the guest said, parsed line by line as it streams."""

    lines: list[str] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    tdx_initialized: bool = False
    pamt_kb: int | None = None
    keyid_range: tuple[int, int] | None = None
    refusals: list[str] = field(default_factory=list)
    #: Why the kernel died: the first line of the report the fatal line belongs to.
    panic: str | None = None
    powered_off: bool = False
    #: Regexes of kernel reports that are expected (``vtdx run --expect-warn``).
    expect: tuple[str, ...] = ()
    splats: list[Splat] = field(default_factory=list)

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        self.lines.append(line)
        self._feed_splat(line)
        if m := RESULT.search(line):
            self.results[m[1]] = m[2].strip()
        elif TDX_OK.search(line):
            self.tdx_initialized = True
        elif m := PAMT_KB.search(line):
            self.pamt_kb = int(m[1])
        elif m := KEYID_RANGE.search(line):
            self.keyid_range = (int(m[1]), int(m[2]))
        elif m := TDX_REFUSAL.search(line):
            self.refusals.append(m[1])
        elif (m := FATAL.search(line)) and self.panic is None:
            open_ = self.splats[-1] if self.splats and not self.splats[-1].closed else None
            self.panic = open_.header if open_ is not None else m[1]
        elif POWER_DOWN.search(line):
            self.powered_off = True

    def _feed_splat(self, line: str) -> None:
        cur = self.splats[-1] if self.splats and not self.splats[-1].closed else None
        m = SPLAT.search(line)
        # An oops right after the BUG: line that explains it is one report, not two.
        if m and not (cur is not None and FATAL.search(line)):
            if cur is not None:
                self._close(cur)
            self.splats.append(Splat(m[1], [line]))
            return
        if cur is None:
            return
        cur.lines.append(line)
        if SPLAT_END.search(line) or len(cur.lines) >= SPLAT_LINES or RESULT.search(line):
            self._close(cur)

    def _close(self, splat: Splat) -> None:
        splat.closed = True
        splat.expected = any(re.search(p, splat.text) for p in self.expect)

    @property
    def unexpected_splats(self) -> list[Splat]:
        out = []
        for s in self.splats:
            if not s.closed:  # still streaming: judge what arrived so far
                s.expected = any(re.search(p, s.text) for p in self.expect)
            if not s.expected:
                out.append(s)
        return out

    @property
    def done(self) -> bool:
        """The init script finished (it prints ``done=1`` right before powering off)."""
        return self.results.get("done") == "1"

    @property
    def refusal_reason(self) -> str | None:
        """The kernel's first reason: tdx_init's specific line precedes tdx_enable's generic one."""
        return self.refusals[0] if self.refusals else None


# --- options -----------------------------------------------------------------------------------

#: The in-guest checks guest/initramfs/init knows.
CHECKS = ("tdx", "hotplug", "kvm", "kvm-td", "none")


def check_mem(mem: int, option: str) -> None:
    """A guest RAM size vtdx can give a machine, else VtdxError naming ``option``."""
    if mem < 256 * MiB:
        raise VtdxError(f"{option} {format_size(mem)}: need at least 256M")
    # Guest-physical addresses stop below the keyid bits (Profile.hkid_start_bit); q35 puts
    # RAM beyond 3 GiB above 4 GiB, so the top of RAM is about mem + 1 GiB.
    top = 1 << Profile().hkid_start_bit
    if mem > top - 4 * GiB:
        raise VtdxError(f"{option} {format_size(mem)}: at most {format_size(top - 4 * GiB)} "
                        f"(the platform's physical addresses end at {format_size(top)}, "
                        "below the keyid bits)")


@dataclass(frozen=True)
class InjectRule:
    """``--inject STATUS[:LEAF][:lp=N][:count=N|all][:after=N]``: the fields of the pytest
    marker's ``Fault`` (vtdx.harness.vm), armed in the module before the kernel starts.
    ``count`` calls of LEAF (on LP ``lp``) return STATUS once ``after`` matching calls
    succeeded."""

    status: int
    leaf: int | None = None
    count: int | None = 1
    lp: int | None = None
    after: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> InjectRule:
        parts = [p.strip() for p in text.split(":")]
        bad = f"--inject {text!r}: "
        try:
            status = parse_status(parts[0])
        except VtdxError as e:
            raise VtdxError(bad + str(e)) from None
        kw: dict[str, Any] = {}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            try:
                if not eq and "leaf" not in kw:
                    kw["leaf"] = parse_leaf(part)
                elif key in ("lp", "after"):
                    kw[key] = int(value, 0)
                elif key == "count":
                    kw["count"] = None if value == "all" else int(value, 0)
                else:
                    raise VtdxError(f"unknown field {part!r} (use lp=, count=, after=)")
            except ValueError:
                raise VtdxError(bad + f"{key}={value!r} is not a number") from None
            except VtdxError as e:
                raise VtdxError(bad + str(e)) from None
        rule = cls(status, text=text, **kw)
        if (rule.count is not None and rule.count < 1) or rule.after < 0 or (
                rule.lp is not None and rule.lp < 0):
            raise VtdxError(bad + "count must be >= 1 (or all), after >= 0, lp >= 0")
        return rule

    def arm(self, module: TdxModule) -> None:
        lps = {self.lp} if self.lp is not None else None
        module.faults.add(self.status, self.leaf, count=self.count, lps=lps, after=self.after)


@dataclass(frozen=True)
class PauseRule:
    """``--pause LEAF[:lp=N][:point=entry|locked|done][:nth=N][:td=PA][:gpa=A[+SIZE]]
    [:hpa=A[+SIZE]][:until=LEAF][:timeout=S]``: a control-point pause armed in the module
    before the kernel starts (``module.control.pause``; docs/races.md). LEAF may be ``any``.
    Resume it with ``vtdx console RUN_DIR -c 'resume-call ID'`` (ids count from 1)."""

    leaf: int | None = None
    lp: int | None = None
    point: str = "locked"
    nth: int = 1
    td: int | None = None
    gpa: tuple[int, int] | None = None
    hpa: tuple[int, int] | None = None
    until: int | None = None
    timeout: float | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> PauseRule:
        parts = [p.strip() for p in text.split(":")]
        bad = f"--pause {text!r}: "
        kw: dict[str, Any] = {}
        try:
            if parts[0] and parts[0] != "any":
                kw["leaf"] = parse_leaf(parts[0])
            for part in parts[1:]:
                key, eq, value = part.partition("=")
                if not eq:
                    raise VtdxError(f"field {part!r} needs a value (e.g. lp=1)")
                if key in ("lp", "nth", "td"):
                    kw[key] = int(value, 0)
                elif key == "point":
                    if value not in POINTS:
                        raise VtdxError(f"point {value!r}: one of {', '.join(POINTS)}")
                    kw["point"] = value
                elif key in ("gpa", "hpa"):
                    start, plus, size = value.partition("+")
                    a = int(start, 0)
                    kw[key] = (a & ~0xFFF, a + (int(size, 0) if plus else 0x1000))
                elif key == "until":
                    kw["until"] = parse_leaf(value)
                elif key == "timeout":
                    kw["timeout"] = float(value)
                else:
                    raise VtdxError(f"unknown field {key!r} (use lp=, point=, nth=, td=, "
                                    "gpa=, hpa=, until=, timeout=)")
        except ValueError:
            raise VtdxError(bad + "a number was expected") from None
        except VtdxError as e:
            raise VtdxError(bad + str(e)) from None
        rule = cls(text=text, **kw)
        if rule.nth < 1 or (rule.lp is not None and rule.lp < 0) or (
                rule.timeout is not None and rule.timeout <= 0):
            raise VtdxError(bad + "nth must be >= 1, lp >= 0, timeout > 0")
        return rule

    def arm(self, module: TdxModule) -> None:
        module.control.pause(self.lp, self.leaf, self.point, td=self.td, gpa=self.gpa,
                             hpa=self.hpa, nth=self.nth, until_leaf=self.until,
                             timeout_s=self.timeout)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class RunOptions:
    kernel: Path
    vmlinux: Path | None = None
    initrd: Path | None = None
    smp: int = 2
    mem: int = 2 * GiB
    append: str = ""
    kernel_src: Path | None = None
    #: Profile overrides that make the platform lack what the kernel needs.
    tdx_keyids: int | None = None
    movdir64b: bool = True
    checks: str = "tdx"
    timeout: float = 300.0
    #: Echo the guest console to ``out`` as it arrives.
    stream: bool = True
    #: Keep the SEAMCALL trace (JSON lines) here after the run; `vtdx trace FILE` reads it.
    save_trace: Path | None = None
    #: Kernel reports (WARNING/BUG...) matching one of these regexes do not fail the run.
    expect_warn: tuple[str, ...] = ()
    #: Module faults armed before the kernel starts.
    inject: tuple[InjectRule, ...] = ()
    #: Extra QEMU arguments, appended last.
    qemu_args: tuple[str, ...] = ()
    #: QEMU gdbstub on 127.0.0.1:PORT.
    gdb: int | None = None
    #: Stay up after boot until stopped (Ctrl-C, SIGTERM) or the guest powers off.
    keep: bool = False
    #: Host files or directories put into the guest: (source, absolute guest path).
    put: tuple[tuple[Path, str], ...] = ()
    #: An interactive shell in the guest on this terminal (implies ``keep``): stdin is the
    #: guest's ttyS0 input, the console is passed through byte by byte.
    shell: bool = False
    #: The named platform profile (``vtdx.platform.profile.PROFILES``) and the module
    #: feature toggles (``+name,-name``) applied to it.
    platform: str = "default"
    features: str = ""
    #: Control-point pauses armed before the kernel starts.
    pauses: tuple[PauseRule, ...] = ()
    #: Contention exploration seed (``vtdx.module.timing.Explore``), or None.
    contend: int | None = None
    #: Fully serial, deterministic module timing (no overlap between LPs' calls).
    serial: bool = False

    @property
    def own_initrd(self) -> bool:
        """A user's initramfs: no vtdx init, so the kernel's TDX lines are the verdict."""
        return self.initrd is not None

    def validate(self) -> None:
        if self.kernel.is_dir():
            hint = " (its bzImage)" if (self.kernel / "bzImage").is_file() else ""
            raise VtdxError(f"kernel {self.kernel} is a directory: --kernel takes the image "
                            f"file{hint}")
        if not self.kernel.is_file():
            raise VtdxError(f"kernel {self.kernel} not found (run `vtdx build-kernel`)")
        for what, p in (("vmlinux", self.vmlinux), ("initrd", self.initrd)):
            if p is not None and p.is_dir():
                raise VtdxError(f"{what} {p} is a directory, not a file")
            if p is not None and not p.is_file():
                raise VtdxError(f"{what} {p} not found")
        if self.save_trace is not None and not self.save_trace.parent.is_dir():
            raise VtdxError(f"--save-trace {self.save_trace}: no such directory "
                            f"{self.save_trace.parent}")
        if self.kernel_src is not None and not (self.kernel_src / "Makefile").is_file():
            raise VtdxError(f"--kernel-src {self.kernel_src}: not a kernel tree")
        if not 1 <= self.smp <= 64:
            raise VtdxError(f"--smp {self.smp}: must be 1..64")
        check_mem(self.mem, "--mem")
        if self.tdx_keyids is not None:
            base = Profile()
            room = (1 << base.keyid_bits) - 1 - base.mktme_keyids
            if not 0 <= self.tdx_keyids <= room:
                raise VtdxError(f"--tdx-keyids {self.tdx_keyids}: must be 0..{room} "
                                f"({base.keyid_bits} keyid bits, {base.mktme_keyids} MKTME keyids)")
        if self.timeout <= 0:
            raise VtdxError("--timeout must be positive")
        if self.platform not in PROFILES:
            raise VtdxError(f"--profile {self.platform}: unknown (choose from "
                            f"{', '.join(PROFILES)})")
        if self.serial and self.contend is not None:
            raise VtdxError("--serial and --contend exclude each other")
        if self.contend is not None and not 0 <= self.contend < 1 << 64:
            raise VtdxError(f"--contend {self.contend}: a seed is 0..2**64-1")
        self.profile()  # --features: unknown names are refused here, in one line
        unknown = [c for c in self.checks.split(",") if c.strip() not in CHECKS]
        if unknown or not self.checks.strip():
            raise VtdxError(f"--checks {self.checks}: unknown check(s) "
                            f"{', '.join(repr(c) for c in unknown) or 'none given'}; "
                            f"valid: {', '.join(CHECKS)}")
        if self.shell and self.own_initrd:
            raise VtdxError("--shell needs vtdx's initramfs (its init offers the shell); "
                            "drop --initrd")
        for src, dest in self.put:
            if not src.exists():
                raise VtdxError(f"--put {src}: no such file or directory")
            if not dest.startswith("/") or ".." in dest.split("/") or dest.rstrip("/") == "":
                raise VtdxError(f"--put {src}={dest}: the guest path must be absolute, "
                                "e.g. /root/tools")
        if self.gdb is not None and not 1 <= self.gdb <= 65535:
            raise VtdxError(f"--gdb {self.gdb}: a TCP port is 1..65535")
        for pat in self.expect_warn:
            try:
                re.compile(pat)
            except re.error as e:
                raise VtdxError(f"--expect-warn {pat!r}: not a regular expression ({e})") from None

    def profile(self) -> Profile:
        over: dict[str, Any] = {"movdir64b": self.movdir64b}
        if self.tdx_keyids is not None:
            over["tdx_keyids"] = self.tdx_keyids
        name = [n for n, on in (("no-movdir64b", not self.movdir64b),
                                (f"tdx-keyids-{self.tdx_keyids}", self.tdx_keyids is not None))
                if on]
        base = Profile.named(self.platform, self.smp, self.mem, self.features)
        over["name"] = "+".join([self.platform, *name]) if name else self.platform
        return replace(base, **over)

    def timing_text(self) -> str:
        """The timing the run asks for (the daemon's default is overlap)."""
        if self.serial:
            return "serial"
        if self.contend is not None:
            return f"explore (seed {self.contend})"
        return "overlap"

    def arm(self, module: TdxModule) -> None:
        """Faults, pauses and timing, before the kernel starts."""
        for rule in self.inject:
            rule.arm(module)
        for pause in self.pauses:
            pause.arm(module)
        timing = requested(self.serial, self.contend)
        if timing is not None:
            module.control.set_timing(timing)

    def cmdline(self) -> str:
        extra = self.append.strip()
        checks = "" if "vtdx.checks=" in extra else f" vtdx.checks={self.checks}"
        keep = " vtdx.shell=1" if self.shell else " vtdx.keep=1" if self.keep else ""
        wants_kvm = bool({"kvm", "kvm-td"} & set(self.checks.split(",")))
        kvm = " kvm_intel.tdx=1" if wants_kvm and "kvm_intel.tdx=" not in extra else ""
        return f"{KERNEL_APPEND}{checks}{kvm}{keep} {extra}".strip()

    def initramfs(self) -> Path:
        """The user's --initrd, or vtdx's (with the KVM payload when ``kvm`` is checked)."""
        rd = self.initrd if self.initrd is not None else initramfs.ensure_initramfs()
        # --checks kvm: kvm-tdx (a TD's life up to its vCPUs); kvm-td: kvm-td (a TD that
        # runs its guest to PASS with 1 and 2 vCPUs).
        wanted = [c for c in ("kvm", "kvm-td") if c in self.checks.split(",")]
        if wanted and self.initrd is None:
            if self.kernel_src is None:
                raise VtdxError(f"--checks {wanted[0]}: the KVM payload is built against the "
                                "kernel's UAPI headers: pass --kernel-src DIR (default kernel: "
                                "its source)")
            headers = payloads.kernel_headers(self.kernel_src)
            built = payloads.build_payloads(headers=headers)
            names = {"kvm": "kvm-tdx", "kvm-td": "kvm-td"}
            rd = initramfs.with_files(rd, {f"vtdx/bin/{names[c]}": built[names[c]]
                                           for c in wanted}, tag="kvm")
        if self.put:
            rd = initramfs.with_files(rd, self.put_files(), tag="put")
        return rd

    def put_files(self) -> dict[str, bytes]:
        """--put as {guest path without the leading /: contents}; a directory recursively."""
        files: dict[str, bytes] = {}
        for src, dest in self.put:
            dest = dest.strip("/")
            try:
                if src.is_dir():
                    for f in sorted(p for p in src.rglob("*") if p.is_file()):
                        files[f"{dest}/{f.relative_to(src).as_posix()}"] = f.read_bytes()
                else:
                    files[dest] = src.read_bytes()
            except OSError as e:
                raise VtdxError(f"--put {src}: {e.strerror}") from None
        total = sum(len(b) for b in files.values())
        if total > self.mem // 4:
            raise VtdxError(f"--put: {total >> 20} MiB does not fit a guest with "
                            f"{format_size(self.mem)} of RAM (the initramfs lives in RAM)")
        return files

    def extra_qemu_args(self) -> list[str]:
        gdb = ["-gdb", f"tcp:127.0.0.1:{self.gdb}"] if self.gdb is not None else []
        return [*gdb, *self.qemu_args]


@dataclass
class RunResult:
    exit_code: int
    verdict: str
    console: ConsoleLog
    boot_s: float
    snapshot: dict[str, Any]
    #: The module's call statistics (``TdxModule.stats``; merged if the run had several).
    stats: CallStats
    pamt_module_kb: int | None
    #: Problems on vtdx's side (daemon errors, model exceptions, QEMU's stderr): shown on failure.
    diagnostics: list[str] = field(default_factory=list)
    #: The kernel's shutdown path (syscore tdx_shutdown) ran TDH.SYS.DISABLE; ``snapshot`` is
    #: the state right before it.
    disabled_by_kernel: bool = False
    #: Leaf -> the kernel functions behind its first traced call (needs --vmlinux).
    callers: dict[int, str] = field(default_factory=dict)
    #: BUSY statuses the kernel got from locks another call held (vtdx.module.contention).
    contention: list[Any] = field(default_factory=list)
    #: The module timing in force, as the summary prints it.
    timing: str = ""
    #: Call id -> kernel caller, for the calls in ``contention`` (needs --vmlinux).
    busy_callers: dict[int, str] = field(default_factory=dict)
    summary: str = ""


def judge(console: ConsoleLog, pamt_module_kb: int | None, timed_out: bool,
          qemu_rc: int | None, own_initrd: bool = False) -> tuple[int, str]:
    """(exit code, one-line verdict) from what the guest printed and the module's state.

    With a user's own initramfs (no vtdx init, no ``VTDX-RESULT`` lines) the kernel's own
    TDX lines decide: "TDX-Module initialized" and its PAMT size, or its refusal line."""
    if console.panic:
        return EXIT_FAILED, f"kernel crashed: {console.panic}"
    splats = console.unexpected_splats
    if splats:
        more = f" (and {len(splats) - 1} more report(s))" if len(splats) > 1 else ""
        return EXIT_FAILED, f"kernel reported a bug: {splats[0].header}{more}"
    if own_initrd:
        if console.tdx_initialized or console.refusals:
            return _judge_tdx(console, pamt_module_kb)
        if timed_out:
            return EXIT_FAILED, "timed out before the kernel printed a TDX line"
        why = f"QEMU exited with status {qemu_rc}" if qemu_rc else "QEMU exited"
        return EXIT_FAILED, f"{why} before the kernel printed a TDX line"
    if timed_out:
        return EXIT_FAILED, "timed out before the guest powered off"
    if not console.done:
        why = f"QEMU exited with status {qemu_rc}" if qemu_rc else "QEMU exited"
        return EXIT_FAILED, f"{why} before the guest's init finished"
    code, verdict = _judge_tdx(console, pamt_module_kb)
    if code != EXIT_OK:
        return code, verdict
    r = console.results
    bad = [k for k, v in r.items() if v == "failed" or v.startswith("unsupported")]
    if r.get("hotplug_tdx_errors", "0") != "0":
        bad.append(f"hotplug_tdx_errors={r['hotplug_tdx_errors']}")
    if bad:
        return EXIT_FAILED, f"in-guest check failed: {', '.join(bad)}"
    return code, verdict


def _judge_tdx(console: ConsoleLog, pamt_module_kb: int | None) -> tuple[int, str]:
    """The verdict of the kernel's TDX lines."""
    if not console.tdx_initialized:
        reason = console.refusal_reason or "no TDX message from the kernel (TDX host code absent?)"
        return EXIT_TDX_REFUSED, f"kernel refused TDX: {reason}"
    if console.pamt_kb is None:
        return EXIT_FAILED, "TDX initialized but the kernel printed no PAMT size"
    if pamt_module_kb != console.pamt_kb:
        return EXIT_FAILED, (f"PAMT mismatch: kernel allocated {console.pamt_kb} KB, "
                             f"vtdx accounts {pamt_module_kb} KB")
    return EXIT_OK, f"TDX-Module initialized, PAMT {console.pamt_kb} KB matches vtdx"


def td_exits(stats: CallStats) -> dict[str, int]:
    """TD exits per exit reason: the TDH.VP.ENTER calls that ended in a TD exit (RAX[31:0] is
    the exit reason; tdx-module td_exit.c), most frequent first."""
    out: Counter[str] = Counter()
    for (_, leaf, rax), n in stats.counts.items():
        if leaf == Leaf.TDH_VP_ENTER and not is_error(rax) and rax & 0xFFFF_FFFF:
            out[exit_reason_name(rax)] += n
    return dict(out.most_common())


def summarize(res: RunResult, opts: RunOptions) -> str:
    """The human summary printed after the console."""
    snap = res.snapshot
    word = {EXIT_OK: "PASS", EXIT_TDX_REFUSED: "TDX REFUSED"}.get(res.exit_code, "FAIL")
    lines = [f"vtdx run: {word}: {res.verdict}",
             f"  machine:   smp {opts.smp}, mem {format_size(opts.mem)}, profile "
             f"{opts.profile().name}, boot to poweroff {res.boot_s:.1f} s",
             f"  platform:  features {_features(opts.profile())}; timing "
             f"{res.timing or opts.timing_text()}"]
    if snap:
        when = " (before the kernel's TDH.SYS.DISABLE at poweroff)" \
            if res.disabled_by_kernel else ""
        lines.append(f"  module:    state {snap.get('state')}{when}, "
                     f"{snap.get('num_init_lps')}/{opts.smp} LPs initialized")
        tdmrs = snap.get("tdmrs") or []
        spans = ", ".join(f"[{t['base']:#x}, {t['base'] + t['size']:#x})" for t in tdmrs)
        lines.append(f"  TDMRs:     {len(tdmrs)}{': ' + spans if spans else ''}")
        by_level = snap.get("pamt_bytes") or {}
        levels = ", ".join(f"{lv} {b // KiB} KB" for lv, b in by_level.items())
        kernel = "" if res.console.pamt_kb is None else f" (kernel: {res.console.pamt_kb} KB)"
        total = "none" if res.pamt_module_kb is None else f"{res.pamt_module_kb} KB"
        lines.append(f"  PAMT:      {levels or '-'}; total {total}{kernel}")
        k = snap.get("keyids") or {}
        prof = opts.profile()
        lines.append(f"  keyids:    TDX [{prof.tdx_keyid_start}, {prof.tdx_keyid_end}), global "
                     f"{k.get('global')}, configured on packages {k.get('configured_packages')}")
    per_leaf = res.stats.per_leaf()
    errors = res.stats.errors_by_leaf()
    if per_leaf:
        lines.append("  SEAMCALLs: leaf: total (per LP)")
        for leaf, by_lp in per_leaf.items():
            lps = " ".join(f"lp{lp}:{n}" for lp, n in by_lp.items())
            errs = errors.get(leaf, 0)
            err = f", {errs} failed" if errs else ""
            who = f"  {res.callers[leaf]}" if leaf in res.callers else ""
            lines.append(f"    {leaf_name(leaf):<22} {sum(by_lp.values()):>5} ({lps}{err}){who}")
    else:
        lines.append("  SEAMCALLs: none")
    exits = td_exits(res.stats)
    if exits:
        lines.append("  TD exits:  " + ", ".join(f"{name} {n}" for name, n in exits.items()))
    if res.console.results:
        lines.append("  guest:     " + " ".join(f"{k}={v}" for k, v in res.console.results.items()
                                               if k != "done"))
    online = res.console.results.get("cpus_online")
    want = "0" if opts.smp == 1 else f"0-{opts.smp - 1}"
    if online is not None and online != want:
        lines.append(f"  note:      the guest brought up CPUs {online} of --smp {opts.smp} "
                     "(kernel CONFIG_NR_CPUS or maxcpus= too small?)")
    if res.contention:
        rows = summarise(res.contention, res.busy_callers.get)
        lines.append(f"  contention: {len(res.contention)} BUSY from locks another call held")
        lines += ["    " + ln for ln in table(
            ["leaf", "status", "lock", "held by", "count", "retried", "moved on", "callers"],
            [[r["leaf"], r["status-name"], r["lock"], r["holder-leaf"], r["count"],
              r["retried"], r["moved-on"], ", ".join(r["callers"]) or "-"]
             for r in rows]).splitlines()]
    if res.diagnostics:
        lines.append("  vtdx:      " + "\n             ".join(res.diagnostics[-12:]))
    for sp in res.console.splats:
        tag = "expected (--expect-warn)" if sp.expected else "FAILS the run"
        lines.append(f"  kernel report, {tag}:")
        lines += ["    " + ln for ln in sp.lines[:25]]
        if len(sp.lines) > 25:
            lines.append(f"    ... ({len(sp.lines) - 25} more lines)")
    return "\n".join(lines)


def _features(p: Profile) -> str:
    return " ".join(f"{'+' if on else '-'}{n}" for n, on in p.features.items())


class _Recorder:
    """The daemon's backend: the TdxModule, plus a snapshot taken right before the kernel
    tears the module down. Linux 7.3 registers a syscore shutdown hook (tdx_shutdown) that
    issues TDH.SYS.DISABLE at poweroff, which resets the module; the summary must describe
    the module as the booted kernel left it, not as the poweroff left it."""

    _TEARDOWN = frozenset({Leaf.TDH_SYS_DISABLE, Leaf.TDH_SYS_SHUTDOWN})

    def __init__(self, module: TdxModule) -> None:
        self.module = module
        #: What vtdx.observe.qmp.endpoint.start_inspect looks for behind a wrapping backend.
        self.delegate = module
        self.at_disable: tuple[dict[str, Any], int] | None = None
        self._lock = threading.Lock()

    def seamcall(self, lp: int, regs: Regs) -> Regs:
        if regs.rax & 0xFFFF in self._TEARDOWN:
            with self._lock:
                if self.at_disable is None:
                    self.at_disable = self._now()
        return self.module.seamcall(lp, regs)

    def _now(self) -> tuple[dict[str, Any], int]:
        with self.module.cond:
            return self.module.snapshot(), self.module.pamt.pamt_bytes_total()

    def state(self) -> tuple[dict[str, Any], int]:
        """(snapshot, PAMT bytes) before teardown if the kernel tore the module down, else now."""
        with self._lock:
            return self.at_disable if self.at_disable is not None else self._now()


def _busy_callers(machine: Any, backends: list[_Recorder]) -> dict[int, str]:
    """Kernel callers of the calls that got BUSY and of the calls holding the lock, from the
    machine's symbolised trace (read before the machine and its trace go away)."""
    recorder = getattr(getattr(machine, "inspect", None), "recorder", None)
    if recorder is None:
        return {}
    ids = {c for b in backends if b.module.contention is not None
           for r in b.module.contention.snapshot() for c in (r.call, *(h.call for h in r.holders))}
    out: dict[int, str] = {}
    for cid in ids:
        caller = recorder.caller_of(cid)
        if caller:
            out[cid] = caller
    return out


def _first_callers(machine: Any) -> dict[int, str]:
    """Leaf -> "caller <- its caller" from the machine's trace (vtdx.observe.trace symbolises each
    call from the guest stack while the vCPU waits in it; KASLR is found from the RIP)."""
    recorder = getattr(getattr(machine, "inspect", None), "recorder", None)
    if recorder is None:
        return {}
    out: dict[int, str] = {}
    for rec in recorder.last(4096):
        stack = [str(f).split("+", 1)[0] for f in rec.get("stack") or []]
        if stack and rec["leaf"] not in out:
            out[rec["leaf"]] = " <- ".join(stack[:2])
    return out


async def run_async(opts: RunOptions, out: TextIO | None,
                    machine_factory: Callable[..., Any] | None = None) -> RunResult:
    """Boot once; the Machine context manager stops QEMU and the daemon and removes the run
    directory whatever happens (timeout, panic, Ctrl-C, SIGTERM, SIGHUP: the last two raise
    ``Terminated`` once everything is cleaned up)."""
    with on_signals() as caught:
        try:
            return await _run_async(opts, out, machine_factory)
        except asyncio.CancelledError:
            if caught:
                raise Terminated(caught[0]) from None
            raise


async def _run_async(opts: RunOptions, out: TextIO | None,
                     machine_factory: Callable[..., Any] | None) -> RunResult:
    opts.validate()
    initrd = opts.initramfs()
    factory: Callable[..., Any] = machine_factory or Machine
    console = ConsoleLog(expect=tuple(opts.expect_warn))
    finished = asyncio.Event()
    backends: list[_Recorder] = []

    def backend(profile: Profile, memory: Any) -> _Recorder:
        from vtdx.module import TdxModule  # loaded while QEMU starts (Machine._start)

        module = TdxModule(profile, memory)
        opts.arm(module)
        backends.append(_Recorder(module))
        return backends[-1]

    echo = [out is not None and opts.stream and not opts.shell]

    def on_output(data: bytes) -> None:  # --shell: the terminal sees what the guest sends
        if out is None:
            return
        try:
            buffer = getattr(out, "buffer", None)
            if buffer is not None:
                out.flush()
                buffer.write(data)
                buffer.flush()
            else:
                out.write(data.decode(errors="replace"))
                out.flush()
        except (OSError, ValueError):
            pass

    def on_console(line: str) -> None:
        console.feed(line)
        if echo[0] and out is not None:
            try:
                out.write(line + "\n")
                out.flush()
            except (OSError, ValueError):  # terminal gone (SIGHUP), pipe closed: keep running
                echo[0] = False
        decided = console.tdx_initialized and console.pamt_kb is not None or console.refusals
        if console.done or console.panic or console.powered_off or (
                opts.own_initrd and decided):
            finished.set()

    timed_out = False
    t0 = time.monotonic()
    async with factory(
        opts.kernel, initrd=initrd, append=opts.cmdline(), smp=opts.smp, mem=opts.mem,
        profile=opts.profile(), backend=backend, on_console=on_console, cpu=CPU_MODEL,
        vmlinux=opts.vmlinux, save_trace=opts.save_trace, extra_args=opts.extra_qemu_args(),
        console_input=opts.shell, on_output=on_output if opts.shell else None,
    ) as machine:
        def say(*lines: str) -> None:
            if out is not None:
                with contextlib.suppress(OSError, ValueError):
                    end = "\r\n" if opts.shell else "\n"  # the terminal may be raw already
                    out.write("".join(f"vtdx: {ln}{end}" for ln in lines))
                    out.flush()

        # Where to attach while it runs: `vtdx console`, qmp-shell, `vtdx trace`.
        where = [f"run directory {machine.run_dir}"]
        if getattr(machine, "inspect", None) is not None:
            where += [f"QMP (vtdx) {machine.vtdx_qmp_path}", f"QMP (QEMU) {machine.qmp_path}"]
        if opts.gdb is not None:
            where.append(f"gdb stub on 127.0.0.1:{opts.gdb} "
                         f"(gdb vmlinux -ex 'target remote :{opts.gdb}')")
        say(*where)
        exited = asyncio.ensure_future(machine.qemu.wait())
        seen = asyncio.ensure_future(finished.wait())
        try:
            await asyncio.wait({exited, seen}, timeout=opts.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if (opts.keep or opts.shell) and seen.done() and not exited.done() \
                    and not console.panic:
                if not opts.shell:
                    say(f"machine kept up (--keep): run directory {machine.run_dir}; "
                        f"stop it with Ctrl-C or `kill {os.getpid()}`")
                try:
                    await asyncio.wait({exited})
                except asyncio.CancelledError:  # the way a kept machine is stopped
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
            elif seen.done() and not exited.done() and not opts.own_initrd:
                # Done/panic seen: give the guest a moment to power off or finish its trace.
                grace = 1.0 if console.panic else 10.0
                await asyncio.wait({exited}, timeout=grace)
            elif seen.done() and not exited.done():
                await asyncio.sleep(1.0)  # the kernel's TDX lines decided: let the trace settle
            # (timed out: neither; the machine is stopped now, --timeout is the whole wait)
            timed_out = not (exited.done() or seen.done())
        finally:
            seen.cancel()
        boot_s = time.monotonic() - t0
        qemu_rc = machine.qemu.returncode
        callers = _first_callers(machine)
        busy_callers = _busy_callers(machine, backends)
        diagnostics = [f"daemon: {e}" for e in machine.daemon.errors] if machine.daemon else []
        diagnostics += [f"qemu: {ln}" for ln in machine.stderr_lines[-10:] if ln.strip()]
        if exited.done():
            with contextlib.suppress(TimeoutError, VtdxError):
                await machine.wait(timeout=5)  # drains the console readers
        else:
            exited.cancel()
    rec = backends[0] if backends else None
    snapshot, pamt_bytes = rec.state() if rec else ({}, 0)
    pamt_kb = pamt_bytes // KiB if snapshot.get("tdmrs") else None
    code, verdict = judge(console, pamt_kb, timed_out, qemu_rc, opts.own_initrd)
    qemu_err = [ln for ln in diagnostics if ln.startswith("qemu: ")]
    if code == EXIT_FAILED and qemu_rc and qemu_err and not console.done:
        verdict += f" ({qemu_err[-1]})"  # QEMU's own reason (bad option, bad image...)
    if rec:
        diagnostics += [f"module: {e.strip().splitlines()[-1]}"
                        for e in rec.module.internal_errors]
    stats = CallStats.merged([b.module.stats for b in backends])
    contention = [r for b in backends if b.module.contention is not None
                  for r in b.module.contention.snapshot()]
    timing = ""
    if rec:
        t = rec.module.control.describe()
        timing = str(t["mode"]) + (f" (seed {t['seed']})" if "seed" in t else "")
    res = RunResult(code, verdict, console, boot_s, snapshot, stats, pamt_kb, diagnostics,
                    disabled_by_kernel=bool(rec and rec.at_disable is not None),
                    callers=callers, contention=contention, timing=timing,
                    busy_callers=busy_callers)
    res.summary = summarize(res, opts)
    return res


def run(opts: RunOptions, out: TextIO | None = None) -> RunResult:
    return asyncio.run(run_async(opts, out))
