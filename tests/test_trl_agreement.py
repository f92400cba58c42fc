"""Our data preparation gives TRL's ``SFTTrainer`` token ids and trained-token masks, row for row.

Each case builds the same rows with TRL 1.16's ``SFTTrainer`` (its own dataset preparation, on a tiny Llama
built from a config, offline) and with :func:`lora_widgets.data.sft.prepare_sft` on the same tokenizer and template.
For conversations, TRL's assistant masks come from ``{% generation %}`` markers; ours are checked both with
the markers and by rendering prefixes (which ignores them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_widgets.data.sft import prepare_sft
from lora_widgets.models import BASE_MODEL_PATH

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

#: A Llama-2-style template (``[INST] ... [/INST] answer</s>``, system folded into the first turn) with
#: generation markers: a second, structurally different template to agree on.
INST_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}{%- endfor %}"
)

PROMPT_COMPLETION = [
    {"prompt": "Q: What does len do?\nA:", "completion": " It returns the number of items."},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b"},
    {"prompt": "x" * 400, "completion": " dropped: its completion starts past max_length"},
    {"prompt": "Say hi.", "completion": " hi " * 60},  # truncated, kept
]
CONVERSATIONAL_PC = [
    {
        "prompt": [{"role": "user", "content": "Name a built-in."}],
        "completion": [{"role": "assistant", "content": "len"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is a tuple?"},
        ],
        "completion": [{"role": "assistant", "content": "An immutable sequence."}],
    },
]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "You explain Python."},
            {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."},
            {"role": "user", "content": "And a dict?"},
            {"role": "assistant", "content": "A mapping from keys to values."},
        ]
    },
    {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "user", "value": "Ping?"}, {"from": "assistant", "value": "Pong."}]},
]
TEXT = [{"text": "import os\nprint(os.getcwd())"}, {"text": "plain prose, trained everywhere"}]
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


@pytest.fixture(scope="module")
def tiny_model(tokenizer: Any) -> Any:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def trl_prepared(
    rows: list[dict[str, Any]], tokenizer: Any, model: Any, tmp: Path, **config: Any
) -> list[Any]:
    """``(input_ids, trained mask)`` per row as TRL's ``SFTTrainer`` prepares them."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp), max_length=MAX_LENGTH, report_to=[], use_cpu=True, **config)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    return [(list(r["input_ids"]), [int(x != -100) for x in r["labels"]]) for r in trainer.train_dataset]


def ours(rows: list[dict[str, Any]], tokenizer: Any, **kwargs: Any) -> list[Any]:
    examples, _ = prepare_sft(rows, tokenizer, max_length=MAX_LENGTH, **kwargs)
    return [(list(e.input_ids), [int(x != -100) for x in e.labels]) for e in examples]


def test_prompt_completion_strings_truncation_and_drops(
    tokenizer: Any, tiny_model: Any, tmp_path: Path
) -> None:
    theirs = trl_prepared(PROMPT_COMPLETION, tokenizer, tiny_model, tmp_path)
    mine = ours(PROMPT_COMPLETION, tokenizer)
    assert len(mine) == 3  # the row whose completion lies past max_length is dropped by both
    assert mine == theirs
    assert len(mine[2][0]) == MAX_LENGTH  # truncated, kept


def test_conversational_prompt_completion(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    assert ours(CONVERSATIONAL_PC, tokenizer) == trl_prepared(
        CONVERSATIONAL_PC, tokenizer, tiny_model, tmp_path
    )


@pytest.mark.parametrize("template", [None, INST_TEMPLATE], ids=["shipped", "inst"])
def test_conversations_assistant_only(tokenizer: Any, tiny_model: Any, tmp_path: Path, template: Any) -> None:
    tok = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    if template is not None:
        tok.chat_template = template
    from trl.data_utils import maybe_convert_to_chatml

    # TRL 1.16 refuses assistant_only_loss on ShareGPT columns before converting them: give it the rows its
    # own converter makes, and give ours the ShareGPT rows.
    sharegpt_as_chatml = [maybe_convert_to_chatml(copy.deepcopy(row)) for row in SHAREGPT]
    for rows, trl_rows in ((MESSAGES, MESSAGES), (SHAREGPT, sharegpt_as_chatml)):
        theirs = trl_prepared(trl_rows, tok, tiny_model, tmp_path, assistant_only_loss=True)
        by_markers = ours(rows, tok, assistant_spans="markers")
        by_prefixes = ours(rows, tok, assistant_spans="prefix")
        assert by_markers == theirs
        assert by_prefixes == theirs
        assert all(0 < sum(mask) < len(mask) for _, mask in theirs)  # partly masked: a real comparison


def test_conversations_train_on_all_is_trls_default(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    for rows in (MESSAGES, SHAREGPT):
        theirs = trl_prepared(rows, tokenizer, tiny_model, tmp_path)
        assert ours(rows, tokenizer, train_on="all") == theirs


def test_text_rows(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    assert ours(TEXT, tokenizer) == trl_prepared(TEXT, tokenizer, tiny_model, tmp_path)
