"""Two measures of an instruction fine-tune: the loss on the answers, and whether the model learned to stop.

* :func:`answer_loss`: the mean next-token cross-entropy over the trained (answer) tokens of held-out
  examples, every trained token weighted equally across batches.
* :func:`end_of_turn_share`: the share of held-out prompts whose greedy reply ends with an end-of-turn / EOS
  token within ``max_new_tokens``. A model whose end-of-turn token was masked out of the loss, or a base model
  that never saw the chat format, rambles on to the limit instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lora_widgets.data.rows import check_messages
from lora_widgets.data.sft_batches import IGNORE_INDEX, SFTExample, collate, masked_lm_loss
from lora_widgets.models import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["answer_loss", "end_of_turn_share"]


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module, examples: Sequence[SFTExample], pad_id: int, batch_size: int = 16
) -> float:
    """Mean cross-entropy (nats) over the trained tokens of ``examples``; the model's mode is restored.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("answer_loss needs at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {
                k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # [B, T, V]
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(masked_lm_loss(logits, batch["labels"])) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def _prompt_of(row: Any, index: int) -> list[dict[str, str]]:
    """The messages before the last assistant turn of a ``{"messages"}`` row, or the row if it is a message list."""
    messages = row["messages"] if isinstance(row, dict) else row
    messages = check_messages(messages, f"row {index}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    if last == 0:
        raise ValueError(f"row {index}: nothing before the first assistant message to prompt with")
    return messages[:last]


@torch.no_grad()
def end_of_turn_share(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Any],
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> float:
    """Share of ``rows`` whose greedy reply ends with a stop token (:func:`lora_widgets.models.stop_token_ids`).

    The prompts are answered ``batch_size`` at a time, left-padded (a decoder-only model continues each prompt
    from its last token): a model that never stops costs ``max_new_tokens`` steps per batch, not per row.

    Args:
        rows: ``{"messages": [...]}`` rows (their last assistant turn and what follows are left out and the rest
            is the prompt) or message lists ending with a user turn.
        max_new_tokens: the reply must end within this many tokens.
        batch_size: prompts generated together (>= 1); lower it if a batch does not fit in memory.

    Raises:
        ValueError: no rows, a bad message list, a tokenizer without a chat template, ``batch_size`` < 1.
    """
    if not rows:
        raise ValueError("end_of_turn_share needs at least one row")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive int, got {batch_size!r}; try 32 (or 1 to save memory)"
        )
    prompts = [_prompt_ids(tokenizer, row, i) for i, row in enumerate(rows)]  # before the model is touched
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = model.training
    model.eval()
    ended = 0
    try:
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = _left_pad(
                prompts[start : start + batch_size], pad_id, device
            )  # [B, T]
            output = model.generate(  # type: ignore[operator]
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=pad_id,
            )  # [B, T + new]; a row that stopped early is padded after its stop token
            new = output[:, input_ids.shape[1] :].tolist()
            ended += sum(any(token in stops for token in reply) for reply in new)
    finally:
        model.train(was_training)
    return ended / len(rows)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, row: Any, index: int) -> list[int]:
    """The token ids of a row's prompt with the assistant's opening (``add_generation_prompt=True``)."""
    encoded: Any = tokenizer.apply_chat_template(
        _prompt_of(row, index), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _left_pad(
    prompts: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]): each prompt right-aligned, the pads before it masked out."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)
