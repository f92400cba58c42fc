"""Resumable training checkpoints: adapter weights plus optimizer, schedule, data-order and RNG state.

Layout of one checkpoint directory (``<run_dir>/checkpoints/step-000100``)::

    adapter/                   PEFT-format adapter (adapter_config.json + adapter_model.safetensors),
                               loadable on its own with lora.load_adapter or peft.PeftModel.from_pretrained
    trainable.safetensors      every trainable parameter by name (what resuming restores; for full
                               fine-tuning this is the only copy of the weights)
    state.safetensors          optimizer tensors (``optimizer.<param index>.<name>``) and torch RNG states
    trainer_state.json         step, data position, optimizer hyper-parameters and scalar state, Python
                               and NumPy RNG states, the run's configuration, parameter names and shapes

Only safetensors and JSON are written and read: nothing is pickled or unpickled, so a checkpoint from an
untrusted source cannot run code. The directory is written with :func:`lora_widgets.atomic.atomic_directory`
(a temporary name next to its destination, every file fsynced, then ``os.replace``), so a crash mid-write
never leaves a half checkpoint under the final name, and a failed write (a full disk) raises an ``OSError``
naming the checkpoint's file while the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora_widgets.atomic import atomic_directory, naming_file
from lora_widgets.lora import layers as lora_mod
from lora_widgets.lora.peft_format import save_adapter
from lora_widgets.paths import as_path

__all__ = [
    "CheckpointState",
    "SavedKind",
    "capture_rng",
    "describe_saved",
    "load_checkpoint",
    "read_checkpoint_state",
    "restore_rng",
    "save_checkpoint",
    "save_trained_weights",
    "seed_everything",
    "trainable_parameters",
    "trained_weights_kind",
]

FORMAT_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
TRAINABLE = "trainable.safetensors"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -- RNG --------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The RNG states of Python, NumPy and torch as (JSON-able dict, tensors)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.cpu()
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, state, gauss = meta["python"]
    random.setstate((int(version), tuple(int(v) for v in state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state(
        (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -- weights ------------------------------------------------------------------------------------------


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None))


SavedKind = Literal["adapter", "model", "trainable"]
"""What :func:`save_trained_weights` writes: a PEFT-format ``adapter`` (ours or PEFT's), the whole ``model``
(every parameter trained), or the ``trainable`` tensors by name (a subset that is not a LoRA adapter)."""


def trained_weights_kind(model: nn.Module) -> SavedKind:
    """What :func:`save_trained_weights` writes for ``model`` as it is now (see :data:`SavedKind`)."""
    if lora_mod.lora_layers(model) or _is_peft_model(model):
        return "adapter"
    params = {id(p): p for p in model.parameters()}.values()
    if all(p.requires_grad for p in params) and callable(getattr(model, "save_pretrained", None)):
        return "model"
    return "trainable"


def describe_saved(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """One sentence saying what :func:`save_trained_weights` wrote to ``path`` for ``model``."""
    kind = trained_weights_kind(model)
    if kind == "adapter":
        return f"Saved the LoRA adapter (PEFT format) to {str(path)!r}."
    if kind == "model":
        return f"Saved the whole fine-tuned model (every parameter was trained) to {str(path)!r}."
    tensors = trainable_parameters(model)
    n = sum(p.numel() for _, p in tensors)
    return (
        f"Saved what was trained: the {len(tensors)} trainable tensors ({n:,} parameters), by name, to "
        f"{str(Path(path) / TRAINABLE)!r}; the frozen model is not in it."
    )


def save_trained_weights(
    model: nn.Module, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Save what training changed, in the format that loads elsewhere (:func:`trained_weights_kind`).

    Our LoRA: :func:`lora_widgets.lora.peft_format.save_adapter` (PEFT format). A PEFT-wrapped model: its own
    ``save_pretrained`` (safetensors). Full fine-tuning (every parameter trainable) of a transformers model:
    ``save_pretrained`` of the whole model. Anything else -- a subset of the parameters, e.g. adapters of the
    user's own making with ``LoRATrainer(lora=None)``, or a module without ``save_pretrained`` --
    ``trainable.safetensors`` with the trainable parameters by name: never the frozen model.
    """
    directory = as_path(directory, "save_adapter", "path")
    kind = trained_weights_kind(model)
    if kind == "adapter" and lora_mod.lora_layers(model):
        return save_adapter(model, directory, base_model_name_or_path)
    directory.mkdir(parents=True, exist_ok=True)
    if kind != "trainable":
        model.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]
        return directory
    _save_tensors({n: p for n, p in trainable_parameters(model)}, directory / TRAINABLE)
    return directory


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    # safetensors needs contiguous CPU tensors that share no storage.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        with naming_file(path):
            save_file(plain, str(path), metadata=metadata or {"format": "pt"})
    except SafetensorError as exc:  # safetensors reports a full disk as "... (os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


# -- optimizer ----------------------------------------------------------------------------------------


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        clean = {}
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            clean[k] = list(v) if isinstance(v, tuple) else v
        groups.append(clean)
    return {"param_groups": groups, "scalars": scalars}, tensors


