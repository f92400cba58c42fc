"""The origin bug, whatever code built the adapters: trainable modules the forward never calls are named at step 1.

The notebook this project grew from (its review: ``shared/seed/review_llm_finetuning_dashboard.md``, issue 4
"LoRA Forward Pass Not Integrated") froze the base model, then ``inject_lora`` stored a ``LoRALayer`` on each
q/k/v projection as ``module._lora`` and never changed ``forward``: the adapters are counted and handed to the
optimizer, and never called. :func:`_reviewed_notebook_code` is that code as the review shows it (without the
review's proposed monkey-patch). Each test runs it, or a variant, through a trainer a user would use: ours with
``lora=None`` (``LoRATrainer``) and an attached ``transformers.Trainer``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lora_widgets.events.types import AlertRaised, Event, RunFailed, RunFinished, StepMetrics, event_from_dict
from lora_widgets.health.gradient_check import (
    ADAPTERS_NEVER_CALLED,
    gradient_report,
    is_no_gradient_error,
    looks_like_adapter,
)
from lora_widgets.lora.layers import LoRAConfig, apply_lora, lora_layers
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import patterned_batch

TORCH_SAYS = "element 0 of tensors does not require grad"
NAMES = [f"model.layers.*.self_attn.{p}._lora: 8 tensors in 4 layers" for p in ("q_proj", "k_proj", "v_proj")]
CALL_ADVICE = "module._lora = ... is kept, counted and trained, but module.forward never calls it"
DETACH_ADVICE = "look for an output cut from the graph: .detach(), .data, torch.no_grad()"


# -- the reviewed notebook's code, as its review shows it ----------------------------------------------------


class LoRALayer(nn.Module):
    """LoRA layer: scaling * (x A^T) B^T, A [rank, in], B [out, rank] (B starts at zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: float = 32) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def inject_lora(
    model: nn.Module, rank: int = 16, targets: tuple[str, ...] = ("q_proj", "v_proj", "k_proj")
) -> tuple[nn.Module, int]:
    """Inject LoRA layers into model attention layers (the reviewed notebook's, unchanged in substance)."""
    lora_params = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(x in name for x in targets):
            module._lora = LoRALayer(module.in_features, module.out_features, rank=rank)  # never called
            lora_params += rank * (module.in_features + module.out_features)
            module.weight.requires_grad = False
            if module.bias is not None:
                module.bias.requires_grad = False
    return model, lora_params


def _llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    return LlamaForCausalLM(config)


def _reviewed_notebook_code() -> nn.Module:
    model: nn.Module = _llama()
    for p in model.parameters():  # the base frozen
        p.requires_grad = False
    model, _ = inject_lora(model, rank=4)
    return model


def _data() -> torch.Tensor:
    return patterned_batch(8, 32).repeat(4, 1)  # [32, 32]


def _trainer(tmp_path: Path, model: nn.Module, **changes: Any) -> tuple[LoRATrainer, list[Event]]:
    settings: dict[str, Any] = dict(max_steps=4, batch_size=4, warmup_steps=0, eval_every=None, val_fraction=0.0,
                                    output_dir=str(tmp_path / "runs"), device="cpu", learning_rate=1e-2)  # fmt: skip
    settings.update(changes)
    trainer = LoRATrainer(model, None, _data(), lora=None, config=TrainConfig(**settings))
    events: list[Event] = []
    trainer.subscribe(events.append)
    return trainer, events


def _alerts(events: list[Event]) -> list[AlertRaised]:
    return [e for e in events if isinstance(e, AlertRaised)]


# -- our trainer -----------------------------------------------------------------------------------------------


def test_reviewed_notebook_code_ends_at_step_1_naming_the_adapters_the_forward_never_calls(
    tmp_path: Path,
) -> None:
    model = _reviewed_notebook_code()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, events = _trainer(tmp_path, model)
    end = trainer.run_sync()

    assert isinstance(end, RunFailed) and end.reason == "no_gradient" and end.error_type == "NoGradientError"
    assert end.step == 0 and not [e for e in events if isinstance(e, StepMetrics)]  # before the first update
    for name in NAMES:
        assert name in end.message
    assert "At step 1 the loss depends on none of the 24 trainable tensors" in end.message
    assert ADAPTERS_NEVER_CALLED in end.message and TORCH_SAYS not in end.message
    assert "not on the forward path to the loss" in end.message and "detached" in end.message
    assert CALL_ADVICE in end.suggestions[0] and "apply_lora" in end.suggestions[0]
    assert DETACH_ADVICE in end.suggestions[1]
    # nothing trained, nothing saved under a name that says otherwise; the model is as it was
    assert end.adapter_path is None and end.saved == "" and "nothing was saved" in end.message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.run_id is not None and "-full-" not in trainer.run_id and "-custom2.6k-" in trainer.run_id

    # the same diagnosis, as an alert, in the events and in metrics.jsonl
    (alert,) = [a for a in _alerts(events) if a.key == "no_gradient"]
    assert alert.key == "no_gradient" and alert.step == 1 and alert.severity == "danger"
    assert alert.title == "No trainable parameter receives a gradient"
    assert all(name in alert.evidence for name in NAMES) and CALL_ADVICE in alert.fix
    assert trainer.run_dir is not None
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    written = [event_from_dict(json.loads(line)) for line in lines]
    assert alert in written and written[-1] == end


