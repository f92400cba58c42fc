"""What a data source is, decided once: the door of the data package.

A run (``LoRATrainer(train_data=...)``, ``LoRADashboard(train_data=...)``, a ``Sweep``) and the data functions
(``prepare_data``, ``load_texts``, ``load_rows``, ``as_blocks``) take data in many shapes. :func:`classify_source`
looks at what was given once, decides its kind, reads its content and returns a :class:`Source`; every later
step dispatches on ``Source.kind`` and never inspects the raw object again (a ``Source`` passed back in is
returned as it is). The route from a source to batches therefore runs one way: this module, then the text
packer (:mod:`lora_widgets.data.text`) or the row tokeniser (:mod:`lora_widgets.data.sft`), then the trainer's
batches (``lora_widgets.training.batches``), then the dashboard.

===================  ===========================================================  ===============================
kind                 given as                                                     ``Source.payload``
===================  ===========================================================  ===============================
``run-data``         a ``RunData`` (:mod:`lora_widgets.data.prepared`)            the ``RunData``
``examples``         ``Examples`` (tokenised instruction examples)                the ``Examples``
``data-split``       a ``DataSplit`` (:func:`lora_widgets.data.text.prepare_data`)  the ``DataSplit``
``blocks``           a 2-D integer tensor of token ids                            ``LongTensor[n, T]``, checked
``corpus``           a built-in text corpus's name (``"python-docs"``)            its documents
``instruct-corpus``  a built-in instruction set's name (``"python-instruct"``)    its training rows
``texts``            strings or ``{"text"}`` dicts (a list, a ``.txt``, a         the non-blank documents
                     ``.jsonl``, a ``datasets.Dataset`` text column)
``rows``             instruction/chat rows (a list, a ``.jsonl``/``.json``, a     the rows, not yet validated
                     ``datasets.Dataset``)                                        (:mod:`lora_widgets.data.rows`)
===================  ===========================================================  ===============================

The ``role`` says what the caller can use, and so which kinds it accepts and how the content of a list, a
JSON file or a dataset decides between texts and rows:

* ``"run"`` (a run's ``train_data``): every kind; data with a row format's field (:data:`ROW_KEYS`) is rows,
  strings and ``{"text"}`` rows are texts, dicts with no known field are refused naming the renaming.
* ``"split"`` (training blocks with their validation part): ``data-split``, ``blocks`` and texts.
* ``"blocks"`` (one side of a run, :func:`lora_widgets.data.text.as_blocks`): ``blocks`` and texts.
* ``"texts"`` (:func:`lora_widgets.data.text.load_texts`): texts only.
* ``"rows"`` (:func:`lora_widgets.data.rows.load_rows`): rows only; every list entry is a row.
* ``"sft"`` (one side of an instruction run, e.g. its ``eval_data``): ``examples`` and rows.

Everything a user passes wrongly is refused here, with the message naming the value and the fix.
"""

from __future__ import annotations

import codecs
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from lora_widgets.data.corpora import (
    get_corpus_info,
    instruction_corpus_names,
    list_corpora,
    load_corpus,
    read_instructions,
)
from lora_widgets.data.prepared import DataSplit, Examples, RunData

__all__ = [
    "FORMATS_HELP",
    "ROW_KEYS",
    "Role",
    "Source",
    "SourceKind",
    "check_texts",
    "classify_source",
    "read_text_file",
    "require_train_data",
    "unknown_format",
]

SourceKind = Literal[
    "run-data", "examples", "data-split", "blocks", "corpus", "instruct-corpus", "texts", "rows"
]
Role = Literal["run", "split", "blocks", "texts", "rows", "sft"]

#: Fields that make data instruction/chat rows rather than text to pack (see :mod:`lora_widgets.data.rows`).
ROW_KEYS = frozenset({"messages", "conversations", "prompt", "completion", "instruction", "output"})

