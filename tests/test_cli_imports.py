"""`vtdx COMMAND` imports only that command's module (vtdx/cli/main.py): the console and the
trace reader start without the run machinery (session, QEMU and kernel tooling); `vtdx
--help` and an unknown command still see every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
from vtdx.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("vtdx."))), file=sys.stderr)
"""


def _imported(*argv: str) -> tuple[set[str], str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                       timeout=60)
    *_, last = r.stderr.strip().splitlines()
    return set(json.loads(last)), r.stdout + r.stderr


@pytest.mark.parametrize("argv", [("console", "--help"), ("trace", "--help"), ("--version",),
                                  ("build-kernel", "--help")])
def test_a_command_imports_only_what_it_runs(argv: tuple[str, ...]) -> None:
    mods, out = _imported(*argv)
    assert "usage: vtdx" in out or "vtdx " in out
    assert not {"vtdx.session.run", "vtdx.session.machine", "vtdx.cli.run"} & mods, sorted(mods)
    if argv[0] != "build-kernel":
        assert "vtdx.host.kernel" not in mods, sorted(mods)


def test_help_and_unknown_commands_list_every_command() -> None:
    for argv in (("--help",), ("nope",), ()):
        mods, out = _imported(*argv)
        assert "vtdx.cli.run" in mods and "vtdx.cli.trace" in mods
        for name in ("setup", "build-kernel", "run", "console", "trace", "daemon"):
            assert name in out, (argv, out)


def test_run_starts_qemu_before_it_loads_the_module_model() -> None:
    """What `vtdx run` imports before QEMU starts (vtdx/session/machine.py, ``_start``) holds
    neither the module model and its TD engine (loaded while QEMU boots, vtdx/module/
    __init__.py) nor what only a download or a symbol cache miss needs."""
    probe = ("import json, sys; import vtdx.cli.run; "
             "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60, check=True)
    mods = set(json.loads(r.stdout))
    late = {"vtdx.module.core", "vtdx.module.leaves", "vtdx.module.context",
            "vtdx.module.engine.engine", "vtdx.observe.qmp.endpoint", "unicorn",
            "elftools", "urllib.request"}
    assert not late & mods, sorted(late & mods)
    assert {"vtdx.session.machine", "vtdx.module.control", "vtdx.module.timing"} <= mods


def test_the_model_packages_export_their_names_on_first_use() -> None:
    import vtdx.module
    import vtdx.module.engine
    from vtdx.module import TdxModule
    from vtdx.module.core import TdxModule as defined
    from vtdx.module.engine import TdExit
    from vtdx.module.engine.exits import TdExit as exit_defined

    assert TdxModule is defined and TdExit is exit_defined
    for package in (vtdx.module, vtdx.module.engine):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope  # noqa: B018