def _join_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# -- save / load --------------------------------------------------------------------------------------


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` read besides the weights and the optimizer."""

    step: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    rng_meta: dict[str, Any] = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def restore_rng(self) -> None:
        """Put the RNGs back where they were when the checkpoint was written."""
        restore_rng(self.rng_meta, self.rng_tensors)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
    scaler: Any = None,
) -> Path:
    """Write a checkpoint atomically (temporary directory, then ``os.replace``) and return its path.

    Raises ``OSError`` naming the file under ``directory`` that could not be written (e.g. a full disk);
    an earlier checkpoint at ``directory`` is then left as it was.

    ``extra`` is any JSON-able dict (the trainer stores its config and data position there). Call it
    between optimizer steps: the RNG states captured are the ones the next step would use.
    """
    directory = Path(directory)
    params = trainable_parameters(model)
    with atomic_directory(directory) as tmp:
        if lora_mod.lora_layers(model) or _is_peft_model(model):
            save_trained_weights(model, tmp / "adapter")
        _save_tensors({n: p for n, p in params}, tmp / TRAINABLE)
        opt_meta, opt_tensors = _split_optimizer(optimizer)
        rng_meta, rng_tensors = capture_rng()
        _save_tensors({**opt_tensors, **rng_tensors}, tmp / STATE_TENSORS)
        state = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "param_names": [n for n, _ in params],
            "param_shapes": [list(p.shape) for _, p in params],
            "optimizer": opt_meta,
            "rng": rng_meta,
            "scaler": (scaler.state_dict() or None) if scaler is not None else None,  # {} when disabled
            "extra": extra or {},
        }
        with naming_file(tmp / STATE_JSON):
            (tmp / STATE_JSON).write_text(json.dumps(state))
    return directory


def read_checkpoint_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint (raises ``ValueError`` if it isn't one)."""
    directory = Path(directory)
    path = directory / STATE_JSON
    if not path.is_file():
        raise ValueError(
            f"{str(directory)!r} is not a training checkpoint (no {STATE_JSON}); checkpoints are the "
            "'checkpoints/step-NNNNNN' folders inside a run directory"
        )
    try:
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict):
        raise _unreadable(path, ValueError(f"a JSON {type(state).__name__}, not an object"))
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {state.get('format_version')!r} is not {FORMAT_VERSION}")
    return state


def _readable(directory: Path) -> bool:
    """Whether ``directory``'s three files parse (the tensors' headers and sizes only: cheap)."""
    try:
        json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        for name in (TRAINABLE, STATE_TENSORS):
            with safe_open(str(directory / name), "pt") as f:
                f.keys()
    except (SafetensorError, OSError, ValueError):  # not a good checkpoint: the caller looks further back
        return False
    return True


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    """A checkpoint file that cannot be read (truncated by a full disk or a killed process), named with the
    latest earlier checkpoint of the same run that reads, to resume from instead."""
    directory = path.parent
    earlier = sorted(
        (d for d in directory.parent.glob("step-*") if d.is_dir() and d.name < directory.name), reverse=True
    )
    good = next((d for d in earlier if _readable(d)), None)
    fix = (
        f"resume from the earlier checkpoint {str(good)!r} instead"
        if good is not None
        else "no earlier checkpoint of this run reads either: start the run again without resume_from"
    )
    return ValueError(f"checkpoint file {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); {fix}")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:  # a truncated file: named with the file
        raise _unreadable(path, exc) from None


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
) -> CheckpointState:
    """Restore trainable weights and optimizer state from ``directory``; returns step, RNG and extras.

    Everything is checked before anything is changed: the checkpoint's trainable parameter names and
    shapes must equal the model's (same base model, same LoRA configuration). Raises ``ValueError``
    naming the first mismatch otherwise. RNG states are returned, not applied: call
    :meth:`CheckpointState.restore_rng` when the run is about to continue.
    """
    directory = Path(directory)
    state = read_checkpoint_state(directory)
    params = trainable_parameters(model)
    names = [n for n, _ in params]
    shapes = [list(p.shape) for _, p in params]
    if names != state["param_names"]:
        only_ckpt = sorted(set(state["param_names"]) - set(names))[:3]
        only_model = sorted(set(names) - set(state["param_names"]))[:3]
        raise ValueError(
            f"checkpoint {str(directory)!r} was made for different trainable parameters "
            f"(only in checkpoint: {only_ckpt}, only in model: {only_model}); resume with the same base "
            "model and LoRA configuration"
        )
    if shapes != state["param_shapes"]:
        bad = next(i for i, (a, b) in enumerate(zip(shapes, state["param_shapes"], strict=True)) if a != b)
        raise ValueError(
            f"checkpoint shape mismatch for {names[bad]!r}: checkpoint {state['param_shapes'][bad]}, "
            f"model {shapes[bad]} (a different LoRA rank?)"
        )
    weights, tensors = _load_tensors(directory / TRAINABLE), _load_tensors(directory / STATE_TENSORS)
    missing = [n for n in names if n not in weights]
    if missing:
        raise _unreadable(directory / TRAINABLE, KeyError(f"no tensor {missing[0]!r}"))
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n].to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict(_join_optimizer(state["optimizer"], tensors))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return CheckpointState(
        step=int(state["step"]),
        path=directory,
        extra=dict(state.get("extra") or {}),
        scaler=state.get("scaler"),
        rng_meta=state["rng"],
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng.")},
    )
