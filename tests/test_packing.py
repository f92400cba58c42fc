"""Padding-free instruction batches: the layout, attention kept within each example, the same loss and gradients
as padded batches, the packing setting, and a trainer run that packs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lora_widgets.data.sft import prepare_sft
from lora_widgets.data.sft_batches import IGNORE_INDEX, SFTExample, collate, pack
from lora_widgets.events.types import DataPrepared, Event, RunFinished
from lora_widgets.lora.layers import LoRAConfig, apply_lora
from lora_widgets.models import BASE_MODEL_PATH
from lora_widgets.training.batches import resolve_packing
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.packed_attention import PACKED_SDPA, use_packed_sdpa
from lora_widgets.training.step import forward_loss
from lora_widgets.training.trainer import LoRATrainer
from lora_widgets.widget.data_view import data_facts, facts_rows
from tests.helpers import tiny_llama
from tests.test_trainer_sft import ROWS, config


def _reads_packed_positions() -> bool:
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


# transformers older than its masking_utils (4.45, the lowest-versions job) cannot read packed position_ids,
# so packing=True is refused there (resolve_packing's ValueError) and these equalities do not apply.
needs_packed_positions = pytest.mark.skipif(
    not _reads_packed_positions(),
    reason="this transformers cannot read packed position_ids (no masking_utils)",
)


def _example(ids: list[int], trained_from: int, row: int = 0) -> SFTExample:
    labels = [IGNORE_INDEX] * trained_from + ids[trained_from:]
    return SFTExample(tuple(ids), tuple(labels), row)


EXAMPLES = [
    _example([5, 6, 7, 8, 9, 10, 11], 3),
    _example([12, 13, 14], 1),
    _example([15, 16, 17, 18, 19], 2, 2),
    _example([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], 4, 3),
]


def test_pack_lays_examples_side_by_side_with_positions_restarting() -> None:
    one = pack(EXAMPLES, pad_id=0)
    assert one["input_ids"].shape == (1, 26)  # every token, no padding
    # longest first: 11, 7, 5, 3 tokens
    assert one["position_ids"][0].tolist() == [*range(11), *range(7), *range(5), *range(3)]
    assert one["input_ids"][0, :11].tolist() == list(EXAMPLES[3].input_ids)
    starts = [0, 11, 18, 23]
    assert all(one["labels"][0, s] == IGNORE_INDEX for s in starts)  # nothing predicts across a boundary
    trained = int((one["labels"] != IGNORE_INDEX).sum())
    assert trained == sum(e.n_trained for e in EXAMPLES)
    rows = pack(EXAMPLES, pad_id=0, width=12)  # first-fit decreasing: [11], [7, 5], [3]
    assert rows["input_ids"].shape == (3, 12)
    assert rows["position_ids"][0].tolist() == [*range(11), 0]  # the padding is a block of its own
    assert rows["position_ids"][1].tolist() == [*range(7), *range(5)]
    assert rows["labels"][2, 3:].eq(IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="11 tokens does not fit in rows of 10"):
        pack(EXAMPLES, pad_id=0, width=10)
    with pytest.raises(ValueError, match="pad_id"):
        pack(EXAMPLES, pad_id=-1)


@needs_packed_positions
@pytest.mark.parametrize("attention", ["sdpa", "eager", "per-example"])
def test_packed_loss_and_gradients_equal_the_padded_batch(attention: str) -> None:
    model = tiny_llama(vocab_size=64)  # 4 query heads on 2 key/value heads: the grouped path too
    model.config._attn_implementation = "sdpa" if attention == "per-example" else attention
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for layer in model.modules():  # B = 0 would hide the adapters' share of the gradient
        if hasattr(layer, "lora_B") and isinstance(layer.lora_B, torch.nn.Linear):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    nc = contextlib.nullcontext

    def loss_and_grads(packed: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if packed:
            c = pack(EXAMPLES, pad_id=0, width=14)  # three rows: [11], [7, 5], [3] + padding
            with use_packed_sdpa(model) if attention == "per-example" else nc():
                loss = forward_loss(
                    model, c["input_ids"], nc, labels=c["labels"], position_ids=c["position_ids"]
                )
        else:
            c = collate(EXAMPLES, pad_id=0)
            loss = forward_loss(
                model, c["input_ids"], nc, attention_mask=c["attention_mask"], labels=c["labels"]
            )
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded_loss, padded_grads = loss_and_grads(False)
    packed_loss, packed_grads = loss_and_grads(True)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert len(packed_grads) == len(padded_grads) == 8
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_packed_positions
def test_attention_never_crosses_an_example() -> None:
    model = tiny_llama(vocab_size=64)
    c = pack(EXAMPLES, pad_id=0)
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packed position_ids only without a KV cache
        logits = model(input_ids=c["input_ids"], position_ids=c["position_ids"], use_cache=False).logits
        changed = c["input_ids"].clone()
        changed[0, :11] = 40  # the first packed example, entirely different
        after = model(input_ids=changed, position_ids=c["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([EXAMPLES[0].input_ids])).logits  # [1, 7, V]
    torch.testing.assert_close(after[0, 11:], logits[0, 11:])  # the others did not see it
    torch.testing.assert_close(logits[0, 11:18], alone[0], rtol=1e-4, atol=1e-5)  # as if run on its own


@needs_packed_positions
def test_per_example_attention_is_switched_on_only_inside_and_leaves_generation_as_sdpa() -> None:
    model = tiny_llama(vocab_size=64)
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model.generate(prompt, max_new_tokens=6, do_sample=False)
        with use_packed_sdpa(model):
            assert model.config._attn_implementation == PACKED_SDPA
            during = model.generate(prompt, max_new_tokens=6, do_sample=False)  # a KV cache: plain SDPA
            padded = collate(EXAMPLES, pad_id=0)
            masked = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert model.config._attn_implementation == "sdpa"
        plain = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert during.tolist() == before.tolist()
    torch.testing.assert_close(masked, plain)  # a padding mask goes to transformers' SDPA unchanged
    with pytest.raises(RuntimeError, match="inside"), use_packed_sdpa(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"  # restored whatever happens inside


@needs_packed_positions
def test_packing_setting_is_validated_and_resolved() -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"TrainConfig\.packing="):
            TrainConfig(packing=bad)
    model = tiny_llama(vocab_size=64)
    assert resolve_packing("auto", model) is False  # SDPA computes the whole block-diagonal mask: slower
    assert resolve_packing(True, model) is True and resolve_packing(False, model) is False
    model.config._attn_implementation = "flash_attention_2"  # a variable-length kernel: packing saves work
    assert resolve_packing("auto", model) is True
    with pytest.raises(ValueError, match="packing=True needs a transformers model"):
        resolve_packing(True, torch.nn.Linear(2, 2))


@needs_packed_positions
def test_a_packed_run_matches_a_padded_run_and_shows_no_padding(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    losses: dict[bool, list[float]] = {}
    for packing in (False, True):
        model = tiny_llama(vocab_size=len(tokenizer))
        cfg = config(tmp_path / str(packing), packing=packing, max_steps=3)
        trainer = LoRATrainer(model, tokenizer, ROWS[:32], ROWS[32:36], LoRAConfig(r=4), cfg)
        events: list[Event] = []
        trainer.subscribe(events.append)
        trainer.run_sync()
        assert isinstance(events[-1], RunFinished), events[-1]
        assert model.config._attn_implementation == "sdpa"  # per-example attention was for the run only
        lines = [
            json.loads(x) for x in (Path(trainer.run_dir or "") / "metrics.jsonl").read_text().splitlines()
        ]
        losses[packing] = [x["loss"] for x in lines if x.get("event") == "step"]
        (data,) = [e for e in events if isinstance(e, DataPrepared)]
        assert data.packed is packing and (data.padding_tokens == 0) is packing
        padding_row = dict(facts_rows(data_facts(data)))["padding"]
        assert padding_row.startswith("none: packed") is packing
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # the same examples, the same updates


def test_prepared_examples_pack_to_their_token_count() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    items, _ = prepare_sft(ROWS[:8], tokenizer, max_length=96)
    c = pack(items, pad_id=0)
    assert c["input_ids"].shape[1] == sum(len(e) for e in items)
    assert int((c["labels"] != IGNORE_INDEX).sum()) == sum(e.n_trained for e in items)
