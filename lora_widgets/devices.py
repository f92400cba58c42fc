"""Which accelerator is there, how much memory it has and uses, and how busy it is.

Reports CUDA GPUs (through ``torch.cuda``; utilisation through NVML when ``pynvml`` is importable, else
``nvidia-smi`` with a short timeout), Apple MPS, and the CPU (model name, threads, RAM). The trainer and
the dashboard use :func:`select_device` to pick the best device, :func:`describe_device` for the status
line and :func:`memory_in_use` / :func:`gpu_utilization` for the memory chart.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch

__all__ = [
    "DeviceInfo",
    "best_precision",
    "describe_device",
    "format_bytes",
    "gpu_utilization",
    "list_devices",
    "memory_in_use",
    "parse_device",
    "select_device",
    "total_memory",
]

DeviceKind = Literal["cuda", "mps", "cpu"]

logger = logging.getLogger(__name__)

_GPU_HOWTO = (
    "To use a GPU: on Google Colab choose Runtime > Change runtime type > a GPU (e.g. T4), then restart; "
    "locally, install a CUDA build of PyTorch (see https://pytorch.org/get-started/locally/) and check "
    "that `nvidia-smi` lists your GPU; on an Apple-silicon Mac, PyTorch >= 2.0 provides the 'mps' device."
)


@dataclass(frozen=True)
class DeviceInfo:
    """One device that can run training.

    ``total_memory``/``used_memory`` are bytes (GPU memory for CUDA/MPS, system RAM for the CPU; ``None``
    when unknown); ``utilization`` is the GPU's busy percentage when NVML or ``nvidia-smi`` can tell.
    """

    kind: DeviceKind
    index: int | None
    name: str
    total_memory: int | None
    used_memory: int | None
    utilization: float | None = None
    threads: int | None = None

    @property
    def device(self) -> torch.device:
        """The ``torch.device`` for this entry."""
        return torch.device(self.kind if self.index is None else f"{self.kind}:{self.index}")

    def __str__(self) -> str:
        mem = f", {format_bytes(self.total_memory, digits=1)} memory" if self.total_memory else ""
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.device}: {self.name}{threads}{mem}"


def format_bytes(n: float | None, digits: int = 2) -> str:
    """Bytes as people read them: ``'1.23 GiB'``, ``'456.0 MiB'``, ``'12.0 KiB'``, ``'512 B'``; ``None`` (not
    known) is ``'unknown'``. ``digits``: decimals of a GiB figure (``describe_device`` uses 1: ``'16.0 GiB'``);
    MiB and KiB always show one. The one byte formatter of the package (memory estimates, failure messages,
    the dashboard's adapter size and device line all use it)."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{digits if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _ram() -> tuple[int, int]:
    """(total, used) system RAM in bytes."""
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.total - vm.available)


def _cuda_name_and_memory(index: int) -> tuple[str, int]:
    """The one place the GPU's name and total memory are read."""
    props = torch.cuda.get_device_properties(index)
    return str(props.name), int(props.total_memory)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def list_devices() -> list[DeviceInfo]:
    """Every usable device, best first: CUDA GPUs, then MPS, then the CPU (always present)."""
    out: list[DeviceInfo] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name, total = _cuda_name_and_memory(i)
            used: int | None = None
            try:
                free, _ = torch.cuda.mem_get_info(i)  # creates a context: fails on a busy exclusive-mode GPU
                used = int(total - free)
            except RuntimeError as exc:
                logger.warning("cannot read the memory in use on cuda:%d: %s", i, exc)
            out.append(DeviceInfo("cuda", i, name, total, used, gpu_utilization(f"cuda:{i}")))
    if _mps_available():
        ram_total, _ = _ram()  # unified memory: the GPU shares system RAM
        used_mps = int(torch.mps.driver_allocated_memory())
        out.append(DeviceInfo("mps", None, f"Apple {platform.machine()} GPU (MPS)", ram_total, used_mps))
    ram_total, used_ram = _ram()
    out.append(DeviceInfo("cpu", None, _cpu_name(), ram_total, used_ram, None, torch.get_num_threads()))
    return out


def parse_device(preference: str | torch.device = "auto") -> torch.device:
    """The device a name asks for, without checking that this machine has it (the one place ``"auto"`` is
    resolved: the first CUDA GPU, else MPS, else the CPU).

    Accepts ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``. Raises
    ``ValueError`` naming the value for anything else. :func:`select_device` adds the availability checks;
    planning for another machine (the memory estimator) needs only this.
    """
    if isinstance(preference, torch.device):
        wanted = preference
    elif isinstance(preference, str) and preference.lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    else:
        try:
            wanted = torch.device(preference)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device={preference!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps'"
            ) from exc
    if wanted.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={str(wanted)!r} is not supported; use 'auto', 'cpu', 'cuda' or 'mps'")
    return wanted