#: The accepted row formats, in the words every message about rows uses.
FORMATS_HELP = (
    'accepted rows: {"text"}, {"prompt", "completion"}, {"messages": [{"role", "content"}]}, '
    'ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input", "output"}, or a str'
)

_TEXTS: frozenset[SourceKind] = frozenset({"corpus", "texts"})
_ACCEPTS: dict[str, frozenset[SourceKind]] = {
    "run": frozenset(get_args(SourceKind)),
    "split": _TEXTS | {"data-split", "blocks"},
    "blocks": _TEXTS | {"blocks"},
    "texts": _TEXTS,
    "rows": frozenset({"instruct-corpus", "rows"}),
    "sft": frozenset({"instruct-corpus", "rows", "examples"}),
}
_ROWS_ROLES = ("rows", "sft")  # roles for which every entry of a list, a file or a dataset is a row
_TEXT_SUFFIXES = (".txt", ".jsonl")
_ROW_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Source:
    """A data source with its kind decided (see the module's table).

    Attributes:
        kind: what it is.
        payload: its content, read: documents for ``corpus``/``texts``, rows for ``rows``/``instruct-corpus``,
            the object itself (a tensor checked) for the prepared kinds.
        given: the type of what the user passed, for messages (``"list"``, ``"PosixPath"``, ``"Dataset"``).
        name: the built-in corpus's name (``corpus`` and ``instruct-corpus``), else ``""``.
    """

    kind: SourceKind
    payload: Any
    given: str
    name: str = ""

    @property
    def is_sft(self) -> bool:
        """Whether it trains as instruction examples (rows, an instruction set, ``Examples``), not packed text."""
        return self.kind in ("rows", "instruct-corpus", "examples")


def require_train_data(train_data: Any) -> None:
    """Refuse a run built without data, naming what a run takes (``LoRATrainer`` and ``Sweep`` check it when
    they are built; the data itself is read when the run starts)."""
    if train_data is None:
        raise ValueError("train_data is required: token blocks, a DataSplit, texts, a file or a corpus name")


def classify_source(obj: Any, *, role: Role = "run", text_field: str = "text") -> Source:
    """Decide what ``obj`` is, read it, and return it as a :class:`Source` (once: a ``Source`` is returned as it is).

    Args:
        obj: a name, a path, a list, a ``datasets.Dataset``, a tensor, or prepared data (the module's table).
        role: what the caller uses (``"run"``, ``"split"``, ``"blocks"``, ``"texts"``, ``"rows"``, ``"sft"``;
            see the module docstring).
        text_field: the ``.jsonl`` field / dataset column that holds a text (texts only).

    Raises:
        ValueError: a kind the role does not take, a missing file or unsupported file type, invalid JSON (the
            line is named), empty data or a non-text row (its index and type), rows in no known format (their
            fields and the renaming), a ``DatasetDict``, a bad tensor.
        TypeError: an unsupported type.
    """
    if role not in _ACCEPTS:
        raise ValueError(f"role must be one of {', '.join(map(repr, _ACCEPTS))}, got {role!r}")
    if isinstance(obj, Source):
        if obj.kind not in _ACCEPTS[role]:
            raise ValueError(f"a {obj.kind} source cannot be used as {role} data (it takes {_kinds(role)})")
        return obj
    given = type(obj).__name__
    if isinstance(obj, RunData | Examples | DataSplit | torch.Tensor):  # RunData is a tuple: before lists
        return _prepared(obj, role, given)
    if (
        isinstance(obj, str)
        and obj in _corpus_names()
        and (role not in _ROWS_ROLES or obj in instruction_corpus_names())
    ):
        return _builtin(obj, role, given)
    if isinstance(obj, str | os.PathLike):
        return _from_path(obj, role, text_field, given)
    if isinstance(obj, list | tuple):
        return _from_list(list(obj), role, given)
    if type(obj).__module__.split(".")[0] == "datasets":  # duck-typed: datasets stays optional
        return _from_dataset(obj, role, text_field, given)
    raise _unsupported(given, role)


