r"""The memory estimator: the predicted peak of one training step, phase by phase.

:func:`estimate_memory` predicts the **peak** bytes of one steady-state training step (forward, backward,
optimizer step), which is what ``torch.cuda.max_memory_allocated`` or an out-of-memory error sees. It and
:class:`MemoryEstimate` are re-exported by :mod:`lora_widgets.memory.fit`, with the measurement and the advice.
The formulas, their sources and a table of estimates against measurements are in ``docs/memory.md``.

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

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from lora_widgets.devices import format_bytes
from lora_widgets.lora.layers import LoRAConfig, as_lora_config
from lora_widgets.memory.activations import ActivationModel, BlockBytes
from lora_widgets.memory.arch import ArchInfo, ParamPlan, param_plan, parse_dtype, resolve_config
from lora_widgets.memory.quant import estimator_name, optimizer_8bit_bytes, quantized_weight_bytes

__all__ = [
    "CPU_RUNTIME_BYTES",
    "CPU_RUNTIME_BYTES_16BIT",
    "CUDA_CONTEXT_BYTES",
    "GiB",
    "MemoryEstimate",
    "cpu_runtime_bytes",
    "estimate_memory",
    "format_bytes",
]

Phase = Literal["forward", "backward", "optimizer"]

_OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "paged_adamw8bit")
_OPTIMIZERS_8BIT = ("adamw8bit", "paged_adamw8bit")
_QUANT = {"8bit": 1.0, "4bit": 0.5 + 0.127 / 8}  # bytes per quantized weight (see _weight_bytes)

GiB = 1024**3
#: Memory a CUDA process holds outside ``max_memory_allocated``: the CUDA context and kernels (~0.3-0.5 GiB)
#: plus the caching allocator's fragmentation; added before comparing an estimate with a GPU's capacity.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
FRAGMENTATION = 0.05
#: Resident memory torch's CPU runtime adds to a process's first training steps beyond the tensors
#: (thread pools, oneDNN/BLAS packing buffers, autograd's engine): added to a CPU estimate before comparing it
#: with free RAM. ``benchmarks/bench_cpu_runtime.py`` measures it (fresh child process, glibc told to return
#: freed memory, peak ``VmHWM`` growth over two AdamW steps minus the live tensor bytes' growth): 14.7-22.7 MiB
#: with fp32 compute on Llama models of 0.9-21.5 M parameters (LoRA and full, 2 threads, torch 2.13), roughly
#: constant in the model's size; rounded up.
CPU_RUNTIME_BYTES = 24 * 1024**2
#: The same with bf16/fp16 compute, which loads more of the runtime: 31.8-33.8 MiB measured on 0.9-21.5 M
#: parameter Llamas (pure bf16 and LoRA), rounded up.
CPU_RUNTIME_BYTES_16BIT = 36 * 1024**2


def cpu_runtime_bytes(dtype: str) -> int:
    """Torch's CPU runtime overhead for a step computed in ``dtype`` (a :class:`MemoryEstimate` dtype name)."""
    return CPU_RUNTIME_BYTES if dtype == "float32" else CPU_RUNTIME_BYTES_16BIT


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
        allocator fragmentation when ``cuda``, for torch's CPU runtime otherwise)."""
        return self.required_bytes(cuda) <= capacity_bytes

    def required_bytes(self, cuda: bool = True) -> int:
        """Device memory needed: ``total`` plus the CUDA context and ~5% fragmentation on a GPU, plus torch's
        CPU runtime overhead (:data:`CPU_RUNTIME_BYTES`, more with 16-bit compute) on a CPU."""
        if not cuda:
            return self.total + cpu_runtime_bytes(self.dtype)
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


def _weight_bytes(plan: ParamPlan, p: int, base_quantization: str | None) -> tuple[int, int]:
    """(frozen, trainable) weight bytes.

    Quantized (QLoRA): the Linear weights inside the blocks as bitsandbytes stores them, counted layer by layer
    (:mod:`lora_widgets.memory.quant`: NF4 is 4 bits a weight plus 0.127 bits of double-quantized block
    constants, Dettmers et al. 2023, arXiv:2305.14314, sec. 3; int8 is a byte a weight plus a scale per row,
    Dettmers et al. 2022, arXiv:2208.07339); the embeddings, norms and output head stay unquantized, in fp32
    after the trainer's k-bit preparation (:mod:`lora_widgets.training.kbit`, as PEFT's).
    """
    frozen = plan.frozen * p
    if base_quantization is not None:
        shapes = plan.frozen_linear_shapes
        quantized = (
            quantized_weight_bytes(shapes, base_quantization)
            if shapes
            else int(plan.frozen_linear * _QUANT[base_quantization])
        )
        frozen = quantized + (plan.frozen - plan.frozen_linear) * 4
    return frozen, plan.trainable * p


