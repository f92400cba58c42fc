"""What one optimizer update and one evaluation do, as plain functions of their inputs.

Nothing here knows about threads, events or files: ``train_step`` is the body of nanoGPT's loop
(forward, backward per micro-batch, clip, step), ``evaluate`` the mean validation loss. The loss is the
next-token cross-entropy (Radford et al. 2018, "Improving Language Understanding by Generative
Pre-Training", sec. 3.1, eq. 1), averaged over the predicted tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_widgets.health.gradient_check import GradientReport, NoGradientError, gradient_report
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training.batches import MicroBatch, PaddedBatch
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.distributed import World

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["Probe", "StepResult", "batch_loss", "evaluate", "forward_loss", "make_optimizer", "train_step"]

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
Probe = Callable[[], Callable[[], object]]
"""A look inside an update: called after clipping, just before ``optimizer.step()`` (e.g. to copy the adapters);
what it returns is called after the step and before ``zero_grad`` (the gradients exist only until then), and
its result is :attr:`StepResult.probed`."""


@dataclass
class StepResult:
    """What an update reports. ``loss``/``grad_norm`` are read only when asked (reading syncs the GPU)."""

    applied: bool  # the optimizer update was made
    loss: float | None = None
    grad_norm: float | None = None
    bad_step: int | None = None  # first update (1-based) whose loss/gradient was NaN/inf, once seen
    probed: Any = None  # what the probe found (None without one)
    gradients: GradientReport | None = None  # which trainable parameters got a gradient (when checked)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") over the trainable
    parameters; weight decay on matrices only, not on biases and norms (as nanoGPT and transformers do).

    With ``config.loraplus_lr_ratio`` = lambda (LoRA+, Hayou et al. 2024, sec. 3-4) the LoRA B factors and the 1-D
    parameters (DoRA's magnitude, as ``peft.optimizers.create_loraplus_optimizer`` groups them) form groups of
    their own with ``"lr_ratio": lambda``: each step sets a group's rate to the schedule's rate times its ratio
    (:func:`train_step`), so B learns lambda times faster than A all along the schedule."""
    params = ckpt.trainable_parameters(model)
    ratio = config.loraplus_lr_ratio
    if ratio is not None and not any(".lora_B." in n for n, _ in params):
        raise ValueError(
            f"TrainConfig.loraplus_lr_ratio={ratio!r} sets LoRA's B factors' learning rate, but the model has no "
            "trainable lora_B (full fine-tuning?): set loraplus_lr_ratio=None, or train LoRA adapters"
        )
    fast = {id(p) for n, p in params if ratio is not None and (".lora_B." in n or p.dim() < 2)}
    groups: list[dict[str, Any]] = [  # matrices decay, vectors do not; the first group always exists
        {
            "params": [p for _, p in params if p.dim() >= 2 and id(p) not in fast],
            "weight_decay": config.weight_decay,
        }
    ]
    for weight_decay, lr_ratio, members in (
        (0.0, 1.0, [p for _, p in params if p.dim() < 2 and id(p) not in fast]),
        (config.weight_decay, ratio, [p for _, p in params if p.dim() >= 2 and id(p) in fast]),
        (0.0, ratio, [p for _, p in params if p.dim() < 2 and id(p) in fast]),
    ):
        if members:
            groups.append({"params": members, "weight_decay": weight_decay, "lr_ratio": lr_ratio})
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def forward_loss(
    model: nn.Module,
    x: torch.Tensor,
    autocast: Autocast,
    reduction: str = "mean",
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``x`` [B, T]: the mean over the predicted tokens, or their sum.

    Without ``labels`` every token after the first is predicted (packed text). With ``labels`` [B, T]
    (aligned with ``x``, ``-100`` where nothing is trained: prompts, padding) only the trained tokens count,
    and ``attention_mask`` [B, T] keeps padding from being attended to. ``num_items`` replaces the count of
    trained tokens in the mean: with gradient accumulation it is the trained tokens of the whole update, so
    that each micro-batch's loss is its *sum* over that one count and the accumulated gradient is the mean
    over every trained token of the update. Dividing each micro-batch by its own count instead weighs tokens
    of short micro-batches more: the gradient-accumulation bug that Unsloth and Hugging Face reported and
    fixed in Oct 2024 (unsloth.ai/blog/gradient; huggingface.co/blog/gradient_accumulation: transformers'
    ``num_items_in_batch``). Equals :func:`lora_widgets.data.sft_batches.masked_lm_loss` for the same labels.
    ``position_ids`` [R, W] restarting per example mark a packed batch (no ``attention_mask``): transformers' models
    then attend within each example only.
    """
    kwargs: dict[str, Any] = {}
    config = getattr(getattr(model, "module", model), "config", None)  # (DDP holds the model in .module)
    if getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False  # no KV cache while training
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with autocast():
        out = model(input_ids=x, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out  # [B, T, V]
    # Targets are the labels shifted left by one; the last position has none (-100 is ignored). Padding the
    # targets instead of slicing the logits avoids copying the [B, T, V] logits.
    targets = F.pad((x if labels is None else labels)[:, 1:], (0, 1), value=-100)  # [B, T]
    if labels is None:
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction
        )
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    if reduction == "sum":
        return total
    return total / (int((targets != -100).sum()) if num_items is None else num_items)


def batch_loss(
    model: nn.Module, batch: MicroBatch, autocast: Autocast, n_micro: int, ranks: int = 1
) -> torch.Tensor:
    """One micro-batch's share of its update's loss; summed over the ``n_micro`` micro-batches of the update
    it is the mean over the update's predicted (packed) or trained (examples) tokens.

    With ``ranks`` processes (DDP averages their gradients), blocks need nothing more: every rank's micro-batch
    has as many tokens, so the mean of the ranks' means is the global mean. An examples loss is already divided
    by the trained tokens of the whole update (every rank's, ``step_items``), so it is multiplied by ``ranks``
    to undo DDP's division: the sum over ranks is then the global mean (transformers does the same with
    ``num_items_in_batch`` under ``average_tokens_across_devices``).
    """
    if isinstance(batch, PaddedBatch):
        return ranks * forward_loss(
            model, batch.input_ids, autocast, attention_mask=batch.attention_mask, labels=batch.labels,
            num_items=batch.step_items, position_ids=batch.position_ids,
        )  # fmt: skip
    return forward_loss(model, batch, autocast) / n_micro  # blocks of one size: the mean of the means


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: Sequence[MicroBatch],
    *,
    step: int,
    lr: float,
    max_grad_norm: float | None,
    autocast: Autocast,
    first_bad: torch.Tensor,
    read: bool,
    probe: Probe | None = None,
    check_gradients: bool = False,
    world: World | None = None,
    ddp: DistributedDataParallel | None = None,
) -> StepResult:
    """Update number ``step`` (1-based): gradients summed over the micro-batches (:func:`batch_loss`), clipped,
    one optimizer step at rate ``lr``.

    Non-finite check without a GPU sync on every update: ``first_bad`` (a 0-d long tensor on the device,
    -1 until then) records the first update whose loss -- or, without fp16 loss scaling, gradient norm --
    was NaN/inf. With ``read`` the loss, norm and marker come back in one transfer *before* the update is
    applied, so a NaN appearing on a read update never reaches the weights (``applied=False``); one
    appearing on an unread update is reported at the next read one (the weights are spoiled by then).

    A loss that depends on no trainable parameter (no ``grad_fn``) raises :class:`NoGradientError` naming
    them, before ``backward()`` would fail with torch's "element 0 of tensors does not require grad"; with
    ``check_gradients`` the parameters that got no gradient are read after the backward passes
    (:attr:`StepResult.gradients`).

    In a multi-process run (``world``), ``ddp`` (the model in ``DistributedDataParallel``) runs the passes and
    averages the gradients in the last micro-batch's backward (the others under ``no_sync``), and the loss is
    averaged over the ranks before the non-finite check, so every rank reads the same loss and makes the same
    decision.
    """
    world = world or World()
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's groups run at lambda times the schedule
    loss_sum = torch.zeros((), device=first_bad.device)
    for i, x in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            loss = batch_loss(ddp or model, x, autocast, len(micro_batches), world.size)
            if not loss.requires_grad:  # nothing trainable is on the path from the loss: say which, and why
                raise NoGradientError(gradient_report(model), step)
            scaler.scale(loss).backward()  # loss scaling: Micikevicius et al. 2018, sec. 3.2 (off: identity)
        loss_sum += loss.detach()
        del loss
    world.mean_(loss_sum)  # [] the update's loss over every rank's tokens
    scaler.unscale_(optimizer)
    gradients = gradient_report(model) if check_gradients else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    finite = torch.isfinite(loss_sum)
    if not scaler.is_enabled():  # with fp16 scaling, overflowing gradients are routine: the scaler skips them
        finite = finite & torch.isfinite(grad_norm)
    first_bad.copy_(torch.where((first_bad < 0) & ~finite, step, first_bad))
    result = StepResult(applied=False, gradients=gradients)
    if read:
        loss_v, norm_v, bad_v = torch.stack([loss_sum.float(), grad_norm.float(), first_bad.float()]).tolist()
        result.loss, result.grad_norm = loss_v, norm_v
        result.bad_step = int(bad_v) if bad_v >= 0 else None
    after = probe() if probe is not None else None
    if result.bad_step != step:
        scaler.step(optimizer)  # (scaling off: optimizer.step())
        scaler.update()
        result.applied = True
    if after is not None:
        result.probed = after()
    optimizer.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[MicroBatch], autocast: Autocast, world: World | None = None
) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of ``batches`` ``[b, T]`` (examples:
    over their trained tokens only, so on instruction data it is the loss on the answers); in a multi-process
    run (``world``) over every rank's batches (the sums and counts are summed over the ranks)."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for x in batches:
            if isinstance(x, PaddedBatch):
                loss = forward_loss(
                    model,
                    x.input_ids,
                    autocast,
                    "sum",
                    x.attention_mask,
                    x.labels,
                    position_ids=x.position_ids,
                )
                n = int((x.labels[:, 1:] != -100).sum())
            else:
                loss, n = forward_loss(model, x, autocast, reduction="sum"), x.shape[0] * (x.shape[1] - 1)
            total = total.to(loss.device) + loss.double()
            count += n
        if world is not None and world.distributed:  # [sum, count] of every rank
            both = torch.tensor([float(total), count], dtype=torch.float64, device=world.collective_device)
            total, count = world.sum_(both)[0], int(both[1])
        return float(total.item()) / max(count, 1)
    finally:
        model.train(was_training)
