"""``TrainConfig``: every hyper-parameter of a training run, validated before anything runs.

Kept apart from the loop in ``training/`` so that the dashboard, notebooks and docs can build and
check a configuration without touching the training code, and so each module holds one job.
A bad value raises ``ValueError`` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_widgets.data.sft import TRAIN_ON
from lora_widgets.devices import best_precision, cuda_has_bf16
from lora_widgets.health.samples import MAX_PROMPTS
from lora_widgets.quantization import BASE_PRECISIONS
from lora_widgets.training.early_stopping import EarlyStopping
from lora_widgets.training.schedules import SCHEDULES

__all__ = ["PRECISIONS", "TrainConfig"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults suit the shipped tiny base model on a CPU (a ~20 s LoRA run).

    Args:
        learning_rate: peak AdamW rate, in (0, 1). Adam divides each gradient coordinate by its running
            RMS, so every update moves a weight by about the learning rate whatever the gradient's scale
            (Kingma & Ba 2015, "Adam", arXiv:1412.6980, sec. 2.1: the step is approximately bounded by
            the step size). A rate of 1 or more moves weights by more than their own magnitude (typically
            well below 1) on every step and diverges; LoRA uses 1e-4 to 1e-2 (3e-3 here).
        batch_size: sequences per micro-batch (>= 1).
        grad_accum_steps: micro-batches whose gradients are summed before each update (>= 1); the
            effective batch is ``batch_size * grad_accum_steps`` sequences.
        epochs: passes over the training blocks (>= 1); ignored when ``max_steps`` is set.
        max_steps: optimizer updates to run (>= 1), overriding ``epochs`` (data is cycled as needed);
            ``None`` runs ``epochs`` full passes.
        warmup_steps: updates of linear warm-up (>= 0), see :mod:`lora_widgets.training.schedules`. It may be as
            long as the run or longer, as in ``transformers``' schedules: the rate then rises for the whole
            run and never reaches ``learning_rate`` (the dashboard's LR preview shows it). It is not an
            error, so that a short trial run (``max_steps=5``) works with the default warm-up.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after warm-up.
        weight_decay: AdamW decoupled weight decay (>= 0); applied to matrices only, not to biases/norms.
        max_grad_norm: clip the global gradient norm to this (> 0); ``None`` disables clipping.
        eval_every: evaluate every this many updates (>= 1); ``None`` evaluates only at the start and end.
            Evaluation needs validation data (``eval_data`` or ``val_fraction > 0``).
        eval_batches: cap on validation batches per evaluation (>= 1), bounding its cost; ``None`` = all.
        seed: seeds Python, NumPy, torch, the adapters' initialisation and the data order.
        precision: ``"fp32"``; ``"bf16"`` (autocast on CPU or CUDA); ``"fp16"`` (CUDA autocast with a
            GradScaler; not available on the CPU, where fp16 matmuls are unsupported or very slow); ``"auto"``:
            bf16 on a GPU that has it, fp16 with a GradScaler on one that does not (a T4), fp32 elsewhere
            (:func:`lora_widgets.devices.best_precision`; a 4-bit base computes in the same dtype).
        base: the frozen base the run expects (:data:`lora_widgets.quantization.BASE_PRECISIONS`):
            ``"16-bit"``, ``"8-bit"`` or ``"4-bit"``; ``None``: the model as given. The Trainer never
            quantizes a model: it checks that the model is the base named here (load one with
            ``load_model(..., base="4-bit")``); the dashboard loads the base its "base" control names.
        log_every: publish a :class:`StepMetrics` every this many updates (>= 1) and on the last one.
            Reading the loss forces a GPU sync, so larger values are a little faster on GPUs.
        checkpoint_every: write a resumable checkpoint every this many updates (>= 1), plus one at the
            end; ``None``: no checkpoints (the final adapter is saved in any case).
        output_dir: parent of the run directories.
        block_size: tokens per training sequence when the data has to be tokenised (2 .. 1,048,576).
        val_fraction: share of the data held out for validation when no ``eval_data`` is given, in [0, 0.5]:
            of the documents (text) or examples (rows), whole (:mod:`lora_widgets.data.split`).
        device: ``"auto"`` (best available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        max_length: tokens per example at most for instruction/chat rows (2 .. 1,048,576), which are
            padded per batch instead of packed into blocks; longer rows are cut (keeping the start, as
            TRL's ``SFTConfig.max_length``) and rows left with no trained token are dropped and counted.
        train_on: for instruction/chat rows, ``"answers"`` (the completions and every assistant turn with
            its end-of-turn token, TRL's ``completion_only_loss``/``assistant_only_loss``) or ``"all"``
            (every token); see :data:`lora_widgets.data.sft.TRAIN_ON`. Plain text trains every token either way.
        packing: how instruction/chat batches are laid out. ``False``: each example in its own row, padded to
            the batch's longest (grouped by length, so little is padding). ``True``: padding-free, the batch's
            examples side by side in one row with ``position_ids`` restarting at 0 for each, so attention never
            crosses an example (Hugging Face, "packing-with-FA2" blog; needs a transformers model).
            With SDPA the run attends per example (:mod:`lora_widgets.training.packed_attention`), as fast as
            the padded default on CPU (1.03x); eager attention computes the row's whole block-diagonal mask.
            ``"auto"`` (default): packed with a variable-length attention kernel
            (``attn_implementation="flash_attention_2"``/``"flash_attention_3"``), padded otherwise: length-grouped
            batches leave 3-5% padding, so packing gains little more (``benchmarks/bench_packing.py``). The same
            examples make each update either way, and so the same loss.
        adapter_stats: measure every LoRA layer (``||dW||/||W||``, norms, gradient norms, singular values,
            last update size) on the first update, every ``eval_every`` updates and the last one, publish
            them as :class:`~lora_widgets.events.types.AdapterStats` and raise "is it training?" alerts
            (:mod:`lora_widgets.health.alerts`) from them. Costs well under 1% of training time at the defaults.
        sample_prompts: prompts answered greedily at each evaluation by the base model and the current
            adapter (:class:`~lora_widgets.events.types.SampleGenerations`); at most 8 non-empty strings. ``None``:
            the first 16 tokens of the first 2 validation blocks; ``()``: no samples. The base model's answers
            are generated once; the adapter's cost about 2% of training time for the shipped model at the defaults.
        sample_max_new_tokens: tokens generated per sample answer (1 .. 1024), bounding their cost.
        early_stopping: an :class:`~lora_widgets.training.early_stopping.EarlyStopping` rule (patience on the
            validation loss, a divergence stop) or ``None`` (run every step). A run it stops ends in
            :class:`~lora_widgets.events.types.RunEarlyStopped` and keeps the adapter of its best evaluation.
            Patience needs ``eval_every``. A dict (from JSON) becomes an ``EarlyStopping``.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
            arXiv:2402.12354, sec. 3-4): B's learning rate is this many times A's (``learning_rate``); the paper
            suggests about 16 (its ratio ``lambda = eta_B / eta_A``; sec. 4 shows B moving too slowly when both rates
            are equal at large width). PEFT's name (``peft.optimizers.create_loraplus_optimizer``); as there, 1-D
            adapter parameters (DoRA's magnitude) get B's rate. ``None`` (default): one rate for all. Needs
            LoRA adapters: a number > 0, 1 being the same as ``None``.
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
    base: str | None = None
    log_every: int = 1
    checkpoint_every: int | None = None
    output_dir: str | os.PathLike[str] = "runs"
    block_size: int = 128
    val_fraction: float = 0.1
    device: str = "auto"
    gradient_checkpointing: bool = False
    max_length: int = 512
    train_on: str = "answers"
    packing: bool | str = "auto"
    adapter_stats: bool = True
    sample_prompts: tuple[str, ...] | None = None
    sample_max_new_tokens: int = 32
    early_stopping: EarlyStopping | None = None
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"TrainConfig.{name}={value!r} is invalid: {name} must be {allowed}")

        lr = self.learning_rate
        if not (_is_num(lr) and math.isfinite(lr) and 0 < lr < 1):
            raise bad(
                "learning_rate",
                "a number in (0, 1) (AdamW moves each weight by about this much per step), e.g. 3e-3 for LoRA",
            )
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_every"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise bad(name, "an integer >= 1")
        if self.max_steps is not None and not (_is_int(self.max_steps) and self.max_steps >= 1):
            raise bad("max_steps", "None (run `epochs` passes over the data) or an integer >= 1")
        for name in ("eval_every", "eval_batches", "checkpoint_every"):
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
        if self.base is not None and self.base not in BASE_PRECISIONS:
            raise bad("base", f"None (the model as given) or one of {list(BASE_PRECISIONS)}")
        if not isinstance(self.output_dir, str | os.PathLike) or not str(self.output_dir):
            raise bad("output_dir", "a non-empty path")
        if not (_is_int(self.block_size) and 2 <= self.block_size <= 2**20):
            raise bad("block_size", "an integer in [2, 1048576], e.g. 128")
        if not (_is_num(self.val_fraction) and 0 <= self.val_fraction <= 0.5):
            raise bad("val_fraction", "a number in [0, 0.5]")
        if not isinstance(self.device, str | torch.device) or not str(self.device):
            raise bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if not (_is_int(self.max_length) and 2 <= self.max_length <= 2**20):
            raise bad("max_length", "an integer in [2, 1048576] (tokens per instruction example), e.g. 512")
        if self.train_on not in TRAIN_ON:
            raise bad(
                "train_on", f"one of {list(TRAIN_ON)}: 'answers' trains the replies only, 'all' every token"
            )
        if self.packing not in (True, False, "auto") or type(self.packing) not in (bool, str):
            raise bad("packing", "'auto', True (padding-free rows) or False (padded rows)")
        for name in ("gradient_checkpointing", "adapter_stats"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        self._check_samples(bad)
        self._check_early_stopping(bad)
        ratio = self.loraplus_lr_ratio
        if ratio is not None and not (_is_num(ratio) and math.isfinite(ratio) and ratio > 0):
            raise bad(
                "loraplus_lr_ratio",
                "None (one learning rate) or a finite number > 0: B's rate over A's, about 16 in LoRA+ "
                "(Hayou et al. 2024)",
            )

    def _check_early_stopping(self, bad: Callable[[str, str], ValueError]) -> None:
        """The early-stopping rule: an ``EarlyStopping`` (a dict from JSON is converted) or ``None``."""
        rule = self.early_stopping
        if isinstance(rule, dict):
            rule = EarlyStopping.from_dict(rule)
            object.__setattr__(self, "early_stopping", rule)
        if rule is not None and not isinstance(rule, EarlyStopping):
            raise bad(
                "early_stopping",
                "None or an EarlyStopping(patience=..., min_delta=..., divergence_factor=...)",
            )
        how = "set eval_every (e.g. 10)"
        why = rule.refusal_without_evaluations(self.eval_every is not None, how) if rule is not None else None
        if why:
            raise bad("early_stopping", f"a rule without patience while eval_every=None. {why}")

    def _check_samples(self, bad: Callable[[str, str], ValueError]) -> None:
        """The sample settings (``bad(name, allowed)`` builds the error)."""
        prompts = self.sample_prompts
        if prompts is not None:
            if isinstance(prompts, str) or not isinstance(prompts, tuple | list):
                raise bad(
                    "sample_prompts",
                    "None (prompts from the validation data), () (no samples) or a tuple of strings",
                )
            if len(prompts) > MAX_PROMPTS or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise bad(
                    "sample_prompts",
                    f"at most {MAX_PROMPTS} non-empty strings (each is generated twice per evaluation)",
                )
            object.__setattr__(self, "sample_prompts", tuple(prompts))  # a list (from JSON) becomes a tuple
        n = self.sample_max_new_tokens
        if not (_is_int(n) and 1 <= n <= 1024):
            raise bad("sample_max_new_tokens", "an integer in [1, 1024], e.g. 32")

    def check_device(self, device: str | torch.device) -> None:
        """Raise ``ValueError`` if ``precision`` cannot run on ``device`` (a type such as ``"cpu"`` or a device).

        Not part of ``__post_init__`` because a config does not know its device until a run resolves
        ``device="auto"``: the trainer checks the device it will use, the dashboard the one it will offer.
        fp16 needs CUDA (its GradScaler; CPU fp16 matmuls are unsupported or very slow); bf16 on CUDA needs
        compute capability 8.0 or more.
        """
        d = torch.device(device)
        if self.precision == "auto":
            return  # resolves to what the device supports (:meth:`resolved`)
        if self.precision == "fp16" and d.type != "cuda":
            raise ValueError(
                f"TrainConfig.precision='fp16' needs a CUDA GPU (it uses a GradScaler); the device is "
                f"{d.type!r}. Use precision='bf16' or 'fp32' here"
            )
        if self.precision == "bf16" and d.type == "cuda" and not cuda_has_bf16():
            raise ValueError(
                "TrainConfig.precision='bf16' is not supported by this GPU (it needs compute capability "
                ">= 8.0, e.g. A100/L4/H100); use precision='fp16' on a T4/V100"
            )

    def resolved(self, device: str | torch.device) -> TrainConfig:
        """This config with ``precision="auto"`` replaced by what ``device`` gets
        (:func:`lora_widgets.devices.best_precision`); unchanged otherwise."""
        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision=best_precision(device))

    def for_run(self, device: torch.device, base: str) -> TrainConfig:
        """This config checked for a run on ``device`` with a model whose base is ``base``
        (:meth:`check_device`, :meth:`check_model`), ``precision="auto"`` resolved (:meth:`resolved`)."""
        self.check_device(device)
        self.check_model(base)
        return self.resolved(device)

    def check_model(self, base: str) -> None:
        """Raise ``ValueError`` if ``base`` (the model's, :func:`lora_widgets.quantization.base_of`) is not the
        base this config names (``None`` accepts any)."""
        if self.base is not None and base != self.base:
            raise ValueError(
                f"TrainConfig.base={self.base!r} but the model's base is {base}; load the model with "
                f"lora_widgets.load_model(..., base={self.base!r}), or set TrainConfig(base=None) to train it as it is"
            )

    def check_data(self, n_train_blocks: int) -> None:
        """Raise ``ValueError`` if one optimizer step needs more sequences than the ``n_train_blocks`` there are.

        Not part of ``__post_init__`` because the number of blocks is known only once the data is packed.
        """
        need = self.batch_size * self.grad_accum_steps
        if n_train_blocks < need:
            blocks = "block" if n_train_blocks == 1 else "blocks"
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} x grad_accum_steps={self.grad_accum_steps} = {need} "
                f"sequences per step, but the training data has only {n_train_blocks} {blocks}; lower "
                "batch_size or grad_accum_steps, lower block_size, or add data"
            )

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