def _kinds(role: str) -> str:
    return ", ".join(sorted(_ACCEPTS[role]))


def _corpus_names() -> list[str]:
    return [info.name for info in list_corpora()]


def _unsupported(given: str, role: str) -> TypeError:
    if role in _ROWS_ROLES:
        return TypeError(
            f"unsupported data source of type {given}; pass a list of rows, a .jsonl/.json path, "
            "a datasets.Dataset or a built-in instruction set name"
        )
    return TypeError(
        f"unsupported data source of type {given}; pass a list of str, a .txt/.jsonl path, "
        f"a built-in corpus name ({', '.join(_corpus_names())}) or a datasets.Dataset"
    )


def _prepared(obj: Any, role: str, given: str) -> Source:
    kind: SourceKind = (
        "run-data" if isinstance(obj, RunData)
        else "examples" if isinstance(obj, Examples)
        else "data-split" if isinstance(obj, DataSplit)
        else "blocks"
    )  # fmt: skip
    if kind not in _ACCEPTS[role]:
        if kind == "data-split" and role == "blocks":
            raise ValueError(
                "got a DataSplit; pass split.train for training data and split.val for evaluation"
            )
        raise _unsupported(given, role)
    return Source(kind, _check_blocks(obj) if kind == "blocks" else obj, given)


