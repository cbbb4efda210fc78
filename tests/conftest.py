"""Fixtures shared by the whole-stack tests."""

from __future__ import annotations

import pytest

from vtdx.errors import VtdxError
from vtdx.host.qemu import QemuRuntime


@pytest.fixture(scope="session")
def runtime() -> QemuRuntime:
    """The provisioned QEMU + plugin; missing is a failure, not a skip (bootstrap makes it)."""
    try:
        return QemuRuntime.find()
    except VtdxError as e:
        pytest.fail(f"{e} (scripts/bootstrap does this)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run first (stable order otherwise): with one worker per CPU
    (scripts/test), a long test started last would leave the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