def test_the_dashboard_shows_the_diagnosis_and_the_alert(tmp_path: Path) -> None:
    from lora_widgets import LoRADashboard

    trainer, _ = _trainer(tmp_path, _reviewed_notebook_code())
    trainer.run_sync()
    assert trainer.run_dir is not None
    dash = LoRADashboard(model=_llama(2), tokenizer=object(), train_data=_data(), train=TrainConfig())

    async def replay() -> Any:
        dash.replay(trainer.run_dir / "metrics.jsonl")  # type: ignore[operator]
        return await dash.wait()

    asyncio.run(replay())
    shown = {c["title"]: c for c in dash.panel.callouts}
    failed = shown["No trainable parameter receives a gradient"]  # the failure's callout
    assert failed["kind"] == "danger" and ADAPTERS_NEVER_CALLED in failed["message"]
    assert NAMES[1] in failed["message"] and CALL_ADVICE in failed["suggestions"][0]
    alert = shown["No trainable parameter receives a gradient (step 1)"]  # the alert's callout
    assert NAMES[1] in alert["message"]


def test_a_correct_adapter_trains_on_and_the_unused_k_proj_modules_are_named(tmp_path: Path) -> None:
    model = _llama()
    apply_lora(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))  # in the forward: they train
    inject_lora(model, rank=4, targets=("k_proj",))  # the reviewed code's mistake, on k_proj only
    trainer, events = _trainer(tmp_path, model)
    end = trainer.run_sync()

    assert isinstance(end, RunFinished) and end.step == 4  # training goes on
    assert all(float(layer.lora_B.weight.abs().sum()) > 0 for layer in lora_layers(model).values())
    (alert,) = [a for a in _alerts(events) if a.key == "no_gradient"]
    assert alert.step == 1 and alert.title == "8 of 24 trainable tensors receive no gradient"
    assert alert.evidence.startswith("After the backward pass of step 1, 8 of 24 trainable tensors")
    assert "model.layers.*.self_attn.k_proj._lora: 8 tensors in 4 layers" in alert.evidence
    assert "q_proj" not in alert.evidence and "v_proj" not in alert.evidence  # those receive gradients
    assert ADAPTERS_NEVER_CALLED in alert.evidence and CALL_ADVICE in alert.fix and DETACH_ADVICE in alert.fix
    assert end.saved == "adapter"


