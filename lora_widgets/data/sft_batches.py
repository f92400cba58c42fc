"""Batches of variable-length instruction examples, and the loss on their trained tokens.

An :class:`SFTExample` holds one tokenised row and its labels (``-100`` where no loss is taken, the
convention of ``torch.nn.functional.cross_entropy(ignore_index=-100)`` and of transformers' models).

* :func:`length_grouped_batches` orders examples so that each batch holds examples of similar length, which
  keeps padding small, deterministically from ``(seed, epoch)``: the recipe of transformers'
  ``trainer_pt_utils.get_length_grouped_indices`` (shuffle, cut into mega-batches of ``mult * batch_size``,
  sort each by length), then the batches are shuffled and the one holding the longest example goes first, so
  that an out-of-memory failure shows at step 1 rather than mid-epoch.
* :func:`collate` pads one batch on the right (``input_ids`` with the pad id, ``labels`` with ``-100``) and
  returns the ``attention_mask`` (1 = real token, 0 = padding), as TRL's ``DataCollatorForLanguageModeling``.
  Padding is therefore never attended to and never trained.
* :func:`pack` lays one batch out padding-free instead: the examples side by side in as few rows as fit, the
  ``position_ids`` restarting at 0 for each, so that transformers' models attend within each example only
  (Hugging Face, "Improve training efficiency with packing and Flash Attention 2", huggingface.co/blog/
  packing-with-FA2, 2024: TRL's and transformers' ``DataCollatorWithFlattening``). The first label of each
  example is :data:`IGNORE_INDEX`, so no example is trained to predict the next one's first token.
* :func:`masked_lm_loss` is the mean next-token cross-entropy over trained tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "SFTExample",
    "collate",
    "iter_batches",
    "length_grouped_batches",
    "masked_lm_loss",
    "pack",
    "padding_count",
]

#: Label of a position that is not trained (``cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    """One tokenised training example.

    Attributes:
        input_ids: token ids, ``len(input_ids) <= max_length``.
        labels: same length; the token id where the loss is taken, :data:`IGNORE_INDEX` elsewhere. Aligned
            with ``input_ids`` (not shifted), as transformers' ``labels=`` are: the token at position ``t`` is
            predicted from positions ``< t``, so ``labels[0]`` is never a target.
        row: index of the source row.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    row: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """Tokens whose prediction is trained (labels after the first position that are not ignored)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def _ids(example: SFTExample | Mapping[str, Sequence[int]]) -> tuple[Sequence[int], Sequence[int]]:
    if isinstance(example, SFTExample):
        return example.input_ids, example.labels
    return example["input_ids"], example.get("labels", example["input_ids"])


def _pairs(
    examples: Sequence[SFTExample | Mapping[str, Sequence[int]]], pad_id: int
) -> list[tuple[Sequence[int], Sequence[int]]]:
    """``(input_ids, labels)`` of each example, checked (see :func:`collate`'s Raises)."""
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be an int >= 0 (tokenizer.pad_token_id), got {pad_id!r}")
    if len(examples) == 0:
        raise ValueError("collate needs at least one example")
    pairs = [_ids(e) for e in examples]
    for i, (ids, lab) in enumerate(pairs):
        if len(ids) == 0 or len(lab) != len(ids):
            raise ValueError(
                f"example {i}: {len(ids)} input ids and {len(lab)} labels; both must be equal and non-zero"
            )
    return pairs


def collate(
    examples: Sequence[SFTExample | Mapping[str, Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad ``examples`` on the right to the longest one.

    Args:
        examples: :class:`SFTExample` objects, or dicts with ``input_ids`` (and ``labels``; without them
            every token is trained, as TRL's collator does).
        pad_id: the padding token id (``tokenizer.pad_token_id``; it is never attended to nor trained, so any
            valid id works, e.g. EOS when the tokenizer has no pad token).

    Returns:
        ``{"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T], "labels": LongTensor[B, T]}``
        with ``T`` the longest example's length.

    Raises:
        ValueError: no examples, an empty example, labels of another length than the ids, a bad ``pad_id``.
    """
    pairs = _pairs(examples, pad_id)
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)  # [B, T]
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, : len(ids)] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(
    examples: Sequence[SFTExample | Mapping[str, Sequence[int]]], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Lay ``examples`` out padding-free: rows of ``width`` tokens filled first-fit-decreasing.

    Each example is contiguous within one row, its ``position_ids`` run 0, 1, ... from its first token, and its
    first label is :data:`IGNORE_INDEX` (a padded row never trains ``labels[0]`` either, since nothing predicts
    it), so the loss over the trained tokens equals the padded batch's (:func:`collate`). A model attends within
    each example only when it reads the restarts in ``position_ids`` (transformers' models do when
    ``attention_mask`` is ``None``: ``masking_utils.find_packed_sequence_indices``). The rest of a row is padding
    with positions 0, 1, ... of its own (a separate block: attended by nothing real, never trained).

    Args:
        examples: as for :func:`collate`.
        pad_id: the padding token id.
        width: tokens per row; ``None``: all examples in one row.

    Returns:
        ``{"input_ids", "position_ids", "labels"}``, each ``LongTensor[R, width]`` (``R`` rows).

    Raises:
        ValueError: as :func:`collate`, and an example longer than ``width``.
    """
    pairs = _pairs(examples, pad_id)
    width = sum(len(ids) for ids, _ in pairs) if width is None else width
    if max(len(ids) for ids, _ in pairs) > width:
        raise ValueError(
            f"an example of {max(len(i) for i, _ in pairs)} tokens does not fit in rows of {width}"
        )
    rows: list[list[int]] = []  # indices into pairs, per row
    free: list[int] = []  # tokens left per row
    for i in sorted(range(len(pairs)), key=lambda k: -len(pairs[k][0])):
        n = len(pairs[i][0])
        row = next((j for j, f in enumerate(free) if f >= n), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [R, W]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [R, W]
    position_ids = torch.empty((len(rows), width), dtype=torch.long)  # [R, W]
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            ids, lab = pairs[i]
            end = start + len(ids)
            input_ids[r, start:end] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, start + 1 : end] = torch.as_tensor(lab[1:], dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0
) -> list[list[int]]:
    """Indices of the examples in each batch of one epoch, grouped by length; deterministic per (seed, epoch).

    Every index appears exactly once; the last batch may be smaller. See the module docstring for the recipe.
    """
    _check_batch_size(batch_size)
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n)
    mult = max(1, min(n // (batch_size * 4), 50))  # transformers' get_length_grouped_indices default
    mega = mult * batch_size
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        group = sorted(order[start : start + mega].tolist(), key=lambda i: -lengths[i])
        batches.extend(group[j : j + batch_size] for j in range(0, len(group), batch_size))
    batches = [batches[k] for k in rng.permutation(len(batches))]
    longest = max(range(len(batches)), key=lambda k: max(lengths[i] for i in batches[k]))
    batches.insert(0, batches.pop(longest))
    return batches


def padding_count(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Padded positions when each of ``batches`` (lists of indices into ``lengths``) is padded to its longest."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)


def iter_batches(
    examples: Sequence[SFTExample], batch_size: int, pad_id: int, seed: int = 0, epoch: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """The collated batches of one epoch, in :func:`length_grouped_batches` order (see :func:`collate`)."""
    lengths = [len(e) for e in examples]
    for batch in length_grouped_batches(lengths, batch_size, seed, epoch):
        yield collate([examples[i] for i in batch], pad_id)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained tokens only.

    Position ``t``'s logits predict token ``t + 1``: logits are shifted left by one against the labels, and
    positions labelled :data:`IGNORE_INDEX` (prompts, padding) take no part. The sum is divided by the number of
    trained tokens, not by the number of positions, so a batch's loss does not depend on how much of it is
    prompt or padding; this equals transformers' ``ForCausalLMLoss`` for the same ``labels``.

    Args:
        logits: ``[B, T, V]`` (any float dtype; computed in fp32).
        labels: ``[B, T]``, aligned with the inputs.
        num_items: divide by this instead of this batch's trained-token count; with gradient accumulation,
            pass the trained tokens of all micro-batches of the step so the step's loss is the mean over all of
            them (transformers' ``num_items_in_batch``).

    Raises:
        ValueError: shapes that do not match, or no trained token (and no ``num_items``).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    n_trained = int((shift_labels != IGNORE_INDEX).sum())
    denominator = n_trained if num_items is None else int(num_items)
    if denominator <= 0:
        raise ValueError(
            "no trained token in this batch (every label after the first position is -100); "
            "prepare the data with lora_widgets.data.sft.prepare_sft, which drops such examples"
        )
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # [B*(T-1), V]
        shift_labels.reshape(-1),  # [B*(T-1)]
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / denominator
