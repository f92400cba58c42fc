"""Adapter statistics agree with the dense computation they avoid, on Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_widgets import LoRAConfig, apply_lora, lora_layers, merge_lora
from lora_widgets.events import AdapterStats, event_from_dict
from lora_widgets.lora import (
    adapter_stats,
    lowrank_singular_values,
    snapshot_adapters,
    summarize_adapter_stats,
)
from tests.helpers import patterned_batch, tiny_gpt2, tiny_llama

REL = 1e-5


def _randomise_b(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def _adapted(make, r: int = 4) -> nn.Module:  # type: ignore[no-untyped-def]
    model = make()
    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, target_modules="all-linear"))
    _randomise_b(model)
    return model


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= REL * max(abs(want), 1e-30)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@torch.no_grad()
def test_stats_equal_the_dense_computation(make) -> None:  # type: ignore[no-untyped-def]
    model = _adapted(make)
    stats = adapter_stats(model, step=5)
    layers = lora_layers(model)
    assert [row.name for row in stats.layers] == list(layers)
    for row in stats.layers:
        layer = layers[row.name]
        a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()  # [r, in], [out, r]
        dense = layer.scaling * b @ a  # [out, in]
        want_sv = torch.linalg.svdvals(dense)[: row.rank]  # the others are 0 (rank <= r)
        got_sv = torch.tensor(row.singular_values, dtype=torch.float64)
        assert torch.allclose(got_sv, want_sv, rtol=REL, atol=REL * float(want_sv[0])), row.name
        w = layer.weight.double()
        assert _close(row.delta_norm, float(torch.linalg.matrix_norm(dense)))
        assert _close(row.weight_norm, float(torch.linalg.matrix_norm(w)))
        assert _close(
            row.relative_update, float(torch.linalg.matrix_norm(dense) / torch.linalg.matrix_norm(w))
        )
        assert _close(row.a_norm, float(a.norm())) and _close(row.b_norm, float(b.norm()))
        assert row.a_grad_norm is None and row.b_grad_norm is None and row.update_ratio is None
        assert row.rank == 4 and row.scaling == pytest.approx(2.0)


def test_layer_index_and_module_kind_for_heatmap_rows_and_columns() -> None:
    llama = adapter_stats(_adapted(tiny_llama), 0)
    kinds = {row.module for row in llama.layers}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted({row.layer for row in llama.layers}) == [0, 1]
    row = next(r for r in llama.layers if r.name == "model.layers.1.mlp.down_proj")
    assert (row.layer, row.module) == (1, "down_proj")
    gpt2 = adapter_stats(_adapted(tiny_gpt2), 0)
    # GPT-2 has attn.c_proj and mlp.c_proj: the kind keeps them apart
    assert {r.module for r in gpt2.layers} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}


def test_gradients_and_the_last_update_after_a_real_step() -> None:
    model = _adapted(tiny_llama)
    model.train()
    x = patterned_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    snap = snapshot_adapters(model)
    before = {
        n: (lay.lora_A.weight.detach().clone(), lay.lora_B.weight.detach().clone())
        for n, lay in lora_layers(model).items()
    }
    opt.step()
    stats = adapter_stats(model, 1, before=snap, after_backward=True, learning_rate=1e-2)
    assert stats.after_backward and stats.learning_rate == 1e-2
    for row in stats.layers:
        layer = lora_layers(model)[row.name]
        assert _close(row.a_grad_norm, float(layer.lora_A.weight.grad.double().norm()))  # type: ignore[arg-type,union-attr]
        assert _close(row.b_grad_norm, float(layer.lora_B.weight.grad.double().norm()))  # type: ignore[arg-type,union-attr]
        a0, b0 = before[row.name]
        a1, b1 = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        step_dense = layer.scaling * (b1 @ a1 - b0.double() @ a0.double())  # [out, in]
        want = float(torch.linalg.matrix_norm(step_dense.detach()) / layer.weight.double().norm())
        assert row.update_ratio is not None and abs(row.update_ratio - want) <= 1e-4 * want, row.name


def test_a_tiny_update_is_not_lost_to_cancellation() -> None:
    model = _adapted(tiny_llama)
    snap = snapshot_adapters(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.add_(1e-7)  # far below float32 resolution of B A itself
    stats = adapter_stats(model, 1, before=snap)
    for row in stats.layers:
        layer = lora_layers(model)[row.name]
        a = layer.lora_A.weight.detach().double()
        db = layer.lora_B.weight.detach().double() - snap.factors[row.name][1].double()  # the rounded step
        want = float(torch.linalg.matrix_norm(layer.scaling * db @ a) / layer.weight.double().norm())
        assert 0 < want < 1e-5 and row.update_ratio == pytest.approx(want, rel=1e-4)


def test_stats_leave_the_model_and_its_gradients_untouched() -> None:
    model = _adapted(tiny_gpt2)
    x = patterned_batch()
    model(input_ids=x, labels=x).loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    adapter_stats(model, 1, after_backward=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, dict(model.named_parameters())[n].grad) for n, g in grads.items())


@torch.no_grad()
def test_bfloat16_training_dtype_is_measured_in_float32() -> None:
    model = _adapted(tiny_llama).to(torch.bfloat16)
    stats = adapter_stats(model, 0)
    for row in stats.layers:
        layer = lora_layers(model)[row.name]
        dense = (
            layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        )  # exact bf16 values
        assert _close(row.delta_norm, float(torch.linalg.matrix_norm(dense)))
        assert isinstance(row.singular_values[0], float)


def test_merged_adapters_are_measured_against_the_frozen_weight() -> None:
    model = _adapted(tiny_llama)
    unmerged = adapter_stats(model, 3)
    merge_lora(model)
    merged = adapter_stats(model, 3)
    for a, b in zip(unmerged.layers, merged.layers, strict=True):
        assert b.relative_update == pytest.approx(a.relative_update, rel=1e-4)
        assert b.weight_norm == pytest.approx(a.weight_norm, rel=1e-4)


@torch.no_grad()
def test_peft_layers_are_measured_too() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    stats = adapter_stats(wrapped, 0)
    assert len(stats.layers) == 4 and {r.module for r in stats.layers} == {"q_proj", "v_proj"}
    for row in stats.layers:
        module = wrapped.get_submodule(row.name)
        dense = 2.0 * module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        assert _close(row.delta_norm, float(torch.linalg.matrix_norm(dense)))
        assert _close(row.weight_norm, float(module.base_layer.weight.double().norm()))


def test_lowrank_singular_values_with_rank_above_the_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(3, 6, generator=g), torch.randn(6, 5, generator=g)  # r=6 > d_out=3, d_in=5
    got = lowrank_singular_values(b, a, scaling=0.5)
    want = torch.linalg.svdvals(0.5 * b @ a)
    assert torch.allclose(got[:3], want[:3], rtol=1e-5)


def test_summary_names_the_layers_without_gradient_and_with_b_zero() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    x = patterned_batch()
    fresh = summarize_adapter_stats(adapter_stats(model, 0))
    assert fresh.b_zero == tuple(lora_layers(model)) and fresh.relative_update == 0.0
    model(input_ids=x, labels=x).loss.backward()
    _randomise_b(model)
    summary = summarize_adapter_stats(adapter_stats(model, 1, after_backward=True))
    # At B = 0, dL/dA = 0 exactly, but B receives a gradient: no layer is without one.
    assert summary.no_gradient == () and summary.b_zero == ()
    assert summary.grad_norm is not None and summary.grad_norm > 0
    assert summary.max_layer in lora_layers(model) and summary.n_layers == 4
    assert summary.max_relative_update >= summary.relative_update * 0.999


def test_event_round_trips_through_json() -> None:
    model = _adapted(tiny_gpt2)
    x = patterned_batch()
    model(input_ids=x, labels=x).loss.backward()
    event = adapter_stats(model, 7, before=snapshot_adapters(model), after_backward=True, learning_rate=3e-3)
    line = json.dumps(event.to_dict(), allow_nan=False)  # strict JSON, as metrics.jsonl
    back = event_from_dict(json.loads(line))
    assert isinstance(back, AdapterStats) and back == event
    assert isinstance(back.layers[0].singular_values, tuple)


def test_non_finite_numbers_survive_json() -> None:
    model = _adapted(tiny_llama)
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora_B.weight[0, 0] = float("inf")
    event = adapter_stats(model, 1)
    back = event_from_dict(json.loads(json.dumps(event.to_dict(), allow_nan=False)))
    assert isinstance(back, AdapterStats)
    # the diverged layer reads NaN, the others are still measured
    assert math.isnan(back.layers[0].delta_norm) and math.isnan(back.layers[0].singular_values[0])
    assert math.isinf(back.layers[0].b_norm)
    assert all(math.isfinite(row.delta_norm) for row in back.layers[1:])


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"no LoRA layers.*apply_lora"):
        adapter_stats(tiny_llama(), 0)
    model = _adapted(tiny_llama)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        adapter_stats(model, -1)
    other = _adapted(tiny_llama, r=2)
    with pytest.raises(ValueError, match="snapshot of other adapters"):
        adapter_stats(model, 1, before=snapshot_adapters(other))


def test_loss_is_unaffected_by_measuring() -> None:
    """Stats between backward and step (the trainer's place) do not change what the step does."""
    runs = []
    for measure in (False, True):
        model = _adapted(tiny_llama)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = patterned_batch()
        for step in range(3):
            logits = model(input_ids=x).logits  # [B, T, V]
            F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
            snap = snapshot_adapters(model) if measure else None
            opt.step()
            if measure:
                adapter_stats(model, step + 1, before=snap, after_backward=True)
            opt.zero_grad(set_to_none=True)
        runs.append(model(input_ids=x).logits.detach())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stats_on_cuda_equal_those_on_cpu() -> None:
    model = _adapted(tiny_llama)
    x = patterned_batch()
    model(input_ids=x, labels=x).loss.backward()
    on_cpu = adapter_stats(model, 1, before=snapshot_adapters(model), after_backward=True)
    model.to("cuda")
    on_gpu = adapter_stats(model, 1, before=snapshot_adapters(model), after_backward=True)
    for a, b in zip(on_cpu.layers, on_gpu.layers, strict=True):
        assert b.delta_norm == pytest.approx(a.delta_norm, rel=1e-4)
        assert b.singular_values == pytest.approx(a.singular_values, rel=1e-4, abs=1e-6)
        assert b.b_grad_norm == pytest.approx(a.b_grad_norm, rel=1e-4)
