"""What a sweep's run result depends on besides its settings, and the one rule for reusing a stored run.

A :class:`~lora_widgets.sweep.runner.Sweep` resumes from ``<directory>/sweep.json``: a run of the same plan
(settings, seeds, configs) that already has a row there is not run again. The plan alone does not decide the
result, though: the same settings on other data, on another base model or with other training code give
another result. So every row carries the :class:`Fingerprint` of the sweep that produced it, and
:func:`stale_parts` is the rule: a row is reused only when each part of its fingerprint equals the current
sweep's; a row without one (written before fingerprints existed) is stale. Stale rows are run again.

The parts, each a short SHA-256 hex digest:

``data``
    the token ids the runs train and validate on (:func:`data_fingerprint`: the bytes of the prepared token
    blocks, or of the instruction examples' ids and labels). Tokenization and the validation split happen
    before it, so a changed corpus, tokenizer, chat template or split changes it.
``model``
    the base model (:func:`model_fingerprint`): its class, its config (name or path included), its parameter
    count, every tensor's name, dtype and shape, and the values of its weights: all of them when the state
    dict is at most :data:`WHOLE_BYTES`, else :data:`SAMPLE_VALUES` evenly spaced values of every tensor, so
    that a multi-GB base is never read whole (a change that touches none of the sampled values goes unseen).
``code``
    the package's version, the hash of its Python sources outside ``widget/`` (the views never change a
    result; a development checkout changes without a new version) and torch's version (:func:`code_fingerprint`).

Not in it: the device and the machine, which also move results in the last digits.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_widgets.data.prepared import Examples

__all__ = [
    "PART_NAMES",
    "SAMPLE_VALUES",
    "WHOLE_BYTES",
    "Fingerprint",
    "code_fingerprint",
    "data_fingerprint",
    "model_fingerprint",
    "resume_note",
    "stale_parts",
]

WHOLE_BYTES = 64 * 2**20
"""Bases whose state dict is at most this many bytes (64 MiB) are hashed whole; larger ones are sampled."""

SAMPLE_VALUES = 64
"""Values hashed per tensor of a larger base, evenly spaced over the flattened tensor (first and last included)."""

_DIGITS = 16  # hex digits kept per part: 64 bits, enough to tell versions of one sweep's inputs apart


@dataclass(frozen=True)
class Fingerprint:
    """What a run's result depends on besides its settings (the module docstring says what each part hashes)."""

    data: str
    model: str
    code: str

    def to_dict(self) -> dict[str, str]:
        """JSON-safe dict (stored in each ``SweepRunEnded.fingerprint``)."""
        return asdict(self)


PART_NAMES: dict[str, str] = {"data": "the data", "model": "the base model", "code": "the package code"}
"""Each part's name in words, as the resume note says what changed."""


def stale_parts(stored: dict[str, Any] | None, current: Fingerprint) -> list[str]:
    """Why a stored row may not be reused: the names of the parts that differ (``[]``: reuse it). A row
    without a fingerprint, or with an unreadable one, is stale as a whole (``["fingerprint"]``)."""
    if not isinstance(stored, dict) or any(not isinstance(stored.get(k), str) for k in PART_NAMES):
        return ["fingerprint"]
    return [k for k, v in current.to_dict().items() if stored[k] != v]


def resume_note(resumed: int, planned: int, directory: str, stale: list[list[str]]) -> str:
    """What a sweep took from its directory, in words: ``"resumed 4 of 8 runs from sweeps/x"``, and for the
    stored rows :func:`stale_parts` refused, how many run again and why; ``""`` when nothing was stored."""
    if not resumed and not stale:
        return ""
    note = f"resumed {resumed} of {planned} runs from {directory}"
    if stale:
        parts = dict.fromkeys(p for reasons in stale for p in reasons)
        changed = [PART_NAMES[p] for p in parts if p in PART_NAMES]
        why = [" and ".join(changed) + " changed"] if changed else []
        if "fingerprint" in parts:
            why.append("no fingerprint (written before sweeps kept one)")
        runs = "run" if len(stale) == 1 else "runs"
        note += f"; {len(stale)} stored {runs} run again: {'; '.join(why)}"
    return note


def _digest(h: Any) -> str:
    return str(h.hexdigest())[:_DIGITS]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous()  # [numel]
    return bytes(flat.cpu().view(torch.uint8).numpy().tobytes())


def data_fingerprint(train: torch.Tensor | Examples, val: torch.Tensor | Examples | None) -> str:
    """Hash of the prepared training and validation data: token blocks ``[n, T]`` (dtype, shape and bytes), or
    instruction examples (each one's token ids and labels). Cheap: one pass over ids the run holds anyway."""
    h = hashlib.sha256()
    for name, part in (("train", train), ("val", val)):
        if part is None:
            h.update(f"{name}:none".encode())
        elif isinstance(part, Examples):
            h.update(f"{name}:examples:{len(part)}:{part.pad_id}".encode())
            for e in part.items:
                h.update(json.dumps([e.input_ids, e.labels]).encode())
        else:
            h.update(f"{name}:{part.dtype}:{tuple(part.shape)}".encode())
            h.update(_tensor_bytes(part))
    return _digest(h)


def _config_text(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "no config"
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the base model: class, config, parameter count, every state-dict tensor's name, dtype and shape,
    and its values (whole up to :data:`WHOLE_BYTES` in all, else :data:`SAMPLE_VALUES` evenly spaced ones)."""
    state = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    total = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    whole = total <= WHOLE_BYTES
    h = hashlib.sha256(f"{type(model).__qualname__}:{params}:{_config_text(model)}".encode())
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.is_meta or t.numel() == 0:
            continue
        if whole:
            h.update(_tensor_bytes(t))
        else:
            flat = t.detach().reshape(-1)  # [numel], a view when contiguous: nothing is copied but the sample
            idx = torch.linspace(0, flat.numel() - 1, min(SAMPLE_VALUES, flat.numel()), device=flat.device)
            h.update(_tensor_bytes(flat[idx.long()]))  # [<= SAMPLE_VALUES]
    return _digest(h)


@functools.cache
def code_fingerprint() -> str:
    """Hash of the package version, its Python sources outside ``widget/`` and torch's version (once a process:
    the code a process runs does not change under it)."""
    import lora_widgets

    root = Path(lora_widgets.__file__).parent
    h = hashlib.sha256(f"lora_widgets {lora_widgets.__version__}; torch {torch.__version__}".encode())
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "widget":
            continue
        h.update(str(rel).encode())
        h.update(path.read_bytes())
    return _digest(h)
