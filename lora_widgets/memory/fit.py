r"""Memory of one training step: predict it before training, measure it, and suggest what would fit.

The public face of the memory tools. :func:`estimate_memory` (in :mod:`lora_widgets.memory.estimate`)
predicts the **peak** bytes of one steady-state training step; :func:`measure_memory` (in
:mod:`lora_widgets.memory.measure`) runs real steps and measures that peak; :func:`suggest_fit` and
:func:`preflight`, here, turn the estimate into advice. The formulas, their sources and a table of
estimates against measurements are in ``docs/memory.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_widgets.lora.layers import LoRAConfig, as_lora_config, has_lora
from lora_widgets.memory.arch import known_models, parse_dtype
from lora_widgets.memory.estimate import (
    CUDA_CONTEXT_BYTES,
    GiB,
    MemoryEstimate,
    estimate_memory,
    format_bytes,
)
from lora_widgets.memory.measure import (
    LiveBytesTracker,
    MemoryMeasurement,
    measure_memory,
    resolve_device,
    storage_bytes,
)
from lora_widgets.memory.quant import estimator_name

__all__ = [
    "GPUS",
    "LiveBytesTracker",
    "MemoryEstimate",
    "MemoryMeasurement",
    "PreflightResult",
    "available_memory",
    "estimate_memory",
    "format_bytes",
    "known_models",
    "measure_memory",
    "parse_dtype",
    "preflight",
    "suggest_fit",
]

#: Common GPUs and their memory in bytes (what the planner and the fit table check against): the total torch
#: reports for the card (``torch.cuda.get_device_properties(0).total_memory``, the "total capacity" of its
#: out-of-memory message), rounded down, not the marketed size. Figures read from users' out-of-memory reports:
#: T4 14.56-14.76 GiB, A10 21.99, A100 40 GB 39.39-39.59, A100 80 GB 79.25-79.35, H100 80 GB 79.11.
GPUS: dict[str, int] = {
    "T4 16 GB": int(14.5 * GiB),
    "L4 24 GB": int(21.9 * GiB),
    "A10G 24 GB": int(21.9 * GiB),
    "A100 40 GB": int(39.3 * GiB),
    "A100 80 GB": int(79.1 * GiB),
    "H100 80 GB": int(79.1 * GiB),
}

# ----------------------------------------------------------------------------------------------
# Advice
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FitSearch:
    """Estimates of the planned step with some settings changed, measured against the memory available."""

    model_or_config: Any
    settings: dict[str, Any]  # lora, batch_size, seq_len, dtype, gradient_checkpointing, weight_dtype
    available_bytes: int
    cuda: bool

    def estimate(self, **changes: Any) -> MemoryEstimate:
        return estimate_memory(self.model_or_config, **{**self.settings, **changes})

    def need(self, e: MemoryEstimate) -> int:
        return e.required_bytes(self.cuda)

    def fits(self, e: MemoryEstimate) -> bool:
        return self.need(e) <= self.available_bytes

    def largest_batch(self, **changes: Any) -> tuple[int, MemoryEstimate] | None:
        """The largest batch size that fits with ``changes`` (below the planned one when nothing changes)."""
        batch_size = self.settings["batch_size"]
        lo, hi = 0, batch_size - 1 if not changes else batch_size
        best: tuple[int, MemoryEstimate] | None = None
        while lo < hi:  # binary search on the (monotone) estimate
            mid = (lo + hi + 1) // 2
            e = self.estimate(batch_size=mid, **changes)
            if self.fits(e):
                lo, best = mid, (mid, e)
            else:
                hi = mid - 1
        return best


def _smaller_batch_tip(fit: _FitSearch) -> str | None:
    found = fit.largest_batch()
    if found is None:
        return None
    b, e = found
    accum = math.ceil(fit.settings["batch_size"] / b)
    return (
        f"batch_size={b} fits (peak {format_bytes(e.total)} of {format_bytes(fit.available_bytes)}); use "
        f"grad_accum_steps={accum} to keep an effective batch of ~{b * accum}"
    )


def _checkpointing_tip(fit: _FitSearch) -> str | None:
    if fit.settings["gradient_checkpointing"]:
        return None
    e = fit.estimate(gradient_checkpointing=True)
    if fit.fits(e):
        return (
            f"turn on gradient_checkpointing=True (peak {format_bytes(e.total)} at "
            f"batch_size={fit.settings['batch_size']})"
        )
    found = fit.largest_batch(gradient_checkpointing=True)
    if found is None:
        return None
    return (
        f"gradient_checkpointing=True with batch_size={found[0]} fits (peak {format_bytes(found[1].total)})"
    )


def _rank_tip(fit: _FitSearch) -> str | None:
    lora: LoRAConfig | None = fit.settings["lora"]
    if lora is None or lora.r <= 1:
        return None
    for r in (r for r in (64, 32, 16, 8, 4, 2, 1) if r < lora.r):
        e = fit.estimate(lora=dataclasses.replace(lora, r=r))
        if fit.fits(e):
            return f"a smaller rank r={r} fits (peak {format_bytes(e.total)})"
    return None


def _base_tip(fit: _FitSearch) -> str | None:
    """A 4-bit base (QLoRA) for a run planned on a 16-bit one; with LoRA r=16 when it was full fine-tuning."""
    if fit.settings.get("base_quantization") or estimator_name(fit.model_or_config) is not None:
        return None
    lora = fit.settings["lora"] or LoRAConfig(r=16)
    best = fit.largest_batch(lora=lora, base_quantization="4bit")
    if best is None:
        return None
    batch, e = best
    how = "" if fit.settings["lora"] is not None else " with LoRA (r=16)"
    return (
        f"a 4-bit base (QLoRA: load_model(..., base='4-bit'), needs bitsandbytes){how} fits with "
        f"batch_size={batch} (peak {format_bytes(e.total)})"
    )


def _seq_len_tip(fit: _FitSearch) -> str | None:
    for s in (s for s in (4096, 2048, 1024, 512, 256, 128, 64) if s < fit.settings["seq_len"]):
        e = fit.estimate(seq_len=s)
        if fit.fits(e):
            return f"seq_len={s} fits (peak {format_bytes(e.total)})"
    return None


def _lora_tip(fit: _FitSearch) -> str | None:
    if fit.settings["lora"] is not None:
        return None
    e = fit.estimate(lora=LoRAConfig(r=16))
    return (
        f"LoRA (r=16) instead of full fine-tuning fits (peak {format_bytes(e.total)})"
        if fit.fits(e)
        else None
    )


def suggest_fit(
    model_or_config: Any,
    lora: LoRAConfig | None,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype | str,
    available_bytes: int,
    gradient_checkpointing: bool = False,
    cuda: bool = True,
    weight_dtype: torch.dtype | str | None = None,
) -> list[str]:
    """Concrete changes that would make the step fit in ``available_bytes`` (empty if it already fits).

    Tried in order of how little they change the run: the largest batch size that fits (same everything
    else), gradient checkpointing (with the largest batch size that then fits), a 4-bit base (QLoRA, for a
    16-bit model), a smaller LoRA rank, a shorter sequence length, LoRA instead of full fine-tuning. Each suggestion states the predicted peak.
    ``cuda`` adds the CUDA context and fragmentation allowance (see :meth:`MemoryEstimate.required_bytes`).
    ``weight_dtype``: as in :func:`estimate_memory`; ``None`` with a model: its parameters' dtype (an fp32
    model with ``dtype="bfloat16"`` is then mixed precision, as the LoRATrainer runs it).
    """
    if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes <= 0:
        raise ValueError(f"available_bytes must be a positive integer, got {available_bytes!r}")
    lora = None if lora is None else as_lora_config(lora, "lora")
    if weight_dtype is None:
        weight_dtype = _param_dtype(model_or_config)
    settings = {
        "lora": lora,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "weight_dtype": weight_dtype,
        "foreach": bool(cuda),  # PyTorch's AdamW default: foreach on a GPU, single-tensor on a CPU
    }
    fit = _FitSearch(_for_estimate(model_or_config, lora), settings, available_bytes, bool(cuda))
    if fit.fits(fit.estimate()):
        return []
    tips = [_smaller_batch_tip, _checkpointing_tip, _base_tip, _rank_tip, _seq_len_tip, _lora_tip]
    out = [tip for tip in (make(fit) for make in tips) if tip is not None]
    if not out:
        out.append(
            f"nothing simple fits in {format_bytes(available_bytes)}: even batch_size=1 needs "
            f"{format_bytes(fit.need(fit.estimate(batch_size=1)))}; use a smaller model, a 4-bit base (QLoRA) "
            "or a device with more memory"
        )
    return out


@dataclass(frozen=True)
class PreflightResult:
    """Whether a planned run fits on its device, with the estimate and what to change if not."""

    fits: bool
    estimate: MemoryEstimate
    available_bytes: int
    suggestions: list[str]
    device: str = "cpu"

    @property
    def available(self) -> int:
        """Alias of ``available_bytes``."""
        return self.available_bytes

    def message(self) -> str:
        """One paragraph for a UI: fits / does not fit, the breakdown and the suggestions."""
        cuda = self.device.startswith("cuda")
        allowance = self.estimate.required_bytes(cuda) - self.estimate.total
        what = "the CUDA context and fragmentation" if cuda else "torch's CPU runtime"
        head = (
            f"Predicted peak {format_bytes(self.estimate.total)} ({self.estimate.peak_phase}) + "
            f"{format_bytes(allowance)} for {what} vs {format_bytes(self.available_bytes)} available on "
            f"{self.device}: " + ("fits." if self.fits else "will NOT fit.")
        )
        if self.fits:
            return head
        return head + "\n" + "\n".join(f"- {s}" for s in self.suggestions)


def _param_dtype(model: Any) -> torch.dtype | None:
    """The dtype of a model's floating parameters (None for configs and names)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _for_estimate(model: Any, lora: LoRAConfig | None) -> Any:
    """A model that already carries the adapters ``lora`` describes is estimated from its config + ``lora``
    (the trainer applies LoRA before it runs; its OOM handler passes that model)."""
    if isinstance(model, nn.Module) and lora is not None and has_lora(model):
        return getattr(model, "config", model)
    return model


