"""A run's data, in one of two kinds, and the order in which updates see it.

* **packed** text (continued pre-training): the text is cut into blocks of ``block_size`` tokens,
  ``Blocks.train`` is a ``LongTensor[n, T]`` and every token is trained.
* **sft** (instruction and chat rows, any format :mod:`lora_widgets.data.rows` accepts): each row is one
  example tokenised by :func:`lora_widgets.data.sft.prepare_sft` with its loss mask, ``Blocks.train`` is an
  :class:`Examples`; micro-batches are padded to their longest example with an attention mask
  (:class:`PaddedBatch`), grouped by length so that little is padding, and the loss is the mean over the
  trained tokens only. With ``TrainConfig.packing`` on (:func:`resolve_packing`) the same micro-batches are laid
  out padding-free instead (:func:`lora_widgets.data.sft_batches.pack`): one row, ``position_ids`` restarting
  per example, no attention mask.

What the user passed is classified once, at the data package's door
(:func:`lora_widgets.data.sources.classify_source`); :func:`load_run_data` turns that ``Source`` into one of the
two kinds, and the step and the loop only see micro-batches (a tensor or a :class:`PaddedBatch`). ``Examples``,
``PaddedBatch``, ``MicroBatch`` and ``RunData`` are defined in :mod:`lora_widgets.data.prepared` (below the
trainer, so the door knows them) and named here as well.

The order is a pure function of (seed, epoch): each epoch visits the training data in an order drawn from
a generator seeded by those two numbers alone, so two runs with one seed see identical batches, and a run
resumed from a checkpoint at step ``s`` continues with exactly the batches the uninterrupted run would have
used from update ``s + 1`` on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lora_widgets.data.corpora import read_instructions
from lora_widgets.data.prepared import Examples, MicroBatch, PaddedBatch, RunData
from lora_widgets.data.sft import prepare_sft
from lora_widgets.data.sft_batches import length_grouped_batches, padding_count
from lora_widgets.data.sources import Source, classify_source
from lora_widgets.data.split import split_groups
from lora_widgets.data.text import train_val_blocks
from lora_widgets.events.types import DataPrepared
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.schedules import steps_per_epoch

__all__ = [
    "BatchOrder",
    "Blocks",
    "Examples",
    "MicroBatch",
    "PaddedBatch",
    "RunData",
    "data_position",
    "data_prepared",
    "eval_batches",
    "load_run_data",
    "prepare_blocks",
    "resolve_packing",
    "vocab_size",
]


@dataclass(frozen=True)
class Blocks:
    """A run's data: training and validation parts, and how many updates one epoch makes.

    ``train``/``val`` are packed blocks ``LongTensor[n, T]`` or :class:`Examples` (see the module docstring);
    both kinds have ``shape[0]`` (sequences) and ``shape[1]`` (the longest sequence).
    """

    train: torch.Tensor | Examples  # [n_train, T] token ids (CPU), or examples
    val: torch.Tensor | Examples | None  # [n_val, T], examples, or None
    steps_per_epoch: int
    split: str = ""  # how the validation part was chosen (DataPrepared.split)

    @property
    def kind(self) -> Literal["packed", "sft"]:
        """``"sft"`` for instruction/chat examples, ``"packed"`` for token blocks."""
        return "sft" if isinstance(self.train, Examples) else "packed"

    @property
    def block_size(self) -> int:
        """Tokens per sequence (``T``); for examples, the longest one (the widest padded batch)."""
        return int(self.train.shape[1])

    def tokens_per_step(self, batch_size: int, grad_accum_steps: int) -> int:
        """Non-padding tokens one update consumes: exact for blocks, the mean over an epoch for examples."""
        sequences = batch_size * grad_accum_steps
        if isinstance(self.train, Examples):
            return round(sum(self.train.lengths) * sequences / max(len(self.train), 1))
        return sequences * self.block_size


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


def _examples(source: Source, tokenizer: Any, config: TrainConfig, name: str) -> Examples:
    """Tokenised examples of a classified source: ``Examples`` as they are (checked against ``config``), rows
    through :func:`lora_widgets.data.sft.prepare_sft`."""
    if source.kind == "examples":
        examples: Examples = source.payload
        s = examples.stats
        if s is not None and (s.train_on, s.max_length) != (config.train_on, config.max_length):
            raise ValueError(
                f"{name} was prepared with train_on={s.train_on!r}, max_length={s.max_length} but the TrainConfig "
                f"says train_on={config.train_on!r}, max_length={config.max_length}; prepare it again, or pass rows"
            )
        return examples
    if tokenizer is None:
        raise ValueError(
            "a tokenizer is needed to tokenise instruction/chat rows; pass the model's tokenizer"
        )
    c = config
    train_on: Any = c.train_on  # validated by TrainConfig against sft.TRAIN_ON
    items, stats = prepare_sft(
        source, tokenizer, c.max_length, train_on, batch_size=c.batch_size, seed=c.seed
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Examples(tuple(items), int(pad), stats)


def _sft_data(source: Source, eval_data: Any, tokenizer: Any, config: TrainConfig) -> RunData:
    """Training and validation examples: ``eval_data`` as given; else the instruction set's validation split
    (its answers never appear in training); else ``val_fraction`` of the examples held out by example (seeded;
    identical examples kept on one side, :func:`lora_widgets.data.split.split_groups`)."""
    train = _examples(source, tokenizer, config, "train_data")
    if eval_data is not None:
        val_source = classify_source(eval_data, role="sft")
        given = "examples" if val_source.kind == "examples" else "rows"
        return RunData(train, _examples(val_source, tokenizer, config, "eval_data"),
                       f"validation {given} given (eval_data)")  # fmt: skip
    if source.kind == "instruct-corpus":
        val_rows = classify_source(read_instructions(source.name, "validation"), role="sft")
        val = _examples(val_rows, tokenizer, config, "eval_data")
        return RunData(train, val, f"{source.name}'s own split by answer (no validation answer is in training): "
                       f"{len(train):,} train / {len(val):,} validation examples")  # fmt: skip
    keys = [tuple(e.input_ids) for e in train.items]
    groups = split_groups(keys, config.val_fraction, config.seed)
    if groups is None:
        why = (
            "val_fraction=0"
            if config.val_fraction == 0
            else f"{len(set(keys))} distinct example(s), too few to hold out {config.val_fraction:.0%}"
        )
        return RunData(train, None, f"none: nothing held out ({why})")
    return RunData(train.subset(groups.train), train.subset(groups.val), groups.describe("example"))


def load_run_data(train_data: Any, eval_data: Any, tokenizer: Any, config: TrainConfig) -> RunData:
    """``(train, val, split)`` from whatever the user gave, its kind decided once at the data package's door
    (:func:`lora_widgets.data.sources.classify_source`): a :class:`RunData` as it is; instruction/chat rows (or
    :class:`Examples`) become examples split by example, anything else token blocks split by document
    (:func:`lora_widgets.data.text.train_val_blocks`). The one rule the trainer, the dashboard and a sweep share;
    raises ``ValueError`` naming the problem."""
    source = classify_source(train_data, role="run")
    if source.kind == "run-data":
        if eval_data is None:
            return source.payload
        source = classify_source(source.payload.train, role="run")  # blocks or examples: its kind is known
    if source.is_sft:
        return _sft_data(source, eval_data, tokenizer, config)
    c = config
    return RunData(*train_val_blocks(  # [n, T], [n_val, T] or None, split
        source, eval_data, tokenizer, c.block_size, c.val_fraction, c.seed
    ))  # fmt: skip


#: Attention implementations that run each packed example on its own (variable-length kernels), where packing
#: pays by default. A packed run on SDPA attends per example too (training/packed_attention.py), at the padded
#: length-grouped default's speed on CPU (1.03x), so "auto" leaves it padded there.
_VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def resolve_packing(packing: bool | str, model: nn.Module) -> bool:
    """Whether instruction batches are packed padding-free for ``model``: ``TrainConfig.packing`` decided.

    ``"auto"`` packs where it pays: a transformers model whose attention is a variable-length kernel. ``True``
    needs a model that reads packed ``position_ids`` (transformers' models do since ``masking_utils`` has
    ``find_packed_sequence_indices``); otherwise a ``ValueError`` says so.
    """
    config = getattr(model, "config", None)
    implementation = str(getattr(config, "_attn_implementation", ""))
    if packing == "auto":
        return implementation in _VARLEN_ATTENTION
    if packing is True and not _reads_packed_positions(model):
        raise ValueError(
            f"TrainConfig.packing=True needs a transformers model that reads packed position_ids; "
            f"{type(model).__name__} does not (or transformers is older than its masking_utils). "
            "Use packing='auto' or False"
        )
    return bool(packing)


def _reads_packed_positions(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel, masking_utils
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and hasattr(masking_utils, "find_packed_sequence_indices")


def _max_id(data: torch.Tensor | Examples) -> int:
    if isinstance(data, Examples):
        return max(max(e.input_ids) for e in data.items)
    return int(data.max())


def prepare_blocks(
    train_data: Any, eval_data: Any, tokenizer: Any, config: TrainConfig, vocab: int | None
) -> Blocks:
    """The run's data (:func:`load_run_data`), checked against the model's vocabulary and the batch settings.
    Raises ``ValueError`` naming the argument."""
    c = config
    train, val, split = load_run_data(train_data, eval_data, tokenizer, config)
    for name, part in (("train_data", train), ("eval_data", val)):
        if part is not None and vocab is not None and _max_id(part) >= vocab:
            raise ValueError(
                f"{name} holds token id {_max_id(part)} but the model's vocabulary has {vocab} "
                "entries; tokenise with the model's own tokenizer"
            )
    if isinstance(train, torch.Tensor) and isinstance(val, torch.Tensor) and val.shape[1] != train.shape[1]:
        raise ValueError(
            f"eval_data blocks have {val.shape[1]} tokens but train_data blocks {train.shape[1]}; use one block_size"
        )
    per_epoch = steps_per_epoch(int(train.shape[0]), c.batch_size, c.grad_accum_steps)
    if per_epoch < 1:
        need = c.batch_size * c.grad_accum_steps
        what = "example(s)" if isinstance(train, Examples) else f"block(s) of {train.shape[1]} tokens"
        raise ValueError(
            f"train_data has {train.shape[0]} {what}, fewer than one update needs (batch_size "
            f"{c.batch_size} x grad_accum_steps {c.grad_accum_steps} = {need}); lower batch_size or "
            "grad_accum_steps, lower block_size, or add data"
        )
    return Blocks(train=train, val=val, steps_per_epoch=per_epoch, split=split)


def data_prepared(
    train: torch.Tensor | Examples,
    val: torch.Tensor | Examples | None,
    config: TrainConfig,
    split: str = "",
    packed: bool = False,
) -> DataPrepared:
    """The data facts a run publishes (sequences, tokens, trained and padded shares, rows truncated/dropped,
    how the validation part was chosen); padding is counted for ``config.batch_size`` as epoch 0 batches the
    examples (none when ``packed``)."""
    n_val = 0 if val is None else int(val.shape[0])
    if not isinstance(train, Examples):
        n, width = int(train.shape[0]), int(train.shape[1])
        return DataPrepared(
            "packed", n, n_val, width, tokens=n * width, trained_tokens=n * (width - 1), split=split
        )
    lengths = train.lengths
    batches = length_grouped_batches(lengths, config.batch_size, config.seed, 0)
    s = train.stats
    return DataPrepared(
        "sft",
        len(train),
        n_val,
        int(train.shape[1]),
        tokens=sum(lengths),
        trained_tokens=sum(train.trained),
        padding_tokens=0 if packed else padding_count(lengths, batches),
        packed=packed,
        rows=s.n_rows if s is not None else len(train),
        truncated=s.n_truncated if s is not None else 0,
        dropped=s.n_dropped if s is not None else 0,
        formats=dict(s.formats) if s is not None else {},
        train_on=s.train_on if s is not None else config.train_on,
        max_length=s.max_length if s is not None else config.max_length,
        split=split,
    )


class BatchOrder:
    """The micro-batches of every update, on the device, in the (seed, epoch) order.

    Blocks: a seeded permutation per epoch, cut into batches. Examples: the length-grouped batches of
    :func:`lora_widgets.data.sft_batches.length_grouped_batches` (longest batch first), full batches before the
    last partial one, so an epoch of ``steps_per_epoch`` updates uses full batches as packing does.
    """

    def __init__(
        self, blocks: Blocks, config: TrainConfig, device: torch.device, packed: bool = False,
        shard: tuple[int, int] = (0, 1),  # (rank, ranks) of a multi-process run: its rows rank::ranks
    ) -> None:  # fmt: skip
        self.blocks = blocks
        self.shard = slice(shard[0], None, shard[1])  # this rank's rows of each (global) micro-batch
        self.packed = packed and isinstance(blocks.train, Examples)  # examples laid out padding-free
        self.batch_size = config.batch_size
        self.grad_accum_steps = config.grad_accum_steps
        self.seed = config.seed
        self.device = device
        self._epoch = -1
        self._perm: torch.Tensor = torch.empty(0, dtype=torch.long)  # [n_train]
        self._groups: list[list[int]] = []

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm = torch.randperm(self.blocks.train.shape[0], generator=g)  # [n_train]
            self._epoch = epoch
        return self._perm

    def _grouped(self, examples: Examples, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            groups = length_grouped_batches(examples.lengths, self.batch_size, self.seed, epoch)
            self._groups = [b for b in groups if len(b) == self.batch_size]
            self._groups += [b for b in groups if len(b) < self.batch_size]
            self._epoch = epoch
        return self._groups

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """The ``grad_accum_steps`` micro-batches of update ``step`` (1-based): ``LongTensor[B, T]`` blocks or
        :class:`PaddedBatch` examples (each knowing the trained-token count of the whole update, all ranks')."""
        per_epoch = self.blocks.steps_per_epoch * self.grad_accum_steps  # micro-batches per epoch
        where = [
            divmod((step - 1) * self.grad_accum_steps + m, per_epoch) for m in range(self.grad_accum_steps)
        ]
        train = self.blocks.train
        if isinstance(train, Examples):
            groups = [self._grouped(train, epoch)[pos] for epoch, pos in where]
            items = sum(train.trained[i] for group in groups for i in group)
            return [train.batch(group[self.shard], items, self.packed).to(self.device) for group in groups]
        out: list[MicroBatch] = []
        for epoch, pos in where:
            idx = self._permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]  # [B]
            out.append(train[idx[self.shard]].to(self.device, non_blocking=True))  # [B / ranks, T]
        return out


def eval_batches(
    val: torch.Tensor | Examples, batch_size: int, max_batches: int | None, device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[MicroBatch]:  # fmt: skip
    """The first ``max_batches`` (all if ``None``) validation batches ``[b, T]``, always in the same order
    (examples: in row order, each padded to its longest); a ``shard=(rank, ranks)`` gets rows rank::ranks of each."""
    n = -(-int(val.shape[0]) // batch_size)
    for i in range(n if max_batches is None else min(n, max_batches)):
        rows = range(i * batch_size, min((i + 1) * batch_size, int(val.shape[0])))[shard[0] :: shard[1]]
        if not rows:  # a rank with none of a batch's rows skips it
            continue
        if isinstance(val, Examples):
            yield val.batch(rows).to(device)
        else:
            yield val[rows.start : rows.stop : rows.step].to(device)  # [b, T]


def data_position(step: int, config: TrainConfig, per_epoch: int) -> dict[str, int]:
    """Where the data stands after ``step`` updates (stored in checkpoints, for people and tools)."""
    return {
        "micro_batch": step * config.grad_accum_steps,
        "epoch": step // per_epoch,
        "step_in_epoch": step % per_epoch,
    }
