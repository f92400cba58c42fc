"""The validation split a run makes and says it made (issue 21, item 1): whole documents of text, whole examples of
rows, the same in the trainer and the dashboard; the run's ``DataPrepared`` event and the data view name the rule;
and the held-out code the shipped base model never trained on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from lora_widgets.data.corpora import load_corpus, load_heldout_code
from lora_widgets.data.split import split_groups, tail_split
from lora_widgets.data.text import prepare_data
from lora_widgets.events.types import DataPrepared, Event
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.models import BASE_MODEL_PATH
from lora_widgets.training.batches import RunData, load_run_data
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.data_view import facts_rows
from tests.helpers import tiny_llama

TEXTS = [f"def f{i}(x):\n    return x * {i}\n" * (4 + i % 3) for i in range(30)]
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }
    for i in range(20)
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


def config(tmp_path: Path, **changes: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "max_steps": 1, "batch_size": 2, "warmup_steps": 0, "eval_every": None, "eval_batches": 1,
        "block_size": 16, "max_length": 64, "val_fraction": 0.2, "output_dir": str(tmp_path / "runs"),
        "device": "cpu", **changes,
    }  # fmt: skip
    return TrainConfig(**settings)


def data_event(trainer: LoRATrainer) -> DataPrepared:
    events: list[Event] = []
    trainer.subscribe(events.append)
    trainer.run_sync()
    (event,) = [e for e in events if isinstance(e, DataPrepared)]
    return event


def test_the_run_event_says_the_text_was_split_by_document(tokenizer: Any, tmp_path: Path) -> None:
    trainer = LoRATrainer(tiny_llama(vocab_size=len(tokenizer)), tokenizer, TEXTS, lora=LoRAConfig(r=2),
                          config=config(tmp_path, seed=3))  # fmt: skip
    event = data_event(trainer)
    expected = prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.2, seed=3)
    assert event.split == expected.split == "by document: 24 train / 6 validation documents, seed 3"
    assert (event.train_sequences, event.val_sequences) == (len(expected.train), len(expected.val))


def test_rows_are_split_by_example_and_identical_examples_stay_together(
    tokenizer: Any, tmp_path: Path
) -> None:
    rows = [*ROWS, ROWS[0], ROWS[0]]  # a row given three times: all copies on one side
    data = load_run_data(rows, None, tokenizer, config(tmp_path, seed=1))
    assert (
        data.val is not None
        and not isinstance(data.val, torch.Tensor)
        and not isinstance(data.train, torch.Tensor)
    )
    val_ids = {tuple(e.input_ids) for e in data.val.items}
    train_ids = {tuple(e.input_ids) for e in data.train.items}
    assert not val_ids & train_ids and len(val_ids) == round(20 * 0.2)
    assert load_run_data(rows, None, tokenizer, config(tmp_path, seed=1)).split == data.split  # seeded
    event = data_event(LoRATrainer(tiny_llama(vocab_size=len(tokenizer)), tokenizer, rows, lora=LoRAConfig(r=2),
                                   config=config(tmp_path, seed=1)))  # fmt: skip
    assert (
        event.split
        == data.split
        == f"by example: {len(data.train)} train / {len(data.val)} validation examples, seed 1"
    )


def test_the_instruction_set_names_its_own_split(tokenizer: Any, tmp_path: Path) -> None:
    data = load_run_data("python-instruct", None, tokenizer, config(tmp_path, max_length=128))
    assert (
        data.split.startswith("python-instruct's own split by answer")
        and "50 validation examples" in data.split
    )


def test_prepared_run_data_is_taken_as_it_is(tokenizer: Any, tmp_path: Path) -> None:
    """The dashboard prepares the data once and hands the trainer a RunData: the run reports the same split."""
    prepared = load_run_data(TEXTS, None, tokenizer, config(tmp_path))
    assert isinstance(prepared, RunData) and load_run_data(prepared, None, None, config(tmp_path)) is prepared
    event = data_event(LoRATrainer(tiny_llama(vocab_size=len(tokenizer)), tokenizer, prepared, lora=LoRAConfig(r=2),
                                   config=config(tmp_path)))  # fmt: skip
    assert event.split == prepared.split and event.split.startswith("by document")


def test_the_dashboard_data_view_shows_the_split(tokenizer: Any, tmp_path: Path) -> None:
    dash = LoRADashboard(model=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer, train_data=TEXTS,
                         lora=LoRAConfig(r=2), train=config(tmp_path))  # fmt: skip
    facts = dash.panel.data_view["facts"]
    assert facts["split"] == f"by document: 24 train / 6 validation documents, seed {TrainConfig().seed}"
    assert ("validation split", facts["split"]) in facts_rows(facts)
    # the held-out share of the blocks, beside their counts: val_fraction counts documents, not tokens
    share = 100 * facts["val"] / (facts["train"] + facts["val"])
    blocks = dict(facts_rows(facts))["blocks (train / validation)"]
    assert blocks.endswith(f"of {facts['seq_len']} tokens (validation {share:.1f}%)") and facts["val"] > 0
    asyncio.run(dash.run())
    assert dash.panel.data_view["facts"]["split"] == facts["split"]  # the run's own event says the same


def test_split_groups_is_seeded_and_keeps_at_least_one_on_each_side() -> None:
    keys = [f"doc{i}" for i in range(10)]
    a, b = split_groups(keys, 0.3, seed=0), split_groups(keys, 0.3, seed=0)
    assert a is not None and a == b and len(a.val) == 3 and sorted(a.train + a.val) == list(range(10))
    assert split_groups(keys, 0.3, seed=1) != a
    assert split_groups(["x", "y"], 0.1, seed=0) is None  # 10% of two documents rounds to none: fall back
    two = split_groups(["x", "y"], 0.5, seed=0)
    assert two is not None and len(two.val) == 1 and len(two.train) == 1
    assert split_groups(["same"] * 5, 0.5) is None and split_groups(keys, 0.0) is None
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_groups(keys, 1.0)
    blocks = torch.arange(30).view(10, 3)
    train, val = tail_split(blocks, 0.2)
    assert torch.equal(val, blocks[8:]) and torch.equal(train, blocks[:8])
    with pytest.raises(ValueError, match=r"only 1 block"):
        tail_split(blocks[:1], 0.2)


def test_the_heldout_code_is_stdlib_code_outside_the_pretraining_corpus() -> None:
    heldout, pretrain = load_heldout_code(), load_corpus("stdlib-code")
    assert len(heldout) >= 50 and sum(map(len, heldout)) > 500_000
    assert not set(heldout) & set(pretrain)
    assert load_heldout_code() == heldout  # the same documents in the same order
    assert any("import" in doc and "def " in doc for doc in heldout[:10])


def test_a_test_part_takes_whole_documents_from_training_and_keeps_validation(tokenizer: Any) -> None:
    """Validation loss that chose a setting is biased low for that setting; the test part is for the number
    reported afterwards, so it must share no document with training or validation."""
    plain = prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.2, seed=0)
    both = prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.2, seed=0, test_fraction=0.2)
    assert plain.test is None and plain.test_documents == ()
    assert both.val_documents == plain.val_documents and torch.equal(both.val, plain.val)
    assert len(both.test_documents) == 6 and not set(both.test_documents) & set(both.val_documents)
    assert both.test is not None and both.test.shape[1] == 16 and both.train.shape[0] < plain.train.shape[0]
    assert both.split == "by document: 18 train / 6 validation / 6 test documents, seed 0"
    # every test block's tokens come from the test documents: no training or validation document reaches it
    test_stream = "".join(TEXTS[i] for i in both.test_documents)
    for block in both.test:
        assert tokenizer.decode(block).replace(tokenizer.eos_token, "") in test_stream


def test_a_test_part_that_cannot_be_made_is_refused_with_the_reason(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"test_fraction=0.1 with val_fraction=0: .*set val_fraction too"):
        prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.0, test_fraction=0.1)
    with pytest.raises(ValueError, match=r"val_fraction=0.5 and test_fraction=0.5 hold out everything"):
        prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\), got -0.1"):
        prepare_data(TEXTS, tokenizer, block_size=16, test_fraction=-0.1)
    with pytest.raises(ValueError, match=r"30 distinct group\(s\) cannot give 3 to validation, 0 to test"):
        prepare_data(TEXTS, tokenizer, block_size=16, val_fraction=0.1, test_fraction=0.01)
    with pytest.raises(ValueError, match=r"cannot hold out whole test documents .*one document"):
        prepare_data([TEXTS[0]], tokenizer, block_size=16, val_fraction=0.1, test_fraction=0.1)


def test_split_groups_takes_the_test_groups_after_the_validation_groups() -> None:
    keys = [f"doc{i}" for i in range(10)] + ["doc0"]  # a duplicate stays with its twin
    plain, both = split_groups(keys, 0.2, seed=3), split_groups(keys, 0.2, seed=3, test_fraction=0.3)
    assert plain is not None and both is not None and plain.val == both.val and both.seed == 3
    assert len({keys[i] for i in both.test}) == 3
    assert sorted(both.train + both.val + both.test) == list(range(11))
    assert ("doc0" in {keys[i] for i in both.test}) == (0 in both.test and 10 in both.test)
    described = both.describe("document")  # items, not groups: doc0 is there twice
    assert described == "by document: 5 train / 3 validation / 3 test documents, seed 3"
