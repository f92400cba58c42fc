"""The documentation site builds with `mkdocs build --strict`: a warning (broken link, missing page,
an API reference entry whose module or docstring cannot be rendered) fails the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason='install the docs tools: pip install -e ".[dev]"')
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, f"mkdocs reported warnings:\n{log}"
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()
    # the architecture page carries its one diagram as a mermaid block
    assert 'class="mermaid"' in (site / "architecture" / "index.html").read_text(encoding="utf-8")


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run python scripts/strip_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_structure(path: Path) -> None:
    """Every notebook opens with what you will learn and a Colab link, and ends with asserts."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0].source
    assert "What you will learn" in first and "colab.research.google.com/github/" in first
    assert any("Check yourself" in c.source for c in nb.cells if c.cell_type == "markdown")
    assert "assert " in nb.cells[-1].source
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    # notebooks use only the public names: the top level and its namespaces (lora_widgets.events, .lora, ...)
    import re

    import lora_widgets

    deep = [
        m.group(0)
        for m in re.finditer(r"(?:from|import) lora_widgets\.([\w.]+)", sources)
        if m.group(1) not in lora_widgets._NAMESPACES
    ]
    assert not deep, f"{path.name} imports private modules: {deep}"


def test_user_docs_import_only_public_names() -> None:
    """README and the user guide show only the top level and its namespaces (architecture and contributor pages
    name modules on purpose)."""
    import re

    import lora_widgets

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    internal = {"architecture.md", "benchmarks.md"}
    deep = [
        f"{page.relative_to(ROOT)}: {m.group(0)}"
        for page in pages
        if page.name not in internal
        for m in re.finditer(r"(?:from|import) lora_widgets\.([\w.]+)", page.read_text())
        if m.group(1) not in lora_widgets._NAMESPACES
    ]
    assert not deep, f"user-facing pages import private modules: {deep}"


def test_architecture_page_names_every_module() -> None:
    """The module table of docs/architecture.md matches the tree: a new module must be described there."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = ROOT / "lora_widgets"
    missing = [
        rel
        for rel in sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
        if f"`{rel}`" not in page
    ]
    assert not missing, f"docs/architecture.md's module table does not mention {missing}"