def test_a_peft_model_with_an_extra_unused_module_is_named(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.model.style_adapter = nn.Linear(32, 32)  # stored, never called
    trainer, events = _trainer(tmp_path, model)
    end = trainer.run_sync()
    assert isinstance(end, RunFinished) and end.step == 4
    (alert,) = [a for a in _alerts(events) if a.key == "no_gradient"]
    assert "base_model.model.model.style_adapter: 2 tensors" in alert.evidence  # weight and bias; no layers
    assert "2 of 18 trainable tensors" in alert.evidence and "lora_A" not in alert.evidence
    assert ADAPTERS_NEVER_CALLED in alert.evidence  # named "adapter"


def test_a_subset_trained_with_lora_none_saves_the_trainable_tensors_by_name(tmp_path: Path) -> None:
    """The user's own adapters, correctly wired: what was trained is saved, never the frozen model."""

    class Adapted(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base, self.adapter = base, LoRALayer(base.in_features, base.out_features, rank=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.adapter(x)

    model = _llama(2)
    for p in model.parameters():
        p.requires_grad = False
    for layer in model.model.layers:
        layer.self_attn.q_proj = Adapted(layer.self_attn.q_proj)
    trainer, events = _trainer(tmp_path, model)
    end = trainer.run_sync()
    assert isinstance(end, RunFinished) and not _alerts(events)  # every trainable tensor got a gradient
    assert end.saved == "trainable" and end.adapter_path is not None
    saved = load_file(str(Path(end.adapter_path) / "trainable.safetensors"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(saved) == sorted(trained) and len(saved) == 4  # 2 layers x (A, B); no frozen weight
    assert all(torch.equal(saved[n], p.detach()) for n, p in trained.items())
    assert not list(Path(end.adapter_path).glob("model*.safetensors"))
    assert "Saved what was trained: the 4 trainable tensors (512 parameters), by name" in end.message
    assert trainer.run_id is not None and "-custom512-" in trainer.run_id


def test_full_fine_tuning_says_it_saved_the_whole_model(tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, _llama(1), max_steps=1)
    end = trainer.run_sync()
    assert isinstance(end, RunFinished) and end.saved == "model"
    assert "Saved the whole fine-tuned model" in end.message and "-full-" in (trainer.run_id or "")


# -- an attached transformers Trainer ---------------------------------------------------------------------


def _hf_run(tmp_path: Path, model: nn.Module) -> tuple[Any, list[Event]]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (the lowest-versions job has none)
    from lora_widgets.hf import HFRun

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                                          use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    rows = [{"input_ids": r, "labels": r} for r in _data()]
    hf = transformers.Trainer(model=model, args=args, train_dataset=rows)
    hf.remove_callback(transformers.PrinterCallback)
    run = HFRun(hf)
    events: list[Event] = []
    run.subscribe(events.append)
    return asyncio.run(run.run()), events


def test_attached_hf_trainer_with_the_reviewed_code_is_named_at_step_1(tmp_path: Path) -> None:
    end, events = _hf_run(tmp_path, _reviewed_notebook_code())
    assert isinstance(end, RunFailed) and end.reason == "no_gradient" and end.step == 0
    assert TORCH_SAYS not in end.message  # torch's error, classified
    assert all(name in end.message for name in NAMES) and ADAPTERS_NEVER_CALLED in end.message
    assert CALL_ADVICE in end.suggestions[0]
    (alert,) = [a for a in _alerts(events) if a.key == "no_gradient"]
    assert alert.step == 1 and all(name in alert.evidence for name in NAMES)


def test_attached_hf_trainer_names_unused_modules_beside_a_working_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inject_lora(model, rank=4, targets=("k_proj",))
    end, events = _hf_run(tmp_path, model)
    assert isinstance(end, RunFinished) and end.step == 4
    (alert,) = [a for a in _alerts(events) if a.key == "no_gradient"]
    assert alert.step == 1 and "8 of 24 trainable tensors" in alert.evidence
    assert "base_model.model.model.layers.*.self_attn.k_proj._lora: 8 tensors in 4 layers" in alert.evidence
    assert events.index(alert) < next(i for i, e in enumerate(events) if isinstance(e, StepMetrics))


# -- the check itself --------------------------------------------------------------------------------------


def test_a_module_that_is_not_an_adapter_is_named_without_calling_it_one() -> None:
    model = _llama(2)
    model.extra_head = nn.Linear(32, 32)  # trainable, never called, neither named nor shaped like an adapter
    model(input_ids=_data()[:2]).logits.sum().backward()
    report = gradient_report(model)
    assert [g.describe() for g in report.groups] == ["extra_head: 2 tensors"]
    assert not report.adapters and ADAPTERS_NEVER_CALLED not in report.evidence(1)
    assert "not on the forward path" in report.evidence(1)


def test_a_detached_output_is_named_too() -> None:
    model = _llama(2)
    for p in model.parameters():
        p.requires_grad = False
    model.model.norm.weight.requires_grad = True
    hook = model.model.norm.register_forward_hook(lambda m, i, out: out.detach())  # the output cut off
    loss = model(input_ids=_data()[:2]).logits.sum()
    hook.remove()
    assert not loss.requires_grad
    with pytest.raises(RuntimeError) as caught:
        loss.backward()
    assert TORCH_SAYS in str(caught.value) and is_no_gradient_error(caught.value)
    report = gradient_report(model)
    assert report.none_received and [g.describe() for g in report.groups] == ["model.norm: 1 tensor"]


def test_low_rank_factors_look_like_adapters_by_shape() -> None:
    assert looks_like_adapter("blocks.*.attn.down", [(8, 512), (512, 8)])  # r x in, out x r
    assert not looks_like_adapter("blocks.*.mlp.fc", [(512, 512)])
    assert looks_like_adapter("blocks.*.attn.q._LoRA", [(512, 512)])  # by name, any case