def _check_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """A 2-D integer tensor of token ids as ``long`` (its own width wins over any ``block_size``)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(
            f"token blocks must be a non-empty 2-D tensor [n_blocks, block_size >= 2], got shape "
            f"{tuple(blocks.shape)}; pack 1-D token ids with ids[: n * block_size].view(n, block_size)"
        )
    if blocks.dtype.is_floating_point or blocks.dtype.is_complex or blocks.dtype == torch.bool:
        raise ValueError(f"token blocks must hold integer token ids, got dtype {blocks.dtype}")
    if int(blocks.min()) < 0:
        raise ValueError(f"token blocks contain a negative id ({int(blocks.min())}); ids must be >= 0")
    return blocks.long()  # [n, T]


def _builtin(name: str, role: str, given: str) -> Source:
    """A built-in corpus by name: an instruction set's training rows, or a text corpus's documents."""
    if get_corpus_info(name).role == "instruct":
        if role not in ("run", *_ROWS_ROLES):
            raise ValueError(
                f"{name!r} is an instruction set (prompt/answer rows), not text to pack into blocks; use "
                f"lora_widgets.data.sft.prepare_sft(load_rows({name!r}), tokenizer, ...)"
            )
        return Source("instruct-corpus", list(read_instructions(name, "train")), given, name)
    return Source("corpus", load_corpus(name), given, name)


def _from_path(obj: str | os.PathLike[str], role: str, text_field: str, given: str) -> Source:
    """A file: rows from ``.jsonl``/``.json``, texts from ``.txt``/``.jsonl`` (for a run: by its content)."""
    path = Path(obj).expanduser()
    suffix = path.suffix.lower()
    if role in _ROWS_ROLES:
        if not path.is_file():
            raise ValueError(
                f"data file {str(path)!r} does not exist (or is not a file); pass a .jsonl/.json file, a list of "
                f"rows, a datasets.Dataset or a built-in instruction set ({', '.join(instruction_corpus_names())})"
            )
        if suffix not in _ROW_SUFFIXES:
            raise ValueError(
                f"unsupported file type {path.suffix or '(none)'!r} for {str(path)!r}; rows come from .jsonl "
                "(one JSON object per line) or .json (a JSON array)"
            )
        return Source("rows", _json_rows(path), given)
    if role == "run" and suffix in _ROW_SUFFIXES and path.is_file():
        lines = _json_lines(path) if suffix == ".jsonl" else list(enumerate(_json_array(path), start=1))
        found = _rows_by_content([record for _, record in lines], str(path), given)
        if found is not None:
            return found
        if suffix == ".jsonl":
            return Source("texts", _texts_of_records(lines, path, text_field), given)
    if isinstance(obj, str) and not (
        path.exists() or suffix in _TEXT_SUFFIXES or os.sep in obj or "/" in obj
    ):
        raise ValueError(
            f"{obj!r} is neither a built-in corpus nor an existing file. Built-in corpora: "
            f"{', '.join(_corpus_names())}; files must end in .txt or .jsonl. "
            "To train on a literal string, pass it inside a list: [text]"
        )
    return Source("texts", _texts_of_file(path, text_field), given)


def _from_list(rows: list[Any], role: str, given: str) -> Source:
    if role in _ROWS_ROLES:
        return Source("rows", rows, given)
    if role == "run":
        found = _rows_by_content(rows, "the training data", given)
        if found is not None:
            return found
    return Source("texts", check_texts(rows, "the list of texts"), given)


def _from_dataset(dataset: Any, role: str, text_field: str, given: str) -> Source:
    names = getattr(dataset, "column_names", None)
    single = isinstance(names, list)  # a DatasetDict has a dict of column lists
    columns: list[str] = names if isinstance(names, list) else []
    if role in _ROWS_ROLES:
        if not single:
            raise ValueError(f"{given} holds several splits; pick one, e.g. dataset['train']")
        return Source("rows", [dict(row) for row in dataset], given)
    if role == "run" and single:
        if columns and not (ROW_KEYS | {"text"}) & set(columns):
            raise unknown_format(columns)  # the same words as for the same rows in a list
        if ROW_KEYS & set(columns):
            return Source("rows", [dict(row) for row in dataset], given)
    if not single:
        raise ValueError(f"{given} is not a single dataset split; pick one, e.g. dataset['train']")
    if text_field not in columns:
        raise ValueError(
            f"the dataset has no {text_field!r} column (columns: {', '.join(columns)}); "
            "pass text_field=<the column that holds the text>"
        )
    return Source("texts", check_texts(list(dataset[text_field]), f"dataset column {text_field!r}"), given)


def _rows_by_content(rows: list[Any], where: str, given: str) -> Source | None:
    """A run's rows when any has a row format's field; ``None`` for texts (strings, ``{"text"}`` rows).

    Raises:
        ValueError: every row is a dict with no known field (e.g. question/answer rows): :func:`unknown_format`.
    """
    if rows and all(isinstance(r, Mapping) and not (ROW_KEYS | {"text"}) & set(r) for r in rows):
        raise unknown_format(list(rows[0]), where)
    if any(isinstance(r, Mapping) and ROW_KEYS & set(r) for r in rows):
        return Source("rows", rows, given)
    return None


_PROMPT_LIKE = ("question", "query", "input", "instruction", "user", "q", "source")
_ANSWER_LIKE = ("answer", "response", "output", "target", "assistant", "a", "reply")


def unknown_format(keys: Sequence[str], where: str = "the training data") -> ValueError:
    """The error for rows (or dataset columns) in none of the accepted formats, the same for a list of dicts, a
    ``.jsonl`` file and a ``datasets.Dataset``: it names their fields and the renaming that makes them a
    prompt/completion row, in the words of the arguments ``LoRATrainer`` and ``LoRADashboard`` have."""
    names = [str(k) for k in keys]
    lower = {k.lower(): k for k in names}
    prompt = next((lower[k] for k in _PROMPT_LIKE if k in lower), None)
    answer = next((lower[k] for k in _ANSWER_LIKE if k in lower and lower[k] != prompt), None)
    p, a = prompt or "<the prompt field>", answer or "<the answer field>"
    return ValueError(
        f"{where} has fields {', '.join(repr(k) for k in names)}, none of the row formats LoRATrainer and "
        f"LoRADashboard train on ({FORMATS_HELP}). Rename them before passing the data, e.g. "
        f'rows = [{{"prompt": r[{p!r}], "completion": r[{a!r}]}} for r in rows], or for a datasets.Dataset '
        f'dataset.rename_columns({{{p!r}: "prompt", {a!r}: "completion"}})'
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def _universal_newlines(text: str) -> str:
    """``\\r\\n`` and ``\\r`` become ``\\n``, as ``open(..., encoding=...)`` in text mode does."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: Path) -> str:
    """The text of ``path``: UTF-8, or UTF-16 when the file starts with a UTF-16 byte-order mark.

    Line endings are normalised to ``\\n`` as text-mode ``open`` does.

    Windows editors save "Unicode" text as UTF-16 with a byte-order mark; such a file is decoded as UTF-16 and
    a warning says so. A UTF-8 byte-order mark is skipped.

    Raises:
        ValueError: the file is neither (the message names the file, the first bad byte's offset and the fix:
            re-save it as UTF-8).
    """
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        warnings.warn(
            f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark, as Windows saves 'Unicode' text); "
            "decoded it as UTF-16. Re-save it as UTF-8 to make this warning go away",
            UnicodeWarning,
            stacklevel=3,
        )
        return _universal_newlines(raw.decode("utf-16"))
    try:
        return _universal_newlines(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start} is {raw[exc.start : exc.start + 1]!r}); re-save it as "
            "UTF-8 (in most editors: Save As -> Encoding: UTF-8) and load it again"
        ) from None


