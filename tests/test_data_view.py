"""The dashboard on instruction/chat rows: it trains them end to end, and its data view shows one example
with the trained tokens marked, the counts of examples, truncated and dropped rows, % trained and % padding."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from lora_widgets.events.replay import Replay
from lora_widgets.events.types import DataPrepared, RunFinished
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.models import BASE_MODEL_PATH
from lora_widgets.training.config import TrainConfig
from lora_widgets.widget import loading
from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.data_view import MAX_TOKENS
from tests.helpers import tiny_llama

ANSWERS = [f"Answer number {i} is {'long ' * (i % 4)}enough." for i in range(24)]
ROWS: list[Any] = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
    for i, a in enumerate(ANSWERS)
] + [{"prompt": "word " * 300, "completion": " cut away"}]  # truncated to nothing: dropped


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


def dashboard(tokenizer: Any, tmp_path: Path, data: Any = None, **changes: Any) -> LoRADashboard:
    settings: dict[str, Any] = {
        "max_steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": None, "max_length": 96,
        "output_dir": str(tmp_path / "runs"), "device": "cpu", **changes,
    }  # fmt: skip
    return LoRADashboard(
        model=tiny_llama(vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        train_data=ROWS if data is None else data,
        lora=LoRAConfig(r=4),
        train=TrainConfig(**settings),
    )


def trained_text(view: dict[str, Any]) -> str:
    return "".join(text for text, trained in view["tokens"] if trained)


def test_the_data_view_marks_the_answers_and_counts_the_rows(tokenizer: Any, tmp_path: Path) -> None:
    dash = dashboard(tokenizer, tmp_path)
    view = dash.panel.data_view
    facts = view["facts"]
    assert (
        facts["kind"] == "sft" and facts["rows"] == 25 and facts["dropped"] == 1 and facts["truncated"] == 1
    )
    assert facts["train"] + facts["val"] == 24 and facts["formats"] == {
        "messages": 24,
        "prompt-completion": 1,
    }
    assert 0 < facts["trained_pct"] < 60 and 0 <= facts["padding_pct"] < 50
    # the example's trained tokens are its answer and the end-of-turn token, nothing of the prompt
    row = view["row"]
    assert trained_text(view) == f"{ANSWERS[row]}{tokenizer.eos_token}\n"
    assert "Question" in "".join(t for t, _ in view["tokens"]) and view["trained"] < view["length"]

    dash.panel.data_index = 5  # what the front end's buttons set
    assert dash.panel.data_view["index"] == 5 and trained_text(dash.panel.data_view).startswith(
        "Answer number"
    )
    dash.panel.data_index = 10_000
    assert dash.panel.data_view["index"] == facts["train"] - 1  # clamped


def test_a_long_example_is_sent_in_part(tokenizer: Any, tmp_path: Path) -> None:
    long_rows = [{"prompt": "word " * 250, "completion": " yes"}] * 8
    dash = dashboard(tokenizer, tmp_path, long_rows, max_length=1024)
    view = dash.panel.data_view
    assert view["length"] > MAX_TOKENS and len(view["tokens"]) == MAX_TOKENS


def test_rows_train_end_to_end_and_the_static_summary_has_the_data(tokenizer: Any, tmp_path: Path) -> None:
    dash = dashboard(tokenizer, tmp_path)
    end = asyncio.run(dash.run())
    assert isinstance(end, RunFinished) and end.step == 2
    html = dash.static_summary_html()
    assert "rows truncated / dropped" in html and "1 / 1 (max_length 96)" in html and "tokens trained" in html
    # the run's own facts (same data, same batch size) replace the dashboard's
    assert dash.panel.data_view["facts"]["train"] == dash.panel.data_view["count"]


def test_the_memory_preflight_gets_the_longest_padded_length(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lora_widgets.memory.fit as memory

    seen: list[int] = []
    real = memory.preflight

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["seq_len"])
        return real(*args, **kwargs)

    monkeypatch.setattr(memory, "preflight", spy)
    dash = dashboard(tokenizer, tmp_path)
    asyncio.run(dash.run())
    longest = max(
        len(e) for e in loading.resolve_data(ROWS, None, tokenizer, dash.current_configs()[1])[0].items
    )
    assert seen == [longest] and longest < 96  # not the block size, not max_length: the widest batch


def test_the_instruction_set_by_name(tokenizer: Any, tmp_path: Path) -> None:
    dash = dashboard(tokenizer, tmp_path, "python-instruct", max_length=128)
    facts = dash.panel.data_view["facts"]
    assert facts["kind"] == "sft" and facts["val"] == 50 and facts["train"] == facts["rows"]


def test_a_watched_run_shows_its_own_facts_without_our_examples(tokenizer: Any, tmp_path: Path) -> None:
    dash = dashboard(tokenizer, tmp_path)
    facts = DataPrepared("packed", 10, 2, 64, tokens=640, trained_tokens=630)
    end = RunFinished(
        step=0, elapsed_s=0.0, final_loss=None, best_val_loss=None, adapter_path=None, message=""
    )

    async def watch() -> None:
        await dash.watch(Replay([facts, end]))

    asyncio.run(watch())
    view = dash.panel.data_view
    assert (view["facts"]["kind"], view["facts"]["train"], view["facts"]["tokens"]) == ("packed", 10, 640)
    assert "tokens" not in view
