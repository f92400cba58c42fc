"""Which documents share a long passage: the grouping that keeps a reprinted text on one side of a split.

Why: splitting by document (:mod:`lora_widgets.data.split`) is not enough when documents reprint each other. The
shipped fine-tuning corpus is Python's Language Reference, whose topics nest: "Compound statements" reprints the
``if``, ``while``, ``for``, ``try``, ``with``, function and class sections, each also a topic of its own, so a
validation topic can sit word for word inside a training one. Web corpora do the same through quoted and mirrored
pages. The field's answer is to find the shared text and keep it on one side: Lee et al. 2022 ("Deduplicating
Training Data Makes Language Models Better", sec. 4 and 5) found 50-token exact substrings shared between the train
and validation splits of C4 and other standard sets, and measured how much of each validation set they cover.

The rule here: two documents **share a passage** when some run of ``words`` consecutive words (whitespace-separated,
exactly equal) occurs in both. Documents are grouped by the connected components of that relation (A shares with
B and B with C: one group), so a split that keeps each group on one side leaves no such run in two parts. Words,
not tokens, so the groups do not depend on the tokenizer; 40 words is about 50-60 tokens of English prose, the
length Lee et al. use.

A caution for web text: boilerplate that many pages repeat (a licence header, a cookie notice of 40 words or more)
joins every page that carries it into one group. The split then has too few groups to hold out and says so
(:func:`lora_widgets.data.text.split_texts` falls back and names why); remove the boilerplate first.

How: each document's words become integer ids (one vocabulary, first-occurrence order), each window of ``words``
ids a 64-bit polynomial hash (``h = h * P + id`` over the window, modulo 2**64, vectorised over all windows at once,
``words`` passes). Windows are sorted by hash; equal hashes in different documents join those documents (union-find).
A hash collision (about ``n_windows**2 / 2**64``, under 1e-7 for 10**6 windows) can only join two documents that
share nothing, which makes a split more cautious, never leakier. Written by hand: deduplication libraries
(``text-dedup``, Lee et al.'s suffix arrays) remove duplicates from one corpus rather than say which documents
belong together, and bring a Rust or C++ build for a task numpy does in a second.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PASSAGE_WORDS", "PassageOverlap", "passage_groups", "passage_overlap"]

PASSAGE_WORDS = 40
"""Default run length, in words, that counts as a shared passage (about Lee et al. 2022's 50 tokens)."""

_P = np.uint64(
    1_000_003
)  # the polynomial hash's base: an odd prime, so multiplying by it is invertible mod 2**64


@dataclass(frozen=True)
class PassageOverlap:
    """How much of some held-out documents' text occurs in other documents (e.g. training), in ``words``-word windows.

    Attributes:
        words: the window length in words.
        windows: the held-out documents' windows counted (documents shorter than ``words`` have none).
        shared: of those, the windows that occur in the other documents.
        documents: indices (into the held-out list) of the documents with at least one shared window.
    """

    words: int
    windows: int
    shared: int
    documents: tuple[int, ...]

    @property
    def share(self) -> float:
        """``shared / windows`` (0 when there are no windows)."""
        return self.shared / self.windows if self.windows else 0.0


def _check(texts: Sequence[str], words: int, name: str) -> list[str]:
    if isinstance(words, bool) or not isinstance(words, numbers.Integral) or words < 1:
        raise ValueError(f"words must be a whole number of at least 1 (e.g. {PASSAGE_WORDS}), got {words!r}")
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of strings (one per document), got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(
            f"{name}[{bad}] is {type(texts[bad]).__name__}, not a string: pass one string per document"
        )
    return list(texts)


def _window_hashes(texts: list[str], words: int, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes uint64[n_windows], owner int64[n_windows])``: every ``words``-word window and its document.

    ``vocab`` (word -> id, grown here) must be shared by every call whose hashes are compared."""
    hashes, owners = [], []
    for doc, text in enumerate(texts):
        ids = np.fromiter(
            (vocab.setdefault(w, len(vocab)) for w in text.split()), dtype=np.uint64
        )  # [n_words]
        n = len(ids) - words + 1
        if n < 1:
            continue
        h = np.zeros(n, dtype=np.uint64)  # [n]
        for j in range(words):  # h = h * P + ids[i + j]: wraps modulo 2**64, as intended
            h = h * _P + ids[j : j + n]
        hashes.append(h)
        owners.append(np.full(n, doc, dtype=np.int64))
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(owners)


def passage_groups(texts: Sequence[str], words: int = PASSAGE_WORDS) -> list[int]:
    """A group number per document: documents that share a run of ``words`` words, directly or through others,
    or that are identical, get the same number (numbered in order of first document, from 0).

    Raises:
        ValueError: ``texts`` not a list of strings, or ``words`` not a whole number >= 1.
    """
    texts = _check(texts, words, "texts")
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, text in enumerate(texts):  # identical documents, however short
        join(first.setdefault(text, i), i)
    hashes, owner = _window_hashes(texts, words, {})
    order = np.argsort(hashes, kind="stable")
    hashes, owner = hashes[order], owner[order]
    same = np.flatnonzero((hashes[1:] == hashes[:-1]) & (owner[1:] != owner[:-1]))  # neighbours: equal window
    for k in same.tolist():
        join(int(owner[k]), int(owner[k + 1]))
    label: dict[int, int] = {}
    return [label.setdefault(root(i), len(label)) for i in range(len(texts))]


def passage_overlap(held: Sequence[str], others: Sequence[str], words: int = PASSAGE_WORDS) -> PassageOverlap:
    """How many of ``held``'s ``words``-word windows occur anywhere in ``others`` (e.g. validation documents
    against training ones): the leak a split by document should leave at zero.

    Raises:
        ValueError: either list not a list of strings, or ``words`` not a whole number >= 1.
    """
    held, others = _check(held, words, "held"), _check(others, words, "others")
    vocab: dict[str, int] = {}
    held_h, held_owner = _window_hashes(held, words, vocab)
    other_h, _ = _window_hashes(others, words, vocab)
    found = np.isin(held_h, other_h)  # [n_held_windows]
    return PassageOverlap(
        words, len(held_h), int(found.sum()), tuple(sorted(set(held_owner[found].tolist())))
    )
