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


def test_the_extending_example_is_one_file_plus_one_yaml(tmp_path):
    """docs/extending.md's algorithm, as a user would add it: its module on the path, its YAML in
    a --config-dir, and nothing else; it trains, with a presence-aware fusion too."""
    from conftest import SMOKE, run_metamm

    text = (REPO / "docs" / "extending.md").read_text()
    code = re.search(r"```python\n# metamm_cli/algorithms/nearest.py\n(.*?)```", text, re.S).group(1)
    yaml_text = re.search(r"```yaml\n(# Nearest support sample.*?)```", text, re.S).group(1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "nearest.py").write_text(code)
    (tmp_path / "conf" / "algorithm").mkdir(parents=True)
    (tmp_path / "conf" / "algorithm" / "nearest.yaml").write_text(
        yaml_text.replace("metamm_cli.algorithms.nearest.Nearest", "nearest.Nearest"))
    env = {"PYTHONPATH": str(tmp_path / "mine")}
    for extra in ([], ["+recipe=robust", "fusion.cross=true"]):
        proc = run_metamm(["train", "--config-dir", str(tmp_path / "conf"), *SMOKE, "algorithm=nearest",
                           "trainer.max_steps=2", "trainer.tensorboard=false", *extra], tmp_path, env=env)
        assert "final validation accuracy" in proc.stdout
