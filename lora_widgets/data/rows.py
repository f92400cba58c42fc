"""Instruction and chat rows: recognise the formats people bring and normalise them to TRL's three kinds.

TRL's ``SFTTrainer`` (https://huggingface.co/docs/trl/sft_trainer#expected-dataset-type-and-format) gives rows
one of three meanings, and so do we:

``{"text": str}``
    language modelling: every token is trained.
``{"prompt": ..., "completion": ...}``
    both strings, or both lists of ``{"role", "content"}`` messages (conversational prompt/completion): the
    loss goes on the completion only.
``{"messages": [{"role", "content"}, ...]}``
    a conversation rendered with the tokenizer's chat template: the loss goes on every assistant turn.

Two more formats are converted on the way in: ShareGPT ``{"conversations": [{"from", "value"}]}`` (``human``/
``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``, ``system`` -> ``system``; TRL's
``maybe_convert_to_chatml`` renames the keys, we also map the role names) becomes ``messages``; Alpaca
``{"instruction", "input", "output"}`` becomes a prompt/completion pair of strings through
:data:`ALPACA_PROMPT`. A bare string is a ``text`` row.

Rows come from a list, a ``.jsonl`` file (one JSON object per line), a ``.json`` file (a JSON array, as Alpaca's
``alpaca_data.json``), a ``datasets.Dataset``, or the built-in instruction set's name (``"python-instruct"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lora_widgets.data.sources import FORMATS_HELP, classify_source, unknown_format

__all__ = [
    "ALPACA_PROMPT",
    "ROLES",
    "SHAREGPT_ROLES",
    "ChatRow",
    "RowFormat",
    "check_messages",
    "is_plain_text",
    "load_rows",
    "normalize_row",
    "normalize_rows",
    "unknown_format",
]

#: The roles a conversation may use (what chat templates render).
ROLES: tuple[str, ...] = ("system", "user", "assistant")

#: ShareGPT speaker names (``"from"``) and the role each becomes.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

#: Alpaca's prompt template, verbatim from Stanford Alpaca (Taori et al. 2023, github.com/tatsu-lab/
#: stanford_alpaca, ``train.py``, ``PROMPT_DICT``). ``"prompt_input"`` is used when the row's ``input`` is
#: non-empty, ``"prompt_no_input"`` otherwise; the ``output`` is the completion (Alpaca appends EOS to it, as
#: TRL does to every string completion).
ALPACA_PROMPT: dict[str, str] = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

#: Where a row came from (its original format); the kind it becomes is :attr:`ChatRow.kind`.
RowFormat = Literal[
    "text", "prompt-completion", "conversational-prompt-completion", "messages", "sharegpt", "alpaca"
]

Message = dict[str, str]


@dataclass(frozen=True)
class ChatRow:
    """One row in TRL's terms.

    Attributes:
        index: the row's position in the source (error messages and statistics refer to it).
        source_format: the format it was given in.
        text: the text of a ``text`` row.
        prompt / completion: a prompt/completion row (strings, or message lists when conversational).
        messages: a conversation (``messages`` and converted ShareGPT rows).
    """

    index: int
    source_format: RowFormat
    text: str | None = None
    prompt: str | list[Message] | None = None
    completion: str | list[Message] | None = None
    messages: list[Message] | None = None

    @property
    def kind(self) -> Literal["text", "prompt_completion", "conversation"]:
        """``"text"``, ``"prompt_completion"`` or ``"conversation"``: what decides the loss mask."""
        if self.messages is not None:
            return "conversation"
        return "text" if self.text is not None else "prompt_completion"

    @property
    def is_conversational(self) -> bool:
        """Whether the row goes through the chat template."""
        return self.messages is not None or isinstance(self.prompt, list)

    def to_trl(self) -> dict[str, Any]:
        """The row as TRL's ``SFTTrainer`` would take it (``text``, ``prompt``/``completion`` or ``messages``)."""
        if self.messages is not None:
            return {"messages": self.messages}
        if self.text is not None:
            return {"text": self.text}
        return {"prompt": self.prompt, "completion": self.completion}


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(repr(k) for k in row) or "none"


