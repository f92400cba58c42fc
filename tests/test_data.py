"""The data pipeline: sources, packing with EOS, deterministic splits, and clear errors on bad input."""

from __future__ import annotations

import copy
import json
import random
import string
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lora_widgets.data.passages import passage_groups
from lora_widgets.data.text import (
    DataSplit,
    as_blocks,
    load_texts,
    pack_blocks,
    prepare_data,
    split_blocks,
    train_val_blocks,
)
from lora_widgets.models import BASE_MODEL_PATH


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


# --- load_texts -------------------------------------------------------------------------------------------


def test_list_and_tuple_keep_order_and_drop_blank_rows() -> None:
    assert load_texts(["a", "  ", "b"]) == ["a", "b"]
    assert load_texts(("x",)) == ["x"]


def test_empty_data_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        load_texts([])
    with pytest.raises(ValueError, match="empty"):
        load_texts(["", "   \n"])


def test_non_text_row_names_its_index_and_type() -> None:
    with pytest.raises(ValueError, match=r"row 2 .* is int"):
        load_texts(["a", "b", 3])
    with pytest.raises(ValueError, match=r"row 0 .* is NoneType"):
        load_texts([None])


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("line one\n\nline two\n", encoding="utf-8")
    assert load_texts(path) == ["line one\n\nline two\n"]
    assert load_texts(str(path)) == ["line one\n\nline two\n"]


def test_jsonl_file_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    assert load_texts(path) == ["first", "second"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "x"}\n', encoding="utf-8")
    assert load_texts(other, text_field="body") == ["x"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": 5}\n', r"row 1 .* is int"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"line 2: no 'text' field \(fields: body\)"),
        ('{"text": "ok"}\n[1, 2]\n', r"line 2: expected a JSON object"),
        ('{"text": "ok"}\n{oops\n', r"line 2: not valid JSON"),
    ],
)
def test_bad_jsonl_rows_are_located(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_texts(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(ValueError, match=r"does not exist") as info:
        load_texts(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_texts(missing)


def test_unsupported_file_type_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '.csv'.*\.txt.*\.jsonl"):
        load_texts(path)
    with pytest.raises(ValueError, match="is a directory"):
        load_texts(tmp_path)


def test_unknown_corpus_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'shakespeare' is neither .* stdlib-code, python-docs"):
        load_texts("shakespeare")


def test_corpus_by_name() -> None:
    from lora_widgets.data.corpora import load_corpus

    assert load_texts("python-docs") == load_corpus("python-docs")


def test_unsupported_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unsupported data source of type int"):
        load_texts(42)


def test_hf_dataset_column() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "label": [0, 1]})
    assert load_texts(ds) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"no 'content' column \(columns: text, label\)"):
        load_texts(ds, text_field="content")
    with pytest.raises(ValueError, match=r"dataset\['train'\]"):
        load_texts(datasets.DatasetDict({"train": ds}))
    with pytest.raises(ValueError, match=r"row 0 .* is int"):
        load_texts(ds, text_field="label")


# --- pack_blocks ------------------------------------------------------------------------------------------


def test_pack_blocks_appends_eos_after_every_document(tokenizer) -> None:  # type: ignore[no-untyped-def]
    docs = ["def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n"]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = [t for doc in ids for t in [*doc, tokenizer.eos_token_id]]
    blocks = pack_blocks(docs, tokenizer, block_size=4)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # tail dropped, nothing padded
    assert (blocks == tokenizer.eos_token_id).sum() == sum(
        1 for t in stream[: blocks.numel()] if t == tokenizer.eos_token_id
    )


def test_data_shorter_than_one_block_says_how_short(tokenizer) -> None:  # type: ignore[no-untyped-def]
    n = len(tokenizer("hello", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ValueError, match=rf"has {n} tokens .* fewer than one block of block_size=128"):
        pack_blocks(["hello"], tokenizer, block_size=128)


def test_tokenizer_without_eos_names_the_fix(tokenizer) -> None:  # type: ignore[no-untyped-def]
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match=r"has no EOS token.*add_special_tokens\(\{'eos_token'"):
        pack_blocks(["some text"], no_eos, block_size=2)
    with pytest.raises(ValueError, match="has no EOS token"):
        prepare_data(["some text"], no_eos, block_size=2)


def test_pack_blocks_refuses_a_bare_string(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"single str; wrap it"):
        pack_blocks("def f(): pass\n" * 50, tokenizer, block_size=4)


