r"""A frozen ``nn.Linear`` plus its LoRA update in one autograd node, at the cost of its FLOPs.

At d = 2048, r = 16 the update ``scaling * B A x`` adds 3 r / d = 2.3% to the FLOPs of a frozen layer's forward
and backward (forward: ``x A^T`` and ``h B^T``; backward: ``g B``, ``g^T h``, ``dh^T x`` and ``dh A``, each
2 N d r against the base's 2 N d^2 twice). Built from separate modules, autograd also makes memory passes
over ``[N, d]`` tensors that cost more than those FLOPs on a CPU: a new tensor for ``h B^T`` and a sum
``base + update`` in the forward, and in the backward a separate ``dh A`` summed into ``g W`` when the two
branches' gradients of ``x`` meet. Here both sums happen inside the matrix products (``addmm_`` with
beta = 1, as PEFT's layer cannot, since it calls its base layer as a module):

    forward:  out = x W^T + b;   h = x_l A^T   [N, r];   out += s h B^T           (in place, no new [N, d])
    backward: dh = g B [N, r];   dB = s g^T h;   dA = s dh^T x_l;   dx = g W, dx += s dh A   (in place)

Here ``x_l`` is the input of the LoRA branch (``x`` itself, or ``dropout(x)``; then its gradient ``s dh A`` is
returned separately and autograd applies the dropout mask). Only ``h`` ([N, r]) is saved besides the
inputs. Backward formulas: the matrix-product rules, e.g. Giles 2008, "An extended collection of matrix
derivative results for forward and reverse mode algorithmic differentiation", sec. 2.2.2.

How the four thin products with N (tokens) as a long side are written depends on the dtype; the numbers are
the same either way (bit for bit, measured), only the speed differs (a 2-core AVX-512 CPU, torch 2.13, d = 2048,
r = 16, N = 2048):

* bf16: N is the last dimension of the result, or the reduction over N is a plain row-major product
  (``(A x^T)^T`` for ``x A^T``, ``(h^T g)^T`` for ``g^T h``, ...): 5-7x faster than the plain forms.
* fp32: the plain forms ``x A^T``, ``g B`` and ``dh^T x``: a layer's forward and backward at 1.037-1.039 of the
  frozen base against 1.045-1.047 with bf16's forms (one thread, interleaved rounds); ``dh^T x`` alone took
  1.95 ms against 3.39 ms for ``(x^T dh)^T``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

__all__ = ["can_fuse", "fused_lora_linear"]


class _FusedLoRALinear(torch.autograd.Function):
    """``x W^T + b + s (x_l A^T) B^T`` with W and b frozen (they get no gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # [N, in]
        lora_x: torch.Tensor,  # [N, in]: x, or dropout(x)
        weight: torch.Tensor,  # [out, in], frozen
        bias: torch.Tensor | None,  # [out], frozen
        lora_a: torch.Tensor,  # [r, in]
        lora_b: torch.Tensor,  # [out, r]
        scaling: float,
    ) -> torch.Tensor:
        plain = lora_x.dtype == torch.float32  # fp32: plain row-major forms; else N last (module docstring)
        hidden = lora_x @ lora_a.t() if plain else (lora_a @ lora_x.t()).t()  # [N, r]: [N, in] @ [in, r]
        out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())  # [N, out]
        out.addmm_(hidden, lora_b.t(), alpha=scaling)  # [N, out] += s [N, r] @ [r, out]
        ctx.save_for_backward(lora_x, weight, lora_a, lora_b, hidden)
        ctx.scaling = scaling
        ctx.same_input = lora_x is x
        ctx.plain = plain  # the backward's thin products take the same forms
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # grad: [N, out]
        lora_x, weight, lora_a, lora_b, hidden = ctx.saved_tensors
        s = ctx.scaling
        plain = ctx.plain
        grad_hidden = grad @ lora_b if plain else (lora_b.t() @ grad.t()).t()  # [N, r]
        grad_b = grad_a = None
        if ctx.needs_input_grad[5]:
            grad_b = (hidden.t() @ grad).mul_(s).t()  # [out, r] = s ([r, N] @ [N, out])^T
        if ctx.needs_input_grad[4]:
            # [r, in] = s [r, N] @ [N, in], or s ([in, N] @ [N, r])^T
            grad_a = (grad_hidden.t() @ lora_x if plain else (lora_x.t() @ grad_hidden).t()).mul_(s)
        grad_x = grad_lora_x = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.same_input:
                grad_x = (grad @ weight).addmm_(grad_hidden, lora_a, alpha=s)  # [N, in]
            else:
                grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # [N, in]
                grad_lora_x = (
                    torch.mm(grad_hidden, lora_a * s) if ctx.needs_input_grad[1] else None
                )  # [N, in]
        return grad_x, grad_lora_x, None, None, grad_a, grad_b, None


def fused_lora_linear(
    x: torch.Tensor,
    lora_x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x @ weight^T + bias + scaling * lora_x @ lora_a^T @ lora_b^T`` for ``x`` of shape ``[..., in]``, in one
    node: a frozen ``nn.Linear(weight [out, in], bias [out])`` plus its LoRA update.

    ``weight`` and ``bias`` must be frozen (they get no gradient). Under ``torch.autocast`` the operands are cast to
    the autocast dtype as ``nn.Linear`` would cast them (the factors' gradients flow back through the cast).
    """
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        dtype = torch.get_autocast_dtype(device)
        same = lora_x is x
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        lora_x = x if same else lora_x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    lead = x.shape[:-1]
    flat_x = x.reshape(-1, x.shape[-1])  # [N, in]
    flat_lora_x = flat_x if lora_x is x else lora_x.reshape(-1, lora_x.shape[-1])  # [N, in]
    # the operands are cast already: autocast, if on, must not cast them again inside (entered only then: the
    # context manager alone costs a few microseconds a call, a tenth of the node's own Python)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        out = _FusedLoRALinear.apply(flat_x, flat_lora_x, weight, bias, lora_a, lora_b, scaling)  # [N, out]
    return out.view(*lead, out.shape[-1])  # [..., out]


def can_fuse(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether :func:`fused_lora_linear` computes exactly what calling the modules would: a plain, frozen
    ``nn.Linear`` base (not a subclass such as a quantized layer) with no forward hooks to run, whose weight,
    the factors and ``x`` share one dtype (or autocast picks the dtype, as it would for the modules)."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    return len({x.dtype, base.weight.dtype, lora_a.dtype, lora_b.dtype}) == 1
