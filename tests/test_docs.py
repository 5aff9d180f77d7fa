"""The documentation builds strictly: `mkdocs build --strict` fails on a broken link, a missing
page or a page left out of the navigation; and the README stays a short read that links to it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install \".[docs]\")")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short_and_links_to_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages - {"index.md"} <= linked, sorted(pages - {"index.md"} - linked)
    for page in linked:
        assert (REPO / "docs" / page).is_file(), page
