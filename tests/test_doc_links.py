"""Links from the README, the changelog and the docs into this repository point at files that exist.

``mkdocs build --strict`` checks links between pages; links that leave ``docs/`` are
absolute GitHub URLs (so they also work on PyPI), which only this test checks.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = "https://github.com/celery-breaker/celery-breaker/blob/main/"
LINK = re.compile(re.escape(REPO) + r"([^)\s#`\"'>]+)")


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_link_into_the_repository_names_a_file_that_exists() -> None:
    broken = []
    seen = 0
    for document in documents():
        for found in LINK.findall(document.read_text(encoding="utf-8")):
            target = found.rstrip(".,;:")  # a bare URL ending a sentence
            seen += 1
            if not (ROOT / target).exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert seen > 20  # the README alone links every page this way
    assert broken == []


def test_the_readme_has_no_relative_links_which_pypi_would_break() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"\]\((?!https?://|#)[^)]+\)", readme) == []
