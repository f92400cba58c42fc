"""Sample generations: base beside current, greedy, bounded, and the model left exactly as it was."""

from __future__ import annotations

import itertools
import json
from typing import Any
from unittest import mock

import pytest
import torch

from lora_widgets import LoRAConfig, apply_lora, load_base_model, lora_layers, merge_lora
from lora_widgets.events import SampleGenerations, event_from_dict
from lora_widgets.health import generate_samples
from lora_widgets.health import samples as samples_mod
from lora_widgets.health.samples import MAX_PROMPTS
from lora_widgets.lora.layers import set_adapters_enabled

PROMPTS = ["def main(", "The with statement"]


@pytest.fixture(scope="module")
def shipped():  # type: ignore[no-untyped-def]
    model, tokenizer = load_base_model()
    base_answers = []
    for p in PROMPTS:  # the base model's own greedy answers, before any adapter exists
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        base_answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: the answers must change
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
    return model, tokenizer, base_answers


def _snapshot(
    model: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, bool], bool, dict[str, bool]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: layer.enabled for n, layer in lora_layers(model).items()},
        model.training,
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_same(model: torch.nn.Module, before) -> None:  # type: ignore[no-untyped-def]
    state, enabled, training, grads = before
    now = _snapshot(model)
    assert all(torch.equal(v, now[0][k]) for k, v in state.items())
    assert now[1:] == (enabled, training, grads)


def test_base_and_current_answers(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, base_answers = shipped
    record = generate_samples(model, tokenizer, PROMPTS, step=50, max_new_tokens=12)
    assert record.step == 50 and record.max_new_tokens == 12 and not record.base_reused
    assert [s.prompt for s in record.samples] == PROMPTS
    assert [s.base for s in record.samples] == base_answers  # adapters off = the model before apply_lora
    assert any(s.current != s.base for s in record.samples)
    assert all(s.base_ended is None and s.current_ended is None for s in record.samples)
    assert record.base_seconds > 0 and record.current_seconds > 0
    again = generate_samples(model, tokenizer, PROMPTS, step=51, max_new_tokens=12)
    assert again.samples == record.samples  # greedy: the same model gives the same text


def test_model_left_exactly_as_found(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    model.train()
    before = _snapshot(model)
    generate_samples(model, tokenizer, PROMPTS[:1], step=1, max_new_tokens=4)
    _assert_same(model, before)
    # adapters that came in switched off (one layer only) stay so
    first = next(iter(lora_layers(model).values()))
    first.enabled = False
    model.eval()
    before = _snapshot(model)
    generate_samples(model, tokenizer, PROMPTS[:1], step=1, max_new_tokens=4)
    _assert_same(model, before)
    set_adapters_enabled(model, True)


def test_a_failure_midway_leaves_the_model_as_found(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    model.train()
    before = _snapshot(model)
    real, calls = samples_mod._answers, itertools.count()

    def base_half_fails(*args: Any, **kwargs: Any) -> Any:  # the current half runs, the base half raises
        if next(calls) == 1:
            raise RuntimeError("injected fault in the base half")
        return real(*args, **kwargs)

    try:
        with pytest.raises(ValueError, match="token id 1000000"):  # beyond the vocabulary: refused up front
            generate_samples(model, tokenizer, [[5, 6], [10**6]], step=1, max_new_tokens=4)
        _assert_same(model, before)
        with (
            mock.patch.object(samples_mod, "_answers", base_half_fails),
            pytest.raises(RuntimeError, match="injected"),
        ):
            generate_samples(model, tokenizer, [[5, 6]], step=1, max_new_tokens=4)
        _assert_same(model, before)  # adapters switched back on, train mode back
    finally:
        model.eval()


def test_token_id_prompts_and_end_of_turn(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    ids = tokenizer(PROMPTS[0])["input_ids"]
    by_text = generate_samples(model, tokenizer, PROMPTS[:1], step=2, max_new_tokens=8)
    by_ids = generate_samples(model, tokenizer, [ids], step=2, max_new_tokens=8)
    assert by_ids.samples == by_text.samples
    # Take the current answer's first token as the "end of turn": generation stops there and says so.
    first = tokenizer(by_text.samples[0].current)["input_ids"][0]
    record = generate_samples(model, tokenizer, [ids], step=2, max_new_tokens=8, eot_token_id=first)
    (pair,) = record.samples
    assert pair.current_ended is True and pair.current == tokenizer.decode([first], skip_special_tokens=True)
    assert isinstance(pair.base_ended, bool)


def test_reuse_base_skips_the_base_half(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    first = generate_samples(model, tokenizer, PROMPTS, step=10, max_new_tokens=6)
    second = generate_samples(model, tokenizer, PROMPTS, step=20, max_new_tokens=6, reuse_base=first)
    assert second.base_reused and second.base_seconds == 0.0
    assert [s.base for s in second.samples] == [s.base for s in first.samples]
    other = generate_samples(model, tokenizer, PROMPTS, step=20, max_new_tokens=5, reuse_base=first)
    assert not other.base_reused  # another length: the base is generated again


def test_record_round_trips_through_json(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    record = generate_samples(model, tokenizer, PROMPTS, step=3, max_new_tokens=4, eot_token_id=0)
    back = event_from_dict(json.loads(json.dumps(record.to_dict(), allow_nan=False)))
    assert isinstance(back, SampleGenerations) and back == record


def test_clear_errors(shipped) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, _ = shipped
    with pytest.raises(ValueError, match="at most 8"):
        generate_samples(model, tokenizer, ["x"] * (MAX_PROMPTS + 1), step=0)
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        generate_samples(model, tokenizer, "def", step=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate_samples(model, tokenizer, ["ok", []], step=0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int in 1\.\.1024"):
        generate_samples(model, tokenizer, ["ok"], step=0, max_new_tokens=0)
    with pytest.raises(ValueError, match="eot_token_id must be a token id"):
        generate_samples(model, tokenizer, ["ok"], step=0, eot_token_id="<|im_end|>")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        generate_samples(model, tokenizer, ["ok"], step=-1)
    from lora_widgets import models as demo

    bare, _ = demo.load_base_model()
    with pytest.raises(ValueError, match="needs a model with lora_widgets LoRA layers"):
        generate_samples(bare, tokenizer, ["ok"], step=0)
    apply_lora(bare, LoRAConfig(r=2))
    merge_lora(bare)
    with pytest.raises(ValueError, match="unmerge_lora first"):
        generate_samples(bare, tokenizer, ["ok"], step=0)
