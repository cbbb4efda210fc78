"""pytest plugin: boot a Linux TDX host kernel on vtdx and test it from pytest.

Loaded through the ``pytest11`` entry point in every pytest run of an environment where
vtdx is installed, so this module imports nothing heavy and does nothing until a test asks
for a vtdx fixture; without ``--vtdx-kernel`` those tests are skipped.

    pytest --vtdx-kernel=default          # the kernel `vtdx build-kernel` built
    pytest --vtdx-kernel=arch/x86/boot/bzImage --vtdx-vmlinux=vmlinux --vtdx-smp=4

Fixtures:
    vtdx_vm    a booted machine (``vtdx.harness.vm.Vm``). Shared by every test of the session that
               asks for the same configuration; ``@pytest.mark.vtdx(...)`` changes it:
               ``smp=``, ``mem=``, ``append=``, ``faults=[Fault(...)]`` and
               ``pauses=[Pause(...)]`` (armed before boot), ``profile=``/``features=`` (the
               platform), ``contend=SEED``/``serial=True`` (module timing, docs/races.md)
               and ``scope="session" | "module" | "function"`` (how long it is reused).
    vtdx_boot  a factory ``vtdx_boot(**same keywords) -> Vm`` for tests that need several
               machines or control over when they boot; each is stopped after the test.
    vtdx_spec  the ``BootSpec`` from the command line.

A kernel report on the console while a test ran (WARNING:, BUG:, lockdep, an oops: the
kernel vtdx builds keeps CONFIG_BUG) fails that test, with the report in the failure text,
unless the test declares it: ``@pytest.mark.vtdx(expect_warnings=["TDH_MNG_CREATE"])``
(regexes searched in the report; ``True`` accepts any).

A failed test that used a machine gets two extra report sections: the tail of the guest's
serial console and the SEAMCALLs made during the test (the last ones of the run when the
test made none), so a CI log shows what the kernel and the TDX module did.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vtdx.errors import VtdxError
from vtdx.units import parse_size

if TYPE_CHECKING:
    from vtdx.harness.vm import BootSpec, Vm

# The other vtdx imports in this file are inside the functions that need them, on purpose
# and not because of a cycle: the plugin is loaded into every pytest run of an environment
# with vtdx installed, and the harness (QEMU runtime, module model, unicorn) takes about
# 0.4 s to import, which only runs that use a vtdx fixture or option should pay.

SCOPES = ("session", "module", "function")
_USED = pytest.StashKey[list]()  # (vm, trace mark, console mark, commands mark) per test
_POOL = pytest.StashKey["VmPool"]()
#: Machines already handed to a test: the first test to get one answers for its boot too.
_HANDED = pytest.StashKey[set]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("vtdx", "vtdx: boot a Linux TDX host kernel on a virtual TDX platform")
    g.addoption("--vtdx-kernel", metavar="BZIMAGE", default=None,
                help="kernel to boot for vtdx fixtures; 'default' = the one `vtdx "
                     "build-kernel` built. Without it, tests using vtdx fixtures are skipped.")
    g.addoption("--vtdx-vmlinux", metavar="FILE", default=None,
                help="matching vmlinux: SEAMCALL traces name the calling kernel function "
                     "(default: vmlinux next to the bzImage, if any)")
    g.addoption("--vtdx-kernel-src", metavar="DIR", default=None,
                help="the kernel's source tree: in-guest payloads are built against its UAPI "
                     "headers, e.g. for KVM's TDX ioctls (default for 'default': its source)")
    g.addoption("--vtdx-smp", metavar="N", type=int, default=2, help="vCPUs (default 2)")
    g.addoption("--vtdx-mem", metavar="SIZE", default="2G", help="guest RAM (default 2G)")
    g.addoption("--vtdx-append", metavar="ARGS", default="",
                help="extra kernel command line for every machine")
    g.addoption("--vtdx-boot-timeout", metavar="S", type=float, default=300.0,
                help="seconds until the guest agent must answer (default 300)")
    g.addoption("--vtdx-report-lines", metavar="N", type=int, default=40,
                help="console lines and SEAMCALLs shown for a failed test (default 40)")
    g.addoption("--vtdx-profile", metavar="NAME", default="default",
                help="platform profile: default or dpamt (Dynamic PAMT module)")
    g.addoption("--vtdx-features", metavar="SPEC", default="",
                help="module features on/off, e.g. +dynamic-pamt,-no-rbp-mod")
    g.addoption("--vtdx-contend", metavar="SEED", type=int, default=None,
                help="contention exploration from SEED (docs/races.md)")
    g.addoption("--vtdx-serial", action="store_true",
                help="no overlap between LPs' SEAMCALLs (deterministic module timing)")


_SPEC = pytest.StashKey["BootSpec | None"]()


def pytest_configure(config: pytest.Config) -> None:
    # Checked here, not in a fixture: a bad path is one usage error, not an error per test.
    config.stash[_SPEC] = spec_from_options(config) if config.getoption(
        "--vtdx-kernel", None) else None
    config.addinivalue_line(
        "markers",
        "vtdx(smp=, mem=, append=, faults=, pauses=, profile=, features=, contend=, serial=, "
        "scope=, expect_warnings=): the machine the vtdx_vm "
        "fixture gives this test (faults: vtdx.harness.vm.Fault rules armed before boot; "
        "pauses: vtdx.harness.vm.Pause control points armed before boot; profile/features: "
        "the platform; contend=SEED / serial=True: the module timing; scope: "
        "session, module or function; expect_warnings: regexes of kernel WARNING/BUG reports "
        "that do not fail the test, True for any)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name what a kernel built elsewhere lacks of what vtdx and kernel tests rely on."""
    spec = config.stash.get(_SPEC, None)
    if spec is None or config.getoption("--vtdx-kernel") == "default":
        return []
    from vtdx.host import kernel as kernel_build

    cfg = kernel_build.find_config(spec.kernel_src, spec.vmlinux, spec.kernel)
    if cfg is None:
        return [f"vtdx: no .config found for {spec.kernel}: cannot check it for CONFIG_BUG, "
                "CONFIG_INTEL_TDX_HOST, ..."]
    missing = kernel_build.missing_for_vtdx(cfg.read_text(errors="replace"))
    return [f"vtdx: WARNING: {cfg} lacks {m}" for m in missing]


