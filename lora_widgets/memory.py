r"""Memory of one training step: predict it before training, measure it, and suggest what would fit.

:func:`estimate_memory` predicts the **peak** bytes of one steady-state training step (forward, backward,
optimizer step), which is what ``torch.cuda.max_memory_allocated`` or an out-of-memory error sees.
:func:`measure_memory` runs real steps and measures that peak; :func:`suggest_fit` and :func:`preflight`
turn the estimate into advice. The formulas, their sources and a table of estimates against measurements
are in ``docs/memory.md``.

Why phases
    The peak is not the sum of weights + gradients + optimizer state + activations. During the forward pass
    the activations that autograd saves pile up; during the backward pass they are released layer by layer
    while gradients appear; the optimizer step runs after the last activation is gone, but needs the
    gradients, AdamW's two moments and (in PyTorch's ``foreach`` implementation) one temporary as large as
    all trainable parameters. So the step is modelled as three phases and the peak is their maximum.

Which step
    The estimate is the **steady-state** step (step 2 onwards): AdamW creates its moments lazily in the
    first ``step()``, so from the second step on they are resident during forward and backward as well.
    That step is the peak of the whole run (the first step's peak is never larger), and it is the step
    :func:`measure_memory` reports. Gradients are assumed freed between steps
    (``optimizer.zero_grad(set_to_none=True)``, PyTorch's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lora_widgets.lora import LoRAConfig, has_lora
from lora_widgets.memory_activations import ActivationModel, BlockBytes
from lora_widgets.memory_arch import (
    ArchInfo,
    ParamPlan,
    known_models,
    param_plan,
    parse_dtype,
    resolve_config,
)
from lora_widgets.memory_measure import (
    LiveBytesTracker,
    MemoryMeasurement,
    measure_memory,
    resolve_device,
    storage_bytes,
)

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

Phase = Literal["forward", "backward", "optimizer"]

_OPTIMIZERS = ("adamw", "adam", "sgd")
_QUANT = {"8bit": 1.0, "4bit": 0.5 + 0.127 / 8}  # bytes per quantized weight (see _weight_bytes)

GiB = 1024**3
#: Common GPUs and their memory in bytes (what the planner and the fit table check against).
GPUS: dict[str, int] = {
    "T4 16 GB": 15 * GiB,  # 16 GB marketed; 15.0 GiB usable as reported by torch
    "L4 24 GB": 22 * GiB,
    "A10G 24 GB": 22 * GiB,
    "A100 40 GB": 40 * GiB,
    "A100 80 GB": 80 * GiB,
    "H100 80 GB": 80 * GiB,
}
#: Memory a CUDA process holds outside ``max_memory_allocated``: the CUDA context and kernels (~0.3-0.5 GiB)
#: plus the caching allocator's fragmentation; added before comparing an estimate with a GPU's capacity.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
FRAGMENTATION = 0.05


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one training step, in bytes.

    The parts (``frozen_weights`` ... ``overhead``) are the full sizes of each kind of tensor; ``total`` is the
    predicted **peak**, the maximum over ``phases``, which is smaller than the sum of the parts.
    ``at_peak`` splits ``total`` into what is resident at that moment (it sums to ``total``), which is what
    the planner's stacked bar shows; ``phase_breakdown`` does the same for the worst moment of each phase.
    ``naive_total`` is the textbook sum, kept for comparison.
    """

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    activations: int  # tensors saved for backward at the end of the forward pass (incl. the log-softmax)
    overhead: int  # the batch, rotary tables and other small buffers
    total: int
    peak_phase: Phase
    phases: dict[str, int]
    at_peak: dict[str, int]
    trainable_params: int
    total_params: int
    batch_size: int
    seq_len: int
    dtype: str
    naive_total: int
    phase_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default=())
    weight_dtype: str = ""  # dtype of parameters, gradients and optimizer state ("" = dtype)

    @property
    def weights(self) -> int:
        """Frozen + trainable weights."""
        return self.frozen_weights + self.trainable_weights

    def fits(self, capacity_bytes: int, cuda: bool = True) -> bool:
        """Whether the peak fits in ``capacity_bytes`` of device memory (allowing for the CUDA context and
        allocator fragmentation when ``cuda``)."""
        return self.required_bytes(cuda) <= capacity_bytes

    def required_bytes(self, cuda: bool = True) -> int:
        """Device memory needed: ``total`` plus the CUDA context and ~5% fragmentation on a GPU."""
        if not cuda:
            return self.total
        return int(self.total * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def as_table(self) -> str:
        """A small text table of the breakdown (GiB/MiB), the phases and the peak."""
        rows = [
            ("frozen weights", self.frozen_weights),
            ("trainable weights", self.trainable_weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            ("overhead", self.overhead),
            ("naive sum", self.naive_total),
        ]
        rows += [(f"peak in {name}", value) for name, value in self.phases.items()]
        rows.append((f"TOTAL (peak, {self.peak_phase})", self.total))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {format_bytes(value):>10}" for name, value in rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return {
            "frozen_weights": self.frozen_weights,
            "trainable_weights": self.trainable_weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "overhead": self.overhead,
            "total": self.total,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "at_peak": dict(self.at_peak),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "naive_total": self.naive_total,
            "phase_breakdown": {k: dict(v) for k, v in self.phase_breakdown.items()},
            "notes": list(self.notes),
            "weight_dtype": self.weight_dtype or self.dtype,
        }


def format_bytes(n: float) -> str:
    """Human-readable bytes: '1.23 GiB', '456.0 MiB', '12.0 KiB'."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _weight_bytes(plan: ParamPlan, p: int, base_quantization: str | None) -> tuple[int, int]:
    """(frozen, trainable) weight bytes.

    4-bit: NF4 with double quantization stores 4 bits per weight plus 0.127 bits of quantization constants
    (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314, sec. 3: 32-bit block constants for blocks of 64 cost
    0.5 bit/param; quantizing them to 8 bit in blocks of 256 brings that to 8/64 + 32/(64*256) = 0.127).
    8-bit: LLM.int8() stores one byte per weight (Dettmers et al. 2022, arXiv:2208.07339, sec. 3); its row
    scales are negligible. Only the Linear weights inside the blocks are quantized (bitsandbytes keeps the
    embeddings, norms and the output head in the compute dtype).
    """
    frozen = plan.frozen * p
    if base_quantization is not None:
        q = _QUANT[base_quantization]
        frozen = int(plan.frozen_linear * q) + (plan.frozen - plan.frozen_linear) * p
    return frozen, plan.trainable * p


def estimate_memory(
    model_or_config: Any,
    lora: LoRAConfig | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    dtype: torch.dtype | str = "float32",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    base_quantization: str | None = None,
    weight_dtype: torch.dtype | str | None = None,
) -> MemoryEstimate:
    """Predict the peak memory of one training step of a causal language model.

    Args:
        model_or_config: a transformers model (counted as it is when ``lora`` is None: with its adapters if
            it has them, else full fine-tuning), a ``PretrainedConfig``, a known model name
            (:func:`known_models`), or a hub id / local path (only its config is read).
        lora: adapters to train; ``None``: full fine-tuning (or the model's own adapters).
        batch_size: sequences per optimizer step.
        seq_len: tokens per sequence.
        dtype: the compute dtype: of activations, and of weights, gradients and optimizer state too unless
            ``weight_dtype`` says otherwise (pure fp32/bf16/fp16 training).
        optimizer: "adamw"/"adam" (two moments per trainable parameter; PyTorch's ``foreach`` step allocates
            one temporary of the size of all trainable parameters) or "sgd" (no state).
        gradient_checkpointing: keep only each block's input and recompute one block at a time in backward.
        base_quantization: None, "8bit" or "4bit" (QLoRA: frozen Linear weights in NF4); requires ``lora``.
        weight_dtype: dtype of the parameters (and so of gradients and optimizer state). ``None``: ``dtype``.
            ``float32`` with ``dtype="bfloat16"``/``"float16"`` is mixed precision with ``torch.autocast``
            (what :class:`~lora_widgets.training.trainer.Trainer` does with ``precision="bf16"`` on an fp32 model):
            the residual stream stays fp32 and every matmul saves compute-dtype copies of its operands,
            including a copy of each (even frozen) weight whose input needs a gradient.

    Returns:
        a :class:`MemoryEstimate`; ``total`` is the steady-state peak (see the module docstring).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    opt = str(optimizer).lower()
    if opt not in _OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {list(_OPTIMIZERS)}")
    if base_quantization not in (None, *_QUANT):
        raise ValueError(
            f"base_quantization={base_quantization!r} is not supported; use None, '8bit' or '4bit'"
        )
    torch_dtype = parse_dtype(dtype)
    p = torch.tensor([], dtype=torch_dtype).element_size()
    w_dtype = torch_dtype if weight_dtype is None else parse_dtype(weight_dtype)
    wb = torch.tensor([], dtype=w_dtype).element_size()
    config, model = resolve_config(model_or_config)
    arch = ArchInfo.from_config(config)
    plan = param_plan(config, model, lora)
    if base_quantization is not None and not plan.lora:
        raise ValueError(
            f"base_quantization={base_quantization!r} needs LoRA (a quantized base cannot be fully fine-tuned); "
            "pass lora=LoRAConfig(...)"
        )
    b, s = batch_size, seq_len
    T = b * s
    full_head = plan.trainable > 0 and bool({"lm_head", "embed_tokens", "wte"} & plan.trainable_leaves)
    acts = ActivationModel(arch, plan, b, s, p, full_head, wb)

    frozen_w, trainable_w = _weight_bytes(plan, wb, base_quantization)
    grads = plan.trainable * wb
    opt_states = 2 * plan.trainable * wb if opt in ("adamw", "adam") else 0
    opt_temp = (
        plan.trainable * wb if opt in ("adamw", "adam") else 0
    )  # foreach: sqrt(v) for all params at once
    overhead = 2 * T * 8 + 2 * s * arch.head_dim * wb  # input ids + labels (int64), RoPE cos/sin
    if base_quantization is not None:
        # each quantized layer is dequantized to the compute dtype for its matmul, one layer at a time
        largest = max(arch.intermediate * arch.hidden, 3 * arch.hidden * arch.hidden)
        overhead += largest * p

    # ---- forward: saved activations accumulate block by block --------------------------------------
    rg = full_head or gradient_checkpointing  # embeddings train, or transformers makes inputs require grad
    blocks: list[BlockBytes] = []
    for _ in range(arch.layers):
        blk = acts.block(rg)
        blocks.append(blk)
        rg = blk.rg_out
    final_saved = acts.final(rg)
    # checkpointing keeps each block's input only
    kept = [T * arch.hidden * wb if gradient_checkpointing else blk.saved for blk in blocks]
    activations = sum(kept) + final_saved
    # at the loss: the logits in the model's dtype, their fp32 copy (transformers upcasts for the loss)
    logits_transient = T * arch.vocab * p + (T * arch.vocab * 4 if p != 4 else 0)
    # Each candidate moment is (activations live, gradients live, temporaries live), on top of `resident`.
    fwd_points = [(activations, 0, logits_transient)]
    if gradient_checkpointing:  # inside the last block's forward, with every block input kept
        fwd_points.append((sum(kept), 0, max(blk.working for blk in blocks)))

    # ---- backward: activations are released block by block while gradients appear ------------------
    head_grads = grads - sum(blk.grads for blk in blocks)
    V = arch.vocab
    bwd_points = [
        # start: nll-loss gradient and log-softmax input gradient (fp32) next to everything saved
        (activations, 0, 2 * T * V * 4),
        # head: the logits' gradient in the model dtype (and its fp32 source), the head's weight gradient
        (
            activations - T * V * 4,
            V * arch.hidden * (wb + (p if acts.autocast else 0)) if full_head else 0,
            T * V * (p + (4 if p != 4 else 0)),
        ),
    ]
    live_grads = head_grads
    for idx in range(arch.layers - 1, -1, -1):
        blk = blocks[idx]
        below = sum(kept[:idx])
        # checkpointing: the block is recomputed from its kept input (which RMSNorm saves itself in fp32)
        current = blk.saved if not gradient_checkpointing else blk.saved + kept[idx] - blk.input_saved
        # the MLP's backward (the block's own gradients not yet all there), then the block's end
        bwd_points.append((below + current, live_grads + blk.early_grads, blk.transient))
        live_grads += blk.grads
        bwd_points.append((below, live_grads, 2 * T * arch.hidden * wb))
    if full_head:  # the embedding's dense gradient (accumulated into the tied head's when tied)
        bwd_points.append((0, live_grads, V * arch.hidden * wb * (1 if arch.tied else 0)))

    # ---- optimizer step: all gradients, both moments and the foreach temporary ---------------------
    opt_points = [(0, grads, opt_temp)]

    base_parts = {
        "frozen weights": frozen_w,
        "trainable weights": trainable_w,
        "optimizer states": opt_states,
        "overhead": overhead,
    }
    breakdown: dict[str, dict[str, int]] = {}
    for name, points in (("forward", fwd_points), ("backward", bwd_points), ("optimizer", opt_points)):
        act, grad, temp = max(points, key=sum)
        breakdown[name] = {**base_parts, "gradients": grad, "activations": act, "temporaries": temp}
    phases = {name: sum(parts.values()) for name, parts in breakdown.items()}
    peak_phase: Phase = "forward"
    for name in ("backward", "optimizer"):
        if phases[name] > phases[peak_phase]:
            peak_phase = name  # type: ignore[assignment]
    total = phases[peak_phase]
    notes = []
    if arch.family == "llama" and arch.model_type not in ("llama", "mistral", "qwen2", "qwen3", "smollm3"):
        notes.append(f"model_type {arch.model_type!r} estimated with the Llama-style block formula")
    return MemoryEstimate(
        frozen_weights=frozen_w,
        trainable_weights=trainable_w,
        gradients=grads,
        optimizer_states=opt_states,
        activations=activations,
        overhead=overhead,
        total=total,
        peak_phase=peak_phase,
        phases=phases,
        at_peak=breakdown[peak_phase],
        phase_breakdown=breakdown,
        trainable_params=plan.trainable,
        total_params=plan.total,
        batch_size=b,
        seq_len=s,
        dtype=_dtype_name(torch_dtype),
        naive_total=frozen_w + trainable_w + grads + opt_states + activations + overhead,
        notes=tuple(notes),
        weight_dtype=_dtype_name(w_dtype),
    )


# ----------------------------------------------------------------------------------------------
# Advice
# ----------------------------------------------------------------------------------------------


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
    else), gradient checkpointing (with the largest batch size that then fits), a smaller LoRA rank, a
    shorter sequence length, LoRA instead of full fine-tuning. Each suggestion states the predicted peak.
    ``cuda`` adds the CUDA context and fragmentation allowance (see :meth:`MemoryEstimate.required_bytes`).
    ``weight_dtype``: as in :func:`estimate_memory`; ``None`` with a model: its parameters' dtype (an fp32
    model with ``dtype="bfloat16"`` is then mixed precision, as the Trainer runs it).
    """
    if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes <= 0:
        raise ValueError(f"available_bytes must be a positive integer, got {available_bytes!r}")
    if weight_dtype is None:
        weight_dtype = _param_dtype(model_or_config)
    model_or_config = _for_estimate(model_or_config, lora)

    def est(**changes: Any) -> MemoryEstimate:
        kwargs: dict[str, Any] = {
            "lora": lora,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "dtype": dtype,
            "gradient_checkpointing": gradient_checkpointing,
            "weight_dtype": weight_dtype,
        }
        kwargs.update(changes)
        return estimate_memory(model_or_config, **kwargs)

    def need(e: MemoryEstimate) -> int:
        return e.required_bytes(cuda)

    current = est()
    if need(current) <= available_bytes:
        return []
    avail = format_bytes(available_bytes)
    out: list[str] = []

    def largest_batch(**changes: Any) -> tuple[int, MemoryEstimate] | None:
        lo, hi = 0, batch_size - 1 if not changes else batch_size
        best: tuple[int, MemoryEstimate] | None = None
        while lo < hi:  # binary search on the (monotone) estimate
            mid = (lo + hi + 1) // 2
            e = est(batch_size=mid, **changes)
            if need(e) <= available_bytes:
                lo, best = mid, (mid, e)
            else:
                hi = mid - 1
        return best

    fit = largest_batch()
    if fit is not None:
        b, e = fit
        accum = math.ceil(batch_size / b)
        out.append(
            f"batch_size={b} fits (peak {format_bytes(e.total)} of {avail}); use grad_accum_steps={accum} "
            f"to keep an effective batch of ~{b * accum}"
        )
    if not gradient_checkpointing:
        e = est(gradient_checkpointing=True)
        if need(e) <= available_bytes:
            out.append(
                f"turn on gradient_checkpointing=True (peak {format_bytes(e.total)} at batch_size={batch_size})"
            )
        else:
            fit = largest_batch(gradient_checkpointing=True)
            if fit is not None:
                out.append(
                    f"gradient_checkpointing=True with batch_size={fit[0]} fits (peak {format_bytes(fit[1].total)})"
                )
    if lora is not None and lora.r > 1:
        for r in (r for r in (64, 32, 16, 8, 4, 2, 1) if r < lora.r):
            e = est(lora=LoRAConfig(**{**lora.to_dict(), "r": r, "target_modules": lora.target_modules}))
            if need(e) <= available_bytes:
                out.append(f"a smaller rank r={r} fits (peak {format_bytes(e.total)})")
                break
    for s in (s for s in (4096, 2048, 1024, 512, 256, 128, 64) if s < seq_len):
        e = est(seq_len=s)
        if need(e) <= available_bytes:
            out.append(f"seq_len={s} fits (peak {format_bytes(e.total)})")
            break
    if lora is None:
        e = est(lora=LoRAConfig(r=16))
        if need(e) <= available_bytes:
            out.append(f"LoRA (r=16) instead of full fine-tuning fits (peak {format_bytes(e.total)})")
    if not out:
        out.append(
            f"nothing simple fits in {avail}: even batch_size=1 needs {format_bytes(need(est(batch_size=1)))}; "
            "use a smaller model, a 4-bit base (QLoRA) or a device with more memory"
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
        head = (
            f"Predicted peak {format_bytes(self.estimate.total)} ({self.estimate.peak_phase}) vs "
            f"{format_bytes(self.available_bytes)} available on {self.device}: "
            + ("fits." if self.fits else "will NOT fit.")
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
    model with ``dtype="bfloat16"`` is estimated as mixed precision (autocast), as the Trainer runs it.

    On a GPU, memory the model already occupies counts as used (``mem_get_info`` reports what is free now),
    so the estimate's weights are added back when the model already lives on that device.
    """
    dev = resolve_device(device)
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
