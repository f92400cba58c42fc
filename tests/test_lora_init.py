"""init_lora_weights: PEFT's initialisations of A and B (True, "gaussian", "pissa", False), as PEFT draws them."""

from __future__ import annotations

import json

import pytest
import torch

from lora_widgets import LoRAConfig, apply_lora, load_adapter, lora_layers, remove_lora, save_adapter
from lora_widgets.lora.layers import LoRALinear
from tests.helpers import random_batch, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

Q = "model.layers.0.self_attn.q_proj"


def _peft_layer(init: bool | str, make=tiny_llama, seed: int = 3):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        make(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, task_type="CAUSAL_LM")
    )
    return model


def _ours(init: bool | str, make=tiny_llama, seed: int = 3, **kwargs):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = make()
    apply_lora(model, LoRAConfig(r=4, alpha=8, init_lora_weights=init, **kwargs))
    return model


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_random_inits_draw_what_peft_draws_from_the_same_seed(init: bool | str) -> None:
    """Same seed, same model: the factors are PEFT's bit for bit (same distributions, same draw order)."""
    theirs = _peft_layer(init).base_model.model.get_submodule(Q)
    ours = lora_layers(_ours(init))[Q]
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)
    assert bool(ours.lora_B.weight.abs().sum() > 0) is (init is False)  # only False starts with B A != 0


def test_init_statistics_are_the_documented_distributions() -> None:
    """A's spread: Kaiming-uniform(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in); gaussian std 1/r."""
    layer = LoRALinear(torch.nn.Linear(2048, 64), r=64, alpha=64)
    bound = 1 / 2048**0.5
    assert layer.lora_A.weight.abs().max() <= bound
    assert float(layer.lora_A.weight.detach().std()) == pytest.approx(bound / 3**0.5, rel=0.02)
    gaussian = LoRALinear(torch.nn.Linear(2048, 64), r=64, alpha=64, init_lora_weights="gaussian")
    assert float(gaussian.lora_A.weight.detach().std()) == pytest.approx(1 / 64, rel=0.02)
    assert float(gaussian.lora_A.weight.detach().mean()) == pytest.approx(0, abs=3e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_pissa_equals_peft_and_reconstructs_w(make) -> None:  # type: ignore[no-untyped-def]
    """Meng et al. 2024, sec. 3: A, B from the top-r SVD, W replaced by W_res with W_res + s B A = W."""
    original = make()
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if hasattr(m, "weight")}
    theirs = _peft_layer("pissa", make)
    ours = _ours("pissa", make)
    ids = random_batch()
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        assert (ours(input_ids=ids).logits - expected).abs().max() < 1e-4  # the model still computes the base
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A.weight, peft_layer.lora_A["default"].weight, atol=1e-6)
        assert torch.allclose(layer.lora_B.weight, peft_layer.lora_B["default"].weight, atol=1e-6)
        assert torch.allclose(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6)
        assert not torch.allclose(layer.base_layer.weight, weights[name], atol=1e-3)  # W was replaced
        rebuilt = layer.base_layer.weight + layer.delta_weight()  # W_res + s B A, in the base's layout
        assert torch.allclose(rebuilt, weights[name], atol=1e-5)


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(9)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.add_(0.05 * torch.randn_like(layer.lora_B.weight))


def test_a_pissa_adapter_moves_both_ways_with_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Saved with init_lora_weights='pissa'; a loader recomputes the residual from the original base."""
    ours = _ours("pissa")
    _perturb(ours)
    ids = random_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - expected).abs().max() < 1e-5
        assert (fresh(input_ids=ids).logits - expected).abs().max() < 1e-5
        theirs.save_pretrained(str(tmp_path / "theirs"))
        again = tiny_llama()
        load_adapter(again, tmp_path / "theirs")
        assert (again(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_remove_lora_puts_the_original_weight_back_and_reset_keeps_the_residual() -> None:
    original = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    model = _ours("pissa")
    layer = lora_layers(model)[Q]
    a0 = layer.lora_A.weight.detach().clone()
    residual = layer.base_layer.weight.detach().clone()
    _perturb(model)
    layer.reset_lora_parameters()  # a new run: PiSSA's factors again, not an SVD of the residual
    assert torch.equal(layer.lora_A.weight, a0) and torch.equal(layer.base_layer.weight, residual)
    remove_lora(model)
    for name, p in model.named_parameters():
        assert torch.allclose(p, original[name], atol=1e-6), name


def test_a_failed_pissa_apply_leaves_the_weights_exactly_as_they_were(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = LoRALinear.__init__

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        real(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "__init__", failing)
    with pytest.raises(RuntimeError, match="injected fault"):
        apply_lora(model, LoRAConfig(r=4, init_lora_weights="pissa"))
    assert not lora_layers(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("kaiming", "'kaiming'"),
        ("pissa_niter_4", "randomized SVD"),
        (1, "init_lora_weights=1"),
        ("olora", "olora"),
    ],
)
def test_other_inits_are_refused_by_name(value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LoRAConfig(init_lora_weights=value)  # type: ignore[arg-type]


def test_pissa_with_a_rank_above_the_weights_rank_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="r=16 exceeds min"):
        LoRALinear(torch.nn.Linear(8, 12), r=16, alpha=16, init_lora_weights="pissa")
