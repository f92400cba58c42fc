"""Package-level promises: public names resolve, layers import one way, README and CI agree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_widgets

ROOT = Path(__file__).resolve().parents[1]
UI_LIBS = ("ipywidgets", "anywidget", "bqplot", "IPython.display")


@pytest.mark.parametrize("name", lora_widgets.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(lora_widgets, name) is not None


def test_unknown_attribute_is_a_clear_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'LoraDashboard'"):
        _ = lora_widgets.LoraDashboard  # type: ignore[attr-defined]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


CORE = [
    "lora",
    "data",
    "corpora",
    "devices",
    "memory",
    "memory_arch",
    "memory_measure",
    "events",
    "schedules",
    "history",
    "checkpoint",
    "train_config",
    "adapter_statistics",
    "alerts",
    "samples",
]


TRAINING = [
    f"training/{m}"
    for m in ("trainer", "batches", "step", "precision", "control", "ownership", "run_dir", "meter")
]


HEADLESS = sorted(
    str(p.relative_to(ROOT / "lora_widgets").with_suffix(""))
    for p in (ROOT / "lora_widgets").rglob("*.py")
    if "widget" not in p.relative_to(ROOT / "lora_widgets").parts[:1] and p.name != "__init__.py"
)
"""Every module outside widget/ (found, not listed, so a new module is covered the day it is added)."""


@pytest.mark.parametrize("module", HEADLESS)
def test_headless_layers_never_import_ui_libraries(module: str) -> None:
    path = ROOT / "lora_widgets" / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    bad = {n for n in _imports(path) if n.split(".")[0] in {u.split(".")[0] for u in UI_LIBS}}
    bad |= {n for n in _imports(path) if n.startswith("lora_widgets.widget")}
    assert not bad, f"{module}.py imports UI code: {sorted(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_modules_do_not_import_the_trainer(module: str) -> None:
    path = ROOT / "lora_widgets" / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    assert not {n for n in _imports(path) if n.startswith("lora_widgets.training")}


def test_importing_the_trainer_loads_no_widget_stack() -> None:
    code = f"import sys, lora_widgets.training.trainer; print([m for m in {list(UI_LIBS)!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    command = match.group(1)
    assert "torch==2.13.0" in command and "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run extracts and runs that very line


def test_readme_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (ROOT / target).exists(), f"README links to missing {target}"
