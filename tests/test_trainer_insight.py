"""Is LoRA learning, headless: the LoRATrainer publishes adapter statistics, sample answers and alerts (issue 14).

Everything a script or CI relies on without the widget: the events in order, in ``metrics.jsonl``, the seed
notebook's bug (LoRA layers that the forward pass never calls) flagged at the first measured update, the
settings that switch it off, and a failing sample generation that never ends the run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from lora_widgets import models as demo
from lora_widgets.events.replay import read_events
from lora_widgets.events.types import (
    AdapterStats,
    AlertRaised,
    Event,
    RunFinished,
    SampleGenerations,
    StepMetrics,
    event_from_dict,
)
from lora_widgets.lora.layers import LoRAConfig, lora_layers
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.insight import PROMPT_TOKENS, Insight, end_of_turn_id
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import patterned_batch, tiny_llama
from tests.test_alerts import _seed_bug_model

VOCAB = 2048  # the shipped tokenizer's


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(demo.BASE_MODEL_PATH)


def _config(tmp_path: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        max_steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_batches=2, learning_rate=1e-2,
        output_dir=str(tmp_path / "runs"), device="cpu", sample_max_new_tokens=6,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def _data(vocab: int = VOCAB) -> torch.Tensor:
    return patterned_batch(8, 32, vocab).repeat(5, 1)  # [40, 32]


def _run(trainer: LoRATrainer) -> list[Event]:
    events: list[Event] = []
    trainer.subscribe(events.append)
    assert isinstance(trainer.run_sync(), RunFinished), events[-1]
    return events


def test_statistics_samples_in_order_and_in_metrics_jsonl(tmp_path: Path, tokenizer: Any) -> None:
    model = tiny_llama(vocab_size=VOCAB)
    trainer = LoRATrainer(model, tokenizer, _data(), lora=LoRAConfig(r=4, target_modules="all-linear"),
                      config=_config(tmp_path))  # fmt: skip
    events = _run(trainer)
    kinds = [
        (e.kind, getattr(e, "step", None)) for e in events if e.kind not in ("state", "run_started", "data")
    ]
    assert kinds == [
        ("eval", 0), ("samples", 0),
        ("step", 1), ("adapter_stats", 1), ("step", 2),
        ("step", 3), ("adapter_stats", 3), ("eval", 3), ("samples", 3),
        ("step", 4), ("step", 5),
        ("step", 6), ("adapter_stats", 6), ("eval", 6), ("samples", 6),
        ("finished", 6),
    ]  # fmt: skip
    stats = [e for e in events if isinstance(e, AdapterStats)]
    n_layers = len(lora_layers(model))
    assert n_layers == 14  # 2 blocks x 7 linear layers
    for s in stats:
        assert s.after_backward and len(s.layers) == n_layers and s.seconds > 0
        assert all(x.a_grad_norm is not None and x.b_grad_norm is not None for x in s.layers)
    assert stats[0].learning_rate == 0.0  # warm-up's first update: B still zero after it
    assert all(x.b_norm == 0.0 and x.relative_update == 0.0 for x in stats[0].layers)
    assert stats[1].learning_rate == pytest.approx(1e-2)
    assert all(x.relative_update > 0 and x.update_ratio and x.update_ratio > 0 for x in stats[1].layers)
    assert {x.module for x in stats[1].layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "up_proj", "down_proj"}  # fmt: skip
    assert sorted({x.layer for x in stats[1].layers}) == [0, 1]

    samples = [e for e in events if isinstance(e, SampleGenerations)]
    first = samples[0]
    assert len(first.samples) == 2 and first.max_new_tokens == 6  # two validation blocks' beginnings
    val = trainer._blocks().val
    assert val is not None
    assert first.samples[0].prompt == tokenizer.decode(
        val[0, :PROMPT_TOKENS].tolist(), skip_special_tokens=True
    )
    assert [s.base for s in samples[2].samples] == [s.base for s in first.samples]
    assert not first.base_reused and samples[1].base_reused and samples[2].base_reused
    assert samples[2].base_seconds == 0.0 and samples[2].current_seconds > 0  # the cost, reported
    assert first.samples[0].current == first.samples[0].base  # B = 0: the adapter computes nothing yet
    assert [s.current for s in samples[2].samples] != [s.base for s in samples[2].samples]  # it learned
    assert all(s.base_ended is None for s in first.samples)  # plain text: no end-of-turn token

    assert not [e for e in events if isinstance(e, AlertRaised)]  # a healthy run raises nothing
    assert trainer.run_dir is not None
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [event_from_dict(json.loads(line)) for line in lines] == events


def test_the_seed_bug_is_flagged_at_the_first_update_headless(tmp_path: Path) -> None:
    """LoRA layers exist (and train nothing) while the forward pass goes around them: danger at step 1."""
    model = _seed_bug_model()
    trainer = LoRATrainer(model, None, _data(128), lora=None, config=_config(tmp_path, learning_rate=3e-3))
    events = _run(trainer)
    alerts = [e for e in events if isinstance(e, AlertRaised)]
    assert [a.key for a in alerts] == ["no_gradient"]  # the cause, once; not also "B zero" or "rate too low"
    alert = alerts[0]
    assert alert.step == 1 and alert.severity == "danger"
    assert alert.title == "12 of 27 trainable tensors receive no gradient"
    assert (
        "the adapters exist but the forward never calls them" in alert.evidence and "apply_lora" in alert.fix
    )
    first_step = next(e for e in events if isinstance(e, StepMetrics))
    assert events.index(alert) < events.index(first_step)  # read from the first update's gradients
    assert trainer.run_dir is not None
    assert alert in read_events(trainer.run_dir / "metrics.jsonl")  # a script reads it back


def test_user_prompts_and_switching_it_off(tmp_path: Path, tokenizer: Any) -> None:
    prompts = ("def main(", "The with statement")
    config = _config(tmp_path, sample_prompts=prompts, max_steps=3, eval_every=None)
    trainer = LoRATrainer(
        tiny_llama(vocab_size=VOCAB), tokenizer, _data(), lora=LoRAConfig(r=2), config=config
    )
    samples = [e for e in _run(trainer) if isinstance(e, SampleGenerations)]
    assert [e.step for e in samples] == [0, 3]
    assert [s.prompt for s in samples[0].samples] == list(prompts)

    off = _config(tmp_path, adapter_stats=False, sample_prompts=())
    trainer = LoRATrainer(tiny_llama(vocab_size=VOCAB), tokenizer, _data(), lora=LoRAConfig(r=2), config=off)
    kinds = {e.kind for e in _run(trainer)}
    assert not kinds & {"adapter_stats", "samples", "alert"}


def test_full_fine_tuning_publishes_no_adapter_events(tmp_path: Path, tokenizer: Any) -> None:
    trainer = LoRATrainer(
        tiny_llama(vocab_size=VOCAB), tokenizer, _data(), lora=None, config=_config(tmp_path)
    )
    kinds = {e.kind for e in _run(trainer)}
    assert not kinds & {"adapter_stats", "samples", "alert"}


def test_a_failing_sample_generation_is_logged_and_training_goes_on(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_llama(vocab_size=VOCAB)

    def broken_generate(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected generation fault")

    model.generate = broken_generate  # type: ignore[method-assign]
    trainer = LoRATrainer(model, tokenizer, _data(), lora=LoRAConfig(r=2), config=_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lora_widgets.training.insight"):
        events = _run(trainer)
    assert not [e for e in events if isinstance(e, SampleGenerations)]
    assert len([e for e in events if isinstance(e, AdapterStats)]) == 3  # the rest goes on
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "injected generation fault" in messages[0] and "switched off" in messages[0]


def test_peft_adapters_are_measured(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    PeftLoraConfig = peft.LoraConfig
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = LoRATrainer(model, None, _data(128), lora=None, config=_config(tmp_path))
    stats = [e for e in _run(trainer) if isinstance(e, AdapterStats)]
    assert [s.step for s in stats] == [1, 3, 6]
    assert len(stats[-1].layers) == 4 and all(x.relative_update > 0 for x in stats[-1].layers)


@pytest.mark.parametrize(
    ("field", "value"),
    [("adapter_stats", "yes"), ("sample_prompts", "def f("), ("sample_prompts", ("ok", "")),
     ("sample_prompts", ("p",) * 9), ("sample_max_new_tokens", 0), ("sample_max_new_tokens", 2.5)],
)  # fmt: skip
def test_bad_settings_are_named(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}={value!r}" in str(info.value)


def test_prompts_from_json_come_back_as_a_tuple() -> None:
    config = TrainConfig(sample_prompts=["a", "b"])  # type: ignore[arg-type]
    assert config.sample_prompts == ("a", "b")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_end_of_turn_token_of_a_chat_tokenizer(tokenizer: Any) -> None:
    plain = AutoTokenizer.from_pretrained(demo.BASE_MODEL_PATH)
    plain.chat_template = None
    assert end_of_turn_id(plain) is None  # no chat template: plain text
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # the shipped template ends turns with EOS
    chat = AutoTokenizer.from_pretrained(demo.BASE_MODEL_PATH)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    assert end_of_turn_id(chat) == chat.convert_tokens_to_ids("<|im_end|>")


def test_a_batch_with_every_label_masked_raises_nothing_is_trained_once(tmp_path: Path) -> None:
    """The hook for data with loss masks (prompt/completion, chat): all -100 labels, said once per run."""
    model = tiny_llama()
    LoRATrainer(model, None, _data(128), lora=LoRAConfig(r=2), config=_config(tmp_path))  # adds the adapters
    insight = Insight.for_run(model, None, _config(tmp_path), None, total=6)
    labels = torch.full((2, 16), -100)
    labels[1, 0] = 5  # position 0 is never a target (the model shifts labels): still nothing trained
    alerts = insight.check_labels(labels, step=3)
    assert [(a.key, a.step, a.severity) for a in alerts] == [("no_trained_tokens", 3, "danger")]
    assert "30 target positions" in alerts[0].evidence
    assert insight.check_labels(labels, step=4) == []  # once per run
    assert Insight().check_labels(labels, step=1) == []  # no run prepared: nothing


def test_importing_the_trainer_keeps_the_public_adapter_stats_a_function() -> None:
    """``lora_widgets.lora.adapter_stats`` is the function, also after the trainer (which imports the statistics
    module) is loaded: no module of that name shadows it."""
    code = (
        "import types, lora_widgets.training.trainer\n"
        "from lora_widgets.lora import adapter_stats\n"
        "assert callable(adapter_stats) and not isinstance(adapter_stats, types.ModuleType), adapter_stats\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
