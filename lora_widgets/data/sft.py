"""Tokenise instruction and chat rows with their loss masks, as TRL's ``SFTTrainer`` does.

:func:`prepare_sft` turns rows (any format :mod:`lora_widgets.data.rows` accepts) into :class:`SFTExample`
objects and an :class:`SFTStats` report. Tokenisation follows TRL 1.16's ``SFTTrainer._prepare_dataset``:

* ``text``: EOS is appended (unless the text ends with it) and every token is trained.
* ``prompt``/``completion`` strings: EOS is appended to the completion; the prompt and prompt+completion are
  tokenised with ``tokenizer(text=...)``; the completion starts where the two token lists first differ
  (TRL's ``common_prefix_length``). Conversational prompt/completion: the prompt is rendered by the chat template
  with the generation prompt, prompt+completion without it; the same rule finds the completion.
* ``messages``: the conversation is rendered by ``tokenizer.apply_chat_template``; by default every assistant turn
  is trained, its end-of-turn token included (TRL's ``assistant_only_loss=True``; TRL's *default* for
  conversations trains every token, which is ``train_on="all"`` here).

Assistant spans come from the template's ``{% generation %}`` markers when it has them (transformers'
``return_assistant_tokens_mask``), and otherwise by rendering prefixes: for assistant message ``i``, the span
runs from the end of ``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i + 1]``,
both compared with the whole conversation's tokens. So any template that renders earlier turns the same whatever
follows them works without markers, and the end-of-turn token the template writes after an answer is trained.

Then, as in TRL: examples longer than ``max_length`` are cut to it (keeping the start), and examples left with no
trained token are dropped (and counted).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lora_widgets.data.rows import ChatRow, load_rows, normalize_rows
from lora_widgets.data.sft_batches import IGNORE_INDEX, SFTExample, length_grouped_batches, padding_count

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TRAIN_ON", "SFTStats", "TrainOn", "assistant_mask", "prepare_sft", "tokenize_row"]

TrainOn = Literal["answers", "all"]
#: ``"answers"``: the completion of prompt/completion rows, every assistant turn of conversations, all of ``text``
#: rows (TRL's ``completion_only_loss`` and ``assistant_only_loss``). ``"all"``: every token.
TRAIN_ON: tuple[str, ...] = ("answers", "all")
_SPAN_METHODS = ("auto", "markers", "prefix")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as TRL's has_generation_markers


@dataclass(frozen=True)
class SFTStats:
    """What :func:`prepare_sft` made of the rows: counts, and the shares of trained and padded tokens.

    Attributes:
        n_rows: rows read.
        n_examples: examples kept.
        n_truncated: rows longer than ``max_length`` (cut to it; kept if a trained token remained).
        n_dropped: rows dropped because truncation left them no trained token.
        dropped_rows: the first (up to 20) dropped rows' indices.
        n_tokens: tokens of the kept examples (after truncation, no padding).
        n_trained_tokens: tokens whose prediction is trained (loss positions).
        n_padding: padded positions when the examples are batched by ``batch_size`` (epoch 0's plan).
        max_length, train_on, batch_size: the settings used.
        formats: rows per source format (``"messages"``, ``"alpaca"``, ...).
        longest: the longest tokenised row, before truncation.
    """

    n_rows: int
    n_examples: int
    n_truncated: int
    n_dropped: int
    dropped_rows: tuple[int, ...]
    n_tokens: int
    n_trained_tokens: int
    n_padding: int
    max_length: int
    train_on: str
    batch_size: int
    longest: int
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def trained_share(self) -> float:
        """Share of the examples' tokens that are trained."""
        return self.n_trained_tokens / self.n_tokens if self.n_tokens else 0.0

    @property
    def padding_share(self) -> float:
        """Share of the batched positions that are padding."""
        total = self.n_tokens + self.n_padding
        return self.n_padding / total if total else 0.0

    def summary(self) -> str:
        """One line for a log or a notebook."""
        return (
            f"{self.n_examples} examples from {self.n_rows} rows ({self.n_truncated} truncated to "
            f"{self.max_length} tokens, {self.n_dropped} dropped); {self.trained_share:.1%} of tokens trained, "
            f"{self.padding_share:.1%} padding at batch size {self.batch_size}"
        )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])  # as TRL's _tokenize for strings


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    chat_template: str | None,
    add_generation_prompt: bool = False,
    with_mask: bool = False,
) -> tuple[list[int], list[int] | None]:
    out: Any = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        return_assistant_tokens_mask=with_mask,
    )
    mask = list(out["assistant_masks"]) if with_mask else None
    return list(out["input_ids"]), mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _prefix_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    full: list[int],
    template: str | None,
    row: int,
) -> list[int]:
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto, _ = _render(tokenizer, messages[: i + 1], template)
        start, end = _common_prefix(before, full), _common_prefix(upto, full)
        if end < len(upto):
            raise ValueError(
                f"row {row}: the chat template renders the conversation up to assistant message {i} differently "
                "from the start of the whole conversation, so the assistant turns cannot be found by rendering "
                "prefixes. Use a template with {% generation %} markers around assistant turns, or "
                "train_on='all'"
            )
        if end <= start:
            raise ValueError(
                f"row {row}: the chat template yields no tokens for assistant message {i} (nothing to train). "
                "Check that tokenizer.chat_template renders assistant content, or pass train_on='all'"
            )
        mask[start:end] = [1] * (end - start)
    return mask


