"""The LoRATrainer on instruction/chat rows: padded length-grouped batches, the loss on the answers only, the
step-wide token normalisation under gradient accumulation, the data facts it publishes, and plain text
still packed."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from lora_widgets.data.sft import prepare_sft
from lora_widgets.data.sft_batches import collate, masked_lm_loss
from lora_widgets.data.sft_eval import answer_loss
from lora_widgets.events.types import DataPrepared, EvalMetrics, Event, RunFailed, RunFinished, RunStarted
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.models import BASE_MODEL_PATH
from lora_widgets.training.batches import BatchOrder, Blocks, Examples, PaddedBatch
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.step import batch_loss, forward_loss
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BASE_MODEL_PATH)


def chat(i: int) -> dict[str, Any]:
    """A conversation whose prompt and answer lengths vary with ``i`` (so batches need padding)."""
    question = "Tell me about item " + " and ".join(str(k) for k in range(i % 5 + 1)) + "."
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"Item {i} is " + "very " * (i % 7) + "fine."},
        ]
    }


ROWS = [chat(i) for i in range(36)] + [
    {"prompt": "Q: what is 2 + 2?\nA:", "completion": " 4"},
    {"instruction": "Add the numbers.", "input": "1 1", "output": "2"},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    {
        "prompt": [{"role": "user", "content": "ping"}],
        "completion": [{"role": "assistant", "content": "pong"}],
    },
]


def model_for(tokenizer: Any) -> torch.nn.Module:
    return tiny_llama(vocab_size=len(tokenizer))


def config(tmp_path: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_every": None,
        "eval_batches": None,
        "max_length": 96,
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
    }
    return TrainConfig(**{**base, **changes})


def run(trainer: LoRATrainer) -> list[Event]:
    events: list[Event] = []
    trainer.subscribe(events.append)
    trainer.run_sync()
    return events


def only(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# -- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("max_length", 1), ("max_length", 2.5), ("train_on", "prompt")])
def test_sft_settings_are_validated_with_named_errors(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})


# -- the run ----------------------------------------------------------------------------------------------


def test_rows_train_with_the_loss_on_the_answers_and_publish_their_data_facts(
    tmp_path: Path, tokenizer: Any
) -> None:
    model = model_for(tokenizer)
    train_rows, eval_rows = ROWS[:32] + ROWS[36:], ROWS[32:36]
    trainer = LoRATrainer(model, tokenizer, train_rows, eval_rows, LoRAConfig(r=4), config(tmp_path))
    # the adapters start as a no-op (B = 0), so the base model's answer loss is what step 0 must report
    val, _ = prepare_sft(eval_rows, tokenizer, max_length=96)
    base = answer_loss(model, val, tokenizer.pad_token_id)
    events = run(trainer)

    assert isinstance(events[-1], RunFinished), events[-1]
    (data,) = only(events, DataPrepared)
    stats = prepare_sft(train_rows, tokenizer, max_length=96, batch_size=4, seed=42)[1]
    assert data.data_kind == "sft" and data.train_on == "answers" and data.max_length == 96
    assert (data.train_sequences, data.val_sequences, data.rows) == (stats.n_examples, 4, len(train_rows))
    assert (data.tokens, data.trained_tokens, data.padding_tokens) == (
        stats.n_tokens,
        stats.n_trained_tokens,
        stats.n_padding,
    )
    assert data.formats == stats.formats and set(data.formats) >= {"messages", "alpaca", "sharegpt"}
    assert 0 < data.trained_share < 0.8 and data.padding_share < 0.5
    assert events.index(data) < events.index(only(events, RunStarted)[0])
    evals = only(events, EvalMetrics)
    assert evals[0].step == 0 and evals[0].val_loss == pytest.approx(base, rel=1e-5)
    # tokens/s counts real tokens: an update is batch x accumulation examples of the mean length, no padding
    started = only(events, RunStarted)[0]
    assert started.tokens_per_step == round(data.tokens * 4 / data.train_sequences)
    # the facts reach metrics.jsonl with the rest
    lines = (Path(trainer.run_dir or "") / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["event"] == "data"


def test_plain_text_keeps_being_packed(tmp_path: Path, tokenizer: Any) -> None:
    texts = ["def f(x):\n    return x + 1\n" * 20] * 6 + [{"text": "class A:\n    pass\n" * 30}]
    trainer = LoRATrainer(
        model_for(tokenizer), tokenizer, texts, None, LoRAConfig(r=4), config(tmp_path, max_steps=1)
    )
    (data,) = only(run(trainer), DataPrepared)
    assert data.data_kind == "packed" and data.seq_len == 128 and data.padding_tokens == 0
    assert data.tokens == data.train_sequences * 128


def test_the_instruction_set_validates_on_its_own_held_out_split(tmp_path: Path, tokenizer: Any) -> None:
    from lora_widgets.data.corpora import read_instructions

    trainer = LoRATrainer(
        model_for(tokenizer), tokenizer, "python-instruct", None, LoRAConfig(r=4),
        config(tmp_path, max_steps=1, eval_batches=1, max_length=128),
    )  # fmt: skip
    (data,) = only(run(trainer), DataPrepared)
    assert data.data_kind == "sft" and data.formats == {"messages": data.rows}
    assert data.val_sequences == len(read_instructions("python-instruct", "validation"))


def test_rows_without_a_trained_token_left_end_the_run_with_the_reason(
    tmp_path: Path, tokenizer: Any
) -> None:
    long_prompt = {"prompt": "word " * 200, "completion": "answer"}
    trainer = LoRATrainer(
        model_for(tokenizer), tokenizer, [long_prompt] * 8, None, LoRAConfig(r=4), config(tmp_path)
    )
    end = run(trainer)[-1]
    assert isinstance(end, RunFailed) and end.reason == "bad_input"
    assert "no token would be trained" in end.message and "max_length=96" in end.message


# -- the loss -----------------------------------------------------------------------------------------------


def unpadded(batch: PaddedBatch) -> list[dict[str, list[int]]]:
    """The batch's examples without their padding."""
    n = batch.attention_mask.sum(1).tolist()
    return [
        {"input_ids": ids[:k], "labels": lab[:k]}
        for ids, lab, k in zip(batch.input_ids.tolist(), batch.labels.tolist(), n, strict=True)
    ]


