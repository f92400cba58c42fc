"""Turn user data into training batches: load texts, tokenise, pack into fixed-length blocks, split.

The pipeline is ``load_texts`` -> split by document -> ``pack_blocks`` each side (``prepare_data`` runs it).

Packing rather than padding: every document is tokenised without special tokens, an end-of-sequence
token is appended after each one so the model learns where documents end, and the resulting stream is
cut into blocks of exactly ``block_size`` tokens (the incomplete tail is dropped). No position is padding,
so no compute is wasted and no attention mask or label masking is needed; this is how GPT-2 and most
causal-LM pretraining pipelines batch text (Radford et al. 2019, section 2.3; Hugging Face's ``run_clm``
``group_texts``). A block may span a document boundary; the EOS token between documents marks it.

The train/validation split is over whole documents (those that share a long passage kept together), before packing
(:mod:`lora_widgets.data.split` says why and gives the fallback for a single document), so no validation block has a
neighbour from its document in training.
It depends only on the data, the tokenizer, ``block_size``, ``val_fraction`` and ``seed``; ``DataSplit.split``
says in words how it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lora_widgets.data.passages import PASSAGE_WORDS, passage_groups
from lora_widgets.data.prepared import DataSplit
from lora_widgets.data.sources import check_texts, classify_source, read_text_file
from lora_widgets.data.split import (
    check_fractions,
    check_val_fraction,
    describe_tail,
    split_groups,
    tail_split,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataSplit",
    "as_blocks",
    "load_texts",
    "pack_blocks",
    "prepare_data",
    "read_text_file",
    "split_blocks",
    "split_texts",
    "train_val_blocks",
]


def load_texts(source: Any, text_field: str = "text") -> list[str]:
    """Load training text from any supported source as a list of documents.

    Args:
        source: one of
            - a list or tuple of strings (one document each) or of ``{"text": str}`` dicts;
            - a path (``str`` or ``os.PathLike``) to a ``.txt`` file (the whole file is one document) or a
              ``.jsonl`` file (one JSON object per line; the document is its ``text_field``);
            - the name of a built-in corpus (``"stdlib-code"``, ``"python-docs"``);
            - a Hugging Face ``datasets.Dataset`` (column ``text_field``), when ``datasets`` is installed.
        text_field: the JSONL field / dataset column that holds the text.

    Returns:
        The non-blank documents, in their original order.

    Raises:
        ValueError: empty data, a non-text row (its index and type are named), a missing file (its path is
            named), an unknown corpus name (the known names are listed), an unsupported file type, or a
            dataset without the column.
        TypeError: ``source`` is of an unsupported type.
    """
    return list(classify_source(source, role="texts", text_field=text_field).payload)


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(
            f"block_size must be an int >= 2 (a block holds inputs and their next-token targets), got {block_size!r}"
        )


def _require_eos(tokenizer: PreTrainedTokenizerBase) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, which packing puts between documents. "
            "Fix: tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}) and, if that grew the "
            "vocabulary, model.resize_token_embeddings(len(tokenizer)); or set tokenizer.eos_token to an "
            "existing token"
        )
    return int(eos_id)


def pack_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Tokenise ``texts``, join them with EOS tokens and cut the stream into equal blocks.

    Each document is encoded without special tokens and followed by ``tokenizer.eos_token_id``; the
    concatenated stream is reshaped to ``[n_blocks, block_size]`` and the incomplete tail dropped.

    Returns:
        ``LongTensor[n_blocks, block_size]``.

    Raises:
        ValueError: bad ``block_size``, a tokenizer without an EOS token, empty or non-text input, or
            fewer tokens than one block (the message gives both numbers).
    """
    _check_block_size(block_size)
    return _blocks_from_stream(_token_stream(texts, tokenizer), block_size)


def _token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All documents' token ids, each followed by EOS: ``int64[n_tokens]``."""
    return np.concatenate(_encode(texts, tokenizer))


def _encode(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
    """Each document's token ids followed by EOS: one ``int64[n_i + 1]`` per document."""
    eos_id = _require_eos(tokenizer)
    if isinstance(texts, str):
        raise ValueError("pack_blocks takes a list of documents, got a single str; wrap it: [text]")
    texts = check_texts(list(texts), "the texts")
    # verbose=False: documents longer than model_max_length are fine here; they are cut into blocks.
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.append(np.asarray(ids, dtype=np.int64), eos_id) for ids in encoded]


def _blocks_from_stream(stream: np.ndarray, block_size: int) -> torch.Tensor:
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the data has {len(stream)} tokens (EOS separators included), fewer than one block of "
            f"block_size={block_size}; add more text or lower block_size"
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)  # [n_blocks, block_size]
    return torch.from_numpy(blocks)


