"""``end_of_turn_share`` answers its prompts in left-padded batches: the same share as one prompt at a time."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from lora_widgets.data import end_of_turn_share, read_instructions
from lora_widgets.data.sft_eval import _prompt_ids
from lora_widgets.models import load_base_model


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any, list[Any]]:
    model, tokenizer = load_base_model()
    return model, tokenizer, read_instructions("python-instruct", "validation")[:12]


def _a_stop_some_replies_reach(model: Any, tokenizer: Any, rows: list[Any], new_tokens: int) -> int:
    """A token that the base model's greedy replies (one prompt at a time) hold in some rows and not in others."""
    present: Counter[int] = Counter()
    for i, row in enumerate(rows):
        ids = _prompt_ids(tokenizer, row, i)
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        present.update(set(out[0, len(ids) :].tolist()))
    token, _ = min(present.items(), key=lambda item: abs(item[1] - len(rows) / 2))
    return token


def test_batched_replies_end_where_one_at_a_time_replies_do(shipped: tuple[Any, Any, list[Any]]) -> None:
    """Left padding must not change a reply: were the pads attended to (no attention mask) or the prompt
    right-padded, the model would continue from a pad, and rows would end (or not) at other tokens."""
    model, tokenizer, rows = shipped
    stop = _a_stop_some_replies_reach(model, tokenizer, rows, new_tokens=16)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]  # a common token now ends a reply
    try:
        one = end_of_turn_share(model, tokenizer, rows, max_new_tokens=16, batch_size=1)
        batched = end_of_turn_share(model, tokenizer, rows, max_new_tokens=16, batch_size=5)  # 5 + 5 + 2
    finally:
        model.generation_config.eos_token_id = saved
    assert 0 < one < 1, one  # some replies end and some do not: the comparison can tell them apart
    assert batched == one


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_bad_batch_size_is_named_and_the_model_keeps_its_mode(
    shipped: tuple[Any, Any, list[Any]], batch_size: Any
) -> None:
    model, tokenizer, rows = shipped
    model.train()
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {batch_size!r}"):
        end_of_turn_share(model, tokenizer, rows, batch_size=batch_size)
    assert model.training
