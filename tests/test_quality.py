"""Lint and type checks run with the tests, so CI rejects what the README promises we avoid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[dev]')")
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_package() -> None:
    pytest.importorskip("mypy")
    result = _run(sys.executable, "-m", "mypy", "lora_widgets")
    assert result.returncode == 0, result.stdout + result.stderr


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
"""The team's size rules (CONTRIBUTING.md): a module holds one job, a function's phases read on one screen."""


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """``(name:line, lines)`` of every function in ``path``, its docstring not counted."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                n -= (first.end_lineno or first.lineno) - first.lineno + 1
            out.append((f"{node.name}:{node.lineno}", n))
    return out


def test_modules_and_functions_stay_small() -> None:
    sources = sorted((ROOT / "lora_widgets").rglob("*.py")) + sorted((ROOT / "lora_widgets").rglob("*.js"))
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split by job): {big}"
    long = [
        f"{p.relative_to(ROOT)}:{name} has {n} lines"
        for p in sorted((ROOT / "lora_widgets").rglob("*.py"))
        for name, n in _function_lengths(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines besides the docstring: {long}"
