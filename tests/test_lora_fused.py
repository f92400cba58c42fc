"""The fused LoRA layer (lora/fused.py) computes what the module-by-module layer computes, gradients included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_widgets.lora.fused import can_fuse, fused_lora_linear
from lora_widgets.lora.layers import LoRALinear


def _reference(layer: LoRALinear, x: torch.Tensor, lora_x: torch.Tensor) -> torch.Tensor:
    """The layer as separate modules: base(x) + scaling * B(A(lora_x))."""
    return layer.base_layer(x) + layer.lora_B(layer.lora_A(lora_x)) * layer.scaling


def _layer(dtype: torch.dtype = torch.float64, bias: bool = True, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10, bias=bias, dtype=dtype), r=4, alpha=8, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_of_the_fused_node(bias: bool) -> None:
    layer = _layer(bias=bias)
    base = layer.base_layer
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)  # [batch, tokens, in]
    xd = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)  # a separate LoRA input (dropout)

    def same(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fused_lora_linear(x, x, base.weight, base.bias, a, b, 2.0)

    def separate(x: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fused_lora_linear(x, xd, base.weight, base.bias, a, b, 2.0)

    assert torch.autograd.gradcheck(same, (x, a, b))
    assert torch.autograd.gradcheck(separate, (x, xd, a, b))


def test_forward_and_gradients_equal_the_module_layer_and_base_gets_none() -> None:
    layer = _layer(torch.float32)
    assert can_fuse(layer.base_layer, torch.zeros(1, 12), layer.lora_A.weight, layer.lora_B.weight)
    x = torch.randn(4, 5, 12, requires_grad=True)
    g = torch.randn(4, 5, 10)
    layer(x).backward(g)
    got = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    _reference(layer, x, x).backward(g)
    want = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_dropout_masks_only_the_lora_branch() -> None:
    layer = _layer(torch.float32, dropout=0.5).train()
    x = torch.randn(6, 12, requires_grad=True)
    g = torch.randn(6, 10)
    torch.manual_seed(3)
    layer(x).backward(g)
    got = (x.grad, layer.lora_A.weight.grad)
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    torch.manual_seed(3)
    _reference(layer, x, layer.lora_dropout(x)).backward(g)
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], layer.lora_A.weight.grad)


def test_input_without_grad_and_no_grad_mode() -> None:
    layer = _layer(torch.float32)
    x = torch.randn(3, 12)
    layer(x).sum().backward()  # only the factors need gradients
    assert layer.lora_A.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x, x))


def test_under_bf16_autocast_it_matches_the_modules_and_factor_grads_stay_fp32() -> None:
    layer = _layer(torch.float32)
    x = torch.randn(8, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = _reference(layer, x, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.dtype == torch.float32


def test_bf16_layer_matches_the_modules() -> None:
    layer = _layer(torch.bfloat16)
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), _reference(layer, x, x), rtol=2e-2, atol=2e-2)


def test_what_is_not_fused_takes_the_module_path() -> None:
    layer = _layer(torch.float32)
    x = torch.randn(2, 12)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    calls: list[int] = []
    handle = layer.base_layer.register_forward_hook(lambda *_: calls.append(1))
    assert not can_fuse(layer.base_layer, x, a, b)  # a hook must run
    torch.testing.assert_close(layer(x), _reference(layer, x, x))
    assert calls  # the base layer was called as a module
    handle.remove()
    assert not can_fuse(layer.base_layer, x.double(), a, b)  # dtypes differ without autocast
    layer.base_layer.weight.requires_grad_(True)
    assert not can_fuse(layer.base_layer, x, a, b)  # a trainable base needs its own gradient


def test_merged_and_disabled_layers_call_only_the_base() -> None:
    layer = _layer(torch.float32)
    x = torch.randn(2, 12)
    calls: list[str] = []
    for name in ("lora_A", "lora_B", "base_layer"):
        getattr(layer, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    layer.merge()
    layer(x)
    assert calls == ["base_layer"]
    layer.unmerge()
    layer.enabled = False
    calls.clear()
    layer(x)
    assert calls == ["base_layer"]
