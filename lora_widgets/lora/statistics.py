r"""What each LoRA adapter has learned so far, measured cheaply and exactly: the numbers behind "is it training?".

For every LoRA layer (ours, :class:`~lora_widgets.lora.layers.LoRALinear`, or PEFT's) with frozen weight
:math:`W \in \mathbb{R}^{d_{out} \times d_{in}}`, factors :math:`B \in \mathbb{R}^{d_{out} \times r}`,
:math:`A \in \mathbb{R}^{r \times d_{in}}` and update :math:`\Delta W = s\,BA` (``s`` = ``scaling``):

- ``relative_update`` :math:`= \|\Delta W\|_F / \|W\|_F`: how far the adapter has moved the layer;
- the norms of A and B and of their gradients (a missing gradient after ``backward()`` means no gradient
  reached the adapter: the bug of the notebook this project grew from);
- the singular values of :math:`\Delta W`, without forming it. Hu et al. 2021 ("LoRA", arXiv:2106.09685,
  sec. 7.2-7.3) read the adaptation through this spectrum: the update is dominated by very few directions
  (a tiny "intrinsic rank"), and it amplifies directions the pre-trained weight did not emphasise. A spectrum
  with one or two large values says that a smaller r would have done; a flat one that r may be limiting;
- ``update_ratio`` :math:`= \|\Delta W_t - \Delta W_{t-1}\|_F / \|W\|_F`, the size of the last optimizer
  step on the effective weight, when a :func:`snapshot_adapters` from before the step is given (see
  :mod:`lora_widgets.health.alerts` for what values are healthy).

Everything runs under ``torch.no_grad()`` in float32 whatever the training dtype, on the model's device,
with layers of the same shapes batched together and one device-to-host transfer at the end. The cost per
layer is two QR factorisations of thin matrices, O((d_out + d_in) r^2), an r x r SVD, and one read of W
for its norm: a small fraction of a training step (``benchmarks/bench_adapter_stats.py``).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_widgets.events.types import AdapterLayerStats, AdapterStats
from lora_widgets.lora.dora import base_of_merged_dora
from lora_widgets.lora.layers import LoRALinear
from lora_widgets.quantization import frozen_weight

__all__ = [
    "AdapterSnapshot",
    "AdapterSummary",
    "adapter_stats",
    "lowrank_singular_values",
    "snapshot_adapters",
    "summarize_adapter_stats",
]


@dataclass(frozen=True)
class _Adapter:
    """One adapter, whatever library made it: its factors, scaling and the frozen weight W (not W + dW)."""

    name: str
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scaling: float
    weight: torch.Tensor  # [d_out, d_in] (or [d_in, out] for Conv1D: norms do not care)
    merged_delta: torch.Tensor | None  # dW to subtract when the adapter is merged into `weight`


def _peft_adapter(name: str, module: nn.Module) -> _Adapter | None:
    """A PEFT LoRA layer (``lora_A``/``lora_B`` ModuleDicts keyed by adapter name), its first active adapter."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return None
    active = [k for k in getattr(module, "active_adapters", list(lora_a)) if k in lora_a]
    base = getattr(module, "base_layer", None)
    if not active or not isinstance(getattr(base, "weight", None), torch.Tensor):
        return None
    key = active[0]
    a: torch.Tensor = lora_a[key].weight  # type: ignore[assignment]  # [r, d_in]
    b: torch.Tensor = lora_b[key].weight  # type: ignore[assignment]  # [d_out, r]
    scaling = float(module.scaling[key])  # type: ignore[index]
    merged = bool(getattr(module, "merged", False))
    delta = (b.float() @ a.float()) * scaling if merged else None  # [d_out, d_in]
    if delta is not None and getattr(module, "fan_in_fan_out", False):
        delta = delta.T
    return _Adapter(name, a, b, scaling, frozen_weight(base), delta)  # type: ignore[arg-type]