def split_blocks(
    blocks: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``blocks`` into (train, val) with a seeded random permutation of the blocks.

    ``round(n * val_fraction)`` blocks (at least one when ``val_fraction > 0``) go to validation. Both parts
    keep the blocks' original order. The split depends only on ``n``, ``val_fraction`` and ``seed``.

    Not what runs use: blocks cut from one packed stream have neighbours from their own documents on the other
    side (:mod:`lora_widgets.data.split`); :func:`prepare_data` splits by document. This is the rule the shipped
    base model's pretraining split was made with (``scripts/build_base_model.py``), kept to reproduce it.

    Returns:
        ``(train[n_train, block_size], val[n_val, block_size])``.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``, or too few blocks to keep one for training and one
            for validation.
    """
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be 2-D [n_blocks, block_size], got shape {tuple(blocks.shape)}")
    check_val_fraction(val_fraction)
    n = blocks.shape[0]
    if val_fraction == 0:
        return blocks, blocks[:0]
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(
            f"only {n} block(s) of {blocks.shape[1]} tokens: too few to hold out {val_fraction:.0%} for "
            "validation and still train; add more text, lower block_size, or set val_fraction=0"
        )
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    val_idx, _ = torch.sort(perm[:n_val])
    train_idx, _ = torch.sort(perm[n_val:])
    return blocks[train_idx], blocks[val_idx]


def split_texts(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.0,
) -> DataSplit:
    """Split ``texts`` by document (seeded), then pack each side into blocks (:mod:`lora_widgets.data.split`).

    Falls back to the last ``val_fraction`` of the blocks (one contiguous piece) when the texts are one
    document or the validation documents hold fewer than one block; ``DataSplit.split`` says which rule ran.
    ``test_fraction`` > 0 also holds out whole test documents (``DataSplit.test``), taken from training.

    Raises:
        ValueError: bad ``block_size`` or fractions, no EOS token, empty or non-text input, too few tokens for
            one training and one validation block, or a test part asked of text that cannot give whole documents
            of at least one block to each part.
    """
    _check_block_size(block_size)
    check_fractions(val_fraction, test_fraction)
    encoded = _encode(texts, tokenizer)  # one int64[n_i + 1] per document; refuses a bare str
    texts = check_texts(list(texts), "the texts")
    return _split_encoded(texts, encoded, block_size, val_fraction, seed, test_fraction)


def _split_encoded(
    texts: list[str],
    encoded: list[np.ndarray],
    block_size: int,
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
) -> DataSplit:
    n_tokens = sum(len(ids) for ids in encoded)
    if test_fraction > 0 and val_fraction == 0:
        raise ValueError(
            f"test_fraction={test_fraction!r} with val_fraction=0: a test part reports on a setting chosen on "
            "validation; set val_fraction too (e.g. 0.1)"
        )
    if val_fraction == 0:
        blocks = _blocks_from_stream(np.concatenate(encoded), block_size)
        return DataSplit(blocks, blocks[:0], block_size, n_tokens, "none: val_fraction=0, nothing held out")
    groups = passage_groups(texts)  # identical documents, or sharing a 40-word passage: one group
    docs = split_groups(groups, val_fraction, seed, test_fraction)
    n_docs, n_groups = len(set(texts)), len(set(groups))
    grouped, units, hint = "", f"{n_docs} distinct document(s)", ""
    if n_groups < n_docs:  # say it: the counts then differ from a plain split by document
        grouped = (f"; documents sharing a {PASSAGE_WORDS}-word passage kept on one side ({n_docs:,} distinct "
                   f"documents in {n_groups:,} groups)")  # fmt: skip
        units += f", in {n_groups} group(s) that share {PASSAGE_WORDS}-word passages,"
        hint = " (if a repeated header or notice joins them, remove it first)"
    reason = (
        "the text is one document"
        if len(texts) == 1
        else f"{units} are too few to hold out {val_fraction:.0%} of them{hint}"
    )
    if docs is not None:
        parts = [docs.train, docs.val, *([docs.test] if test_fraction > 0 else [])]
        streams = [np.concatenate([encoded[i] for i in part]) for part in parts]  # [n_part_tokens] each
        if all(len(stream) >= block_size for stream in streams):
            train, val, *test = (_blocks_from_stream(stream, block_size) for stream in streams)  # [n, T] each
            return DataSplit(train, val, block_size, n_tokens, docs.describe("document") + grouped, docs.val,
                             test[0] if test else None, docs.test)  # fmt: skip
        short = [
            f"the {len(part)} {name} document(s)"
            for name, part, stream in zip(("training", "validation", "test"), parts, streams, strict=False)
            if len(stream) < block_size
        ]
        reason = f"{' and '.join(short)} would hold fewer than one block of {block_size} tokens"
    if test_fraction > 0:
        raise ValueError(
            f"cannot hold out whole test documents (test_fraction={test_fraction!r}): {reason}; use more "
            "documents, a smaller block_size, or test_fraction=0"
        )
    blocks = _blocks_from_stream(np.concatenate(encoded), block_size)  # [n, T]
    train, val = tail_split(blocks, val_fraction)
    return DataSplit(train, val, block_size, n_tokens, describe_tail(reason, len(val), len(blocks)))


def prepare_data(
    source: Any,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
    test_fraction: float = 0.0,
) -> DataSplit:
    """Load ``source`` (anything :func:`load_texts` accepts), split it by document and pack each side.

    ``round(n_groups * val_fraction)`` groups of whole documents (seeded) validate, so no validation block has a
    neighbour from its own document in training, nor a passage of 40 words that a training document reprints (a
    group: identical documents, or documents that share such a passage, :mod:`lora_widgets.data.passages`); see
    :func:`split_texts` for the single-document fallback.
    ``test_fraction`` > 0 holds out ``round(n_groups * test_fraction)`` more groups of whole documents as
    ``DataSplit.test``: the set to report on after validation loss chose a learning rate, a rank or a step
    (:mod:`lora_widgets.data.split`); the validation documents stay the same. ``DataSplit.split`` says how the
    split was made.

    Raises:
        ValueError: see :func:`load_texts`, :func:`pack_blocks` and :func:`split_texts`.
    """
    _check_block_size(block_size)
    check_fractions(val_fraction, test_fraction)
    _require_eos(tokenizer)  # fail before reading a large corpus
    texts = load_texts(source, text_field=text_field)
    return split_texts(texts, tokenizer, block_size, val_fraction, seed, test_fraction)


def as_blocks(obj: Any, tokenizer: PreTrainedTokenizerBase | None, block_size: int) -> torch.Tensor:
    """Return ``obj`` as a ``LongTensor[n_blocks, width]`` of token ids.

    An existing 2-D integer tensor is checked and returned as ``long`` (its own width wins over
    ``block_size``); anything else goes through :func:`load_texts` and :func:`pack_blocks`.

    Raises:
        ValueError: a tensor that is not 2-D, not integer, empty or negative; a :class:`DataSplit` (pass
            ``split.train`` or ``split.val``); a source without a tokenizer; see also :func:`load_texts`.
    """
    source = classify_source(obj, role="blocks")  # refuses a DataSplit, checks a tensor
    if source.kind == "blocks":
        return source.payload  # [n, T]
    if tokenizer is None:
        raise ValueError(
            f"a tokenizer is needed to turn {source.given} data into token blocks; pass the model's tokenizer"
        )
    return pack_blocks(source.payload, tokenizer, block_size)


def train_val_blocks(
    train_data: Any,
    eval_data: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    block_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The blocks a run trains and validates on, from what a user passes as ``train_data``/``eval_data``.

    The one rule the trainer and the dashboard share: a :class:`DataSplit` brings its own validation part
    (unless ``eval_data`` is given); given ``eval_data`` is used as it is; otherwise ``val_fraction`` is held
    out when there are at least two blocks: whole documents of a text source (:func:`split_texts`), the last
    blocks of a tensor (its document boundaries are unknown). An empty validation part becomes ``None``.

    Returns:
        ``(train[n, T], val[n_val, T] or None, split)``; ``split`` says in words how the validation part was
        chosen (the run's ``DataPrepared.split``).
    """
    check_val_fraction(val_fraction)
    split = "validation data given (eval_data)"
    source = classify_source(train_data, role="split")
    if source.kind == "data-split":
        data: DataSplit = source.payload
        if eval_data is None and data.val.shape[0] > 0:
            eval_data, split = data.val, data.split
        source = classify_source(data.train, role="blocks")
    if eval_data is not None:
        val = as_blocks(eval_data, tokenizer, block_size)  # [n_val, T]
        train = as_blocks(source, tokenizer, block_size)  # [n, T]
        return train, (val if val.shape[0] > 0 else None), split
    if val_fraction == 0:
        return as_blocks(source, tokenizer, block_size), None, "none: val_fraction=0, no validation"
    if source.kind == "blocks" or tokenizer is None:
        blocks = as_blocks(source, tokenizer, block_size)  # [n, T]; without a tokenizer: a clear error
        reason = "blocks given as a tensor, document boundaries unknown"
    else:
        _check_block_size(block_size)
        texts: list[str] = source.payload
        encoded = _encode(texts, tokenizer)  # one int64[n_i + 1] per document
        if sum(len(ids) for ids in encoded) >= 2 * block_size:
            data = _split_encoded(texts, encoded, block_size, val_fraction, seed)
            return data.train, data.val, data.split
        blocks = _blocks_from_stream(np.concatenate(encoded), block_size)  # [1, T] or an error
    if blocks.shape[0] < 2:
        return blocks, None, "none: one block, nothing to hold out"
    train, val = tail_split(blocks, val_fraction)
    return train, val, describe_tail(reason, len(val), len(blocks))