def assistant_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
    method: str = "auto",
    row: int = 0,
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its assistant mask (1 on every assistant turn's tokens).

    Args:
        method: ``"markers"`` (the template's ``{% generation %}`` markers), ``"prefix"`` (rendering prefixes,
            see the module docstring) or ``"auto"`` (markers when the template has them).
        row: the row index named in errors.

    Raises:
        ValueError: an unknown method, ``"markers"`` with a template that has none, or a template that yields
            no assistant span.
    """
    if method not in _SPAN_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _SPAN_METHODS))}, got {method!r}")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    has_markers = isinstance(template, str) and bool(_GENERATION_MARKER.search(template))
    if method == "markers" and not has_markers:
        raise ValueError("method='markers' needs a chat template with {% generation %} markers; use 'prefix'")
    if has_markers and method != "prefix":
        full, mask = _render(tokenizer, messages, chat_template, with_mask=True)
        assert mask is not None
        if 1 not in mask:
            raise ValueError(
                f"row {row}: the chat template's {{% generation %}} markers cover no token of this conversation "
                "(nothing to train). They must wrap each assistant turn's content and end-of-turn token; or pass "
                "train_on='all'"
            )
        return full, mask
    full, _ = _render(tokenizer, messages, chat_template)
    return full, _prefix_spans(tokenizer, messages, full, chat_template, row)


def tokenize_row(
    row: ChatRow,
    tokenizer: PreTrainedTokenizerBase,
    train_on: str = "answers",
    chat_template: str | None = None,
    assistant_spans: str = "auto",
) -> tuple[list[int], list[int]]:
    """``(input_ids, trained)`` of one row, untruncated; ``trained[t]`` is 1 where the token is trained."""
    eos = tokenizer.eos_token
    if row.kind == "text":
        assert row.text is not None
        ids = _encode(tokenizer, row.text if row.text.endswith(eos) else row.text + eos)
        return ids, [1] * len(ids)
    if row.kind == "conversation":
        assert row.messages is not None
        if train_on == "all":
            ids, _ = _render(tokenizer, row.messages, chat_template)
            return ids, [1] * len(ids)
        if not any(m["role"] == "assistant" for m in row.messages):
            raise ValueError(
                f"row {row.index} has no assistant message, so nothing in it would be trained; add the answer as "
                "an assistant message, drop the row, or pass train_on='all'"
            )
        return assistant_mask(tokenizer, row.messages, chat_template, assistant_spans, row.index)
    if isinstance(row.prompt, list) and isinstance(row.completion, list):
        prompt_ids, _ = _render(tokenizer, row.prompt, chat_template, add_generation_prompt=True)
        ids, _ = _render(tokenizer, row.prompt + row.completion, chat_template)
    else:
        assert isinstance(row.prompt, str) and isinstance(row.completion, str)
        completion = row.completion if row.completion.endswith(eos) else row.completion + eos
        prompt_ids, ids = _encode(tokenizer, row.prompt), _encode(tokenizer, row.prompt + completion)
    start = 0 if train_on == "all" else _common_prefix(prompt_ids, ids)
    return ids, [0] * start + [1] * (len(ids) - start)


def _check_args(
    tokenizer: Any, max_length: int, train_on: str, assistant_spans: str, batch_size: int
) -> None:
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(
            f"tokenizer must be the model's transformers tokenizer (AutoTokenizer.from_pretrained(...), or the "
            f"second value load_model returns), got {type(tokenizer).__name__} ({tokenizer!r:.40})"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per example), got {max_length!r}")
    if train_on not in TRAIN_ON:
        raise ValueError(
            f"train_on must be one of {', '.join(map(repr, TRAIN_ON))}, got {train_on!r}: 'answers' trains the "
            "completions and assistant turns, 'all' every token"
        )
    if assistant_spans not in _SPAN_METHODS:
        raise ValueError(
            f"assistant_spans must be one of {', '.join(map(repr, _SPAN_METHODS))}, got {assistant_spans!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if getattr(tokenizer, "eos_token", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, which ends every completion and text row; "
            "set tokenizer.eos_token to an existing token"
        )


def _check_template(tokenizer: Any, rows: list[ChatRow], chat_template: str | None) -> None:
    """A conversation needs a template (a string; whether it parses is found at its first use)."""
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__}")
    first = next((r for r in rows if r.is_conversational), None)
    if first is None:
        return
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"row {first.index} is a conversation ({first.source_format}) but the tokenizer has no chat "
            "template; pass chat_template=<a Jinja template>, set tokenizer.chat_template, use the model's "
            "instruct variant (which ships one), or give prompt/completion strings instead"
        )


def _tokenize_checked(
    row: ChatRow, tokenizer: Any, train_on: str, chat_template: str | None, spans: str
) -> tuple[list[int], list[int]]:
    """:func:`tokenize_row`, with an error the template raises on this row (``raise_exception(...)``, an
    undefined variable) named by the row."""
    import jinja2

    try:
        return tokenize_row(row, tokenizer, train_on, chat_template, spans)
    except jinja2.TemplateSyntaxError as exc:  # the template itself, found at its first use
        where = "chat_template" if chat_template is not None else "tokenizer.chat_template"
        lines = str(chat_template if chat_template is not None else tokenizer.chat_template).split("\n")
        line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
        raise ValueError(
            f"{where} is not a valid Jinja template: {exc.message} (template line {exc.lineno}: {line!r:.80}); "
            "fix the template (every {% if %}/{% for %} needs its expression and its {% endif %}/{% endfor %})"
        ) from None
    except jinja2.TemplateError as exc:
        raise ValueError(
            f"row {row.index}: the chat template failed on this conversation ({type(exc).__name__}: {exc}); "
            "fix the row (e.g. roles the template expects, in the order it expects) or the template"
        ) from None


def prepare_sft(
    rows: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    train_on: TrainOn = "answers",
    *,
    chat_template: str | None = None,
    assistant_spans: Literal["auto", "markers", "prefix"] = "auto",
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[list[SFTExample], SFTStats]:
    """Tokenise ``rows`` with their loss masks, truncate to ``max_length`` and drop rows left untrained.

    Args:
        rows: anything :func:`lora_widgets.data.rows.load_rows` accepts (a list of rows, a ``.jsonl``/``.json``
            path, a ``datasets.Dataset``, ``"python-instruct"``), in any format of :mod:`lora_widgets.data.rows`.
        tokenizer: the model's tokenizer; its chat template renders conversations.
        max_length: tokens per example at most (TRL's ``max_length``, ``truncation_mode="keep_start"``).
        train_on: ``"answers"`` (default) or ``"all"``, see :data:`TRAIN_ON`.
        chat_template: a Jinja template to use instead of the tokenizer's.
        assistant_spans: how assistant turns are found, see :func:`assistant_mask`.
        batch_size, seed: the batching that :attr:`SFTStats.n_padding` is measured for (epoch 0).

    Returns:
        ``(examples, stats)``, the examples in row order.

    Raises:
        ValueError: a bad argument (named, with the allowed values), a bad row (its index and keys are named;
            see :func:`lora_widgets.data.rows.normalize_row`), a conversation without a chat template, a
            template that yields no assistant span, or data in which no token would be trained.
    """
    _check_args(tokenizer, max_length, train_on, assistant_spans, batch_size)
    normalized = normalize_rows(load_rows(rows))
    _check_template(tokenizer, normalized, chat_template)
    examples: list[SFTExample] = []
    dropped: list[int] = []
    n_truncated = longest = 0
    for row in normalized:
        ids, trained = _tokenize_checked(row, tokenizer, train_on, chat_template, assistant_spans)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            n_truncated += 1
            ids, trained = ids[:max_length], trained[:max_length]
        labels = tuple(t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True))
        example = SFTExample(input_ids=tuple(ids), labels=labels, row=row.index)
        if example.n_trained == 0:
            dropped.append(row.index)
            continue
        examples.append(example)
    if not examples:
        raise ValueError(
            f"no token would be trained: all {len(normalized)} rows lost their trained tokens to "
            f"max_length={max_length} (the longest row has {longest} tokens); raise max_length or shorten the "
            "prompts" + ("" if train_on == "all" else ", or pass train_on='all'")
        )
    lengths = [len(e) for e in examples]
    batches = length_grouped_batches(lengths, batch_size, seed, 0)
    n_tokens = sum(lengths)
    stats = SFTStats(
        n_rows=len(normalized),
        n_examples=len(examples),
        n_truncated=n_truncated,
        n_dropped=len(dropped),
        dropped_rows=tuple(dropped[:20]),
        n_tokens=n_tokens,
        n_trained_tokens=sum(e.n_trained for e in examples),
        n_padding=padding_count(lengths, batches),
        max_length=max_length,
        train_on=train_on,
        batch_size=batch_size,
        longest=longest,
        formats=dict(Counter(r.source_format for r in normalized)),
    )
    return examples, stats