# --------------------------------------------------------------------------- spec


def spec_from_options(config: pytest.Config) -> BootSpec | None:
    """The command line's BootSpec, or None when --vtdx-kernel was not given."""
    from vtdx.harness.vm import BootSpec

    opt = config.getoption
    kernel_opt = opt("--vtdx-kernel")
    if not kernel_opt:
        return None
    vmlinux = Path(opt("--vtdx-vmlinux")) if opt("--vtdx-vmlinux") else None
    kernel_src = Path(opt("--vtdx-kernel-src")) if opt("--vtdx-kernel-src") else None
    if kernel_opt == "default":
        from vtdx.host import kernel as kernel_build

        art = kernel_build.default_kernel(None)
        if art is None:
            raise pytest.UsageError("--vtdx-kernel=default: no kernel built yet "
                                    "(run `vtdx build-kernel`)")
        kernel, vmlinux = art.bzimage, vmlinux or art.vmlinux
        src_default = art.info().get("path")
        if not opt("--vtdx-kernel-src") and isinstance(src_default, str):
            kernel_src = Path(src_default)
    else:
        kernel = Path(kernel_opt)
        if vmlinux is None:
            # A kernel build tree: arch/x86/boot/bzImage with vmlinux three levels up.
            for cand in (kernel.parent / "vmlinux", kernel.parent.parent.parent / "vmlinux"):
                if cand.is_file():
                    vmlinux = cand
                    break
    if not kernel.is_file():
        raise pytest.UsageError(f"--vtdx-kernel: {kernel} not found")
    if vmlinux is not None and not vmlinux.is_file():
        raise pytest.UsageError(f"--vtdx-vmlinux: {vmlinux} not found")
    if kernel_src is not None and not (kernel_src / "Makefile").is_file():
        raise pytest.UsageError(f"--vtdx-kernel-src: {kernel_src} is not a kernel tree")
    smp = opt("--vtdx-smp")
    if not 1 <= smp <= 64:
        raise pytest.UsageError(f"--vtdx-smp {smp}: must be 1..64")
    try:
        from vtdx.session.run import check_mem

        check_mem(parse_size(opt("--vtdx-mem")), "--vtdx-mem")
    except VtdxError as e:
        raise pytest.UsageError(str(e)) from None
    if opt("--vtdx-serial") and opt("--vtdx-contend") is not None:
        raise pytest.UsageError("--vtdx-serial and --vtdx-contend exclude each other")
    spec = BootSpec(kernel=kernel, vmlinux=vmlinux, smp=smp, mem=opt("--vtdx-mem"),
                    append=opt("--vtdx-append"), boot_timeout=opt("--vtdx-boot-timeout"),
                    kernel_src=kernel_src, profile=opt("--vtdx-profile"),
                    features=opt("--vtdx-features"), contend=opt("--vtdx-contend"),
                    serial=opt("--vtdx-serial"))
    try:
        spec.platform()
    except VtdxError as e:
        raise pytest.UsageError(str(e)) from None
    return spec