def check_texts(rows: Sequence[Any], where: str) -> list[str]:
    """Every row a ``str`` (or a ``{"text": str}`` dict), blank rows dropped; an empty result refused.

    Raises:
        ValueError: a row that is not text (its index, type and value are named), or no non-blank text.
    """
    texts: list[str] = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping) and set(row) == {"text"}:
            row = row["text"]
        if not isinstance(row, str):
            raise ValueError(
                f"row {i} of {where} is {type(row).__name__} ({row!r:.60}), not text; "
                "every row must be a str (convert or drop that row)"
            )
        if row.strip():
            texts.append(row)
    if not texts:
        raise ValueError(f"{where} is empty (no non-blank text); pass at least one non-empty string")
    return texts


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """``(line number, record)`` of each non-blank line of a ``.jsonl`` file."""
    records: list[tuple[int, Any]] = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), start=1):  # not splitlines(): U+2028
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
    return records


def _json_array(path: Path) -> list[Any]:
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of rows, got a JSON {type(data).__name__}")
    return data


def _json_rows(path: Path) -> list[Any]:
    """The raw rows of a ``.json`` array or a ``.jsonl`` file."""
    if path.suffix.lower() == ".json":
        return _json_array(path)
    return [record for _, record in _json_lines(path)]


def _texts_of_records(lines: list[tuple[int, Any]], path: Path, text_field: str) -> list[str]:
    texts: list[Any] = []
    for lineno, record in lines:
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, line {lineno}: expected a JSON object with a {text_field!r} field, "
                f"got {type(record).__name__}"
            )
        if text_field not in record:
            raise ValueError(
                f"{path}, line {lineno}: no {text_field!r} field (fields: {', '.join(map(str, record))}); "
                "pass text_field=<the field that holds the text>, or use lora_widgets.data.sft.prepare_sft for "
                "prompt/completion, messages, ShareGPT or Alpaca rows"
            )
        texts.append(record[text_field])
    return check_texts(texts, f"{path} (field {text_field!r})")


def _texts_of_file(path: Path, text_field: str) -> list[str]:
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist (resolved to {path.resolve()})")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; pass a .txt or .jsonl file, or a list of texts")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return check_texts([read_text_file(path)], str(path))
    if suffix == ".jsonl":
        return _texts_of_records(_json_lines(path), path, text_field)
    raise ValueError(
        f"unsupported file type {suffix or '(none)'!r} for {str(path)!r}; use .txt (the file is one document) "
        "or .jsonl (one JSON object per line with a text field)"
    )
