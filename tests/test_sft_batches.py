"""Padded batches: the attention mask hides padding, grouping by length is deterministic, the loss is the
mean over trained tokens only."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_widgets.data.sft_batches import (
    SFTExample,
    collate,
    iter_batches,
    length_grouped_batches,
    masked_lm_loss,
    padding_count,
)


def example(ids: list[int], n_prompt: int, row: int = 0) -> SFTExample:
    return SFTExample(tuple(ids), tuple([-100] * n_prompt + ids[n_prompt:]), row)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_collate_pads_right_with_mask_and_ignored_labels() -> None:
    batch = collate([example([5, 6, 7, 8], 2), example([9, 10], 1)], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert collate([{"input_ids": [3, 4]}], pad_id=0)["labels"].tolist() == [[3, 4]]  # TRL's collator default
    with pytest.raises(ValueError, match="pad_id must be an int >= 0"):
        collate([example([1, 2], 0)], pad_id=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one example"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="example 0: 2 input ids and 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


def test_padding_is_not_attended(model: LlamaForCausalLM) -> None:
    short = example([3, 4, 5], 1)
    alone = model(input_ids=torch.tensor([short.input_ids])).logits  # [1, 3, V]
    batch = collate([example(list(range(10, 20)), 2), short], pad_id=0)
    padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2, 10, V]
    torch.testing.assert_close(padded[1, :3], alone[0], atol=1e-5, rtol=1e-5)
    # and the loss does not change with the padding (pad ids differ, loss identical)
    other = collate([example(list(range(10, 20)), 2), short], pad_id=7)
    logits_other = model(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits
    torch.testing.assert_close(
        masked_lm_loss(padded, batch["labels"]),
        masked_lm_loss(logits_other, other["labels"]),
        atol=1e-6,
        rtol=1e-6,
    )


def test_masked_loss_is_the_mean_over_trained_tokens(model: LlamaForCausalLM) -> None:
    batch = collate([example([5, 6, 7, 8, 9], 3), example([9, 10, 11], 1)], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2, 5, V]
    ours = masked_lm_loss(logits, batch["labels"])
    hf = model(**batch).loss  # transformers' ForCausalLMLoss on the same labels
    torch.testing.assert_close(ours, hf)
    # by hand: trained targets are (row 0) positions 3, 4 and (row 1) positions 1, 2 -> 4 tokens
    logp = torch.log_softmax(logits.float(), dim=-1)
    picks = [logp[0, 2, 8], logp[0, 3, 9], logp[1, 0, 10], logp[1, 1, 11]]
    torch.testing.assert_close(ours, -torch.stack(picks).mean())
    torch.testing.assert_close(masked_lm_loss(logits, batch["labels"], num_items=8), ours / 2)
    with pytest.raises(ValueError, match="no trained token"):
        masked_lm_loss(logits, torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        masked_lm_loss(logits[0], batch["labels"])


def test_length_grouping_is_a_deterministic_partition_with_little_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=gen).tolist()
    plan = length_grouped_batches(lengths, batch_size=8, seed=3, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(203))
    assert sorted(len(b) for b in plan) == [3] + [8] * (len(plan) - 1)  # 203 = 25 * 8 + 3
    assert max(lengths[i] for i in plan[0]) == max(lengths)  # the longest batch first (fail fast on OOM)
    assert plan == length_grouped_batches(lengths, batch_size=8, seed=3, epoch=1)
    assert plan != length_grouped_batches(lengths, batch_size=8, seed=3, epoch=2)
    assert plan != length_grouped_batches(lengths, batch_size=8, seed=4, epoch=1)
    random_plan = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert padding_count(lengths, plan) < 0.25 * padding_count(lengths, random_plan)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        length_grouped_batches(lengths, batch_size=0)
    assert length_grouped_batches([], batch_size=4) == []


def test_iter_batches_covers_every_example_once() -> None:
    examples = [example(list(range(2, 2 + n)), 1, row=n) for n in (3, 9, 4, 12, 5)]
    batches = list(iter_batches(examples, batch_size=2, pad_id=0, seed=0, epoch=0))
    assert len(batches) == 3
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e) for e in examples)
    assert all(b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape for b in batches)
