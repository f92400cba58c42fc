"""``TrainConfig``: every hyper-parameter of a training run, validated before anything runs.

Kept apart from the loop in ``trainer.py`` so that the dashboard, notebooks and docs can build and
check a configuration without touching the training code, and so each module holds one job.
A bad value raises ``ValueError`` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_widgets.schedules import SCHEDULES

__all__ = ["PRECISIONS", "TrainConfig"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults suit the shipped tiny base model on a CPU (a ~20 s LoRA run).

    Args:
        learning_rate: peak AdamW rate, in (0, 1].
        batch_size: sequences per micro-batch (>= 1).
        grad_accum_steps: micro-batches whose gradients are summed before each update (>= 1); the
            effective batch is ``batch_size * grad_accum_steps`` sequences.
        epochs: passes over the training blocks (>= 1); ignored when ``max_steps`` is set.
        max_steps: optimizer updates to run (>= 1), overriding ``epochs`` (data is cycled as needed);
            ``None`` runs ``epochs`` full passes.
        warmup_steps: updates of linear warm-up (>= 0), see :mod:`lora_widgets.schedules`.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after warm-up.
        weight_decay: AdamW decoupled weight decay (>= 0); applied to matrices only, not to biases/norms.
        max_grad_norm: clip the global gradient norm to this (> 0); ``None`` disables clipping.
        eval_every: evaluate every this many updates (>= 1); ``None`` evaluates only at the start and end.
            Evaluation needs validation data (``eval_data`` or ``val_fraction > 0``).
        eval_batches: cap on validation batches per evaluation (>= 1), bounding its cost; ``None`` = all.
        seed: seeds Python, NumPy, torch, the adapters' initialisation and the data order.
        precision: ``"fp32"``; ``"bf16"`` (autocast on CPU or CUDA); ``"fp16"`` (CUDA autocast with a
            GradScaler; not available on the CPU, where fp16 matmuls are unsupported or very slow).
        log_every: publish a :class:`StepMetrics` every this many updates (>= 1) and on the last one.
            Reading the loss forces a GPU sync, so larger values are a little faster on GPUs.
        checkpoint_every: write a resumable checkpoint every this many updates (>= 1), plus one at the
            end; ``None``: no checkpoints (the final adapter is saved in any case).
        output_dir: parent of the run directories.
        block_size: tokens per training sequence when the data has to be tokenised (2 .. 1,048,576).
        val_fraction: share of the data held out for validation when no ``eval_data`` is given, in [0, 0.5].
        device: ``"auto"`` (best available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
    """

    learning_rate: float = 3e-3
    batch_size: int = 8
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int | None = 200
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = 50
    eval_batches: int | None = 8
    seed: int = 42
    precision: str = "fp32"
    log_every: int = 1
    checkpoint_every: int | None = None
    output_dir: str | os.PathLike[str] = "runs"
    block_size: int = 128
    val_fraction: float = 0.1
    device: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"TrainConfig.{name}={value!r} is invalid: {name} must be {allowed}")

        lr = self.learning_rate
        if not (_is_num(lr) and math.isfinite(lr) and 0 < lr <= 1):
            raise bad("learning_rate", "a number in (0, 1], e.g. 3e-3 for LoRA")
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_every"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise bad(name, "an integer >= 1")
        for name in ("max_steps", "eval_every", "eval_batches", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 1):
                raise bad(name, "None or an integer >= 1")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise bad("warmup_steps", "an integer >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {list(SCHEDULES)}")
        if not (_is_num(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a finite number >= 0")
        g = self.max_grad_norm
        if g is not None and not (_is_num(g) and math.isfinite(g) and g > 0):
            raise bad("max_grad_norm", "None (no clipping) or a finite number > 0, e.g. 1.0")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise bad("seed", "an integer >= 0")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {list(PRECISIONS)}")
        if not isinstance(self.output_dir, str | os.PathLike) or not str(self.output_dir):
            raise bad("output_dir", "a non-empty path")
        if not (_is_int(self.block_size) and 2 <= self.block_size <= 2**20):
            raise bad("block_size", "an integer in [2, 1048576], e.g. 128")
        if not (_is_num(self.val_fraction) and 0 <= self.val_fraction <= 0.5):
            raise bad("val_fraction", "a number in [0, 0.5]")
        if not isinstance(self.device, str | torch.device) or not str(self.device):
            raise bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "True or False")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["device"] = str(self.device)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
