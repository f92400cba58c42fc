"""The built-in instruction set ``"python-instruct"``: questions about Python answered by Python's own docs.

Every answer is text that ships with CPython, written by the Python developers (PSF licence), so the set is
offline, deterministic within one interpreter, and written by no one here. Two sources:

1. **Language topics** (``pydoc_data.topics``, what ``help("with")`` prints). The question is made from the
   topic's title (``The "with" statement`` -> "Explain the `with` statement in Python."); the answer is the
   opening of the topic's first prose (not indented) paragraph: as many whole sentences as fit in
   :data:`MAX_ANSWER_CHARS` (a topic whose first sentence is longer is left out).
2. **Standard-library functions** of the modules in :data:`FUNCTION_MODULES`: the question is
   "What does `module.name(signature)` do?", the answer is the docstring's summary, its first paragraph
   (PEP 257: "the first line should be a short summary"), read from the module's source with ``ast``.
   Only functions defined at the module's top level and public (in its literal ``__all__``, or without a
   leading underscore) count; those with no docstring or a summary longer than :data:`MAX_ANSWER_CHARS` are
   left out; a signature longer than 60 characters is shown as ``(...)``.

Rows are conversations, ``{"messages": [user question, assistant answer]}``. Rows with the same answer text
(aliases, duplicated summaries) are grouped, and whole groups go to validation when the SHA-256 of their
answer falls in the first :data:`VAL_FRACTION` of the hash range: no validation answer appears in training,
and the split depends only on the text, not on the order or count of rows.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

__all__ = ["FUNCTION_MODULES", "MAX_ANSWER_CHARS", "VAL_FRACTION", "build_instructions"]

#: Answers longer than this (characters) are cut at a sentence boundary (topics) or left out (functions), so
#: that an answer fits well inside 128 generated tokens.
MAX_ANSWER_CHARS = 300
#: Share of answer groups held out for validation (chosen by answer hash).
VAL_FRACTION = 0.1
#: Pure-Python standard-library modules whose documented public functions become questions.
FUNCTION_MODULES: tuple[str, ...] = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "difflib", "email.utils", "enum", "fnmatch", "fractions", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "html", "inspect", "ipaddress", "json", "linecache",
    "locale", "logging", "mimetypes", "os", "pickle", "platform", "posixpath", "pprint", "quopri", "random",
    "re", "reprlib", "shlex", "shutil", "statistics", "string", "subprocess", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "tokenize", "traceback", "types", "typing", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")


def _message_rows(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _backquote(text: str) -> str:
    """``"with"`` -> ```with```: pydoc's quoted code spans in Markdown style."""
    return re.sub(r'"([^"\s]+)"', r"`\1`", text)


def _opening(paragraph: str) -> str:
    """The first sentences of ``paragraph`` that fit in :data:`MAX_ANSWER_CHARS` (the first one in any case)."""
    sentences = _SENTENCE_END.split(" ".join(paragraph.split()))
    answer = sentences[0]
    for sentence in sentences[1:]:
        if len(answer) + 1 + len(sentence) > MAX_ANSWER_CHARS:
            break
        answer = f"{answer} {sentence}"
    return answer


def _topic_rows() -> list[dict[str, Any]]:
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        lines = topics[key].strip().splitlines()
        if len(lines) < 3 or not set(lines[1]) <= set("*="):
            continue  # no title underline: not a titled topic
        title = _backquote(lines[0].strip())
        paragraphs = [p.strip("\n") for p in "\n".join(lines[2:]).split("\n\n")]
        prose = next((p for p in paragraphs if p.strip() and not p.startswith((" ", "\t"))), "")
        answer = _opening(_backquote(prose.strip()))
        if len(prose) < 40 or len(answer) > MAX_ANSWER_CHARS:
            continue
        subject = title[0].lower() + title[1:] if title[1:2].islower() else title
        rows.append(_message_rows(f"Explain {subject} in Python.", answer))
    return rows


def _public_names(tree: ast.Module) -> set[str] | None:
    """The module's literal ``__all__``, or None when it has none (or builds it at run time)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _function_rows() -> list[dict[str, Any]]:
    """Read from each module's source with ``ast``, not by importing it, so that nothing another library patched
    at run time (torch replaces ``inspect.getfile``, for one) changes the set."""
    rows = []
    for module_name in FUNCTION_MODULES:
        try:
            spec = importlib.util.find_spec(module_name)
        except ImportError:  # a stripped-down installation: that module contributes no questions
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        public = _public_names(tree)
        for node in sorted((n for n in tree.body if isinstance(n, ast.FunctionDef)), key=lambda n: n.name):
            if (node.name not in public) if public is not None else node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            if len(summary) < 15 or len(summary) > MAX_ANSWER_CHARS:
                continue
            signature = f"({ast.unparse(node.args)})"
            if len(signature) > 60:
                signature = "(...)"
            rows.append(_message_rows(f"What does `{module_name}.{node.name}{signature}` do?", summary))
    return rows


def _is_validation(answer: str) -> bool:
    digest = hashlib.sha256(answer.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VAL_FRACTION


@functools.cache
def _split() -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for row in _topic_rows() + _function_rows():
        question, answer = (m["content"] for m in row["messages"])
        if (question, answer) in seen:
            continue
        seen.add((question, answer))
        (val if _is_validation(answer) else train).append(row)
    return tuple(train), tuple(val)


def build_instructions(split: Literal["train", "validation"]) -> list[dict[str, Any]]:
    """The rows of one split of ``"python-instruct"`` (fresh copies; same content every call).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"validation"``, or this Python has no ``pydoc_data``.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    try:
        train, val = _split()
    except ImportError as exc:
        raise ValueError(
            f"cannot build 'python-instruct': this Python installation has no pydoc_data module ({exc}); "
            "install the full standard library (e.g. Debian's libpython3-stdlib)"
        ) from exc
    rows = train if split == "train" else val
    return [{"messages": [dict(m) for m in row["messages"]]} for row in rows]
