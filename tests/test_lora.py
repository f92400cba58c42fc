"""The LoRA core: the adapter is really in the forward pass, trains, merges and persists correctly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_widgets import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    disable_adapters,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lora_widgets.lora import LoRALinear
from lora_widgets.lora.layers import set_adapters_enabled
from tests.helpers import patterned_batch, random_batch, tiny_gpt2, tiny_llama


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_b(model: nn.Module, seed: int = 3) -> None:
    """Give B non-zero values, as after training, so merges and round trips test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"r": 0}, "r=0"),
        ({"r": -4}, "r=-4"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj("}, "regular expression"),
    ],
)
def test_invalid_config_names_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="LoRAConfig") as info:
        LoRAConfig(**kwargs)
    assert needle in str(info.value)


def test_config_round_trips_through_dict() -> None:
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="rank"):
        LoRAConfig.from_dict({"rank": 4})


def test_scaling_plain_and_rslora() -> None:
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / math.sqrt(16))
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=16, alpha=32, use_rslora=True))
    assert all(layer.scaling == 8.0 for layer in lora_layers(model).values())


# -- wrapping -----------------------------------------------------------------------------------


def test_default_targets_per_architecture() -> None:
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    rl = apply_lora(llama, LoRAConfig(r=2))
    rg = apply_lora(gpt2, LoRAConfig(r=2))
    assert sorted({n.split(".")[-1] for n in rl.matched}) == ["q_proj", "v_proj"]
    assert len(rl.matched) == 4  # 2 layers x (q, v)
    assert sorted({n.split(".")[-1] for n in rg.matched}) == ["c_attn"]


def test_all_linear_excludes_the_output_head_and_regex_matches_full_path() -> None:
    model = tiny_llama()
    report = apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in report.matched
    assert len(report.matched) == 2 * 7  # q k v o gate up down
    model2 = tiny_llama()
    report2 = apply_lora(model2, LoRAConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj"))
    assert report2.matched == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_zero_init_gives_the_base_models_output() -> None:
    for make in (tiny_llama, tiny_gpt2):
        model = make()
        ids = random_batch()
        before = _logits(model, ids)
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
        assert torch.equal(_logits(model, ids), before)


def test_adapter_is_in_the_forward_pass() -> None:
    """The seed notebook's bug: adapters built but never called. Non-zero B must change the output."""
    model = tiny_llama()
    ids = random_batch()
    apply_lora(model, LoRAConfig(r=4))
    before = _logits(model, ids)
    _randomise_b(model)
    assert not torch.allclose(_logits(model, ids), before)


def test_only_a_and_b_are_trainable_and_counts_match_formula() -> None:
    model = tiny_llama()
    report = apply_lora(model, LoRAConfig(r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads x 8); r (in + out) each, 2 layers
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert report.trainable_params == expected
    assert report.total_params == count_parameters(model)[1]
    assert report.trainable_percent == pytest.approx(100 * expected / report.total_params)


def test_gradients_reach_a_and_b_and_not_the_base() -> None:
    model = tiny_llama().train()
    apply_lora(model, LoRAConfig(r=4))
    _randomise_b(model)  # with B = 0, A's gradient is exactly zero at the first step
    ids = random_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_few_steps_lower_the_loss_and_change_the_adapters(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make().train()
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    a0 = {n: layer.lora_A.weight.clone() for n, layer in lora_layers(model).items()}
    b0 = {n: layer.lora_B.weight.clone() for n, layer in lora_layers(model).items()}
    ids = patterned_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for n, layer in lora_layers(model).items():
        assert not torch.equal(layer.lora_A.weight, a0[n])
        assert not torch.equal(layer.lora_B.weight, b0[n])


def test_applying_twice_is_refused_and_nothing_matched_lists_modules() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2))
    assert all(not isinstance(m.base_layer, LoRALinear) for m in lora_layers(model).values())
    with pytest.raises(ValueError, match=r"matched no Linear/Conv1D module.*q_proj.*v_proj"):
        apply_lora(tiny_llama(), LoRAConfig(target_modules=["query"]))


def test_unknown_architecture_without_targets_says_what_to_pass() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default target_modules"):
        apply_lora(model, LoRAConfig())
    report = apply_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert report.matched == ["0"]


def test_remove_lora_restores_base_and_flags() -> None:
    model = tiny_llama()
    ids = random_batch()
    before = _logits(model, ids)
    apply_lora(model, LoRAConfig(r=4))
    _randomise_b(model)
    merge_lora(model)
    remove_lora(model)
    assert not lora_layers(model)
    assert (_logits(model, ids) - before).abs().max() < 1e-5  # merge then unmerge: fp32 rounding only
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoRAConfig(r=2))  # a fresh run on the same base model is possible


