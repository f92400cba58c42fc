"""LoRA+ (Hayou et al. 2024, sec. 3-4): B's learning rate is ``loraplus_lr_ratio`` times A's, as PEFT groups it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from lora_widgets import LoRAConfig, LoRATrainer, TrainConfig, apply_lora, lora_layers
from lora_widgets.events.types import RunStarted
from lora_widgets.training.step import make_optimizer
from lora_widgets.widget.labels import label_from_started
from tests.helpers import tiny_llama

peft = pytest.importorskip("peft")


def _blocks() -> torch.Tensor:
    return torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))


def _config(tmp_path, **changes: Any) -> TrainConfig:  # type: ignore[no-untyped-def]
    base: dict[str, Any] = {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_every": None,
        "eval_batches": 1,
        "device": "cpu",
        "output_dir": str(tmp_path),
        "sample_prompts": (),
        "adapter_stats": False,
    }
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("use_dora", [False, True])
def test_b_and_vectors_get_ratio_times_as_peft_groups_them(tmp_path, use_dora: bool) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, use_dora=use_dora))
    optimizer = make_optimizer(model, _config(tmp_path, loraplus_lr_ratio=16.0, learning_rate=1e-3))
    ratio_of = {id(p): g.get("lr_ratio", 1.0) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in lora_layers(model).values():
        assert ratio_of[id(layer.lora_A.weight)] == 1.0
        assert ratio_of[id(layer.lora_B.weight)] == 16.0
        if use_dora:
            assert ratio_of[id(layer.lora_magnitude_vector)] == 16.0
    # PEFT's create_loraplus_optimizer puts exactly the same parameters in B's groups
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora))
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    their_fast = {
        n.removeprefix("base_model.model.")
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        for g in opt.param_groups
        if g["lr"] == pytest.approx(16e-3)
        for n, p in theirs.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert their_fast == {names[i] for i, r in ratio_of.items() if r == 16.0}


def test_each_step_runs_b_at_ratio_times_the_schedule(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The rates the optimizer actually used: B's group at 16x A's at every step, warm-up and decay included."""
    model = tiny_llama()
    trainer = LoRATrainer(
        model, None, _blocks(), lora=LoRAConfig(r=4), config=_config(tmp_path, loraplus_lr_ratio=16.0)
    )
    seen: list[tuple[float, float]] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates = {g.get("lr_ratio", 1.0): g["lr"] for g in self.param_groups}
        seen.append((rates[1.0], rates[16.0]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    trainer.run_sync()
    assert len(seen) == 4 and len({a for a, _ in seen}) > 1  # the schedule moved
    for a, b in seen:
        assert b == pytest.approx(16 * a)


def test_ratio_one_trains_exactly_as_plain_lora(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = []
    for ratio in (None, 1.0, 16.0):
        model = tiny_llama()
        trainer = LoRATrainer(
            model,
            None,
            _blocks(),
            lora=LoRAConfig(r=4),
            config=_config(tmp_path / str(ratio), loraplus_lr_ratio=ratio),
        )
        trainer.run_sync()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(results[0], results[1], atol=1e-7)
    assert not torch.allclose(results[0], results[2], atol=1e-4)


def test_the_ratio_is_in_run_started_and_the_label(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = LoRATrainer(
        tiny_llama(), None, _blocks(), lora=LoRAConfig(r=4), config=_config(tmp_path, loraplus_lr_ratio=16)
    )
    started: list[RunStarted] = []
    trainer.subscribe(lambda e: started.append(e) if isinstance(e, RunStarted) else None)
    trainer.run_sync()
    assert started[0].config["loraplus_lr_ratio"] == 16
    assert "λB=16" in label_from_started(1, started[0])
    saved = json.loads(json.dumps(started[0].config))
    assert TrainConfig.from_dict({**saved}).loraplus_lr_ratio == 16


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "16", True])
def test_bad_ratios_are_refused_with_the_fix(value: object) -> None:
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=value)  # type: ignore[arg-type]


def test_a_ratio_without_adapters_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    with pytest.raises(ValueError, match="no trainable lora_B"):
        make_optimizer(model, _config(tmp_path, loraplus_lr_ratio=16.0))
