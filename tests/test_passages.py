"""Documents that share a long passage are grouped, and a split keeps each group on one side.

The bug this guards: the shipped corpus's topics reprint each other ("Compound statements" holds "Function
definitions" word for word), so a split by document alone put validation text in training.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import AutoTokenizer

from lora_widgets.data import load_corpus, passage_groups, passage_overlap, prepare_data
from lora_widgets.data.text import split_texts
from lora_widgets.models import BASE_MODEL_PATH


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


def _words(n: int, seed: int) -> list[str]:
    draw = random.Random(seed)
    return [f"w{draw.randrange(10**6)}" for _ in range(n)]


def _doc(*parts: list[str]) -> str:
    return " ".join(w for part in parts for w in part)


def test_a_reprinted_passage_joins_two_documents_and_joins_are_transitive() -> None:
    shared_ab, shared_bc = _words(40, 1), _words(40, 2)
    a = _doc(_words(100, 3), shared_ab, _words(50, 4))
    b = _doc(shared_ab, _words(30, 5), shared_bc)
    c = _doc(_words(20, 6), shared_bc)
    lone = _doc(_words(200, 7))
    assert passage_groups([lone, a, b, c]) == [0, 1, 1, 1]  # numbered by first document


def test_a_passage_one_word_short_does_not_join_and_whitespace_does_not_matter() -> None:
    shared = _words(40, 1)
    short = _doc(_words(60, 2), shared[:39], _words(60, 3))
    assert passage_groups([_doc(shared), short]) == [0, 1]  # 39 words in common: apart
    reflowed = "\n".join(
        " ".join(shared[i : i + 7]) for i in range(0, 40, 7)
    )  # the same words, new line breaks
    assert passage_groups([_doc(_words(10, 4), shared), reflowed]) == [0, 0]
    assert passage_groups([_doc(shared), short], words=39) == [0, 0]


def test_identical_documents_group_even_when_shorter_than_a_passage() -> None:
    assert passage_groups(["tiny doc", "other", "tiny doc"]) == [0, 1, 0]
    assert passage_groups([]) == []


def test_passage_overlap_counts_the_held_windows_found_in_the_others() -> None:
    shared = _words(45, 1)  # 6 windows of 40 words
    held = [_doc(_words(60, 2), shared), _doc(_words(80, 3))]
    others = [_doc(shared, _words(10, 4))]
    got = passage_overlap(held, others)
    assert got.windows == (105 - 39) + (80 - 39) and got.shared == 6 and got.documents == (0,)
    assert got.share == pytest.approx(6 / got.windows)
    assert passage_overlap(["a b c"], ["a b c"]).windows == 0  # shorter than a window: nothing counted


def test_a_split_never_puts_a_reprinted_document_on_the_other_side(tokenizer) -> None:  # type: ignore[no-untyped-def]
    section = _words(60, 0)
    docs = [_doc(_words(150, 100 + i)) for i in range(18)]
    docs.append(_doc(_words(50, 1), section, _words(50, 2)))  # a "compound" topic that reprints ...
    docs.append(_doc(section))  # ... this one, whole
    together = 0
    for seed in range(12):
        data = split_texts(docs, tokenizer, block_size=16, val_fraction=0.2, seed=seed)
        held = set(data.val_documents)
        assert ({18, 19} <= held) or not ({18, 19} & held), (seed, held)
        together += {18, 19} <= held
        assert "kept on one side (20 distinct documents in 19 groups)" in data.split
    assert together >= 1  # the pair was drawn into validation at least once, whole


def test_grouped_into_too_few_groups_falls_back_and_says_why(tokenizer) -> None:  # type: ignore[no-untyped-def]
    header = _words(45, 0)  # a licence header on every document joins them all
    docs = [_doc(header, _words(100, i)) for i in range(12)]
    data = split_texts(docs, tokenizer, block_size=16, val_fraction=0.1, seed=0)
    assert data.split.startswith(
        "by position (12 distinct document(s), in 1 group(s) that share 40-word passages,"
    )
    assert "remove it first" in data.split


def test_the_shipped_corpus_splits_leave_no_held_out_passage_in_training(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Every held-out document's 40-word windows, searched as plain text in the training documents (a check apart
    from the hashing), for the notebooks' and the dashboard's settings."""
    docs = load_corpus("finetune")
    for val, test, seed in ((0.1, 0.0, 0), (0.1, 0.1, 0), (0.2, 0.2, 0), (0.1, 0.0, 1)):
        data = prepare_data(docs, tokenizer, block_size=128, val_fraction=val, test_fraction=test, seed=seed)
        held = set(data.val_documents) | set(data.test_documents)
        train_text = (
            " " + " ".join(" ".join(docs[i].split()) for i in range(len(docs)) if i not in held) + " "
        )
        for i in held:
            words = docs[i].split()
            for k in range(0, len(words) - 39, 25):  # every 25th window
                assert f" {' '.join(words[k : k + 40])} " not in train_text, (val, test, seed, i, k)
        assert (
            passage_overlap([docs[i] for i in held], [d for j, d in enumerate(docs) if j not in held]).shared
            == 0
        )