def _customise(base: BootSpec, kw: dict[str, Any]) -> tuple[BootSpec, str]:
    """(spec, scope) from marker / factory keywords."""
    kw = dict(kw)
    kw.pop("expect_warnings", None)  # about the test, not the machine (see _expected)
    scope = kw.pop("scope", "session")
    if scope not in SCOPES:
        raise pytest.UsageError(f"vtdx marker: scope={scope!r}, use one of {SCOPES}")
    if "append" in kw:
        kw["append"] = f"{base.append} {kw['append']}".strip()
    for key in ("faults", "pauses"):
        if key in kw:
            kw[key] = tuple(kw[key])
    unknown = set(kw) - {f.name for f in dataclasses.fields(base)}
    if unknown:
        raise pytest.UsageError(f"vtdx marker: unknown keyword(s) {sorted(unknown)}")
    return dataclasses.replace(base, **kw), scope


# --------------------------------------------------------------------------- pool


class VmPool:
    """Booted machines by (scope owner, spec): boot once, reuse until the scope ends."""

    def __init__(self) -> None:
        self.vms: dict[tuple[str, BootSpec], Vm] = {}
        self.boot_log: list[tuple[str, float]] = []

    def get(self, owner: str, spec: BootSpec) -> Vm:
        from vtdx.harness.vm import Vm

        key = (owner, spec)
        vm = self.vms.get(key)
        if vm is not None and not vm.alive:  # a test crashed it: the next one gets a new one
            vm.stop()
            vm = None
        if vm is None:
            vm = Vm(spec).start()
            self.vms[key] = vm
            self.boot_log.append((owner, vm.boot_seconds))
        return vm

    def release(self, owner: str) -> None:
        for key in [k for k in self.vms if k[0] == owner]:
            self.vms.pop(key).stop()

    def close(self) -> None:
        for vm in self.vms.values():
            vm.stop()
        self.vms.clear()


def _pool(config: pytest.Config) -> VmPool:
    if _POOL not in config.stash:
        config.stash[_POOL] = VmPool()
        _stop_on_signals()
    return config.stash[_POOL]