# -- merge, delta, enable/disable -------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_is_w_plus_scaled_ba_and_idempotent(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    apply_lora(model, LoRAConfig(r=4, alpha=12, target_modules="all-linear"))
    _randomise_b(model)
    ids = random_batch()
    unmerged = _logits(model, ids)
    w0 = {n: layer.weight.clone() for n, layer in lora_layers(model).items()}
    merge_lora(model)
    for n, layer in lora_layers(model).items():
        ba = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling  # [out, in]
        expected = w0[n] + (ba.T if layer.fan_in_fan_out else ba)
        assert torch.allclose(layer.weight, expected, atol=1e-6)
        assert torch.allclose(layer.delta_weight(), expected - w0[n], atol=1e-6)
    merged = _logits(model, ids)
    assert (merged - unmerged).abs().max() < 1e-5
    merge_lora(model)  # twice: no-op
    assert torch.equal(_logits(model, ids), merged)
    unmerge_lora(model)
    unmerge_lora(model)
    for n, layer in lora_layers(model).items():
        assert torch.allclose(layer.weight, w0[n], atol=1e-6)
    assert (_logits(model, ids) - unmerged).abs().max() < 1e-5


def test_disable_gives_base_output_and_eval_does_not_merge() -> None:
    model = tiny_llama()
    ids = random_batch()
    base = _logits(model, ids)
    apply_lora(model, LoRAConfig(r=4))
    _randomise_b(model)
    adapted = _logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), adapted)
    model.eval()
    assert not any(layer.merged for layer in lora_layers(model).values())
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        set_adapters_enabled(model, False)


# -- PEFT-format persistence ---------------------------------------------------------------------


def test_save_writes_peft_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8.0, 0.05)
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["use_rslora"] is False and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_load_round_trip_into_a_fresh_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], use_rslora=True))
    _randomise_b(model)
    ids = random_batch()
    expected = _logits(model, ids)
    save_adapter(model, tmp_path)
    fresh = tiny_gpt2()
    report = load_adapter(fresh, tmp_path)
    assert sorted(report.matched) == sorted(lora_layers(model))
    assert (_logits(fresh, ids) - expected).abs().max() < 1e-6


def test_partial_layer_selection_saves_an_exact_pattern(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path).matched == ["model.layers.0.self_attn.q_proj"]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_bad_adapter_directories_raise_and_leave_the_model_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tiny_llama()
    apply_lora(src, LoRAConfig(r=4))
    good = save_adapter(src, tmp_path / "good")
    target = tiny_llama()
    before = _state(target)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(target, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(target, tmp_path / "empty")

    # wrong shapes: an r=4 adapter whose tensors say r=3
    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    tensors = {k: (v[:3] if "lora_A" in k else v[:, :3]).contiguous() for k, v in tensors.items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(target, bad)

    # unknown module names
    unk = tmp_path / "unknown"
    unk.mkdir()
    (unk / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    save_file(
        {k.replace("self_attn", "cross_attn"): v for k, v in tensors.items()},
        unk / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(target, unk)

    # a pickle file is never read
    pkl = tmp_path / "pickle"
    pkl.mkdir()
    (pkl / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pkl / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_adapter(target, pkl)

    _assert_unchanged(target, before)
    assert not lora_layers(target)


def test_delta_weight_shapes() -> None:
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(r=2))
    layer = next(iter(lora_layers(model).values()))
    assert layer.fan_in_fan_out
    assert layer.delta_weight().shape == layer.weight.shape == (32, 96)  # Conv1D: [in, out]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_unload_exports_a_plain_model(tmp_path, make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    base_names = [n for n, _ in model.named_parameters()]
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomise_b(model)
    ids = random_batch()
    adapted = _logits(model, ids)
    merge_lora(model, unload=True)
    assert not lora_layers(model)
    assert [n for n, _ in model.named_parameters()] == base_names
    assert all(p.requires_grad for p in model.parameters())
    assert (_logits(model, ids) - adapted).abs().max() < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert (_logits(reloaded, ids) - adapted).abs().max() < 1e-5


def test_nothing_is_written_onto_the_users_model_and_a_copy_restores_its_flags() -> None:
    """apply_lora records the previous requires_grad flags in its own wrappers, not on the model, so a
    deep copy of an adapted model (as measure_memory makes) still gets them back from remove_lora."""
    import copy

    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    attrs = {n: sorted(vars(m)) for n, m in model.named_modules()}
    apply_lora(model, LoRAConfig(r=2))
    assert sorted(vars(model)) == attrs[""]  # no marker attribute on the model
    twin = copy.deepcopy(model)
    for m in (model, twin):
        remove_lora(m)
        assert {n: sorted(vars(x)) for n, x in m.named_modules()} == attrs
        assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["model.norm.weight"]


def test_layer_and_config_share_one_scaling_rule_and_one_validation() -> None:
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=16, alpha=32, use_rslora=True)
    assert layer.scaling == LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0
    with pytest.raises(ValueError, match="LoRALinear: r must be an integer >= 1, got r=0"):
        LoRALinear(nn.Linear(8, 8), r=0, alpha=1)
    fresh = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="use_rslora='no'"):
        LoRALinear(fresh, r=2, alpha=4, use_rslora="no")
    assert fresh.weight.requires_grad  # refused before the layer was frozen