def available_memory(device: torch.device | str | None = None) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on a GPU, available RAM (psutil) on a CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        return total - int(torch.mps.current_allocated_memory())
    import psutil

    return int(psutil.virtual_memory().available)


def preflight(
    model: Any,
    lora: LoRAConfig | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    available_bytes: int | None = None,
    weight_dtype: torch.dtype | str | None = None,
) -> PreflightResult:
    """Compare the estimate with the device's free memory before a run; suggest changes if it won't fit.

    ``dtype`` is the compute dtype; ``weight_dtype`` defaults to the model's parameter dtype, so an fp32
    model with ``dtype="bfloat16"`` is estimated as mixed precision (autocast), as the LoRATrainer runs it.

    On a GPU, memory the model already occupies counts as used (``mem_get_info`` reports what is free now),
    so the estimate's weights are added back when the model already lives on that device. Without
    ``available_bytes`` the device must exist here (``device="cuda"`` on a CPU-only build is refused, naming
    it); with it, ``device`` only says whether the CUDA context and fragmentation allowance apply.
    """
    # with an explicit budget nothing is asked of the device: it may be another machine's (planning)
    dev = resolve_device(device, present=available_bytes is None)
    if available_bytes is not None and (
        isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes <= 0
    ):
        raise ValueError(
            f"available_bytes must be a positive integer or None, got available_bytes={available_bytes!r}"
        )
    if weight_dtype is None:
        weight_dtype = _param_dtype(model)
    estimate = estimate_memory(
        _for_estimate(model, lora),
        lora,
        batch_size,
        seq_len,
        dtype,
        gradient_checkpointing=gradient_checkpointing,
        weight_dtype=weight_dtype,
        foreach=dev.type == "cuda",  # PyTorch's AdamW default (the trainer's): foreach on a GPU only
    )
    cuda = dev.type == "cuda"
    if available_bytes is None:
        available_bytes = available_memory(dev)
        if isinstance(model, nn.Module):
            on_device = [p for p in model.parameters() if p.device.type == dev.type]
            available_bytes += storage_bytes(iter(on_device))
        if cuda:
            available_bytes += CUDA_CONTEXT_BYTES  # the context already exists in this process
    fits = estimate.required_bytes(cuda) <= available_bytes
    suggestions = (
        []
        if fits
        else suggest_fit(
            model,
            lora,
            batch_size,
            seq_len,
            dtype,
            available_bytes,
            gradient_checkpointing,
            cuda=cuda,
            weight_dtype=weight_dtype,
        )
    )
    return PreflightResult(fits, estimate, int(available_bytes), suggestions, str(dev))
