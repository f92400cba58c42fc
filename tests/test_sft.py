"""Instruction/chat rows: every accepted format, the loss masks, truncation counts, and the errors users meet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from lora_widgets.data.rows import ALPACA_PROMPT, is_plain_text, load_rows, normalize_rows
from lora_widgets.data.sft import TRAIN_ON, SFTStats, assistant_mask, prepare_sft
from lora_widgets.data.sft_batches import SFTExample
from lora_widgets.models import BASE_MODEL_PATH

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


def trained_text(tokenizer: Any, example: SFTExample) -> str:
    return str(
        tokenizer.decode(
            [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
        )
    )


# --- formats ----------------------------------------------------------------------------------------------


def test_every_format_is_recognised_and_normalised() -> None:
    rows = normalize_rows(
        [
            "a plain string",
            {"text": "a text row"},
            {"prompt": "2+2=", "completion": "4"},
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "yo"}],
            },
            {"messages": CHAT},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "u"}]},
            {"instruction": "Add.", "input": "2 2", "output": "4"},
            {"instruction": "Say hi.", "output": "hi"},
        ]
    )
    assert [r.source_format for r in rows] == [
        "text",
        "text",
        "prompt-completion",
        "conversational-prompt-completion",
        "messages",
        "sharegpt",
        "sharegpt",
        "alpaca",
        "alpaca",
    ]
    assert [r.kind for r in rows][:5] == [
        "text",
        "text",
        "prompt_completion",
        "prompt_completion",
        "conversation",
    ]
    assert rows[5].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert [m["role"] for m in rows[6].messages or []] == ["system", "user"]
    assert rows[7].prompt == ALPACA_PROMPT["prompt_input"].format(instruction="Add.", input="2 2")
    assert rows[8].prompt == ALPACA_PROMPT["prompt_no_input"].format(instruction="Say hi.")
    assert rows[7].completion == "4"
    assert rows[4].to_trl() == {"messages": CHAT}
    assert is_plain_text(["a", {"text": "b"}]) and not is_plain_text(
        ["a", {"prompt": "p", "completion": "c"}]
    )


def test_rows_from_jsonl_json_and_datasets(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}, {"messages": CHAT}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    assert load_rows(jsonl) == rows
    assert load_rows(str(array)) == rows
    datasets = pytest.importorskip("datasets")
    assert load_rows(datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])) == [rows[0]]
    with pytest.raises(ValueError, match="pick one"):
        load_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_rows(bad)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(TypeError, match="unsupported data source"):
        load_rows(3.5)


def test_utf16_rows_file_is_decoded_and_said_so(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(json.dumps({"prompt": "é?", "completion": "ü"}).encode("utf-16"))
    with pytest.warns(UnicodeWarning, match=r"windows.jsonl is UTF-16.*Re-save it as UTF-8"):
        assert load_rows(path) == [{"prompt": "é?", "completion": "ü"}]


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "a"}, r"row 1 has keys 'question', 'answer': accepted rows"),
        ({"prompt": "q", "answer": "a"}, r"row 1 has keys 'prompt', 'answer': missing 'completion'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"row 1, field 'messages', message 0: unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "gpt", "content": "x"}]},
            r"unknown role 'gpt'.*ShareGPT's 'gpt' is 'assistant'",
        ),
        ({"messages": [{"role": "user", "content": "  "}]}, r"message 0 \(user\): empty content"),
        ({"messages": []}, r"expected a non-empty list of messages"),
        (
            {"messages": [{"role": "user"}]},
            r"message 0: expected a dict with 'role' and 'content', got 'role'",
        ),
        ({"conversations": [{"from": "robot", "value": "x"}]}, r"unknown ShareGPT speaker 'robot'"),
        ({"prompt": "q", "completion": ""}, r"row 1: empty 'completion'"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, r"'prompt' is str and"),
        ({"instruction": "", "output": "a"}, r"row 1: empty Alpaca 'instruction'"),
        (42, r"row 1 is int"),
    ],
)
def test_bad_rows_name_their_index_and_the_fix(tokenizer: Any, row: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_sft([{"text": "fine"}, row], tokenizer)


def test_bad_arguments_are_named(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"train_on must be one of 'answers', 'all', got 'assistant'"):
        prepare_sft(["x"], tokenizer, train_on="assistant")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        prepare_sft(["x"], tokenizer, max_length=1)
    with pytest.raises(ValueError, match="assistant_spans must be one of"):
        prepare_sft(["x"], tokenizer, assistant_spans="guess")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no rows"):
        prepare_sft([], tokenizer)
    assert TRAIN_ON == ("answers", "all")


def test_conversation_without_template_or_assistant(tokenizer: Any) -> None:
    bare = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    bare.chat_template = None
    with pytest.raises(
        ValueError, match=r"row 0 is a conversation \(messages\) but the tokenizer has no chat"
    ):
        prepare_sft([{"messages": CHAT}], bare)
    with pytest.raises(ValueError, match=r"row 0 has no assistant message.*train_on='all'"):
        prepare_sft([{"messages": CHAT[:2]}], tokenizer)
    examples, _ = prepare_sft([{"messages": CHAT[:2]}], tokenizer, train_on="all")
    assert all(label != -100 for label in examples[0].labels)


def test_template_that_yields_no_assistant_span(tokenizer: Any) -> None:
    hides_answers = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(
        ValueError, match=r"row 0: the chat template yields no tokens for assistant message 2"
    ):
        prepare_sft([{"messages": CHAT}], tokenizer, chat_template=hides_answers)
    empty_markers = "{% for m in messages %}{{ m['content'] }}{% generation %}{% endgeneration %}{% endfor %}"
    with pytest.raises(
        ValueError, match=r"row 0: the chat template's \{% generation %\} markers cover no token"
    ):
        prepare_sft([{"messages": CHAT}], tokenizer, chat_template=empty_markers)
    with pytest.raises(ValueError, match="needs a chat template with"):
        prepare_sft([{"messages": CHAT}], tokenizer, chat_template=hides_answers, assistant_spans="markers")


def test_nothing_trained_after_truncation_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"no token would be trained: all 2 rows .* max_length=4"):
        prepare_sft([{"prompt": "a long prompt here", "completion": "x"}] * 2, tokenizer, max_length=4)


# --- masks ------------------------------------------------------------------------------------------------


def test_prompt_completion_trains_the_completion_and_eos(tokenizer: Any) -> None:
    (example,), stats = prepare_sft([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], tokenizer)
    assert trained_text(tokenizer, example) == " 4<|endoftext|>"
    assert example.input_ids[-1] == tokenizer.eos_token_id
    (everything,), _ = prepare_sft([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], tokenizer, train_on="all")
    assert everything.labels == everything.input_ids
    assert stats.formats == {"prompt-completion": 1}


def test_every_assistant_turn_is_trained_with_its_end_of_turn(tokenizer: Any) -> None:
    for method in ("auto", "prefix", "markers"):
        (example,), _ = prepare_sft([{"messages": CHAT}], tokenizer, assistant_spans=method)  # type: ignore[arg-type]
        text = trained_text(tokenizer, example)
        assert text == "A mutable sequence.<|endoftext|>\nAn immutable one.<|endoftext|>\n", method
    ids, mask = assistant_mask(tokenizer, CHAT, method="prefix")
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    assert [mask[i] for i in eos_positions] == [0, 0, 1, 0, 1]  # system, user, assistant, user, assistant


def test_prefix_rendering_works_with_a_template_without_markers(tokenizer: Any) -> None:
    zephyr_like = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    (example,), _ = prepare_sft([{"messages": CHAT}], tokenizer, chat_template=zephyr_like)
    assert (
        trained_text(tokenizer, example)
        == "A mutable sequence.<|endoftext|>\nAn immutable one.<|endoftext|>\n"
    )


def test_alpaca_and_sharegpt_rows_are_trained_on_their_answers(tokenizer: Any) -> None:
    rows = [
        {"instruction": "Name a vowel.", "input": "", "output": "a"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    alpaca, sharegpt = prepare_sft(rows, tokenizer, max_length=512)[0]
    assert trained_text(tokenizer, alpaca) == "a<|endoftext|>"
    assert tokenizer.decode(alpaca.input_ids).startswith("Below is an instruction that describes a task.")
    assert trained_text(tokenizer, sharegpt) == "hello<|endoftext|>\n"


def test_truncation_and_drops_are_counted(tokenizer: Any) -> None:
    rows = [
        {"prompt": "short", "completion": " answer"},
        {"prompt": "p " * 40, "completion": " lost"},  # completion past max_length: dropped
        {"prompt": "q", "completion": " long" * 40},  # truncated, kept
    ]
    examples, stats = prepare_sft(rows, tokenizer, max_length=16, batch_size=2)
    assert [e.row for e in examples] == [0, 2]
    assert (stats.n_rows, stats.n_examples, stats.n_truncated, stats.n_dropped) == (3, 2, 2, 1)
    assert stats.dropped_rows == (1,)
    assert max(len(e) for e in examples) == 16 and stats.longest > 16
    assert stats.n_tokens == sum(len(e) for e in examples)
    assert stats.n_trained_tokens == sum(e.n_trained for e in examples)
    assert 0 < stats.trained_share < 1
    # one batch of 2 padded to 16 tokens
    assert stats.n_padding == 32 - stats.n_tokens
    assert stats.padding_share == pytest.approx(stats.n_padding / 32)
    assert "1 dropped" in stats.summary() and "padding" in stats.summary()
    assert isinstance(stats, SFTStats)


def test_builtin_instruction_set_prepares(tokenizer: Any) -> None:
    examples, stats = prepare_sft("python-instruct", tokenizer, max_length=256)
    assert stats.formats == {"messages": stats.n_rows} and stats.n_dropped == 0
    assert 0.2 < stats.trained_share < 0.7
    assert all(
        e.labels[-2] == tokenizer.eos_token_id for e in examples
    )  # every answer's end-of-turn is trained