Points = list[tuple[int, int, int]]  # candidate moments: (activations live, gradients live, temporaries live)


class _Resident(NamedTuple):
    """Bytes that do not depend on the moment within the step (parts of :class:`MemoryEstimate`)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int  # all of them, as in the optimizer step
    optimizer_states: int
    optimizer_temp: int  # PyTorch's foreach AdamW: sqrt(v) for all parameters at once
    overhead: int


def _check_estimate_args(
    batch_size: Any, seq_len: Any, optimizer: Any, gradient_checkpointing: Any, base_quantization: Any
) -> str:
    """Validate the plain arguments of :func:`estimate_memory`; returns the optimizer's name."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    opt = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if opt not in _OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not supported; use one of {list(_OPTIMIZERS)} "
            "('adamw8bit' / 'paged_adamw8bit': bitsandbytes' 8-bit AdamW)"
        )
    if not isinstance(gradient_checkpointing, bool):
        raise ValueError(
            f"gradient_checkpointing must be True or False, got gradient_checkpointing={gradient_checkpointing!r}"
        )
    if base_quantization not in (None, *_QUANT):
        raise ValueError(
            f"base_quantization={base_quantization!r} is not supported; use None, '8bit' or '4bit'"
        )
    return opt


def _optimizer_bytes(plan: ParamPlan, wb: int, opt: str, foreach: bool) -> tuple[int, int]:
    """(state, temporary at the step) of the optimizer.

    AdamW (Loshchilov & Hutter 2019, Algorithm 2): two moments in the parameters' dtype. PyTorch's ``foreach``
    step (its default on a GPU) computes ``sqrt(v)`` for all parameters at once, a temporary of their size;
    the single-tensor step (its default on a CPU) goes parameter by parameter: ``sqrt(v)`` and its quotient
    for the largest tensor only. bitsandbytes' 8-bit AdamW (:func:`optimizer_8bit_bytes`) updates in place
    in one fused kernel per tensor: no temporary.
    """
    if opt in _OPTIMIZERS_8BIT:
        return optimizer_8bit_bytes(plan.trainable_sizes or (plan.trainable,)), 0
    if opt == "sgd":
        return 0, 0
    temp = plan.trainable * wb if foreach else 2 * plan.largest_trainable * wb
    return 2 * plan.trainable * wb, temp


def _resident(
    arch: ArchInfo,
    plan: ParamPlan,
    tokens: int,
    seq_len: int,
    wb: int,
    optim: tuple[str, bool],
    quant: str | None,
) -> _Resident:
    """Weights, gradients, optimizer state and its temporary, and the small buffers of one step."""
    frozen_w, trainable_w = _weight_bytes(plan, wb, quant)
    states, temp = _optimizer_bytes(plan, wb, *optim)
    overhead = 2 * tokens * 8 + 2 * seq_len * arch.head_dim * wb  # input ids + labels (int64), RoPE cos/sin
    return _Resident(
        frozen_weights=frozen_w,
        trainable_weights=trainable_w,
        gradients=plan.trainable * wb,
        optimizer_states=states,
        optimizer_temp=temp,
        overhead=overhead,
    )


def _forward(
    acts: ActivationModel, arch: ArchInfo, tokens: int, wb: int, checkpointing: bool, full_head: bool
) -> tuple[list[BlockBytes], list[int], int]:
    """Forward: saved activations accumulate block by block. (blocks, bytes kept per block, final saved)."""
    rg = full_head or checkpointing  # embeddings train, or transformers makes inputs require grad
    blocks: list[BlockBytes] = []
    for _ in range(arch.layers):
        blk = acts.block(rg)
        blocks.append(blk)
        rg = blk.rg_out
    final_saved = acts.final(rg)
    # checkpointing keeps each block's input only (and what an 8-bit base keeps outside autograd's saved tensors)
    kept = [tokens * arch.hidden * wb + blk.held if checkpointing else blk.saved for blk in blocks]
    return blocks, kept, final_saved


