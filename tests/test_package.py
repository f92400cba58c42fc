"""Package-level promises: public names resolve, layers import one way, README and CI agree."""

from __future__ import annotations

import ast
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


MODULES = sorted(
    str(p.relative_to(ROOT / "lora_widgets").with_suffix("")).replace("/__init__", "")
    for p in (ROOT / "lora_widgets").rglob("*.py")
)
"""Every module of the package (found, not listed, so a new module is covered the day it is added)."""

# Layers, lowest first: a module may import its own layer and the ones before it, never a later one.
LAYERS = ("core", "training", "hf", "sweep", "widget")


def _layer(module: str) -> str:
    top = module.split("/")[0]
    if top in ("training", "sweep", "widget"):
        return top
    return "hf" if top == "hf" else "core"


def _package_imports(module: str) -> set[str]:
    path = ROOT / "lora_widgets" / module
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return {n for n in _imports(path) if n.startswith("lora_widgets.")}


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_one_way(module: str) -> None:
    """core <- training <- hf <- sweep <- widget: nothing imports a layer above its own (the one-way rule)."""
    if module == "__init__":
        return  # the top-level namespace re-exports from every layer, lazily
    mine = LAYERS.index(_layer(module))
    above = {
        n
        for n in _package_imports(module)
        if LAYERS.index(_layer(n.split(".", 1)[1].replace(".", "/"))) > mine
    }
    assert not above, f"{module} ({_layer(module)}) imports a higher layer: {sorted(above)}"


@pytest.mark.parametrize("module", [m for m in MODULES if _layer(m) != "widget" and m != "__init__"])
def test_headless_layers_never_import_ui_libraries(module: str) -> None:
    path = ROOT / "lora_widgets" / module
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    bad = {n for n in _imports(path) if n.split(".")[0] in {u.split(".")[0] for u in UI_LIBS}}
    assert not bad, f"{module} imports UI code: {sorted(bad)}"


def test_top_level_is_small_typed_and_clashes_with_nothing_in_transformers() -> None:
    """About 30 names, each imported under TYPE_CHECKING (so IDEs and mypy see its type), none shadowing
    a name a notebook also imports from transformers (our trainer is LoRATrainer, not Trainer)."""
    import transformers

    names = [n for n in lora_widgets.__all__ if n != "__version__"]
    assert 20 <= len(names) <= 32, f"{len(names)} top-level names: {names}"
    tree = ast.parse((ROOT / "lora_widgets" / "__init__.py").read_text())
    typed = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for sub in ast.walk(node)
        if isinstance(sub, ast.ImportFrom)
        for alias in sub.names
    }
    assert set(names) <= typed, f"untyped for IDEs: {sorted(set(names) - typed)}"
    clashes = [n for n in names if n in dir(transformers)]
    assert not clashes, f"top-level names that clash with transformers: {clashes}"


def test_module_file_names_are_unique_across_packages() -> None:
    """No two modules share a name with two jobs (there were two session.py)."""
    stems = [m.rsplit("/", 1)[-1] for m in MODULES if "/" in m and not m.endswith("__init__")]
    duplicates = sorted({s for s in stems if stems.count(s) > 1} - {"config"})
    assert not duplicates, f"modules that share a file name: {duplicates}"


def test_public_function_names_are_unique() -> None:
    """One public name, one job: no two modules define a public function or class of the same name."""
    where: dict[str, list[str]] = {}
    for module in MODULES:
        path = ROOT / "lora_widgets" / module
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.parse(path.read_text()).body:
            if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(module)
    clashes = {n: ms for n, ms in where.items() if len(ms) > 1}
    assert not clashes, f"public names defined in more than one module: {clashes}"