def _adapters(model: nn.Module) -> list[_Adapter]:
    out: list[_Adapter] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a, b = module.lora_A.weight, module.lora_B.weight
            delta = module.delta_weight().float() if module.merged else None
            weight = frozen_weight(module.base_layer)  # a quantized base dequantized: ||W|| in numbers
            if (
                delta is not None and module.lora_magnitude_vector is not None
            ):  # merged DoRA: W0 = W n/m - s B A
                weight, delta = base_of_merged_dora(module), None
            out.append(_Adapter(name, a, b, float(module.scaling), weight, delta))
        elif (peft := _peft_adapter(name, module)) is not None:
            out.append(peft)
    if not out:
        raise ValueError(
            f"the model ({type(model).__name__}) has no LoRA layers; call lora_widgets.apply_lora(model, config) "
            "(or wrap it with PEFT) before asking for adapter statistics"
        )
    return out


def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    r"""Singular values of ``scaling * b @ a`` (descending) without forming the product; batched over leading dims.

    The identity: with thin QR factorisations

    .. code-block:: text

        B   = Q_B R_B      B: [d_out, r]   Q_B: [d_out, r] orthonormal columns   R_B: [r, r]
        A^T = Q_A R_A      A: [r, d_in]    Q_A: [d_in, r]  orthonormal columns   R_A: [r, r]
        s B A = Q_B (s R_B R_A^T) Q_A^T                                          M = s R_B R_A^T: [r, r]

    multiplying by matrices with orthonormal columns on the left (Q_B) and by the transpose of one on the
    right (Q_A^T) leaves singular values unchanged, so the r singular values of M are those of the
    d_out x d_in matrix s B A (the others are zero). Cost O((d_out + d_in) r^2 + r^3) instead of
    O(d_out d_in r) for the product and O(d_out d_in min(d_out, d_in)) for its SVD. Also holds for r > d
    (R is then [d, r] and M [min(d_out, r), min(d_in, r)]).

    Args:
        b: ``[..., d_out, r]``; a: ``[..., r, d_in]``; computed in float32 (or float64 if given float64).
    """
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    b, a = b.to(dtype), a.to(dtype)
    # A diverged run has NaN/inf factors; the SVD refuses them, so those matrices get NaN singular values.
    bad = ~(torch.isfinite(b).flatten(-2).all(-1) & torch.isfinite(a).flatten(-2).all(-1))  # [...]
    b, a = b.masked_fill(bad[..., None, None], 0.0), a.masked_fill(bad[..., None, None], 0.0)
    r_b = torch.linalg.qr(b, mode="r").R  # [..., r, r]
    r_a = torch.linalg.qr(a.mT, mode="r").R  # [..., r, r]
    sv = torch.linalg.svdvals((r_b @ r_a.mT) * scaling)  # [..., r]
    return sv.masked_fill(bad[..., None], math.nan)


