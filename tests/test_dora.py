"""DoRA (Liu et al. 2024, sec. 4): the same outputs, gradients and files as PEFT's ``use_dora``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_widgets import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lora_widgets.lora.statistics import adapter_stats
from tests.helpers import random_batch, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _peft_dora(make, dropout: float = 0.0, seed: int = 5):  # type: ignore[no-untyped-def]
    """A PEFT DoRA model with random B (init_lora_weights=False) and a magnitude moved off its initial norm,
    so that m / ||W + s B A|| != 1 and every term of the formula is exercised."""
    torch.manual_seed(seed)
    target = ["c_attn"] if make is tiny_gpt2 else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=target,
        use_dora=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(make(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _grads(
    model: nn.Module, ids: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradients of a fixed loss by PEFT-style parameter name (adapter name dropped)."""
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both models (one draw per layer, in the same order)
    logits = model(input_ids=ids).logits
    (logits.float().pow(2).mean()).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            key = key.replace(
                "lora_magnitude_vector.weight", "lora_magnitude_vector"
            )  # PEFT's module -> ours
            grads[key] = p.grad.detach().clone()
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_equal_peft(tmp_path, arch: str, dropout: float) -> None:  # type: ignore[no-untyped-def]
    """Training mode: with dropout PEFT computes W0 on the dropped input, without it reuses the base output."""
    make = MAKERS[arch]
    theirs = _peft_dora(make, dropout)
    theirs.save_pretrained(str(tmp_path))
    ours = make()
    load_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    theirs.train()
    ours.train()
    ids = random_batch()
    expected, their_grads = _grads(theirs, ids)
    got, our_grads = _grads(ours, ids)
    assert (got - expected).abs().max() < 1e-5
    assert set(our_grads) == set(their_grads)  # A, B and the magnitude of each layer, nothing else
    assert any(
        k.endswith("lora_magnitude_vector.weight") or k.endswith("lora_magnitude_vector") for k in our_grads
    )
    for key, grad in their_grads.items():
        assert torch.allclose(our_grads[key], grad, atol=1e-6, rtol=1e-4), key
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() < 1e-5


def test_the_norm_is_detached_as_in_sec_4_3() -> None:
    """The gradient of B is the one with ||W + s B A||_c held constant: changing that convention would show here."""
    layer = lora_layers(_ours_trained("llama"))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, layer.in_features)
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    b_grad = layer.lora_B.weight.grad.clone()  # type: ignore[union-attr]
    w = layer.base_layer.weight  # [out, in]; q_proj has no bias

    def b_grad_of_eq5(detach: bool) -> torch.Tensor:
        v = w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight  # [out, in]
        norm = v.norm(dim=1).detach() if detach else v.norm(dim=1)  # [out]
        y = (layer.lora_magnitude_vector / norm).view(1, -1) * (x @ v.T)  # eq. 5 applied to x
        assert torch.allclose(y, layer(x), atol=1e-5)
        layer.zero_grad()
        y.pow(2).sum().backward()
        return layer.lora_B.weight.grad.clone()  # type: ignore[union-attr]

    assert torch.allclose(b_grad_of_eq5(detach=True), b_grad, atol=1e-6)
    assert not torch.allclose(b_grad_of_eq5(detach=False), b_grad, atol=1e-6)


def _ours_trained(arch: str, **kwargs) -> nn.Module:  # type: ignore[no-untyped-def]
    model = MAKERS[arch]()
    apply_lora(model, LoRAConfig(r=4, alpha=8, use_dora=True, **kwargs))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude_vector))  # type: ignore[union-attr]
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_saved_loads_in_peft_with_the_same_logits(tmp_path, arch: str) -> None:  # type: ignore[no-untyped-def]
    ours = _ours_trained(arch)
    save_adapter(ours, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    magnitude_keys = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitude_keys) == len(lora_layers(ours)) and len(keys) == 3 * len(magnitude_keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(MAKERS[arch](), str(tmp_path))
    ids = random_batch()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() < 1e-5


def test_a_fresh_dora_layer_computes_the_base_and_starts_with_the_weights_row_norms() -> None:
    base = tiny_llama()
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, use_dora=True))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))  # type: ignore[arg-type]
    ids = random_batch()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() < 1e-5
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload(arch: str) -> None:
    model = _ours_trained(arch)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    ids = random_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merge_lora(model)
        assert (model(input_ids=ids).logits - expected).abs().max() < 1e-4
        for name, layer in lora_layers(model).items():
            assert not torch.allclose(layer.base_layer.weight, weights[name])
        unmerge_lora(model)
        for name, layer in lora_layers(model).items():
            assert torch.allclose(layer.base_layer.weight, weights[name], atol=1e-6)
        assert (model(input_ids=ids).logits - expected).abs().max() < 1e-5
        stats = adapter_stats(model, 0)  # statistics of B A keep working on DoRA layers, merged or not
        merge_lora(model)
        stats_merged = adapter_stats(model, 0)
        for a, b in zip(stats.layers, stats_merged.layers, strict=True):
            assert a.weight_norm == pytest.approx(b.weight_norm, rel=1e-5)  # ||W0||, not ||merged W||
            assert a.relative_update == pytest.approx(b.relative_update, rel=1e-4) and a.relative_update > 0
        merge_lora(model, unload=True)
        assert not lora_layers(model)
        assert (model(input_ids=ids).logits - expected).abs().max() < 1e-4


