"""Measuring the memory of real training steps: exact live-bytes accounting on any device.

:func:`measure_memory` is the measured counterpart of :func:`lora_widgets.memory.fit.estimate_memory`; both are
re-exported from :mod:`lora_widgets.memory.fit`. The CPU method (:class:`LiveBytesTracker`) is justified in its
docstring and in ``docs/memory.md``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_widgets.devices import parse_device
from lora_widgets.lora.layers import LoRAConfig, apply_lora, as_lora_config
from lora_widgets.memory.arch import parse_dtype, resolve_config
from lora_widgets.memory.quant import quantized_tensors
from lora_widgets.quantization import is_quantized, kbit_cast, keep_cpu_layout, require_bitsandbytes

__all__ = ["LiveBytesTracker", "MemoryMeasurement", "measure_memory", "resolve_device", "storage_bytes"]


@dataclass(frozen=True)
class MemoryMeasurement:
    """Measured peak of the training steps run by :func:`measure_memory`, in bytes.

    ``phase_peaks`` holds the peak within each phase (forward, backward, optimizer) of the last step;
    ``resident_bytes`` what was allocated before the first step (weights, batch); ``method`` how it was
    measured ("cuda.max_memory_allocated" or "dispatch-tracker").
    """

    peak_bytes: int
    phase_peaks: dict[str, int]
    method: str
    resident_bytes: int = 0
    steps: int = 2

    @property
    def peak_phase(self) -> str:
        """The phase whose peak is the highest."""
        return max(self.phase_peaks, key=lambda k: self.phase_peaks[k])


class LiveBytesTracker(TorchDispatchMode):
    """Exact live-bytes accounting of every tensor storage created under it, on any device.

    Every ATen operator call passes through ``__torch_dispatch__`` (forward, autograd's backward and the
    optimizer's ``foreach`` kernels alike). An output whose storage is neither one of the operator's inputs
    (views and in-place results share their input's storage) nor already tracked is a new allocation of
    ``storage.nbytes()``; a weak reference to the storage (``StorageWeakRef``) tells when it is freed: expired
    references are swept before each new allocation is counted, so ``peak`` is the true maximum of live
    bytes at operator granularity. Memory that a kernel allocates internally and frees before returning
    (e.g. a CPU matmul's packing buffers) is not seen: those buffers are device-specific, and the estimate
    models the tensors a step creates, which are the same on every device.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weakref = StorageWeakRef
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0
        self.phase = "forward"
        self.phase_peaks: dict[str, int] = {}

    def _sweep(self) -> None:
        dead = [ptr for ptr, (ref, _) in self._live.items() if ref.expired()]
        for ptr in dead:
            self.current -= self._live.pop(ptr)[1]

    def reset_phase_peaks(self) -> None:
        """Start a new step: phase peaks are recomputed from the current live bytes."""
        self._sweep()
        self.phase_peaks = {}

    def set_phase(self, phase: str) -> None:
        """Label the allocations that follow (forward / backward / optimizer)."""
        self._sweep()
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        flat_out, _ = tree_flatten(out)
        self._sweep()
        for t in flat_out:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = (self._weakref(storage), nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        return out


def resolve_device(device: torch.device | str | None, present: bool = True) -> torch.device:
    """``None``/"cpu" -> CPU; "auto" -> the first GPU if there is one (CUDA, then MPS), else the CPU.

    With ``present`` (the default), a GPU that this torch build or machine does not have (``"cuda"`` on a
    CPU-only build, ``"cuda:3"`` on a one-GPU machine, ``"mps"`` off a Mac) is refused here, naming the
    value, rather than failing later; ``present=False`` only parses the name (planning for another machine).
    """
    # parse_device: the one place a device name is parsed and "auto" resolved
    dev = torch.device("cpu") if device is None else parse_device(device)
    if not present:
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device!r}: this torch build or machine has no CUDA GPU (torch {torch.__version__}); "
                "use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={device!r}: there are {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); pick one of them"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: Apple MPS is not available here; use device='cpu' or 'auto'")
    return dev


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _build_model(model_or_config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A private copy of the model to train (the caller's model is never modified)."""
    from transformers import AutoModelForCausalLM

    if isinstance(model_or_config, nn.Module):
        return copy.deepcopy(model_or_config).to(device=device, dtype=dtype)
    config, _ = resolve_config(model_or_config)
    with torch.device(device):
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def _optimizer(params: list[nn.Parameter], name: str, foreach: bool) -> torch.optim.Optimizer:
    """The optimizer a measurement runs: ``torch.optim.AdamW`` or bitsandbytes' ``AdamW8bit``."""
    if name == "adamw8bit":
        bnb = require_bitsandbytes("optimizer='adamw8bit'")
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5, foreach=foreach)


def _quantized_copy(model: nn.Module, compute: torch.dtype, device: torch.device) -> nn.Module:
    """A private copy of a bitsandbytes model, prepared as the trainer prepares it (:func:`kbit_cast`).

    It is copied as it is, never cast or moved: transformers refuses to cast a quantized model, and
    bitsandbytes places its layers when they load. The caller's model is not touched.
    """
    where = {t.device.type for t in quantized_tensors(model)}
    if where != {device.type}:
        raise ValueError(
            f"the quantized model is on {sorted(where)} but device={str(device)!r}; measure it where it was "
            f"loaded (device={sorted(where)[0]!r}), or load it on {device.type!r} (load_model(..., base=...))"
        )
    net = copy.deepcopy(model)
    kbit_cast(net, compute)
    keep_cpu_layout(net)
    return net


def _measure_cuda(
    phase_step: Callable[[Callable[[str], None]], None], dev: torch.device, baseline: int, steps: int
) -> MemoryMeasurement:
    """``steps`` steps on a GPU: the peak by ``max_memory_allocated``, per phase in the last step by resetting
    the peak counter at each phase boundary; ``baseline`` (bytes allocated before the model) is subtracted."""
    torch.cuda.synchronize(dev)
    resident = torch.cuda.memory_allocated(dev) - baseline
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps - 1):
        phase_step(lambda _name: None)
    torch.cuda.synchronize(dev)
    overall = torch.cuda.max_memory_allocated(dev)
    phase_peaks: dict[str, int] = {}
    current = ["forward"]

    def mark(name: str) -> None:
        torch.cuda.synchronize(dev)
        if name != "forward":
            phase_peaks[current[0]] = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        current[0] = name

    phase_step(mark)
    torch.cuda.synchronize(dev)
    phase_peaks[current[0]] = torch.cuda.max_memory_allocated(dev)
    phase_peaks = {k: v - baseline for k, v in phase_peaks.items()}
    peak = max(overall - baseline, *phase_peaks.values())
    return MemoryMeasurement(peak, phase_peaks, "cuda.max_memory_allocated", resident, steps)


def _check_measure_args(
    quantized: bool,
    lora: Any,
    weight_dtype: Any,
    compute: torch.dtype,
    sizes: tuple[Any, Any, Any],
    flags: tuple[Any, Any],
) -> torch.dtype:
    """Validate :func:`measure_memory`'s arguments; returns the weights' dtype (fp32 for a quantized base)."""
    for name, value in zip(("batch_size", "seq_len", "steps"), sizes, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    for name, flag in zip(("gradient_checkpointing", "foreach"), flags, strict=True):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {name}={flag!r}")
    w_dtype = compute if weight_dtype is None else parse_dtype(weight_dtype)
    if not quantized:
        return w_dtype
    if weight_dtype is not None and w_dtype != torch.float32:
        raise ValueError(
            f"weight_dtype={weight_dtype!r}: a quantized base trains fp32 adapters next to its fp32 "
            "embeddings, norms and head (the k-bit preparation); pass weight_dtype=None or 'float32'"
        )
    if lora is None:
        raise ValueError(
            "a quantized base cannot be fully fine-tuned (its 4/8-bit weights have no gradient); "
            "pass lora=LoRAConfig(...)"
        )
    return torch.float32


def measure_memory(
    model: Any,
    lora: LoRAConfig | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    dtype: torch.dtype | str = "float32",
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
    steps: int = 2,
    weight_dtype: torch.dtype | str | None = None,
    optimizer: str = "adamw",
    foreach: bool = True,
) -> MemoryMeasurement:
    """Run ``steps`` real training steps (AdamW) on a copy of ``model`` and measure their peak.

    ``optimizer``: ``"adamw"`` (``torch.optim.AdamW``; ``foreach``: its foreach implementation, PyTorch's
    default on a GPU, or the single-tensor one, its default on a CPU) or ``"adamw8bit"``
    (``bitsandbytes.optim.AdamW8bit``), as in :func:`estimate_memory`.

    ``model`` may be a torch model (deep-copied: the original is untouched), a config or a known model name
    (a randomly initialised model is built: memory does not depend on the weights' values). A model with a
    quantized (bitsandbytes) base is copied as it is, not cast, and prepared as the trainer prepares it
    (non-quantized parameters in fp32, 4-bit layers computing in ``dtype``; autocast when ``dtype`` is
    16-bit); it needs ``lora`` and is measured on the device it was loaded on.

    Method:
        * CUDA: ``torch.cuda.max_memory_allocated`` (reset before the first step; per phase by resetting the
          peak counter at each phase boundary of the last step), i.e. what an out-of-memory error sees.
        * CPU (or any other device): :class:`LiveBytesTracker`, an exact account of every tensor storage
          allocated and freed during the steps (weights, batch, activations, gradients, optimizer state and
          temporaries), at operator granularity. Peak RSS would include the allocator's caching and the
          interpreter; the tracker counts exactly what a GPU's ``max_memory_allocated`` counts, minus
          kernel-internal workspaces.

    The steady-state step (step 2, when AdamW's moments already exist) is the run's peak, as in
    :func:`estimate_memory`.
    """
    torch_dtype = parse_dtype(dtype)
    quantized = isinstance(model, nn.Module) and is_quantized(model)
    w_dtype = _check_measure_args(
        quantized,
        lora,
        weight_dtype,
        torch_dtype,
        (batch_size, seq_len, steps),
        (gradient_checkpointing, foreach),
    )
    if optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(
            f"optimizer={optimizer!r}: measure_memory runs 'adamw' or 'adamw8bit' (bitsandbytes)"
        )
    lora = None if lora is None else as_lora_config(lora, "lora")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    baseline = 0
    if cuda:  # only what this measurement allocates counts (not the caller's own tensors on the GPU)
        torch.cuda.synchronize(dev)
        baseline = torch.cuda.memory_allocated(dev)
    # a transformers causal LM
    net: Any = _quantized_copy(model, torch_dtype, dev) if quantized else _build_model(model, w_dtype, dev)
    if lora is not None:
        apply_lora(net, lora)
    if gradient_checkpointing:
        enable = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if quantized:  # as the k-bit preparation: checkpointed blocks of frozen weights pass gradients down
            net.enable_input_require_grads()
    net.train()
    vocab = int(net.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(dev)  # [b, s]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(params, optimizer, foreach)

    # mixed precision: weights stay in w_dtype, the forward runs under autocast in the compute dtype
    autocast: Any = (
        torch.autocast(device_type=dev.type, dtype=torch_dtype)
        if w_dtype != torch_dtype
        else contextlib.nullcontext()
    )

    def phase_step(mark: Callable[[str], None]) -> None:
        mark("forward")
        with autocast:
            # use_cache=False as the trainer does (no KV cache while training, and no warning with checkpointing)
            loss = net(input_ids=batch, labels=batch, use_cache=False).loss  # output and logits dropped here
        mark("backward")
        loss.backward()
        del loss
        mark("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        return _measure_cuda(phase_step, dev, baseline, steps)
    resident = storage_bytes(iter([*net.parameters(), *net.buffers(), *quantized_tensors(net), batch]))
    tracker = LiveBytesTracker()
    with tracker:
        for _ in range(steps):
            tracker.reset_phase_peaks()
            phase_step(tracker.set_phase)
        tracker.set_phase("done")
    peaks = {k: v + resident for k, v in tracker.phase_peaks.items() if k != "done"}
    return MemoryMeasurement(tracker.peak + resident, peaks, "dispatch-tracker", resident, steps)