def _lowrank_fro(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||u @ v||_F for u [..., d_out, k], v [..., k, d_in] through the same QR identity (no d_out x d_in product).
    Non-finite inputs give NaN (QR propagates them; only the SVD refuses them)."""
    r_u = torch.linalg.qr(u, mode="r").R  # [..., k, k]
    r_v = torch.linalg.qr(v.mT, mode="r").R  # [..., k, k]
    return torch.linalg.matrix_norm(r_u @ r_v.mT)  # [...]


@dataclass(frozen=True)
class AdapterSnapshot:
    """Copies of every adapter's factors (A, B) at one moment: pass it to :func:`adapter_stats` to measure
    the update made since. Costs the adapters' size in memory, nothing of the frozen model."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def snapshot_adapters(model: nn.Module) -> AdapterSnapshot:
    """Copy A and B of every LoRA layer (call it just before ``optimizer.step()``)."""
    return AdapterSnapshot(
        {ad.name: (ad.a.detach().clone(), ad.b.detach().clone()) for ad in _adapters(model)}
    )


def _layer_index(name: str) -> int | None:
    """The first all-digit component of a module path: ``model.layers.3.self_attn.q_proj`` -> 3."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _module_kinds(names: Sequence[str]) -> dict[str, str]:
    """Shortest path suffix (after the block index) that tells apart the adapted modules of one block:
    ``q_proj`` for Llama, but ``attn.c_proj`` and ``mlp.c_proj`` for GPT-2 (both end in ``c_proj``)."""
    tails = {n: re.split(r"(?:^|\.)\d+\.", n)[-1] for n in names}  # path after the last block index
    kinds: dict[str, str] = {}
    for name, tail in tails.items():
        parts = tail.split(".")
        for k in range(1, len(parts) + 1):
            kind = ".".join(parts[-k:])
            clash = any(t != tail and (t == kind or t.endswith("." + kind)) for t in tails.values())
            if not clash:
                break
        kinds[name] = kind
    return kinds


def _grad_norm(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else torch.linalg.vector_norm(p.grad, dtype=torch.float32)


def _group_numbers(group: list[_Adapter], snapshot: AdapterSnapshot | None) -> dict[str, torch.Tensor]:
    """Per-layer numbers of adapters that share shapes and device, computed batched (tensors of [n])."""
    a = torch.stack([ad.a.detach() for ad in group]).float()  # [n, r, d_in]
    b = torch.stack([ad.b.detach() for ad in group]).float()  # [n, d_out, r]
    s = torch.tensor([ad.scaling for ad in group], device=a.device)  # [n]
    sv = lowrank_singular_values(b, a) * s[:, None]  # [n, r]
    w_norm = torch.stack(
        [
            torch.linalg.vector_norm(ad.weight.detach(), dtype=torch.float32)
            if ad.merged_delta is None
            else torch.linalg.vector_norm(ad.weight.detach().float() - ad.merged_delta)
            for ad in group
        ]
    )  # [n]
    out = {
        "sv": sv,
        "w": w_norm,
        "a": torch.linalg.matrix_norm(a),
        "b": torch.linalg.matrix_norm(b),
    }
    if snapshot is not None:
        a0 = torch.stack([snapshot.factors[ad.name][0] for ad in group]).float()  # [n, r, d_in]
        b0 = torch.stack([snapshot.factors[ad.name][1] for ad in group]).float()  # [n, d_out, r]
        # dW_t - dW_(t-1) = s (B1 A1 - B0 A0) = s [B1 - B0, B0] [A1; A1 - A0]: the differences are taken
        # factor by factor, so a tiny step is not lost to cancellation between two large products.
        u = torch.cat([b - b0, b0], dim=-1)  # [n, d_out, 2r]
        v = torch.cat([a, a - a0], dim=-2)  # [n, 2r, d_in]
        out["step"] = _lowrank_fro(u, v) * s.abs()  # [n]
    return out


def _check_snapshot(adapters: list[_Adapter], snapshot: AdapterSnapshot) -> None:
    for ad in adapters:
        old = snapshot.factors.get(ad.name)
        if old is None or old[0].shape != ad.a.shape or old[1].shape != ad.b.shape:
            raise ValueError(
                f"before= is a snapshot of other adapters (layer {ad.name!r} is missing or has another shape); "
                "take it with snapshot_adapters(model) on this model just before optimizer.step()"
            )


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else (math.nan if math.isnan(num) else 0.0)


@torch.no_grad()
def adapter_stats(
    model: nn.Module,
    step: int,
    *,
    before: AdapterSnapshot | None = None,
    after_backward: bool = False,
    learning_rate: float | None = None,
) -> AdapterStats:
    """Statistics of every LoRA layer of ``model`` after ``step`` optimizer updates, as an event.

    Args:
        model: a model with lora_widgets (or PEFT) LoRA layers.
        step: optimizer updates completed (the numbering of :class:`~lora_widgets.events.types.StepMetrics`).
        before: a :func:`snapshot_adapters` taken before the last ``optimizer.step()``: fills ``update_ratio``.
        after_backward: say True when called between ``backward()`` and ``zero_grad()``: a missing gradient
            then means that no gradient reached the adapter (what the "no gradient" alert reads).
        learning_rate: the rate of the last update, recorded for the update-size alert.

    Raises:
        ValueError: the model has no LoRA layers, ``step`` is negative, or ``before`` does not match.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 (updates completed), got {step!r}")
    start = time.perf_counter()
    adapters = _adapters(model)
    if before is not None:
        _check_snapshot(adapters, before)
    groups: dict[tuple[object, ...], list[_Adapter]] = {}
    for ad in adapters:
        groups.setdefault((tuple(ad.a.shape), tuple(ad.b.shape), ad.a.device), []).append(ad)
    numbers: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups.values():
        batch = _group_numbers(group, before)
        for i, ad in enumerate(group):
            numbers[ad.name] = {k: v[i] for k, v in batch.items()}
    for ad in adapters:  # gradients: some may be None, so layer by layer
        for key, p in (("ga", ad.a), ("gb", ad.b)):
            g = _grad_norm(p)
            if g is not None:
                numbers[ad.name][key] = g
    # One transfer to the host for everything (a single device sync).
    flat = [(n, k, v) for n, d in numbers.items() for k, v in d.items()]
    host = torch.cat([v.reshape(-1).float().cpu() for _, _, v in flat]).tolist() if flat else []
    values: dict[str, dict[str, list[float]]] = {}
    pos = 0
    for n, k, v in flat:
        values.setdefault(n, {})[k] = host[pos : pos + v.numel()]
        pos += v.numel()
    kinds = _module_kinds([ad.name for ad in adapters])
    rows = []
    for ad in adapters:
        got = values[ad.name]
        sv = tuple(got["sv"])
        delta = math.sqrt(sum(x * x for x in sv))  # ||dW||_F^2 = sum of sigma_i^2
        w = got["w"][0]
        rows.append(
            AdapterLayerStats(
                name=ad.name,
                layer=_layer_index(ad.name),
                module=kinds[ad.name],
                rank=int(ad.a.shape[0]),
                scaling=ad.scaling,
                weight_norm=w,
                delta_norm=delta,
                relative_update=_ratio(delta, w),
                a_norm=got["a"][0],
                b_norm=got["b"][0],
                a_grad_norm=got["ga"][0] if "ga" in got else None,
                b_grad_norm=got["gb"][0] if "gb" in got else None,
                singular_values=sv,
                update_ratio=_ratio(got["step"][0], w) if "step" in got else None,
            )
        )
    seconds = time.perf_counter() - start
    return AdapterStats(step, tuple(rows), bool(after_backward), learning_rate, seconds)


@dataclass(frozen=True)
class AdapterSummary:
    """The whole model at a glance (from :func:`summarize_adapter_stats`).

    ``relative_update``: ``sqrt(sum ||dW||^2) / sqrt(sum ||W||^2)`` over the adapted layers;
    ``max_relative_update`` and ``max_layer``: the layer that moved most; ``median_update_ratio``: median of the
    layers' last-step ``update_ratio`` (None when not measured); ``grad_norm``: global norm of the adapters'
    gradients (None when no layer has one); ``no_gradient``: layers whose A and B both have no or an all-zero
    gradient (meaningful when ``after_backward``); ``b_zero``: layers whose B is still exactly zero.
    """

    step: int
    n_layers: int
    relative_update: float
    max_relative_update: float
    max_layer: str
    median_update_ratio: float | None
    grad_norm: float | None
    no_gradient: tuple[str, ...]
    b_zero: tuple[str, ...]


def summarize_adapter_stats(stats: AdapterStats) -> AdapterSummary:
    """Reduce an :class:`~lora_widgets.events.types.AdapterStats` event to the few numbers a status line shows."""
    layers = stats.layers
    if not layers:
        raise ValueError("the AdapterStats event has no layers to summarise")
    total_delta = math.sqrt(sum(x.delta_norm**2 for x in layers))
    total_w = math.sqrt(sum(x.weight_norm**2 for x in layers))
    top = max(layers, key=lambda x: -math.inf if math.isnan(x.relative_update) else x.relative_update)
    ratios = [x.update_ratio for x in layers if x.update_ratio is not None]
    grads = [g for x in layers for g in (x.a_grad_norm, x.b_grad_norm) if g is not None]
    return AdapterSummary(
        step=stats.step,
        n_layers=len(layers),
        relative_update=_ratio(total_delta, total_w),
        max_relative_update=top.relative_update,
        max_layer=top.name,
        median_update_ratio=statistics.median(ratios) if ratios else None,
        grad_norm=math.sqrt(sum(g * g for g in grads)) if grads else None,
        no_gradient=tuple(x.name for x in layers if not (x.a_grad_norm or x.b_grad_norm)),
        b_zero=tuple(x.name for x in layers if x.b_norm == 0.0),
    )
