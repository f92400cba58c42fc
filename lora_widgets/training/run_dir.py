"""The run directory: what a run writes, so that nothing trained is lost.

Layout of ``<output_dir>/<run_id>/``::

    config.json        the settings, model, device, data sizes and versions (written atomically)
    metrics.jsonl      every event, one JSON line each, appended and flushed as it happens
    control.json       a stop/pause/resume request from another process, read every step (only while one
                       is pending); both files' protocol is lora_widgets.events.run_files
    checkpoints/       step-NNNNNN/ resumable checkpoints (see lora_widgets.training.checkpoint)
    adapter/           the trained weights at the end of the run (PEFT format for LoRA; the whole model for
                       full fine-tuning; trainable.safetensors, the trainable tensors by name, otherwise)

``run_id`` is ``<date>-<time>-<r8|lora|full|custom1.3k>-lr<rate>`` (``-2``, ``-3``, ... if taken). Creating one also
removes the temporary entries that a killed run left behind in earlier run directories.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_widgets.atomic import atomic_write_json, remove_stale_temporaries
from lora_widgets.events.run_files import METRICS_FILE, EventLines, MetricsWriter
from lora_widgets.events.types import EvalMetrics, StepMetrics
from lora_widgets.lora.layers import LoRAConfig, count_parameters
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training.batches import Blocks
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import format_lr

__all__ = ["RunDirectory", "config_document", "read_metrics", "run_stem"]

logger = logging.getLogger(__name__)


def _short(n: int) -> str:
    """``1280`` -> ``1.3k``, ``98304`` -> ``98k``, ``2_400_000`` -> ``2.4M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2g}{unit}" if n < 10 * size else f"{round(n / size)}{unit}"
    return str(n)


def run_stem(
    config: TrainConfig, rank: int | None, adapters: bool, trainable: tuple[int, int] | None = None
) -> str:
    """``20260101-120000-r8-lr3e-3``: when, what and the rate. What: the LoRA rank, ``lora`` (adapters of
    unknown rank), ``full`` (every parameter trains), or ``custom<n>`` for any other subset, ``n`` its
    trainable parameters (``trainable``: (trainable, total) counts; e.g. ``custom1.3k``)."""
    if rank is not None:
        tag = f"r{rank}"
    elif adapters:
        tag = "lora"
    elif trainable is not None and trainable[0] < trainable[1]:
        tag = f"custom{_short(trainable[0])}"
    else:
        tag = "full"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}-lr{format_lr(config.learning_rate)}"


def _output_root(output_dir: str | os.PathLike[str]) -> Path:
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"TrainConfig.output_dir={str(root)!r} is a file, not a directory; set output_dir to a folder "
            "for the run directories (e.g. 'runs')"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"TrainConfig.output_dir={str(root)!r} cannot be created ({exc.strerror or exc}); set output_dir "
            "to a folder you can write to"
        ) from exc
    return root


class RunDirectory:
    """One run's folder: its config, its event log and the paths of its checkpoints and adapter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run_id = path.name

    @classmethod
    def create(cls, output_dir: str | os.PathLike[str], stem: str) -> RunDirectory:
        """A new, unique run directory under ``output_dir`` (created if needed); stale temporaries of
        killed runs there are removed first. Raises ``ValueError`` naming ``output_dir`` if it is a file or
        cannot be written."""
        root = _output_root(output_dir)
        for run in root.iterdir():
            if run.is_dir():
                for place in (run, run / "checkpoints", run / "adapter"):
                    for path in remove_stale_temporaries(place):
                        logger.info("removed %s, left by a run that was killed while writing it", path)
        for n in range(1, 10_000):
            path = root / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise ValueError(
                    f"cannot create a run directory in TrainConfig.output_dir={str(root)!r}: "
                    f"{exc.strerror or exc}; set output_dir to a folder you can write to"
                ) from exc
            return cls(path)
        raise ValueError(f"could not create a unique run directory under {str(root)!r}; clean it up")

    @property
    def adapter_dir(self) -> Path:
        """Where the final adapter goes."""
        return self.path / "adapter"

    def checkpoint_dir(self, step: int) -> Path:
        """``checkpoints/step-NNNNNN`` for the checkpoint after ``step`` updates."""
        return self.path / "checkpoints" / f"step-{step:06d}"

    def save_adapter(self, model: nn.Module, base_name: str | None) -> tuple[str | None, str]:
        """Save the trained weights to ``adapter/`` (not non-finite ones); returns (path or ``None``, a note
        for the run's end message saying why nothing was saved)."""
        bad = [n for n, t in ckpt.trainable_parameters(model) if not bool(torch.isfinite(t).all())]
        if bad:
            return None, f" The weights hold non-finite values ({bad[0]}, ...), so no adapter was saved."
        try:
            path = ckpt.save_trained_weights(model, self.adapter_dir, base_name)
        except Exception as exc:  # reported in the end message and logged: the run must still end cleanly
            logger.exception("saving the final adapter failed")
            return (
                None,
                f" Saving the adapter to {str(self.adapter_dir)!r} failed: {type(exc).__name__}: {exc}.",
            )
        note = "" if ckpt.trained_weights_kind(model) == "adapter" else " " + ckpt.describe_saved(model, path)
        return str(path), note

    def write_config(self, document: dict[str, Any]) -> None:
        """Write (or rewrite) ``config.json`` atomically."""
        atomic_write_json(self.path / "config.json", document, indent=2)

    def open_metrics(self) -> MetricsWriter:
        """``metrics.jsonl``, opened for appending (one whole line per event, flushed: a crash loses at
        most the line being written; a failed write is logged and the run goes on)."""
        return MetricsWriter(self.path / METRICS_FILE)


def config_document(
    *,
    run_id: str,
    config: TrainConfig,
    lora: LoRAConfig | None,
    model: nn.Module,
    base_name: str | None,
    device: torch.device,
    device_name: str,
    blocks: Blocks | None,
    resumed_from: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """What ``config.json`` holds: enough to tell later which settings, model, data and versions ran."""
    import lora_widgets

    trainable, total = count_parameters(model)
    return {
        "run_id": run_id,
        "train": config.to_dict(),
        "lora": lora.to_dict() if lora is not None else None,
        "model": {"class": type(model).__name__, "name_or_path": base_name},
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device),
        "device_name": device_name,
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        "data": None
        if blocks is None
        else {
            "train_blocks": int(blocks.train.shape[0]),
            "val_blocks": int(blocks.val.shape[0]) if blocks.val is not None else 0,
            "block_size": blocks.block_size,
            "steps_per_epoch": blocks.steps_per_epoch,
        },
        "versions": {"lora_widgets": lora_widgets.__version__, "torch": torch.__version__},
    }


def read_metrics(checkpoint_dir: Path, up_to_step: int) -> list[StepMetrics | EvalMetrics]:
    """The step and evaluation events of the run a checkpoint belongs to, up to its step, read from that
    run's ``metrics.jsonl`` (empty if it is gone). A damaged line is skipped, with a warning naming it."""
    metrics = checkpoint_dir.parent.parent / METRICS_FILE
    events: list[StepMetrics | EvalMetrics] = []
    if not metrics.is_file():
        return events
    lines = EventLines(str(metrics))
    with open(metrics, encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            event = lines.feed(line.rstrip("\n"))
            if isinstance(event, StepMetrics | EvalMetrics) and event.step <= up_to_step:
                events.append(event)
    return events
