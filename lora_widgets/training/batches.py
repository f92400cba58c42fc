"""Token blocks for a run, and the order in which updates see them.

The order is a pure function of (seed, epoch): each epoch visits the training blocks in a permutation drawn
from a generator seeded by those two numbers alone, so two runs with one seed see identical batches, and a
run resumed from a checkpoint at step ``s`` continues with exactly the batches the uninterrupted run would
have used from update ``s + 1`` on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_widgets.schedules import steps_per_epoch
from lora_widgets.train_config import TrainConfig

__all__ = ["BatchOrder", "Blocks", "data_position", "eval_batches", "prepare_blocks", "vocab_size"]


@dataclass(frozen=True)
class Blocks:
    """A run's token ids: training and validation blocks, and how many updates one epoch makes."""

    train: torch.Tensor  # [n_train, T] token ids (CPU)
    val: torch.Tensor | None  # [n_val, T] or None
    steps_per_epoch: int

    @property
    def block_size(self) -> int:
        """Tokens per sequence (``T``)."""
        return int(self.train.shape[1])


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding, when it says (transformers models do); else ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except NotImplementedError:  # transformers' base class for models without one
        return None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def prepare_blocks(
    train_data: Any, eval_data: Any, tokenizer: Any, config: TrainConfig, vocab: int | None
) -> Blocks:
    """Token blocks from whatever the user gave (see :func:`lora_widgets.data.train_val_blocks`), checked
    against the model's vocabulary and the batch settings. Raises ``ValueError`` naming the argument."""
    from lora_widgets import data as data_mod  # heavy deps (tokenizers) only when needed

    c = config
    train, val = data_mod.train_val_blocks(  # [n, T], [n_val, T] or None
        train_data, eval_data, tokenizer, c.block_size, c.val_fraction, c.seed
    )
    for name, blocks in (("train_data", train), ("eval_data", val)):
        if blocks is not None and vocab is not None and int(blocks.max()) >= vocab:
            raise ValueError(
                f"{name} holds token id {int(blocks.max())} but the model's vocabulary has {vocab} "
                "entries; tokenise with the model's own tokenizer"
            )
    if val is not None and val.shape[1] != train.shape[1]:
        raise ValueError(
            f"eval_data blocks have {val.shape[1]} tokens but train_data blocks {train.shape[1]}; use one block_size"
        )
    per_epoch = steps_per_epoch(int(train.shape[0]), c.batch_size, c.grad_accum_steps)
    if per_epoch < 1:
        need = c.batch_size * c.grad_accum_steps
        raise ValueError(
            f"train_data has {train.shape[0]} block(s) of {train.shape[1]} tokens, fewer than one "
            f"update needs (batch_size {c.batch_size} x grad_accum_steps {c.grad_accum_steps} = {need}); "
            "lower batch_size or grad_accum_steps, lower block_size, or add data"
        )
    return Blocks(train=train, val=val, steps_per_epoch=per_epoch)


class BatchOrder:
    """The micro-batches of every update, on the device, in the (seed, epoch) order."""

    def __init__(self, blocks: Blocks, config: TrainConfig, device: torch.device) -> None:
        self.blocks = blocks
        self.batch_size = config.batch_size
        self.grad_accum_steps = config.grad_accum_steps
        self.seed = config.seed
        self.device = device
        self._epoch = -1
        self._perm: torch.Tensor = torch.empty(0, dtype=torch.long)  # [n_train]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm = torch.randperm(self.blocks.train.shape[0], generator=g)  # [n_train]
            self._epoch = epoch
        return self._perm

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """The ``grad_accum_steps`` micro-batches ``LongTensor[B, T]`` of update ``step`` (1-based)."""
        per_epoch = self.blocks.steps_per_epoch * self.grad_accum_steps  # micro-batches per epoch
        out = []
        for m in range(self.grad_accum_steps):
            epoch, pos = divmod((step - 1) * self.grad_accum_steps + m, per_epoch)
            idx = self._permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]  # [B]
            out.append(self.blocks.train[idx].to(self.device, non_blocking=True))  # [B, T]
        return out


def eval_batches(
    val: torch.Tensor, batch_size: int, max_batches: int | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """The first ``max_batches`` (all if ``None``) validation batches ``[b, T]``, always in the same order."""
    n = -(-val.shape[0] // batch_size)
    for i in range(n if max_batches is None else min(n, max_batches)):
        yield val[i * batch_size : (i + 1) * batch_size].to(device)  # [b, T]


def data_position(step: int, config: TrainConfig, per_epoch: int) -> dict[str, int]:
    """Where the data stands after ``step`` updates (stored in checkpoints, for people and tools)."""
    return {
        "micro_batch": step * config.grad_accum_steps,
        "epoch": step // per_epoch,
        "step_in_epoch": step % per_epoch,
    }