def _forward_points(
    blocks: list[BlockBytes],
    kept: list[int],
    activations: int,
    tokens: int,
    vocab: int,
    p: int,
    checkpointing: bool,
    dequant: int,
) -> Points:
    """Forward: at the loss; with checkpointing, inside the last block (its MLP's weight dequantized if
    the base is quantized: ``dequant`` bytes)."""
    # at the loss: the logits in the model's dtype, their fp32 copy (transformers upcasts for the loss)
    logits_transient = tokens * vocab * p + (tokens * vocab * 4 if p != 4 else 0)
    points = [(activations, 0, logits_transient)]
    if checkpointing:  # inside the last block's forward, with every block input kept
        points.append((sum(kept), 0, max(blk.working for blk in blocks) + dequant))
    return points


def _backward_points(
    arch: ArchInfo,
    acts: ActivationModel,
    blocks: list[BlockBytes],
    kept: list[int],
    activations: int,
    grads: int,
    shape: tuple[int, int, int],
    checkpointing: bool,
    full_head: bool,
    dequant: int = 0,
) -> Points:
    """Backward: activations are released block by block while gradients appear. ``dequant``: bytes of the
    largest quantized weight dequantized to the compute dtype for an input-gradient matmul (0: no quantized
    base)."""
    T, p, wb = shape  # tokens, bytes per activation element, bytes per weight element
    V = arch.vocab
    head_grads = grads - sum(blk.grads for blk in blocks)
    points = [
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
        current = blk.saved if not checkpointing else blk.saved + kept[idx] - blk.input_saved
        # the MLP's backward (the block's own gradients not yet all there), then the block's end
        points.append((below + current, live_grads + blk.early_grads, blk.transient))
        if dequant:  # down_proj's input gradient [T, i] from its dequantized weight, all the block's saved
            points.append(
                (below + current, live_grads, T * arch.intermediate * p + 2 * T * arch.hidden * wb + dequant)
            )
        live_grads += blk.grads
        points.append((below, live_grads, 2 * T * arch.hidden * wb))
    if full_head:  # the embedding's dense gradient (accumulated into the tied head's when tied)
        points.append((0, live_grads, V * arch.hidden * wb * (1 if arch.tied else 0)))
    return points


def _peak(res: _Resident, phase_points: dict[str, Points]) -> tuple[dict[str, dict[str, int]], Phase]:
    """Each phase's worst moment on top of what is resident, and the phase with the highest one."""
    base_parts = {
        "frozen weights": res.frozen_weights,
        "trainable weights": res.trainable_weights,
        "optimizer states": res.optimizer_states,
        "overhead": res.overhead,
    }
    breakdown: dict[str, dict[str, int]] = {}
    for name, points in phase_points.items():
        act, grad, temp = max(points, key=sum)
        breakdown[name] = {**base_parts, "gradients": grad, "activations": act, "temporaries": temp}
    totals = {name: sum(parts.values()) for name, parts in breakdown.items()}
    peak_phase: Phase = "forward"
    for name in ("backward", "optimizer"):
        if totals[name] > totals[peak_phase]:
            peak_phase = name  # type: ignore[assignment]
    return breakdown, peak_phase


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
    foreach: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of one training step of a causal language model.

    Args:
        model_or_config: a transformers model (counted as it is when ``lora`` is None: with its adapters if
            it has them, else full fine-tuning), a ``PretrainedConfig``, a known model name
            (:func:`known_models`), or a hub id / local path (only its config is read).
        lora: adapters to train (a :class:`~lora_widgets.lora.config.LoRAConfig` or a PEFT ``LoraConfig``);
            ``None``: full fine-tuning (or the model's own adapters).
        batch_size: sequences per optimizer step.
        seq_len: tokens per sequence.
        dtype: the compute dtype: of activations, and of weights, gradients and optimizer state too unless
            ``weight_dtype`` says otherwise (pure fp32/bf16/fp16 training).
        optimizer: "adamw"/"adam" (two moments per trainable parameter, 8 bytes in fp32), "adamw8bit" /
            "paged_adamw8bit" (bitsandbytes' 8-bit AdamW: about 2 bytes; the paged one's state can be evicted
            to CPU memory under pressure, counted here as resident, its worst case) or "sgd" (no state).
        gradient_checkpointing: keep only each block's input and recompute one block at a time in backward.
        base_quantization: None, "8bit" or "4bit" (QLoRA: frozen Linear weights in NF4); requires ``lora``.
            ``None`` with a model loaded quantized (``load_model(base="4-bit")``): the model's own.
        weight_dtype: dtype of the parameters (and so of gradients and optimizer state). ``None``: ``dtype``.
            ``float32`` with ``dtype="bfloat16"``/``"float16"`` is mixed precision with ``torch.autocast``
            (what :class:`~lora_widgets.training.trainer.LoRATrainer` does with ``precision="bf16"`` on an fp32 model):
            the residual stream stays fp32 and every matmul saves compute-dtype copies of its operands,
            including a copy of each (even frozen) weight whose input needs a gradient.
        foreach: AdamW's ``foreach`` implementation (PyTorch's default on a GPU: one temporary as large as all
            trainable parameters at the optimizer step) or, ``False``, the single-tensor one (its default on a
            CPU, and what the trainer gets there: temporaries of the largest tensor only).

    Returns:
        a :class:`MemoryEstimate`; ``total`` is the steady-state peak (see the module docstring).
    """
    # ---- inputs and parameter counts ----------------------------------------------------------------
    opt = _check_estimate_args(batch_size, seq_len, optimizer, gradient_checkpointing, base_quantization)
    if not isinstance(foreach, bool):
        raise ValueError(f"foreach must be True or False, got foreach={foreach!r}")
    lora = None if lora is None else as_lora_config(lora, "lora")
    torch_dtype = parse_dtype(dtype)
    w_dtype = torch_dtype if weight_dtype is None else parse_dtype(weight_dtype)
    p, wb = torch_dtype.itemsize, w_dtype.itemsize
    config, model = resolve_config(model_or_config)
    base_quantization = base_quantization or estimator_name(model)  # a loaded 4-bit model counts as one
    arch = ArchInfo.from_config(config)
    plan = param_plan(config, model, lora)
    if base_quantization is not None and not plan.lora:
        raise ValueError(
            f"base_quantization={base_quantization!r} needs LoRA (a quantized base cannot be fully fine-tuned); "
            "pass lora=LoRAConfig(...)"
        )
    b, s, gc = batch_size, seq_len, gradient_checkpointing
    T = b * s
    full_head = plan.trainable > 0 and bool({"lm_head", "embed_tokens", "wte"} & plan.trainable_leaves)
    acts = ActivationModel(arch, plan, b, s, p, full_head, wb, base_quantization)
    res = _resident(arch, plan, T, s, wb, (opt, foreach), base_quantization)

    # ---- the three phases: forward, backward, optimizer step ---------------------------------------
    blocks, kept, final_saved = _forward(acts, arch, T, wb, gc, full_head)
    activations = sum(kept) + final_saved
    # a quantized layer's weight is dequantized to the compute dtype for each matmul, one layer at a time
    # (bitsandbytes' MatMul4Bit / MatMul8bitFp / MatMul8bitLt): the largest is an MLP weight, h x i
    dequant = arch.hidden * arch.intermediate * p if base_quantization else 0
    breakdown, peak_phase = _peak(
        res,
        {
            "forward": _forward_points(blocks, kept, activations, T, arch.vocab, p, gc, dequant),
            "backward": _backward_points(
                arch, acts, blocks, kept, activations, res.gradients, (T, p, wb), gc, full_head, dequant
            ),
            "optimizer": [
                (0, res.gradients, res.optimizer_temp)
            ],  # all gradients, both moments, the temporary
        },
    )
    phases = {name: sum(parts.values()) for name, parts in breakdown.items()}

    notes = []
    if arch.family == "llama" and arch.model_type not in ("llama", "mistral", "qwen2", "qwen3", "smollm3"):
        notes.append(f"model_type {arch.model_type!r} estimated with the Llama-style block formula")
    return MemoryEstimate(
        frozen_weights=res.frozen_weights,
        trainable_weights=res.trainable_weights,
        gradients=res.gradients,
        optimizer_states=res.optimizer_states,
        activations=activations,
        overhead=res.overhead,
        total=phases[peak_phase],
        peak_phase=peak_phase,
        phases=phases,
        at_peak=breakdown[peak_phase],
        phase_breakdown=breakdown,
        trainable_params=plan.trainable,
        total_params=plan.total,
        batch_size=b,
        seq_len=s,
        dtype=_dtype_name(torch_dtype),
        naive_total=sum(res) - res.optimizer_temp + activations,
        notes=tuple(notes),
        weight_dtype=_dtype_name(w_dtype),
    )
