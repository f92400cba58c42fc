"""The door of the data package (issue 18, item 4): what a data source is, decided once, in one module.

Every kind a user can pass is classified by :func:`lora_widgets.data.sources.classify_source` into one
:class:`Source` with its content read; every wrong source is refused there with the message the package has
always given. A run reads a file once, and the data package never reaches up into the trainer.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from lora_widgets.data import sources
from lora_widgets.data.prepared import DataSplit, Examples, RunData
from lora_widgets.data.rows import load_rows
from lora_widgets.data.sft_batches import SFTExample
from lora_widgets.data.sources import Source, classify_source
from lora_widgets.data.text import as_blocks, load_texts

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
QA = [{"question": "What is 2 + 2?", "answer": "4"}]
BLOCKS = torch.arange(8, dtype=torch.int32).view(2, 4)  # [n=2, T=4]


def _file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def _dataset(rows: list[dict[str, Any]]) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(rows)


def _dataset_dict(rows: list[dict[str, Any]]) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def _examples() -> Examples:
    return Examples((SFTExample((1, 2, 3), (-100, 2, 3), 0),), pad_id=0)


# (id, builds the source from a temporary directory, the kind a run sees, what its payload must be)
KINDS: list[tuple[str, Callable[[Path], Any], str, Callable[[Any], bool]]] = [
    ("run-data", lambda t: RunData(BLOCKS, None, "given"), "run-data", lambda p: p.split == "given"),
    ("examples", lambda t: _examples(), "examples", lambda p: len(p) == 1),
    (
        "data-split",
        lambda t: DataSplit(BLOCKS.long(), BLOCKS[:1].long(), 4, 8),
        "data-split",
        lambda p: p.block_size == 4,
    ),
    ("blocks", lambda t: BLOCKS, "blocks", lambda p: p.dtype == torch.long and torch.equal(p, BLOCKS.long())),
    (
        "corpus",
        lambda t: "python-docs",
        "corpus",
        lambda p: len(p) > 10 and all(isinstance(d, str) for d in p),
    ),
    ("instruct-corpus", lambda t: "python-instruct", "instruct-corpus", lambda p: "messages" in p[0]),
    ("texts-list", lambda t: ["a = 1", {"text": "b = 2"}, "  "], "texts", lambda p: p == ["a = 1", "b = 2"]),
    ("texts-txt", lambda t: _file(t, "doc.txt", "one document"), "texts", lambda p: p == ["one document"]),
    (
        "texts-jsonl",
        lambda t: str(_file(t, "docs.jsonl", '{"text": "x"}\n\n{"text": "y"}\n')),
        "texts",
        lambda p: p == ["x", "y"],
    ),
    ("rows-list", lambda t: CHAT, "rows", lambda p: p == CHAT),
    (
        "rows-jsonl",
        lambda t: _file(t, "pc.jsonl", json.dumps({"prompt": "p", "completion": "c"}) + "\n"),
        "rows",
        lambda p: p == [{"prompt": "p", "completion": "c"}],
    ),
    (
        "rows-json",
        lambda t: _file(t, "alpaca.json", json.dumps([{"instruction": "i", "input": "", "output": "o"}])),
        "rows",
        lambda p: p[0]["output"] == "o",
    ),
    ("dataset-texts", lambda t: _dataset([{"text": "x"}, {"text": "y"}]), "texts", lambda p: p == ["x", "y"]),
    ("dataset-rows", lambda t: _dataset(CHAT), "rows", lambda p: p == CHAT),
]


@pytest.mark.parametrize(("build", "kind", "payload"), [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_each_kind_is_decided_once(
    tmp_path: Path, build: Callable[[Path], Any], kind: str, payload: Callable[[Any], bool]
) -> None:
    source = classify_source(build(tmp_path), role="run")
    assert source.kind == kind and payload(source.payload)
    assert source.is_sft == (kind in ("rows", "instruct-corpus", "examples"))
    assert classify_source(source, role="run") is source  # decided once: a Source is never looked at again
    if kind in ("corpus", "instruct-corpus"):
        assert source.name in ("python-docs", "python-instruct")


# (id, role, builds the source, exception, the message the package has always given)
ERRORS: list[tuple[str, str, Callable[[Path], Any], type[Exception], str]] = [
    (
        "unknown-name",
        "run",
        lambda t: "no-such-corpus",
        ValueError,
        "'no-such-corpus' is neither a built-in corpus",
    ),
    (
        "unsupported-type",
        "run",
        lambda t: 3,
        TypeError,
        "unsupported data source of type int; pass a list of str",
    ),
    ("question-answer", "run", lambda t: QA, ValueError, r"has fields 'question', 'answer'.*rename_columns"),
    (
        "question-answer-jsonl",
        "run",
        lambda t: _file(t, "qa.jsonl", json.dumps(QA[0]) + "\n"),
        ValueError,
        r"qa\.jsonl has fields 'question', 'answer'",
    ),
    ("missing-file", "run", lambda t: t / "missing.txt", ValueError, "missing.txt' does not exist"),
    ("float-tensor", "run", lambda t: torch.zeros(2, 4), ValueError, "integer token ids"),
    ("1-d-tensor", "run", lambda t: torch.arange(8), ValueError, "2-D"),
    ("non-text-row", "run", lambda t: ["a", 3], ValueError, "row 1 of the list of texts is int"),
    ("empty-texts", "run", lambda t: ["", " "], ValueError, "the list of texts is empty"),
    (
        "bad-json-line",
        "run",
        lambda t: _file(t, "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n'),
        ValueError,
        r"bad\.jsonl, line 2: not valid JSON",
    ),
    ("instruct-as-text", "texts", lambda t: "python-instruct", ValueError, "is an instruction set"),
    ("tensor-as-text", "texts", lambda t: BLOCKS, TypeError, "unsupported data source of type Tensor"),
    (
        "split-as-blocks",
        "blocks",
        lambda t: DataSplit(BLOCKS, BLOCKS, 4, 8),
        ValueError,
        r"pass split\.train",
    ),
    ("corpus-as-rows", "rows", lambda t: "python-docs", ValueError, "data file 'python-docs' does not exist"),
    ("txt-as-rows", "rows", lambda t: _file(t, "a.txt", "x"), ValueError, "unsupported file type '.txt'"),
    ("int-as-rows", "rows", lambda t: 3, TypeError, "pass a list of rows"),
    ("json-object", "rows", lambda t: _file(t, "o.json", '{"a": 1}'), ValueError, "expected a JSON array"),
    (
        "datasetdict-rows",
        "rows",
        lambda t: _dataset_dict(CHAT),
        ValueError,
        r"several splits.*dataset\['train'\]",
    ),
    (
        "datasetdict-text",
        "run",
        lambda t: _dataset_dict([{"text": "x"}]),
        ValueError,
        "not a single dataset split",
    ),
    ("no-text-column", "texts", lambda t: _dataset([{"body": "x"}]), ValueError, "no 'text' column"),
    ("blocks-as-rows", "sft", lambda t: BLOCKS, TypeError, "pass a list of rows"),
    (
        "source-of-wrong-kind",
        "split",
        lambda t: Source("rows", CHAT, "list"),
        ValueError,
        "a rows source cannot be used as split data",
    ),
    ("unknown-role", "everything", lambda t: [], ValueError, "role must be one of"),
]


@pytest.mark.parametrize(
    ("role", "build", "error", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_a_wrong_source_is_refused_at_the_door(
    tmp_path: Path, role: Any, build: Callable[[Path], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        classify_source(build(tmp_path), role=role)


def test_the_role_decides_what_a_list_is() -> None:
    """A list of strings is texts to pack for a run and for load_texts, but rows (text rows) for load_rows."""
    assert classify_source(["a"], role="run").kind == "texts"
    assert classify_source(["a"], role="rows").kind == "rows"
    assert classify_source(CHAT, role="run").kind == "rows"
    assert load_texts(["a", {"text": "b"}]) == ["a", "b"] and load_rows(("a",)) == ["a"]
    assert torch.equal(as_blocks(BLOCKS, None, 128), BLOCKS.long())


def test_a_run_reads_its_file_once(tmp_path: Path) -> None:
    """A .jsonl of texts was read twice on the way to a run (once to look for rows, once as text); now once."""
    from transformers import AutoTokenizer

    from lora_widgets.models import BASE_MODEL_PATH
    from lora_widgets.training.batches import load_run_data
    from lora_widgets.training.config import TrainConfig

    path = _file(
        tmp_path, "docs.jsonl", "".join(json.dumps({"text": f"x = {i}\n" * 20}) + "\n" for i in range(8))
    )
    with mock.patch.object(sources, "read_text_file", wraps=sources.read_text_file) as read:
        data = load_run_data(
            path,
            None,
            AutoTokenizer.from_pretrained(BASE_MODEL_PATH),
            TrainConfig(block_size=16, val_fraction=0.25),
        )
    assert read.call_count == 1
    assert data.train.shape[1] == 16 and data.val is not None and data.split.startswith("by document")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "lora_widgets" / "data").glob("*.py")), ids=lambda p: p.name)
def test_the_route_from_a_source_to_batches_runs_downhill(path: Path) -> None:
    """data/ never reaches up into the trainer, the HF bridge, a sweep or the dashboard (not even lazily)."""
    up = {n for n in _imports(path) if n.split(".")[:2][-1] in ("training", "hf", "sweep", "widget")}
    assert not up, f"data/{path.name} imports {sorted(up)}"


def test_what_a_source_is_is_decided_in_one_module() -> None:
    """The duck-typed dataset check and the row fields live only at the door (there were four ladders)."""
    package = ROOT / "lora_widgets"
    for path in package.rglob("*.py"):
        if path.name == "sources.py" and path.parent.name == "data":
            continue
        text = path.read_text()
        assert '== "datasets"' not in text, f"{path.relative_to(ROOT)} decides what a dataset is"
        assert '"conversations", "prompt"' not in text, f"{path.relative_to(ROOT)} lists the row fields"