def select_device(preference: str | torch.device = "auto", require_gpu: bool = False) -> torch.device:
    """The device to train on.

    ``"auto"`` picks the first CUDA GPU, else MPS, else the CPU. ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"`` (or a ``torch.device``) ask for that device. ``require_gpu=True`` refuses to fall back to
    the CPU.

    Raises:
        RuntimeError: the requested device (or, with ``require_gpu``, any GPU) is not available; the
            message lists what was found and how to get a GPU.
        ValueError: ``preference`` is not a device name.
    """
    wanted = parse_device(preference)

    def found() -> str:  # only computed for an error message (it may run nvidia-smi)
        return "; ".join(str(d) for d in list_devices())

    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU visible"
            )
            raise RuntimeError(
                f"device {str(wanted)!r} requested but CUDA is not available ({build}). Found: {found()}. {_GPU_HOWTO}"
            )
        index = 0 if wanted.index is None else wanted.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {str(wanted)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist. "
                f"Found: {found()}"
            )
        wanted = torch.device("cuda", index)
    elif wanted.type == "mps" and not _mps_available():
        raise RuntimeError(f"device 'mps' requested but MPS is not available. Found: {found()}. {_GPU_HOWTO}")
    if require_gpu and wanted.type == "cpu":
        raise RuntimeError(
            f"a GPU is required but none was found (or 'cpu' was requested). Found: {found()}. {_GPU_HOWTO}"
        )
    return wanted


def _as_device(device: str | torch.device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def total_memory(device: str | torch.device) -> int | None:
    """Total memory in bytes of a CUDA GPU, or system RAM for the CPU and MPS (unified memory)."""
    d = _as_device(device)
    if d.type == "cuda":
        return _cuda_name_and_memory(d.index or 0)[1]
    return _ram()[0]


def describe_device(device: str | torch.device) -> str:
    """One line for a status bar: ``'NVIDIA A100-SXM4-40GB (cuda:0, 39.4 GiB)'`` or the CPU's model."""
    d = _as_device(device)
    if d.type == "cuda":
        name, total = _cuda_name_and_memory(d.index or 0)
        return f"{name} ({d}, {format_bytes(total, digits=1)})"
    if d.type == "mps":
        return f"Apple GPU (mps, unified memory {format_bytes(_ram()[0], digits=1)})"
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads, {format_bytes(_ram()[0], digits=1)} RAM)"


def best_precision(device: str | torch.device) -> str:
    """The precision a run gets on ``device`` when asked for ``"auto"``: ``"bf16"`` on a GPU that supports it
    (compute capability >= 8.0: A100, L4, H100), ``"fp16"`` with a loss scaler on one that does not (T4, V100),
    ``"fp32"`` elsewhere (CPU bf16 autocast is slower than fp32 on most CPUs; fp16 needs CUDA).

    The one rule for both the training precision and a quantized base's compute dtype
    (:func:`lora_widgets.quantization.compute_dtype`), so the two always agree.
    """
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if cuda_has_bf16() else "fp16"


def cuda_has_bf16() -> bool:
    """Whether the CUDA GPU computes in bf16 natively (compute capability >= 8.0: A100, L4, H100).

    Not ``torch.cuda.is_bf16_supported()`` as called bare: since torch 2.3 it defaults to
    ``including_emulation=True`` and answers True on a T4 or V100 as well, where bf16 is emulated (slowly), so a
    Colab T4 would train in emulated bf16 instead of fp16 with a loss scaler. The one rule behind
    :func:`best_precision`, ``TrainConfig``'s bf16 check and a 4-bit base's compute-dtype check.
    """
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _rss() -> int:
    """Resident set size of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


def memory_in_use(device: str | torch.device) -> tuple[int, int | None]:
    """(allocated, reserved) bytes: the CUDA caching allocator's figures, MPS's current/driver memory,
    or, on the CPU, this process's resident set size and ``None``."""
    d = _as_device(device)
    if d.type == "cuda":
        return int(torch.cuda.memory_allocated(d)), int(torch.cuda.memory_reserved(d))
    if d.type == "mps":
        return int(torch.mps.current_allocated_memory()), int(torch.mps.driver_allocated_memory())
    return _rss(), None


# -- utilisation ------------------------------------------------------------------------------------

_nvml: Any = None  # the pynvml module once initialised, False if unusable
_smi_failed_at: float | None = None


def _nvml_utilization(index: int) -> float | None:
    global _nvml
    if _nvml is False:
        return None
    try:
        import pynvml  # optional (nvidia-ml-py); nvidia-smi is the fallback
    except ImportError:
        _nvml = False
        return None
    try:
        if _nvml is None:
            pynvml.nvmlInit()
            _nvml = pynvml
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError as exc:
        logger.info("NVML cannot read GPU utilisation (%s); falling back to nvidia-smi", exc)
        _nvml = False
        return None


def _smi_utilization(index: int) -> float | None:
    global _smi_failed_at
    if _smi_failed_at is not None and time.monotonic() - _smi_failed_at < 60.0:
        return None  # don't fork a failing process on every step
    exe = shutil.which("nvidia-smi")
    if exe is None:
        _smi_failed_at = time.monotonic()
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={index}"],
            capture_output=True,
            text=True,
            timeout=2.0,
            check=True,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.info("nvidia-smi cannot read GPU utilisation (%s); retrying in a minute", exc)
        _smi_failed_at = time.monotonic()
        return None


def gpu_utilization(device: str | torch.device) -> float | None:
    """Percent of time the GPU was busy over the driver's last sample period, or ``None`` if unknown.

    NVML (``pynvml``, fast) is preferred; ``nvidia-smi`` (a subprocess, ~50 ms) is the fallback. Indices
    are NVML's physical ones, which match torch's unless ``CUDA_VISIBLE_DEVICES`` reorders devices.
    """
    d = _as_device(device)
    if d.type != "cuda":
        return None
    index = d.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        parts = [p.strip() for p in visible.split(",")]
        if index < len(parts) and parts[index].isdigit():
            index = int(parts[index])
    value = _nvml_utilization(index)
    return value if value is not None else _smi_utilization(index)