def _stop_on_signals() -> None:
    """SIGTERM (CI timeouts, `timeout`) and SIGHUP (closed terminal) end the session the way
    Ctrl-C does, so pytest tears the fixtures down and ``pytest_unconfigure`` stops every
    machine (QEMU, daemon, run directory). Without this either signal kills pytest at once;
    QEMU would still die with it (parent-death signal) and the run directory be removed by
    the machine's reaper, but no test would be reported. Installed with the first machine, so
    a session without vtdx machines keeps pytest's own behaviour."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: object) -> None:
        # Once: a second signal during the cleanup it starts must not abort that cleanup.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"vtdx: {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _POOL in config.stash:
        config.stash[_POOL].close()


@pytest.hookimpl(trylast=True)  # after the fixtures of the test are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _POOL not in item.config.stash:
        return
    pool = item.config.stash[_POOL]
    pool.release(f"function:{item.nodeid}")
    this_module = getattr(item, "module", None)
    next_module = getattr(nextitem, "module", None) if nextitem is not None else None
    mod = this_module.__name__ if this_module is not None else ""
    next_mod = next_module.__name__ if next_module is not None else None
    if mod != next_mod:
        pool.release(f"module:{mod}")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _POOL not in config.stash or not config.stash[_POOL].boot_log:
        return
    log = config.stash[_POOL].boot_log
    total = sum(s for _, s in log)
    terminalreporter.write_line(
        f"vtdx: {len(log)} machine boot(s), {total:.1f} s booting "
        f"(to guest agent ready: {', '.join(f'{s:.1f}' for _, s in log)} s)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vtdx_spec(pytestconfig: pytest.Config) -> BootSpec:
    spec = pytestconfig.stash.get(_SPEC, None)
    if spec is None:
        pytest.skip("vtdx: no --vtdx-kernel given")
    return spec


def _track(item: pytest.Item, vm: Vm) -> Vm:
    """Remember where the trace and console were when this test got the machine."""
    used = item.stash.setdefault(_USED, [])
    if not any(u[0] is vm for u in used):
        handed = item.config.stash.setdefault(_HANDED, set())
        # A kernel report printed while the machine booted belongs to the first test that
        # got it (a fault armed before boot is that test's doing).
        console = len(vm.machine.console_lines) if id(vm) in handed else 0
        handed.add(id(vm))
        used.append((vm, vm.trace.mark(), console, len(vm.commands)))
    return vm


@pytest.fixture
def vtdx_vm(request: pytest.FixtureRequest, vtdx_spec: BootSpec) -> Iterator[Vm]:
    marker = request.node.get_closest_marker("vtdx")
    spec, scope = _customise(vtdx_spec, marker.kwargs if marker else {})
    owner = {"session": "session", "function": f"function:{request.node.nodeid}",
             "module": f"module:{request.module.__name__}"}[scope]
    vm = _pool(request.config).get(owner, spec)
    yield _track(request.node, vm)
    if scope != "function" and vm.alive:
        # Rules a test armed over QMP must not leak into the next test on a shared machine.

        try:
            vm.vtdx.inject_clear()
        except VtdxError:
            pass


@pytest.fixture
def vtdx_boot(request: pytest.FixtureRequest,
              vtdx_spec: BootSpec) -> Generator[Callable[..., Vm], None, None]:
    vms: list[Vm] = []

    def boot(**kw: Any) -> Vm:
        from vtdx.harness.vm import Vm

        spec, _ = _customise(vtdx_spec, {**kw, "scope": "function"})
        vm = Vm(spec).start()
        vms.append(vm)
        _pool(request.config).boot_log.append((f"function:{request.node.nodeid}",
                                               vm.boot_seconds))
        return _track(request.node, vm)

    yield boot
    for vm in vms:
        vm.stop()


# --------------------------------------------------------------------------- report


def trace_excerpt(recs: list[dict[str, Any]], lines: int = 40) -> str:
    """Calls per leaf, the failed calls, then the last calls with runs of identical calls
    (same LP, leaf, status, caller: TDMR.INIT loops) folded into one line."""
    from vtdx.observe.trace import format_record

    def one(r: dict[str, Any]) -> str:
        return format_record(r).splitlines()[0]

    per_leaf: dict[str, int] = {}
    for r in recs:
        per_leaf[str(r.get("name"))] = per_leaf.get(str(r.get("name")), 0) + 1
    out = ["calls: " + ", ".join(f"{k} {v}" for k, v in per_leaf.items())]
    errors = [r for r in recs if not r.get("ok", True)]
    if errors:
        out.append(f"failed ({len(errors)}):")
        out += [one(r) for r in errors[-10:]]
    runs: list[list[dict[str, Any]]] = []
    for r in recs:
        key = (r.get("lp"), r.get("leaf"), r.get("status"), r.get("caller"))
        if runs and (runs[-1][0].get("lp"), runs[-1][0].get("leaf"), runs[-1][0].get("status"),
                     runs[-1][0].get("caller")) == key:
            runs[-1].append(r)
        else:
            runs.append([r])
    out.append("last calls:")
    for run in runs[-lines:]:
        line = one(run[-1])
        if len(run) > 1:
            line = f"{line}   (x{len(run)}: #{run[0].get('seq')}..#{run[-1].get('seq')})"
        out.append(line)
    return "\n".join(out)


def failure_sections(used: list[tuple[Any, int, int, int]], lines: int = 40
                     ) -> list[tuple[str, str]]:
    """(title, text) sections describing the machines a failed test used."""
    out: list[tuple[str, str]] = []
    for n, (vm, trace_mark, _console_mark, cmd_mark) in enumerate(used):
        tag = f" (machine {n + 1})" if len(used) > 1 else ""
        console = vm.console_tail(lines) or "(no console output)"
        why = getattr(vm.machine, "failure_text", lambda: "")() if not vm.alive else ""
        state = "" if vm.alive else f"  [{why or 'QEMU has exited'}]"
        out.append((f"vtdx guest console, last {lines} lines{tag}{state}", console))
        try:
            recs = vm.trace.since(trace_mark)
            what = "SEAMCALLs during this test"
            if not recs:
                recs, what = vm.trace.since(0), "SEAMCALLs: none during this test; the run's"
            out.append((f"vtdx {what}{tag}", trace_excerpt(recs, lines // 2) if recs
                        else "(none)"))
        except Exception as e:  # the report must never hide the test's own failure
            out.append((f"vtdx SEAMCALL trace{tag}", f"(unavailable: {e})"))
        cmds = vm.commands[cmd_mark:][-3:]
        if cmds:
            out.append((f"vtdx guest commands (last {len(cmds)}){tag}",
                        "\n".join(c.describe()[-2000:] for c in cmds)))
    return out


def _expected(item: pytest.Item) -> tuple[str, ...]:
    """The regexes of kernel reports the test declared expected (``(".",)``: any)."""
    marker = item.get_closest_marker("vtdx")
    want = marker.kwargs.get("expect_warnings", ()) if marker else ()
    if want is True:
        return (".",)
    if isinstance(want, str):
        return (want,)
    return tuple(want or ())


def _settle(vm: Any, quiet: float = 0.2, limit: float = 1.0) -> None:
    """Let the console catch up: a report the test's last command caused is printed by
    the kernel before the command returns, but reaches the host a moment later."""

    lines = getattr(vm.machine, "console_lines", None)
    if lines is None or not vm.alive:
        return
    end = time.monotonic() + limit
    n, since = len(lines), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.05)
        if len(lines) != n:
            n, since = len(lines), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def kernel_reports(used: list[tuple[Any, int, int, int]], expect: tuple[str, ...] = ()
                   ) -> list[Any]:
    """The unexpected kernel reports (vtdx.session.run.Splat) printed on the consoles of the
    machines a test used, since it got them."""
    from vtdx.session.run import split_splats

    out = []
    for vm, _trace_mark, console_mark, _cmd_mark in used:
        lines = list(getattr(vm.machine, "console_lines", []) or [])[console_mark:]
        out += [s for s in split_splats(lines, expect) if not s.expected]
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    used = item.stash.get(_USED, None)
    if used and call.when == "call":
        for vm, *_ in used:
            _settle(vm)
        reports = kernel_reports(used, _expected(item))
        if reports:
            text = "\n\n".join(s.text for s in reports)
            title = (f"vtdx: the kernel reported {len(reports)} bug(s) during this test "
                     "(declare expected ones: @pytest.mark.vtdx(expect_warnings=[REGEX]))")
            if rep.passed:
                rep.outcome = "failed"
                rep.longrepr = f"{title}\n{text}"
            else:
                rep.sections.append((title, text))
    if not used or not rep.failed:
        return
    for title, text in failure_sections(used, item.config.getoption("--vtdx-report-lines")):
        longrepr = rep.longrepr
        if hasattr(longrepr, "addsection"):
            longrepr.addsection(title, text)  # part of the failure text (JUnit XML too)
        else:
            rep.sections.append((title, text))