@pytest.mark.parametrize("bad", [0, 1, -4, 2.5, True, "128"])
def test_bad_block_size(tokenizer, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        pack_blocks(["text"], tokenizer, block_size=bad)


# --- split_blocks -----------------------------------------------------------------------------------------


def _numbered(n: int, width: int = 3) -> torch.Tensor:
    return torch.arange(n * width).view(n, width)  # row i starts with i * width


def test_split_is_a_deterministic_partition() -> None:
    blocks = _numbered(50)
    train, val = split_blocks(blocks, val_fraction=0.2, seed=7)
    again_train, again_val = split_blocks(blocks, val_fraction=0.2, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(val) == 10 and len(train) == 40
    rows = sorted(int(r) // 3 for r in torch.cat([train, val])[:, 0])
    assert rows == list(range(50))  # disjoint and complete
    assert torch.all(train[1:, 0] > train[:-1, 0]) and torch.all(val[1:, 0] > val[:-1, 0])  # order kept
    _, other_val = split_blocks(blocks, val_fraction=0.2, seed=8)
    assert not torch.equal(val, other_val)


def test_split_edge_cases() -> None:
    train, val = split_blocks(_numbered(5), val_fraction=0.0)
    assert len(train) == 5 and val.shape == (0, 3)
    train, val = split_blocks(_numbered(2), val_fraction=0.01)
    assert len(train) == 1 and len(val) == 1  # at least one validation block
    with pytest.raises(ValueError, match=r"only 1 block\(s\).*val_fraction=0"):
        split_blocks(_numbered(1), val_fraction=0.1)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            split_blocks(_numbered(5), val_fraction=bad)


# --- prepare_data / as_blocks -----------------------------------------------------------------------------


def test_prepare_data_is_deterministic(tokenizer) -> None:  # type: ignore[no-untyped-def]
    first = prepare_data("python-docs", tokenizer, block_size=64, val_fraction=0.1, seed=0)
    second = prepare_data("python-docs", tokenizer, block_size=64, val_fraction=0.1, seed=0)
    assert isinstance(first, DataSplit)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.val_documents == second.val_documents and first.split == second.split
    texts = load_texts("python-docs")
    groups = passage_groups(texts)  # the corpus's topics reprint each other: 79 documents, 58 groups
    n_groups, held = len(set(groups)), {groups[i] for i in first.val_documents}
    assert len(held) == round(n_groups * 0.1) and n_groups < len(set(texts))
    assert set(first.val_documents) == {i for i, g in enumerate(groups) if g in held}  # whole groups only
    n_val = len(first.val_documents)
    assert first.split == (
        f"by document: {len(texts) - n_val:,} train / {n_val:,} validation documents, seed 0; documents sharing a "
        f"40-word passage kept on one side ({len(set(texts))} distinct documents in {n_groups} groups)"
    )
    assert (
        len(first.train) + len(first.val) <= first.n_tokens // 64
    )  # each side drops its own incomplete tail
    assert first.n_train_tokens == len(first.train) * 64 and first.block_size == 64
    other = prepare_data("python-docs", tokenizer, block_size=64, val_fraction=0.1, seed=1)
    assert other.val_documents != first.val_documents  # the seed picks the documents


def _documents_seen(blocks: torch.Tensor, owner: dict[tuple[int, ...], int], n: int = 12) -> set[int]:
    """The documents whose token ``n``-grams occur inside ``blocks[k, T]`` (``owner``: n-gram -> document)."""
    return {
        owner[g]
        for b in blocks.tolist()
        for j in range(len(b) - n + 1)
        if (g := tuple(b[j : j + n])) in owner
    }


def _owners(ids: list[list[int]], n: int = 12) -> dict[tuple[int, ...], int]:
    """Each token n-gram that occurs in exactly one document, mapped to it."""
    seen: dict[tuple[int, ...], int] = {}
    for doc, toks in enumerate(ids):
        for j in range(len(toks) - n + 1):
            g = tuple(toks[j : j + n])
            seen[g] = doc if seen.get(g, doc) == doc else -1
    return {g: d for g, d in seen.items() if d >= 0}


def test_no_validation_document_is_in_training(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Whole documents validate: every document whose text is in a validation block is a validation document,
    and none of them has text in a training block (documents known by their own words: each draws from its own
    vocabulary, so a 12-token run names its document). Random blocks of the packed stream (the old rule) fail it."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(40 * 12)]
    texts = [
        " ".join(rng.choice(words[12 * i : 12 * i + 12]) for _ in range(20 + 7 * (i % 5))) for i in range(40)
    ]
    texts.append(texts[3])  # a duplicate: it must land on the same side as its twin
    data = prepare_data(texts, tokenizer, block_size=32, val_fraction=0.2, seed=5)
    val_docs = set(data.val_documents)
    assert len({texts[i] for i in val_docs}) == round(40 * 0.2)  # 40 distinct documents, 20% of them
    assert (3 in val_docs) == (40 in val_docs)
    owner = _owners([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:40]])
    in_val, in_train = _documents_seen(data.val, owner), _documents_seen(data.train, owner)
    assert in_val and in_val <= val_docs and not in_train & val_docs
    old_train, old_val = split_blocks(
        pack_blocks(texts, tokenizer, 32), 0.2, seed=5
    )  # the leak this test catches
    assert _documents_seen(old_val, owner) & _documents_seen(old_train, owner)
    again = prepare_data(texts, tokenizer, block_size=32, val_fraction=0.2, seed=5)
    assert again.val_documents == data.val_documents and torch.equal(again.val, data.val)


def test_a_single_document_falls_back_to_its_last_blocks(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "".join(f"x{i} = {i}\n" for i in range(200))
    data = prepare_data([text], tokenizer, block_size=16, val_fraction=0.1, seed=0)
    blocks = pack_blocks([text], tokenizer, 16)
    n_val = round(len(blocks) * 0.1)
    assert torch.equal(data.val, blocks[-n_val:]) and torch.equal(data.train, blocks[:-n_val])
    assert (
        data.split.startswith("by position (the text is one document): the last") and data.val_documents == ()
    )
    short = ["x = 1\n" * 60, "y = 2\n"]  # seed 0 trains on the short one, which would not fill a block
    split = prepare_data(short, tokenizer, block_size=16, val_fraction=0.5, seed=0).split
    assert split.startswith("by position (the 1 training document(s) would hold fewer than one block of 16")
    # every short part is named, not only validation: 9 documents of 6 tokens, 3 per part, blocks of 20
    tiny = [f"v{i} = {i}\n" for i in range(9)]
    with pytest.raises(ValueError, match=r"the 3 training document\(s\) and the 3 validation document\(s\) and "
                       r"the 3 test document\(s\) would hold fewer than one block of 20 tokens"):  # fmt: skip
        prepare_data(tiny, tokenizer, block_size=20, val_fraction=1 / 3, test_fraction=1 / 3, seed=0)


def test_prepare_data_from_a_jsonl_file(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(40)))
    split = prepare_data(path, tokenizer, block_size=8, val_fraction=0.25, seed=1)
    assert split.train.shape[1] == 8 and len(split.val) >= 1


def test_as_blocks(tokenizer) -> None:  # type: ignore[no-untyped-def]
    blocks = torch.arange(12, dtype=torch.int32).view(3, 4)
    out = as_blocks(blocks, None, block_size=128)
    assert out.dtype == torch.long and torch.equal(out, blocks.long())
    assert as_blocks(["def f(): pass\n" * 20], tokenizer, 16).shape[1] == 16
    with pytest.raises(ValueError, match="2-D"):
        as_blocks(torch.arange(8), None, 4)
    with pytest.raises(ValueError, match="integer token ids"):
        as_blocks(torch.zeros(2, 4), None, 4)
    with pytest.raises(ValueError, match="negative id"):
        as_blocks(-torch.ones(2, 4, dtype=torch.long), None, 4)
    split = DataSplit(train=blocks, val=blocks[:1], block_size=4, n_tokens=12)
    with pytest.raises(ValueError, match=r"split\.train"):
        as_blocks(split, tokenizer, 4)
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        as_blocks(["text"], None, 4)


def test_train_val_blocks_follows_one_rule_for_trainer_and_dashboard(tokenizer) -> None:  # type: ignore[no-untyped-def]
    blocks = torch.arange(20 * 8).view(20, 8)
    split = DataSplit(train=blocks[:15], val=blocks[15:], block_size=8, n_tokens=160, split="by document: x")
    train, val, how = train_val_blocks(split, None, None, 8)  # a DataSplit brings its own validation part
    assert torch.equal(train, blocks[:15]) and val is not None and torch.equal(val, blocks[15:])
    assert how == "by document: x"
    train, val, how = train_val_blocks(split, blocks[:2], None, 8)  # given eval_data wins
    assert val is not None and torch.equal(val, blocks[:2]) and how == "validation data given (eval_data)"
    train, val, how = train_val_blocks(
        blocks, None, None, 8, val_fraction=0.1, seed=3
    )  # a tensor: its last blocks
    assert val is not None and torch.equal(val, blocks[18:]) and torch.equal(train, blocks[:18])
    assert how.startswith("by position (blocks given as a tensor")
    assert train_val_blocks(blocks[:1], None, None, 8)[1] is None  # one block: nothing to hold out
    assert train_val_blocks(blocks, None, None, 8, val_fraction=0.0)[1] is None
    texts = [f"def f{i}(x):\n    return x + {i}\n" * 4 for i in range(30)]
    t_train, t_val, how = train_val_blocks(texts, None, tokenizer, 16, val_fraction=0.2, seed=0)
    expected = prepare_data(texts, tokenizer, block_size=16, val_fraction=0.2, seed=0)
    assert torch.equal(t_train, expected.train) and t_val is not None and torch.equal(t_val, expected.val)
    assert how == expected.split == "by document: 24 train / 6 validation documents, seed 0"