def examples(tokenizer: Any, n: int = 12) -> Examples:
    items, stats = prepare_sft(ROWS[:n], tokenizer, max_length=96, batch_size=2)
    return Examples(tuple(items), tokenizer.pad_token_id, stats)


def test_forward_loss_with_labels_is_the_masked_mean_and_padding_changes_nothing(tokenizer: Any) -> None:
    model, ex = model_for(tokenizer), examples(tokenizer)
    short, long = (
        min(range(len(ex)), key=ex.lengths.__getitem__),
        max(range(len(ex)), key=ex.lengths.__getitem__),
    )
    pair = ex.batch([short, long])  # the short one is padded
    logits = model(input_ids=pair.input_ids, attention_mask=pair.attention_mask).logits
    loss = forward_loss(
        model, pair.input_ids, contextlib.nullcontext, "mean", pair.attention_mask, pair.labels
    )
    torch.testing.assert_close(loss, masked_lm_loss(logits, pair.labels))
    # the padded example's summed loss is what it is alone: padding is neither attended to nor trained
    alone = ex.batch([short])
    one = forward_loss(
        model, alone.input_ids, contextlib.nullcontext, "sum", alone.attention_mask, alone.labels
    )
    padded = PaddedBatch(pair.input_ids[:1], pair.attention_mask[:1], pair.labels[:1], 1)
    both = forward_loss(
        model, padded.input_ids, contextlib.nullcontext, "sum", padded.attention_mask, padded.labels
    )
    torch.testing.assert_close(one, both, rtol=1e-5, atol=1e-5)


def test_accumulated_gradient_is_the_mean_over_every_trained_token_of_the_update(tokenizer: Any) -> None:
    """Two micro-batches with different trained-token counts must give the gradient of one big batch (the
    Oct 2024 gradient-accumulation bug: a mean per micro-batch does not)."""
    ex = examples(tokenizer)
    cfg = TrainConfig(batch_size=2, grad_accum_steps=2, seed=3)
    order = BatchOrder(Blocks(ex, None, steps_per_epoch=3), cfg, torch.device("cpu"))
    micro = order.micro_batches(1)
    assert len({int((m.labels[:, 1:] != -100).sum()) for m in micro}) == 2, "counts must differ to test this"

    def grads(losses: Any) -> list[torch.Tensor]:
        model.zero_grad()
        for loss in losses():
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model = model_for(tokenizer).train()
    accumulated = grads(lambda: [batch_loss(model, m, contextlib.nullcontext, 2) for m in micro])
    whole = collate([row for m in micro for row in unpadded(m)], ex.pad_id)
    assert whole["input_ids"].shape[0] == 4

    def one_batch() -> list[torch.Tensor]:
        logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
        return [masked_lm_loss(logits, whole["labels"])]

    for a, b in zip(accumulated, grads(one_batch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_example_order_is_a_function_of_seed_and_epoch(tokenizer: Any) -> None:
    ex = examples(tokenizer)
    cfg = TrainConfig(batch_size=2, grad_accum_steps=1, seed=5)
    blocks = Blocks(ex, None, steps_per_epoch=6)
    walked = BatchOrder(blocks, cfg, torch.device("cpu"))
    seen = [walked.micro_batches(s)[0] for s in range(1, 14)]
    jumped = BatchOrder(blocks, cfg, torch.device("cpu")).micro_batches(13)[0]  # as a resumed run does
    torch.testing.assert_close(seen[-1].input_ids, jumped.input_ids)
    first_epoch = sorted(tuple(r["input_ids"]) for b in seen[:6] for r in unpadded(b))
    every = sorted(tuple(e.input_ids) for e in ex.items)
    assert first_epoch == every  # each example once per epoch (12 = 6 full batches of 2)
    assert seen[0].input_ids.shape[1] == ex.shape[1]  # the longest batch comes first
