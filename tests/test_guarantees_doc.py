"""docs/guarantees.md names real tests: every ``tests/...py::name`` it cites exists (read with ast, not collected).

The guides cite tests too; they are checked the same way, so no page can promise a proof
that was renamed or deleted.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
GUARANTEES = ROOT / "docs" / "guarantees.md"
PAGES = [GUARANTEES, *sorted((ROOT / "docs" / "guides").glob("*.md"))]

#: ``tests/a/b.py``, optionally ``::name`` or ``::Class::name``, optionally ``[param-id]``.
REFERENCE = re.compile(r"(?P<path>tests/[A-Za-z0-9_/]+\.py)(?P<names>(?:::[A-Za-z_][A-Za-z0-9_]*)*)(?:\[[^\]\s`]*\])?")


def references(page: Path) -> list[tuple[str, tuple[str, ...]]]:
    found = []
    for match in REFERENCE.finditer(page.read_text(encoding="utf-8")):
        names = tuple(name for name in match["names"].split("::") if name)
        found.append((match["path"], names))
    return found


@cache
def definitions(path: str) -> dict[str, set[str]]:
    """Top-level functions and classes of a test file, each class with its methods."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    found: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            found[node.name] = {
                item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
    return found


def missing(path: str, names: tuple[str, ...]) -> str | None:
    """Why ``path::names`` names nothing, or None when it exists."""
    if not (ROOT / path).is_file():
        return f"{path}: no such file"
    if not names:
        return None
    defined = definitions(path)
    if names[0] not in defined:
        return f"{path}::{names[0]}: no such test function or class"
    if len(names) == 2 and names[1] not in defined[names[0]]:
        return f"{path}::{names[0]}::{names[1]}: no such method"
    if len(names) > 2:
        return f"{path}::{'::'.join(names)}: too deep"
    return None


def test_the_reference_pattern_reads_every_form() -> None:
    text = (
        "`tests/unit/test_a.py::test_b` and tests/unit/test_a.py::TestC::test_d[memory-x] "
        "and `tests/storage/test_contract.py` (the `cluster` store)"
    )
    found = [(m["path"], tuple(n for n in m["names"].split("::") if n)) for m in REFERENCE.finditer(text)]
    assert found == [
        ("tests/unit/test_a.py", ("test_b",)),
        ("tests/unit/test_a.py", ("TestC", "test_d")),
        ("tests/storage/test_contract.py", ()),
    ]


def test_a_missing_test_is_reported() -> None:
    assert missing("tests/unit/test_no_such_file.py", ("test_x",)) == "tests/unit/test_no_such_file.py: no such file"
    assert missing("tests/test_guarantees_doc.py", ("test_nothing_here",)) is not None
    assert missing("tests/test_guarantees_doc.py", ("test_a_missing_test_is_reported",)) is None


def test_the_guarantees_page_cites_many_tests() -> None:
    cited = [ref for ref in references(GUARANTEES) if ref[1]]
    assert len(cited) >= 100, f"only {len(cited)} test references in {GUARANTEES.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_test_the_guarantees_page_names_exists(page: Path) -> None:
    problems = sorted({problem for path, names in references(page) if (problem := missing(path, names))})
    assert not problems, f"{page.relative_to(ROOT)} cites tests that do not exist:\n" + "\n".join(problems)
