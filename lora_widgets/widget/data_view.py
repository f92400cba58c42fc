"""The dashboard's data view: what the run trains on, one example at a time, with the trained tokens marked.

One job: build the JSON payload that ``dashboard.js`` renders (the panel's ``data_view`` trait) from the
facts of a :class:`~lora_widgets.events.types.DataPrepared` event and the prepared data. For instruction/chat
examples, each token carries whether its prediction is trained (its label is not ``-100``): the answers and
their end-of-turn tokens light up, the prompts and chat-template markup are dimmed. That is the thing to
check by eye when a fine-tune goes wrong: a mask on nothing ("all labels are -100"), on the prompt, or
missing the end-of-turn token (the model then never learns to stop). Packed text trains every token.

Token strings come from the tokenizer (``decode`` of each id, so a character split over two byte-level
tokens shows as the replacement character); at most :data:`MAX_TOKENS` tokens of an example are sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lora_widgets.data.sft_batches import IGNORE_INDEX
from lora_widgets.events.types import DataPrepared
from lora_widgets.training.batches import Examples

__all__ = ["MAX_TOKENS", "DataView", "data_facts"]

MAX_TOKENS = 400
"""Tokens of one example sent to the browser at most (each is a <span>)."""


def data_facts(event: DataPrepared) -> dict[str, Any]:
    """The numbers the view and the static summary show, JSON-safe, from a :class:`DataPrepared` event."""
    return {
        "kind": event.data_kind,
        "train": event.train_sequences,
        "val": event.val_sequences,
        "seq_len": event.seq_len,
        "tokens": event.tokens,
        "trained_pct": 100.0 * event.trained_share,
        "padding_pct": 100.0 * event.padding_share,
        "rows": event.rows,
        "truncated": event.truncated,
        "dropped": event.dropped,
        "formats": dict(event.formats),
        "train_on": event.train_on,
        "max_length": event.max_length,
        "split": event.split,
        "packed": event.packed,
    }


def facts_rows(facts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` lines of the facts, as the static summary prints them (the view's JS mirrors it)."""
    if not facts:
        return []
    if facts.get("kind") == "packed":
        return [
            ("data", "text packed into blocks (every token trained)"),
            (
                "blocks (train / validation)",
                f"{facts['train']:,} / {facts['val']:,} of {facts['seq_len']} tokens{_val_share(facts)}",
            ),
            ("tokens", f"{facts['tokens']:,}"),
            *_split_row(facts),
        ]
    formats = ", ".join(f"{k} {v:,}" for k, v in sorted(facts.get("formats", {}).items()))
    return [
        ("data", f"instruction/chat rows ({formats}); loss on {facts['train_on']}"),
        ("examples (train / validation)", f"{facts['train']:,} / {facts['val']:,}{_val_share(facts)}"),
        ("rows truncated / dropped", f"{facts['truncated']:,} / {facts['dropped']:,} (max_length {facts['max_length']})"),
        ("tokens trained", f"{facts['trained_pct']:.1f}% of {facts['tokens']:,}"),
        _layout_row(facts),
        *_split_row(facts),
    ]  # fmt: skip


def _val_share(facts: Mapping[str, Any]) -> str:
    """``" (validation 2.6%)"``: the held-out share of the blocks or examples. ``val_fraction`` counts groups of
    documents (:mod:`lora_widgets.data.split`), so with documents of very different sizes this share can be far
    from it; said where the counts are read."""
    total = facts["train"] + facts["val"]
    return f" (validation {100 * facts['val'] / total:.1f}%)" if facts["val"] and total else ""


def _layout_row(facts: Mapping[str, Any]) -> tuple[str, str]:
    if facts.get("packed"):
        return ("padding", "none: packed, examples side by side, positions restart per example")
    return ("padding", f"{facts['padding_pct']:.1f}% (longest padded length {facts['seq_len']})")


def _split_row(facts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """How the validation part was chosen (``DataPrepared.split``), when the event said."""
    return [("validation split", str(facts["split"]))] if facts.get("split") else []


class DataView:
    """Payloads of the data view for the data a dashboard prepared (``train``: blocks or examples)."""

    def __init__(self, train: torch.Tensor | Examples, tokenizer: Any, facts: Mapping[str, Any]) -> None:
        self.train = train
        self.tokenizer = tokenizer
        self.facts: dict[str, Any] = dict(facts)

    @property
    def count(self) -> int:
        """Examples (or blocks) that can be shown."""
        return int(self.train.shape[0])

    def _tokens(self, index: int) -> tuple[list[int], list[bool], int | None]:
        if isinstance(self.train, Examples):
            example = self.train.items[index]
            trained = [t > 0 and label != IGNORE_INDEX for t, label in enumerate(example.labels)]
            return list(example.input_ids), trained, example.row
        ids = [int(t) for t in self.train[index].tolist()]
        return ids, [t > 0 for t in range(len(ids))], None

    def _text(self, token_id: int) -> str:
        decode = getattr(self.tokenizer, "decode", None)  # ready-made token blocks may come without one
        return str(decode([token_id])) if callable(decode) else f"<{token_id}>"

    def payload(self, index: int) -> dict[str, Any]:
        """What the front end renders for example ``index`` (clamped to the examples there are): the facts,
        the example's tokens ``[text, trained]`` (at most :data:`MAX_TOKENS`) and its counts."""
        index = min(max(int(index), 0), self.count - 1)
        ids, trained, row = self._tokens(index)
        shown = ids[:MAX_TOKENS]
        return {
            "facts": self.facts,
            "index": index,
            "count": self.count,
            "row": row,
            "length": len(ids),
            "trained": sum(trained),
            "tokens": [[self._text(t), bool(k)] for t, k in zip(shown, trained, strict=False)],
        }

    def with_facts(self, event: DataPrepared) -> None:
        """Take the facts of a run's :class:`DataPrepared` (its batch size decides the padding share)."""
        self.facts = data_facts(event)
