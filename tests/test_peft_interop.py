"""Interoperability with Hugging Face PEFT: adapters move both ways with identical logits."""

from __future__ import annotations

import pytest
import torch

from lora_widgets import LoRAConfig, apply_lora, load_adapter, lora_layers, save_adapter
from tests.helpers import random_batch, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _randomise_b(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


CASES = [
    (tiny_llama, LoRAConfig(r=4, alpha=8)),
    (tiny_llama, LoRAConfig(r=8, alpha=8, target_modules="all-linear", use_rslora=True)),
    (tiny_gpt2, LoRAConfig(r=4, alpha=16)),
]


@pytest.mark.parametrize(("make", "cfg"), CASES, ids=["llama-qv", "llama-all-rslora", "gpt2"])
def test_ours_loads_in_peft_with_same_logits(tmp_path, make, cfg) -> None:  # type: ignore[no-untyped-def]
    ours = make()
    apply_lora(ours, cfg)
    _randomise_b(ours)
    ids = random_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("make", "cfg"), CASES, ids=["llama-qv", "llama-all-rslora", "gpt2"])
def test_peft_adapter_loads_here_with_same_logits(tmp_path, make, cfg) -> None:  # type: ignore[no-untyped-def]
    target = "all-linear" if cfg.target_modules == "all-linear" else None
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        target_modules=target,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B, so the comparison is meaningful
    )
    torch.manual_seed(11)
    peft_model = peft.get_peft_model(make(), peft_cfg)
    ids = random_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path))
    ours = make()
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("make", "cfg"), CASES, ids=["llama-qv", "llama-all-rslora", "gpt2"])
def test_trainable_counts_equal_peft(make, cfg) -> None:  # type: ignore[no-untyped-def]
    report = apply_lora(make(), cfg)
    target = "all-linear" if cfg.target_modules == "all-linear" else None
    peft_model = peft.get_peft_model(
        make(), peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=target, task_type="CAUSAL_LM")
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert report.trainable_params == trainable
    assert report.total_params == total


def test_a_peft_wrapped_model_is_refused_by_apply_lora() -> None:
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(peft_model, LoRAConfig(r=2))


@pytest.mark.parametrize(("make", "cfg"), CASES, ids=["llama-qv", "llama-all-rslora", "gpt2"])
def test_a_peft_lora_config_is_converted_exactly(make, cfg) -> None:  # type: ignore[no-untyped-def]
    """apply_lora(model, peft.LoraConfig(...)) adapts the same modules with the same scale and init as PEFT."""
    target = "all-linear" if cfg.target_modules == "all-linear" else None
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, target_modules=target, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM"
    )
    assert LoRAConfig.from_peft(peft_cfg) == LoRAConfig(
        r=cfg.r, alpha=cfg.alpha, target_modules=target, use_rslora=cfg.use_rslora
    )
    ours, base = make(), make()  # make() seeds the model's own init, so seed the adapters' init after it
    torch.manual_seed(4)
    report = apply_lora(ours, peft_cfg)
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(base, peft_cfg)
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    theirs = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
    }
    assert sorted(theirs) == sorted(lora_layers(ours))
    for name, layer in lora_layers(ours).items():
        assert layer.scaling == pytest.approx(theirs[name].scaling["default"])
        assert torch.equal(
            layer.lora_A.weight, theirs[name].lora_A["default"].weight
        )  # same init, same order
        assert not layer.lora_B.weight.any()