def test_merging_matches_peft_merge_and_unload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    theirs = _peft_dora(tiny_llama)
    theirs.save_pretrained(str(tmp_path))
    ours = tiny_llama()
    load_adapter(ours, tmp_path)
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours, unload=True)
    for (name, p), (name2, q) in zip(merged_theirs.named_parameters(), ours.named_parameters(), strict=True):
        assert name == name2
        assert torch.allclose(p, q, atol=1e-6), name


def test_loading_checks_the_magnitude_against_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ours = _ours_trained("llama")
    save_adapter(ours, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": False}))
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    plain = tiny_llama()
    apply_lora(plain, LoRAConfig(r=4, alpha=8))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(plain, tmp_path)  # a plain LoRA model cannot take a DoRA adapter in place


def test_the_trainer_trains_the_magnitude_and_reseeding_resets_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lora_widgets import LoRATrainer, TrainConfig

    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, use_dora=True))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    start = layer.lora_magnitude_vector.detach().clone()  # type: ignore[union-attr]
    blocks = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        max_steps=3, batch_size=4, warmup_steps=0, eval_every=None, eval_batches=1, device="cpu",
        output_dir=str(tmp_path), learning_rate=1e-2, sample_prompts=(),
    )  # fmt: skip
    trainer = LoRATrainer(model, None, blocks, config=config)
    trainer.run_sync()
    trained = layer.lora_magnitude_vector.detach().clone()  # type: ignore[union-attr]
    assert not torch.allclose(trained, start)
    layer.reset_lora_parameters()  # what a new run does after seeding: m = ||W + s B A||_c = ||W||_c again
    assert torch.allclose(layer.lora_magnitude_vector, start)  # type: ignore[arg-type]
    remove_lora(model)


def test_dora_on_a_4_bit_base_equals_peft_and_merges_by_dequantizing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PEFT's DoRA on a Linear4bit dequantizes W0 for the norm (dequantize_module_weight); ours reads the same W0."""
    pytest.importorskip("bitsandbytes")
    from tests.test_qlora import ids, quantized_tiny

    _, ours = quantized_tiny(tmp_path / "a")
    _, base_for_peft = quantized_tiny(tmp_path / "b")
    apply_lora(ours, LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            assert layer.quantized == "4-bit"
            layer.lora_B.weight.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude_vector))  # type: ignore[union-attr]
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(base_for_peft, str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = ours(ids()).logits
        assert (theirs(ids()).logits - expected).abs().max() < 1e-5
        with pytest.warns(UserWarning, match="dequantized"):
            merge_lora(ours, unload=True)
        assert (ours(ids()).logits - expected).abs().max() < 2e-3  # as plain LoRA's dequantizing merge


def test_a_trainer_that_fails_to_replace_dora_adapters_restores_them_with_their_magnitudes(
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    from lora_widgets import LoRATrainer, TrainConfig
    from lora_widgets.lora.layers import LoRALinear

    model = tiny_llama()
    blocks = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))
    LoRATrainer(model, None, blocks, lora=LoRAConfig(r=4, use_dora=True), config=TrainConfig(device="cpu"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_magnitude_vector.mul_(1.5)  # type: ignore[union-attr]  # as a trained adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = LoRALinear.__init__

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        real(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "__init__", failing)
    with pytest.raises(RuntimeError, match="injected fault"):
        LoRATrainer(model, None, blocks, lora=LoRAConfig(r=8), config=TrainConfig(device="cpu"))
    monkeypatch.undo()
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, p in after.items():
        assert torch.equal(p, before[name]), name
