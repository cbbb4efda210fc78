"""docs/conformance.md is generated from vtdx/module/conformance.py and cannot drift: every
leaf of the dispatcher's table is declared, every declaration names the source file it
follows, and the page is the rendering of the declarations."""

from __future__ import annotations

from pathlib import Path

from vtdx.abi.leaves import leaf_name
from vtdx.module import conformance as cf
from vtdx.module.leaves import leaf_table
from vtdx.platform.profile import GENERATIONS

PAGE = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def test_every_leaf_is_declared_and_nothing_else() -> None:
    table = set(leaf_table())
    declared = set(cf.by_leaf())
    assert sorted(map(leaf_name, table - declared)) == []
    assert sorted(map(leaf_name, declared - table)) == []


def test_each_declaration_names_a_source_and_what_it_models() -> None:
    for c in cf.DECLARED:
        name = leaf_name(c.leaf)
        assert c.files, name
        assert all(f.startswith(("src/", "Linux ")) and (".c" in f) for f in c.files), name
        assert c.modelled, name
        for part in (c.files, c.modelled, c.gaps):
            assert isinstance(part, tuple) and all(isinstance(x, str) for x in part), name
        assert c.trees and set(c.trees) <= set(GENERATIONS), name


def test_page_is_current() -> None:
    assert PAGE.read_text() == cf.render(), (
        "docs/conformance.md is stale: python -m vtdx.module.conformance > docs/conformance.md")


def test_page_lists_every_leaf() -> None:
    text = PAGE.read_text()
    for leaf in leaf_table():
        assert f"### {leaf_name(leaf)} ({leaf})" in text
