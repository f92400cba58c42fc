"""Strip outputs, execution counts and volatile metadata from notebooks before committing them.

The notebooks are committed without outputs (CI executes them with ``pytest --nbval-lax notebooks/``),
so a diff shows only what an author changed. Usage::

    python scripts/strip_notebooks.py                # every notebooks/*.ipynb
    python scripts/strip_notebooks.py path/a.ipynb   # given files
    python scripts/strip_notebooks.py --check        # exit 1 if any notebook still has outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def is_clean(nb: nbformat.NotebookNode) -> bool:
    """True when no code cell carries outputs or an execution count."""
    return all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in nb.cells
        if cell.cell_type == "code"
    )


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, execution counts, per-cell metadata and widget state, in place."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {}
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA}
    language_info = nb.metadata.get("language_info")
    if language_info is not None:
        nb.metadata["language_info"] = {"name": language_info.get("name", "python")}
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="report, change nothing, exit 1 if dirty")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if args.check:
            if not is_clean(nb):
                dirty.append(path)
            continue
        nbformat.write(strip(nb), path)
    for path in dirty:
        print(f"{path}: has outputs or execution counts; run python scripts/strip_notebooks.py")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
