"""Built-in corpora that ship with Python itself, so every machine has them offline.

Two text corpora, two clearly different domains, and one instruction set, all written by the Python
developers (not by us) and distributed under the Python Software Foundation License:

``"stdlib-code"`` (role ``"pretrain"``)
    The source of the standard library's top-level ``.py`` modules (``argparse.py``, ``json/`` is a
    package and is not included, ...), one document per file, in file-name order. The shipped base model
    is pretrained on it: Python code with its comments and docstrings.

``"python-docs"`` (role ``"finetune"``)
    ``pydoc_data.topics.topics``: the prose of the Python Language Reference that ``help("assert")`` prints,
    one document per topic, in topic-name order. Mostly English prose about the language, with a few code
    examples: a different domain, which a LoRA fine-tune visibly adapts the base model to.

``"python-instruct"`` (role ``"instruct"``)
    Questions about Python answered by Python's own documentation, as chat rows
    (``{"messages": [user, assistant]}``): "Explain the `with` statement in Python." -> the opening of that
    ``pydoc_data.topics`` topic, and "What does `json.dumps(...)` do?" -> the function's docstring summary.
    A fixed train/validation split by answer hash keeps every validation answer out of training. Read it with
    :func:`read_instructions`; its construction is documented in :mod:`lora_widgets.data.instruct_corpus`.

:func:`load_heldout_code` gives standard-library code the shipped base model never trained on, to measure
forgetting with: the modules inside the standard library's packages (``json/decoder.py``, ``asyncio/*.py``,
...). No document of ``"stdlib-code"`` itself is held out: the base model's pretraining split was over random
128-token blocks (``scripts/build_base_model.py``), and every one of its 164 files has blocks on the training side.

All are read from the running interpreter, so their exact content depends on the Python version (the
shipped model was built from CPython 3.11; see its model card). Within one interpreter the result is
deterministic: the same documents in the same order every time.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MAX_CODE_CHARS",
    "MAX_FILE_CHARS",
    "MAX_HELDOUT_CHARS",
    "CorpusInfo",
    "CorpusRole",
    "corpus_for_role",
    "get_corpus_info",
    "instruction_corpus_names",
    "list_corpora",
    "load_corpus",
    "load_heldout_code",
    "python_version",
    "read_instructions",
]

CorpusRole = Literal["pretrain", "finetune", "instruct"]

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
    "python-instruct": CorpusInfo(
        name="python-instruct",
        role="instruct",
        description=(
            "Instruction set of chat rows {'messages': [user, assistant]}: 'Explain <topic title> in Python.' -> "
            "the opening sentences (up to 300 characters) of that pydoc_data.topics topic's first paragraph, and "
            "'What does `module.function(signature)` do?' -> the docstring summary of public functions of ~60 "
            "pure-Python stdlib modules. Rows with the same answer are grouped; whole groups go to validation "
            "when the SHA-256 of the answer falls in the first 10% of its range, so no validation answer "
            "appears in training. Read with read_instructions('python-instruct', 'train' | 'validation')."
        ),
        source="pydoc_data.topics and the docstrings and signatures of standard-library functions",
        licence=_PSF,
    ),
}

_ROLES: dict[str, str] = {"pretrain": "stdlib-code", "finetune": "python-docs", "instruct": "python-instruct"}


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
        raise ValueError(
            f"unknown corpus {name!r}; built-in corpora are: {', '.join(_CORPORA)} "
            f"(or a role: {', '.join(_ROLES)})"
        ) from None


def corpus_for_role(role: str) -> str:
    """Name of the corpus used for ``role`` (``"pretrain"``, ``"finetune"`` or ``"instruct"``).

    Raises:
        ValueError: unknown role (the message lists the roles).
    """
    try:
        return _ROLES[role]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown corpus role {role!r}; use 'pretrain' (stdlib-code), 'finetune' (python-docs) or "
            "'instruct' (python-instruct)"
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


def load_corpus(name: str) -> list[str]:
    """Return the documents of the built-in corpus ``name`` (or of the corpus for a role) as a new list.

    ``name`` is a corpus name (``"stdlib-code"``, ``"python-docs"``) or a role: ``"pretrain"`` (the
    standard library's source, which the shipped model was pretrained on) or ``"finetune"`` (the Python
    Language Reference prose from ``pydoc_data.topics``, a different domain for LoRA to adapt to). The list
    is the same, in the same order, on every call within one Python installation (cached after the first
    read, which takes well under a second).

    Raises:
        ValueError: unknown corpus name or role (the message lists the known ones), an instruction set
            (read it with :func:`read_instructions`), or the installation lacks the files it is read from.
    """
    if isinstance(name, str) and name in _ROLES:
        name = _ROLES[name]
    if get_corpus_info(name).role == "instruct":
        raise ValueError(
            f"{name!r} is an instruction set of chat rows, not a list of documents; read it with "
            f"read_instructions({name!r}, 'train') or read_instructions({name!r}, 'validation')"
        )
    return list(_read(name))


#: Directories under the standard library whose modules are not held-out code: tests, installed third-party
#: packages, the fine-tuning corpus (``pydoc_data``), generated codec tables (``encodings``), bundled wheels.
_NOT_HELDOUT = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "encodings", "__pycache__",
     "_bundled", "__phello__", "lib-dynload"}
)  # fmt: skip


#: Upper bound on the held-out code (characters): a forgetting set needs thousands of blocks, not all of them.
MAX_HELDOUT_CHARS = 2_000_000


def _package_modules(stdlib: Path) -> list[Path]:
    """``.py`` files in the standard library's package directories, in path order (pruned while walking, so
    ``site-packages`` is never listed)."""
    found: list[Path] = []
    for top, dirs, files in os.walk(stdlib):
        here = Path(top)
        dirs[:] = [d for d in dirs if d not in _NOT_HELDOUT and not d.startswith("config-")]
        if here != stdlib:  # top-level modules are the pretraining corpus
            found += [here / f for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(stdlib).parts)


@functools.cache
def _heldout_code() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen = set(_read("stdlib-code"))
    documents: list[str] = []
    total = 0
    for path in _package_modules(stdlib):
        if not _is_code_module(path) and path.name != "__init__.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text or len(text) > MAX_FILE_CHARS or text in seen:
            continue
        if total + len(text) > MAX_HELDOUT_CHARS:
            break
        documents.append(text)
        total += len(text)
    return tuple(documents)


def load_heldout_code() -> list[str]:
    """Standard-library source the shipped base model never trained on: a forgetting set in its own domain.

    The modules inside the standard library's packages (``asyncio/``, ``email/``, ``json/``, ``xml/``, ...; their
    tests, ``pydoc_data``, ``encodings`` and installed third-party packages left out), one document per file in
    path order up to :data:`MAX_HELDOUT_CHARS` in all, each under :data:`MAX_FILE_CHARS` and none identical to a ``"stdlib-code"`` document. The base
    model pretrained on the top-level modules only (``"stdlib-code"``), and of those on random blocks, so no
    ``"stdlib-code"`` document is unseen; these files are code by the same authors in the same style that it
    never saw. Its tokenizer was trained on ``"stdlib-code"`` only as well. Measured against CPython 3.11, which
    the shipped model was built from; on another version a module that moved into a package could have been a
    top-level (pretraining) file there.

    Returns:
        A new list of documents, the same on every call within one installation (an empty list when the
        installation has no such package modules).
    """
    return list(_heldout_code())


def instruction_corpus_names() -> list[str]:
    """Names of the built-in instruction sets (role ``"instruct"``)."""
    return [info.name for info in _CORPORA.values() if info.role == "instruct"]


def read_instructions(name: str, split: str = "train") -> list[dict[str, Any]]:
    """The rows of a built-in instruction set's ``split`` (``"train"`` or ``"validation"``), as fresh dicts.

    Raises:
        ValueError: unknown corpus, a corpus that is not an instruction set, or an unknown split.
    """
    from lora_widgets.data.instruct_corpus import build_instructions

    if get_corpus_info(name).role != "instruct":
        raise ValueError(
            f"{name!r} is a text corpus, not an instruction set; read it with load_corpus({name!r}). "
            f"Instruction sets: {', '.join(instruction_corpus_names())}"
        )
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    return build_instructions("train" if split == "train" else "validation")


def python_version() -> str:
    """The interpreter version the corpora are read from (they differ slightly between versions)."""
    return ".".join(str(part) for part in sys.version_info[:3])
