"""Built-in text corpora that ship with Python itself, so every machine has them offline.

Two corpora, two clearly different domains, both written by the Python developers (not by us) and
distributed under the Python Software Foundation License:

``"stdlib-code"`` (role ``"pretrain"``)
    The source of the standard library's top-level ``.py`` modules (``argparse.py``, ``json/`` is a
    package and is not included, ...), one document per file, in file-name order. The shipped base model
    is pretrained on it: Python code with its comments and docstrings.

``"python-docs"`` (role ``"finetune"``)
    ``pydoc_data.topics.topics``: the prose of the Python Language Reference that ``help("assert")`` prints,
    one document per topic, in topic-name order. Mostly English prose about the language, with a few code
    examples: a different domain, which a LoRA fine-tune visibly adapts the base model to.

Both are read from the running interpreter, so their exact content depends on the Python version (the
shipped model was built from CPython 3.11; see its model card). Within one interpreter the result is
deterministic: the same documents in the same order every time.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "MAX_CODE_CHARS",
    "MAX_FILE_CHARS",
    "CorpusInfo",
    "CorpusRole",
    "corpus_for_role",
    "get_corpus_info",
    "list_corpora",
    "python_version",
    "read_corpus",
]

CorpusRole = Literal["pretrain", "finetune"]

#: Files larger than this (characters) are skipped: the few giants (``_pydecimal.py``, ``turtle.py``)
#: would otherwise dominate the corpus.
MAX_FILE_CHARS = 200_000
#: Upper bound on the whole code corpus (characters), so a future, larger standard library cannot make
#: tokenisation or pretraining unexpectedly slow. CPython 3.11's eligible files total about 4.2 M.
MAX_CODE_CHARS = 6_000_000

_PSF = "PSF-2.0 (Python Software Foundation License Version 2), https://docs.python.org/3/license.html"


@dataclass(frozen=True)
class CorpusInfo:
    """Describes one built-in corpus: what it is, where it comes from, and its licence."""

    name: str
    role: CorpusRole
    description: str
    source: str
    licence: str


_CORPORA: dict[str, CorpusInfo] = {
    "stdlib-code": CorpusInfo(
        name="stdlib-code",
        role="pretrain",
        description=(
            "Source code of the Python standard library's top-level .py modules (code, comments and "
            "docstrings), one document per file in file-name order; test modules, generated build data "
            f"and files over {MAX_FILE_CHARS:,} characters are left out."
        ),
        source="the running interpreter's standard library directory (sysconfig 'stdlib' path)",
        licence=_PSF,
    ),
    "python-docs": CorpusInfo(
        name="python-docs",
        role="finetune",
        description=(
            "English prose of the Python Language Reference as shipped for help(): "
            "pydoc_data.topics, one document per topic in topic-name order."
        ),
        source="pydoc_data.topics (part of the standard library)",
        licence=_PSF,
    ),
}

_ROLES: dict[str, str] = {"pretrain": "stdlib-code", "finetune": "python-docs"}


def list_corpora() -> list[CorpusInfo]:
    """Describe every built-in corpus (name, role, description, source, licence)."""
    return list(_CORPORA.values())


def get_corpus_info(name: str) -> CorpusInfo:
    """Return the description of the corpus called ``name``.

    Raises:
        ValueError: ``name`` is not a built-in corpus (the message lists the known names).
    """
    try:
        return _CORPORA[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown corpus {name!r}; built-in corpora are: {', '.join(_CORPORA)}") from None


def corpus_for_role(role: str) -> str:
    """Name of the corpus used for ``role`` (``"pretrain"`` or ``"finetune"``).

    Raises:
        ValueError: unknown role (the message lists the two roles).
    """
    try:
        return _ROLES[role]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown corpus role {role!r}; use 'pretrain' (stdlib-code) or 'finetune' (python-docs)"
        ) from None


def _is_code_module(path: Path) -> bool:
    """Whether a top-level stdlib file belongs in the code corpus."""
    name = path.name
    if not name.endswith(".py"):
        return False
    if name.startswith(("test", "_test", "__hello__", "_sysconfigdata")):
        return False  # tests, a demo stub, and machine-specific generated build data
    return name != "this.py"  # ROT13-obfuscated text, not code


def _stdlib_code() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise ValueError(
            f"cannot read the 'stdlib-code' corpus: the standard library directory {stdlib} does not exist "
            "in this Python installation"
        )
    documents: list[str] = []
    total = 0
    for path in sorted(p for p in stdlib.iterdir() if p.is_file() and _is_code_module(p)):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text or len(text) > MAX_FILE_CHARS:
            continue
        if total + len(text) > MAX_CODE_CHARS:
            break
        documents.append(text)
        total += len(text)
    if not documents:
        raise ValueError(f"cannot read the 'stdlib-code' corpus: no .py modules found in {stdlib}")
    return tuple(documents)


def _python_docs() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise ValueError(
            "cannot read the 'python-docs' corpus: this Python installation has no pydoc_data module "
            f"({exc}); install the full standard library (e.g. Debian's libpython3-stdlib) or use a list of texts"
        ) from exc
    documents = [topics[key].strip() for key in sorted(topics)]
    return tuple(doc for doc in documents if doc)


@functools.cache
def _read(name: str) -> tuple[str, ...]:
    if name == "stdlib-code":
        return _stdlib_code()
    return _python_docs()


def read_corpus(name: str) -> list[str]:
    """Return the documents of the built-in corpus ``name`` as a new list of strings.

    The list is the same, in the same order, on every call within one Python installation (cached after
    the first read, which takes well under a second).

    Raises:
        ValueError: unknown corpus name (the message lists the known ones), or the installation lacks
            the files the corpus is read from.
    """
    get_corpus_info(name)
    return list(_read(name))


def python_version() -> str:
    """The interpreter version the corpora are read from (they differ slightly between versions)."""
    return ".".join(str(part) for part in sys.version_info[:3])
