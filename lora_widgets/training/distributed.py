"""More than one process (DDP): the facts of the process group and the decisions its ranks make together.

Launched by ``torchrun`` or ``accelerate launch`` (both set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``), every process runs the same script; :class:`World` says which one this is and
holds the few collective operations a run needs:

* the process group is initialised if the launcher left it to us: ``gloo`` on the CPU, ``nccl`` on CUDA, each
  rank on ``cuda:<LOCAL_RANK>`` (:meth:`World.from_env`, :meth:`World.device`);
* the model is wrapped in ``DistributedDataParallel`` for the forward/backward passes only (:meth:`World.wrap`):
  the trainer keeps the bare model for everything else (saving, statistics, generation). The frozen base is not
  broadcast (every rank loads the same weights); the trainable parameters are, once, from rank 0;
* the data: each global micro-batch of ``batch_size x world_size`` sequences is cut into disjoint per-rank slices
  (``[rank::world_size]``), so one update sees ``batch_size x world_size x grad_accum_steps`` sequences and a
  2-process run makes the same updates as a 1-process run with twice the ``batch_size`` (:meth:`World.data_config`);
* every rank stops at the same step: rank 0's pause and any rank's stop (the run directory's ``control.json``,
  ``stop()``, an early-stopping verdict) are agreed in one ``all_reduce`` of two flags before each update
  (:meth:`World.agree`), and a pause holds every rank in rounds of that same agreement (:meth:`World.hold`);
* the loss of an update and the validation loss are reduced across ranks (:meth:`World.mean_`,
  :meth:`World.sum_`), so the non-finite check and the early-stopping rule see the same numbers on every rank.

Why ``torch.distributed`` and not ``accelerate``: the trainer needs four collectives and a DDP wrapper, and owns its
loop, precision, gradient accumulation and checkpoints already; ``Accelerator.prepare`` would take over the
optimizer, the data loader and mixed precision, which the trainer does its own way (and checks against a 1-process
run). ``accelerate launch`` still starts such a script: it sets the same environment as ``torchrun``.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lora_widgets.devices import parse_device
from lora_widgets.events.source import Requests
from lora_widgets.training.config import TrainConfig

__all__ = ["World", "is_main_process"]

logger = logging.getLogger(__name__)

_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # the backend this module initialises for each device type


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun"
        ) from None


def _serves(backend: str, device_type: str) -> bool:
    """Whether ``backend`` (``"gloo"``, ``"nccl"`` or torch's ``"cpu:gloo,cuda:nccl"``) has collectives for
    ``device_type``: gloo for CPU and CUDA tensors, nccl for CUDA only."""
    if ":" in backend:
        parts = dict(p.split(":", 1) for p in backend.split(","))
        return device_type in parts
    return (
        device_type == "cuda" if backend == "nccl" else backend == "gloo" and device_type in ("cpu", "cuda")
    )


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(frozen=True)
class World:
    """Which process this is among how many (``size == 1``: a plain run, every method a no-op)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str = ""  # the process group's backend ("" without one)

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        """The initialised process group as it is (a :class:`World` of one without one); for code that runs
        inside someone else's launch, such as a transformers ``Trainer``'s callbacks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        local = _env_int("LOCAL_RANK", dist.get_rank())
        return cls(dist.get_rank(), local, dist.get_world_size(), str(dist.get_backend()))

    @classmethod
    def from_env(cls, device_type: str) -> World:
        """The launcher's world (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), with the process group initialised for
        ``device_type`` (``gloo`` for ``"cpu"``, ``nccl`` for ``"cuda"``) unless it already is.

        Raises:
            ValueError: a process group initialised with another world size than ``WORLD_SIZE``, or whose backend
                has no collectives for ``device_type``; a device type other than CPU and CUDA; an unusable
                environment (``RANK`` missing or out of range, ``MASTER_ADDR`` missing).
        """
        size = _env_int("WORLD_SIZE", 1)
        initialised = dist.is_available() and dist.is_initialized()
        if initialised and dist.get_world_size() != size and "WORLD_SIZE" in os.environ:
            raise ValueError(
                f"the process group was initialised with world size {dist.get_world_size()} but WORLD_SIZE={size}; "
                "initialise it with the launcher's world size (torchrun sets WORLD_SIZE), or leave it to LoRATrainer"
            )
        if initialised:
            size = dist.get_world_size()
        if size <= 1:
            return cls()
        if device_type not in _BACKENDS:
            raise ValueError(
                f"WORLD_SIZE={size}: a multi-process run trains on the CPU (gloo) or CUDA GPUs (nccl), not on "
                f"{device_type!r}; set TrainConfig(device='cpu') or 'cuda'"
            )
        if not initialised:
            cls._initialise(size, device_type)
        backend = str(dist.get_backend())
        if not _serves(backend, device_type):
            raise ValueError(
                f"the process group's backend {backend!r} has no collectives for {device_type!r} tensors; use "
                f"backend {_BACKENDS[device_type]!r} for device {device_type!r}, or TrainConfig(device=...) to match"
            )
        return cls(dist.get_rank(), _env_int("LOCAL_RANK", dist.get_rank()), size, backend)

    @staticmethod
    def _initialise(size: int, device_type: str) -> None:
        rank = _env_int("RANK", -1)
        if not 0 <= rank < size:
            raise ValueError(f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r}; launch with torchrun")
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={size} but {' and '.join(missing)} not set; launch with `torchrun --nproc_per_node "
                f"{size} script.py` (or accelerate launch), which sets them"
            )
        if device_type == "cuda":
            torch.cuda.set_device(_env_int("LOCAL_RANK", rank))
        dist.init_process_group(_BACKENDS[device_type])
        atexit.register(_destroy)  # the group this module made ends with the process

    def device(self, preference: str | torch.device, chosen: torch.device) -> torch.device:
        """The device of this rank: ``cuda:<LOCAL_RANK>`` for a CUDA run (``chosen`` otherwise). ``ValueError``
        when ``preference`` names another GPU index than the rank's own."""
        if not self.distributed or chosen.type != "cuda":
            return chosen
        named = None if str(preference) == "auto" else parse_device(preference).index
        if named is not None and named != self.local_rank:
            raise ValueError(
                f"TrainConfig.device={str(preference)!r} but this process is LOCAL_RANK {self.local_rank} of a "
                f"{self.size}-process run, which trains on cuda:{self.local_rank}; use device='cuda' (or 'auto')"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA device(s); start at most "
                "one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", self.local_rank)

    def data_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the batch size of one *global* micro-batch (``batch_size x size``): what the data
        order, the steps per epoch and the token counts are computed from; each rank then takes its slice."""
        return config if not self.distributed else config.replace(batch_size=config.batch_size * self.size)

    def wrap(self, model: nn.Module, device: torch.device) -> DistributedDataParallel | None:
        """``model`` in ``DistributedDataParallel`` (``None`` for a plain run), after broadcasting its trainable
        parameters from rank 0. Only trainable parameters are synchronised (a frozen LoRA base is skipped by
        DDP); buffers are not broadcast each step (``broadcast_buffers=False``: a causal LM's buffers, such as
        rotary frequencies, are constants), and every trainable parameter must get a gradient in every step
        (``find_unused_parameters=False``, DDP's fast path)."""
        if not self.distributed:
            return None
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        # buffers are not synchronised in the forward passes (torch >= 2.13 names it forward_sync_buffers)
        buffers = (
            "forward_sync_buffers" if "forward_sync_buffers" in _ddp_arguments() else "broadcast_buffers"
        )
        options: dict[str, Any] = {
            "device_ids": [device.index] if device.type == "cuda" else None,
            "find_unused_parameters": False,
            "init_sync": False,  # the base is the same checkpoint everywhere; the trainable part was broadcast above
            buffers: False,
        }
        return DistributedDataParallel(model, **options)

    @property
    def collective_device(self) -> torch.device:
        """Where a tensor must be for the backend to reduce it: this rank's GPU under nccl, else the CPU."""
        return (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in self.backend
            else torch.device("cpu")
        )

    def _flags(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.collective_device)

    def agree(self, requests: Requests, stop: bool = False) -> bool:
        """Whether every rank stops now, agreed in one ``all_reduce(MAX)`` of ``[stop, pause]``: a stop asked on
        any rank (``requests`` or ``stop``, e.g. an early-stopping verdict) stops all, rank 0's pause holds all.
        Applies the outcome to this rank's ``requests``; without other ranks, just reads them."""
        if not self.distributed:
            return requests.stop_requested or stop
        flags = self._flags(
            [float(requests.stop_requested or stop), float(self.is_main and requests.pause_requested)]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        halt, pause = (bool(v) for v in flags.tolist())
        if halt and not stop:
            requests.stop()
        elif not self.is_main:
            requests.pause() if pause else requests.resume()
        return halt

    def hold(self, requests: Requests, poll: Callable[[], None], every: float) -> float:
        """Hold every rank while rank 0 is paused; returns the seconds held. Each round sleeps ``every`` seconds,
        calls ``poll`` (which reads the run directory's requests) and agrees (:meth:`agree`), so all ranks leave
        in the same round and no collective waits longer than a round (a pause may outlast the group's timeout)."""
        t0 = time.monotonic()
        while True:
            time.sleep(every)
            poll()
            if self.agree(requests) or not requests.pause_requested:
                return time.monotonic() - t0

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over the ranks, in place (returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.size)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def share(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (a picklable object: a path, ``None``)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.collective_device)
        return box[0]


def _ddp_arguments() -> frozenset[str]:
    return frozenset(inspect.signature(DistributedDataParallel).parameters)


def _destroy() -> None:
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except RuntimeError as exc:  # at exit the peers may be gone already: say so, the process ends anyway
        logger.warning("could not destroy the process group at exit: %s", exc)
