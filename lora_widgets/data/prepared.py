"""Data already prepared for training: what a source becomes, and what a run can be given instead of a source.

* :class:`DataSplit`: packed token blocks ``[n, T]`` split for training and validation (:func:`lora_widgets.data.
  text.prepare_data` makes one).
* :class:`Examples`: tokenised instruction examples with their loss masks, padded only per batch
  (:func:`lora_widgets.data.sft.prepare_sft` makes the items).
* :class:`PaddedBatch`: one micro-batch of examples, padded (with an attention mask) or packed padding-free;
  :data:`MicroBatch` is what one forward/backward pass consumes, blocks ``[B, T]`` or a ``PaddedBatch``.
* :class:`RunData`: a run's ``(train, val, split)`` as ``lora_widgets.training.batches.load_run_data`` prepared
  it; the dashboard prepares its data once and passes this to every run.

They live in the data package, below the trainer, so that :mod:`lora_widgets.data.sources` can tell each of
them from a raw source without importing the training package (the route from a source to batches runs one
way, data -> training -> widget).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Union

import torch

from lora_widgets.data.sft_batches import SFTExample, collate, pack

if TYPE_CHECKING:
    from lora_widgets.data.sft import SFTStats

__all__ = ["DataSplit", "Examples", "MicroBatch", "PaddedBatch", "RunData"]


@dataclass(frozen=True)
class DataSplit:
    """Packed token blocks split for training and validation.

    Attributes:
        train: ``LongTensor[n_train, block_size]`` of token ids.
        val: ``LongTensor[n_val, block_size]`` of token ids (``n_val`` is 0 when ``val_fraction`` is 0).
        block_size: tokens per block (the sequence length the model is trained on).
        n_tokens: tokens of all documents, EOS separators included, before each side's incomplete tail
            block was dropped.
        split: how the validation part was chosen, in words (``"by document: 410 train / 46 validation
            documents, seed 0"``, or the fallback; :mod:`lora_widgets.data.split`); a run's ``DataPrepared``
            event repeats it.
        val_documents: indices (in load order) of the documents held out whole for validation; empty when the
            split was not by document.
        test: ``LongTensor[n_test, block_size]`` from whole documents neither trained nor validated on, for the
            number reported after validation loss chose a setting (``prepare_data(..., test_fraction=0.1)``);
            ``None`` when no test part was asked for.
        test_documents: indices (in load order) of the test documents; empty without a test part.
    """

    train: torch.Tensor
    val: torch.Tensor
    block_size: int
    n_tokens: int
    split: str = "as given"
    val_documents: tuple[int, ...] = ()
    test: torch.Tensor | None = None
    test_documents: tuple[int, ...] = ()

    @property
    def n_train_tokens(self) -> int:
        """Tokens the training blocks hold (``n_train * block_size``)."""
        return int(self.train.numel())

    @property
    def n_val_tokens(self) -> int:
        """Tokens the validation blocks hold."""
        return int(self.val.numel())


@dataclass(frozen=True)
class PaddedBatch:
    """One micro-batch of instruction examples, padded on the right (see :func:`lora_widgets.data.sft_batches.collate`),
    or packed padding-free (:func:`lora_widgets.data.sft_batches.pack`: ``position_ids`` and no ``attention_mask``).

    ``step_items`` is the number of trained tokens of the whole optimizer update this micro-batch belongs to:
    the loss divides by it, so that with gradient accumulation every trained token of the update weighs the
    same (the Oct 2024 gradient-accumulation fix of transformers' ``num_items_in_batch``; see
    :func:`lora_widgets.training.step.forward_loss`).
    """

    input_ids: torch.Tensor  # [B, T] token ids, padding = pad id
    attention_mask: torch.Tensor | None  # [B, T] 1 = real token, 0 = padding; None when packed
    labels: torch.Tensor  # [B, T] token ids where trained, -100 elsewhere (prompts, padding)
    step_items: int
    position_ids: torch.Tensor | None = None  # [R, W] restarting at 0 per example when packed; else None

    def to(self, device: torch.device) -> PaddedBatch:
        """The same batch on ``device``."""
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=None if self.attention_mask is None else move(self.attention_mask),
            labels=move(self.labels),
            position_ids=None if self.position_ids is None else move(self.position_ids),
        )

    @property
    def shape(self) -> torch.Size:
        """``[B, T]``, as a packed micro-batch's ``shape``."""
        return self.input_ids.shape


#: What one forward/backward pass consumes: packed blocks ``LongTensor[B, T]`` or a :class:`PaddedBatch`.
MicroBatch = Union[torch.Tensor, PaddedBatch]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class Examples:
    """Tokenised instruction examples (from :func:`lora_widgets.data.sft.prepare_sft`), padded only per batch.

    Attributes:
        items: the examples, in row order.
        pad_id: the id padding uses (never attended nor trained, so EOS serves when there is no pad token).
        stats: what the preparation reported (rows read, truncated, dropped, formats), or ``None``.
    """

    items: tuple[SFTExample, ...]
    pad_id: int
    stats: SFTStats | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int, int]:
        """``(examples, longest)``: the shape the examples would have padded together; the longest is the
        padded length of the widest batch (what memory estimates take as ``seq_len``)."""
        return len(self.items), max((len(e) for e in self.items), default=0)

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Tokens of each example (no padding)."""
        return [len(e) for e in self.items]

    @functools.cached_property
    def trained(self) -> list[int]:
        """Trained tokens (loss positions) of each example."""
        return [e.n_trained for e in self.items]

    def subset(self, indices: Sequence[int]) -> Examples:
        """The examples at ``indices`` (same pad id and statistics)."""
        return Examples(tuple(self.items[i] for i in indices), self.pad_id, self.stats)

    def batch(
        self, indices: Sequence[int], step_items: int | None = None, packed: bool = False
    ) -> PaddedBatch:
        """The examples at ``indices`` collated (CPU), padded or ``packed`` in one row; ``step_items`` defaults to
        their own trained tokens."""
        chosen = [self.items[i] for i in indices]
        items = sum(self.trained[i] for i in indices) if step_items is None else step_items
        if packed:
            cols = pack(chosen, self.pad_id)  # each [1, sum of lengths]
            return PaddedBatch(cols["input_ids"], None, cols["labels"], int(items), cols["position_ids"])
        cols = collate(chosen, self.pad_id)  # each [B, T]
        return PaddedBatch(cols["input_ids"], cols["attention_mask"], cols["labels"], int(items))


class RunData(NamedTuple):
    """A run's data as ``lora_widgets.training.batches.load_run_data`` prepared it; a
    :class:`~lora_widgets.LoRATrainer` takes it as ``train_data`` (the dashboard prepares the data once and
    passes this to every run)."""

    train: torch.Tensor | Examples  # [n, T] token blocks (CPU), or examples
    val: torch.Tensor | Examples | None  # [n_val, T], examples, or None
    split: str  # how the validation part was chosen, in words (DataPrepared.split)