def check_messages(messages: Any, where: str = "messages", sharegpt: bool = False) -> list[Message]:
    """Validate a message list and return fresh ``{"role", "content"}`` dicts (ShareGPT's converted).

    Args:
        where: how errors name the list (e.g. ``"row 3, field 'messages'"``).
        sharegpt: the messages use ShareGPT's ``from``/``value`` keys and speaker names.

    Raises:
        ValueError: not a non-empty list of dicts, an unknown role, a non-str or empty content (each message
            is named by its position and role).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: expected a non-empty list of messages, got {type(messages).__name__} ({messages!r:.80})"
        )
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out: list[Message] = []
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or role_key not in message or content_key not in message:
            got = _keys(message) if isinstance(message, Mapping) else type(message).__name__
            raise ValueError(
                f"{where}, message {j}: expected a dict with {role_key!r} and {content_key!r}, got {got}"
            )
        role, content = message[role_key], message[content_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise ValueError(
                    f"{where}, message {j}: unknown ShareGPT speaker {role!r}; use one of "
                    f"{', '.join(map(repr, SHAREGPT_ROLES))} (human -> user, gpt -> assistant)"
                )
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            hint = f" (ShareGPT's {role!r} is {SHAREGPT_ROLES[role]!r})" if role in SHAREGPT_ROLES else ""
            raise ValueError(
                f"{where}, message {j}: unknown role {role!r}; roles must be one of {', '.join(map(repr, ROLES))}"
                f"{hint}"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}, message {j} ({role}): content must be a str, got {type(content).__name__}"
            )
        if not content.strip():
            raise ValueError(
                f"{where}, message {j} ({role}): empty content; remove the message (or the row), or fill it in"
            )
        out.append({"role": role, "content": content})
    return out


def _prompt_completion(row: Mapping[str, Any], index: int) -> ChatRow:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise ValueError(
                f"row {index}: empty 'completion' (nothing to train on); fill it in or drop the row"
            )
        return ChatRow(index, "prompt-completion", prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        return ChatRow(
            index,
            "conversational-prompt-completion",
            prompt=check_messages(prompt, f"row {index}, field 'prompt'"),
            completion=check_messages(completion, f"row {index}, field 'completion'"),
        )
    raise ValueError(
        f"row {index}: 'prompt' is {type(prompt).__name__} and 'completion' is {type(completion).__name__}; "
        "both must be strings, or both lists of {'role', 'content'} messages"
    )


def _alpaca(row: Mapping[str, Any], index: int) -> ChatRow:
    instruction, output, extra = row["instruction"], row["output"], row.get("input") or ""
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise ValueError(f"row {index}: Alpaca field {name!r} must be a str, got {type(value).__name__}")
    if not instruction.strip() or not output.strip():
        empty = "instruction" if not instruction.strip() else "output"
        raise ValueError(f"row {index}: empty Alpaca {empty!r}; fill it in or drop the row")
    key = "prompt_input" if extra.strip() else "prompt_no_input"
    prompt = ALPACA_PROMPT[key].format(instruction=instruction, input=extra)
    return ChatRow(index, "alpaca", prompt=prompt, completion=output)


def normalize_row(row: Any, index: int) -> ChatRow:
    """Recognise one row's format and return it in TRL's terms, validated.

    Raises:
        ValueError: a row that is neither a str nor a dict, a dict with none of the accepted field sets (the
            message names the row index and the keys it has), an unknown role, an empty content, or a field
            of the wrong type.
    """
    if isinstance(row, str):
        if not row.strip():
            raise ValueError(f"row {index} is an empty string; drop it")
        return ChatRow(index, "text", text=row)
    if not isinstance(row, Mapping):
        raise ValueError(
            f"row {index} is {type(row).__name__} ({row!r:.60}), not a dict or str; {FORMATS_HELP}"
        )
    if "messages" in row:
        return ChatRow(
            index, "messages", messages=check_messages(row["messages"], f"row {index}, field 'messages'")
        )
    if "conversations" in row:
        conversation = row["conversations"]
        first = conversation[0] if isinstance(conversation, list) and conversation else None
        sharegpt = not (isinstance(first, Mapping) and "role" in first)
        messages = check_messages(conversation, f"row {index}, field 'conversations'", sharegpt)
        return ChatRow(index, "sharegpt", messages=messages)
    if "prompt" in row and "completion" in row:
        return _prompt_completion(row, index)
    if "instruction" in row and "output" in row:
        return _alpaca(row, index)
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {index}: 'text' must be a non-empty str, got {text!r:.60}")
        return ChatRow(index, "text", text=text)
    partial = {
        "prompt": "completion",
        "completion": "prompt",
        "instruction": "output",
        "output": "instruction",
    }
    missing = [f"{partial[k]!r} (it has {k!r})" for k in partial if k in row]
    detail = f"missing {missing[0]}; " if missing else ""
    raise ValueError(f"row {index} has keys {_keys(row)}: {detail}{FORMATS_HELP}")


def normalize_rows(rows: Sequence[Any]) -> list[ChatRow]:
    """:func:`normalize_row` over ``rows`` (each keeps its index).

    Raises:
        ValueError: no rows, or a bad row (see :func:`normalize_row`).
    """
    if isinstance(rows, (str, Mapping)):
        raise ValueError(f"expected a list of rows, got a single {type(rows).__name__}; wrap it: [row]")
    if len(rows) == 0:
        raise ValueError(f"no rows: the data is empty; {FORMATS_HELP}")
    return [normalize_row(row, i) for i, row in enumerate(rows)]


def is_plain_text(rows: Sequence[Any]) -> bool:
    """Whether every row is a str or a ``{"text"}`` dict: data that packs into blocks (``lora_widgets.data.text``)."""
    return all(isinstance(r, str) or (isinstance(r, Mapping) and set(r) == {"text"}) for r in rows)


def load_rows(source: Any) -> list[Any]:
    """The raw rows of ``source``, not yet validated (see :func:`normalize_rows`); what a source is, is decided
    by :func:`lora_widgets.data.sources.classify_source` (a classified ``Source`` of rows is read as it is).

    Args:
        source: a list or tuple of rows; a ``.jsonl`` / ``.json`` path; a ``datasets.Dataset``; or the name of
            the built-in instruction set (``"python-instruct"``: its training split).

    Raises:
        ValueError: a missing file, an unsupported file type, invalid JSON (the line is named), a text file
            that is not UTF-8 (see :func:`lora_widgets.data.sources.read_text_file`), a ``DatasetDict``.
        TypeError: an unsupported source type.
    """
    return list(classify_source(source, role="rows").payload)
