"""The pure pieces of the loop: one update, the loss scaler path (fp16's, run here on the CPU), the batch order."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lora_widgets.lora.layers import LoRAConfig, apply_lora
from lora_widgets.lora.peft_format import lora_state_dict
from lora_widgets.training.batches import BatchOrder, Blocks
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.step import forward_loss, make_optimizer, train_step
from tests.helpers import tiny_llama


def adapted(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4))
    for layer in model.modules():  # non-zero B, so every factor gets a gradient
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model.train()


def one_update(scaler: torch.amp.GradScaler, poison: bool = False) -> tuple[object, dict[str, torch.Tensor]]:
    model = adapted()
    if poison:
        model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))  # type: ignore[union-attr,operator]
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))  # [B, T]
    result = train_step(
        model,
        make_optimizer(model, TrainConfig()),
        scaler,
        [x, x.flip(0)],
        step=1,
        lr=1e-2,
        max_grad_norm=1.0,
        autocast=contextlib.nullcontext,
        first_bad=torch.full((), -1, dtype=torch.long),
        read=True,
    )
    return result, {k: v.clone() for k, v in lora_state_dict(model).items()}


def test_loss_scaling_changes_nothing_but_the_scale() -> None:
    plain, w_plain = one_update(torch.amp.GradScaler("cpu", enabled=False))
    scaled, w_scaled = one_update(torch.amp.GradScaler("cpu", enabled=True))  # fp16's path, on the CPU
    assert plain == scaled  # same loss, gradient norm, applied
    assert all(torch.equal(w_plain[k], w_scaled[k]) for k in w_plain)  # a power-of-two scale is exact
    assert not all(torch.equal(w_plain[k], lora_state_dict(adapted())[k]) for k in w_plain)  # it trained


def test_a_non_finite_loss_is_not_applied_with_or_without_scaling() -> None:
    before = lora_state_dict(adapted())
    for enabled in (False, True):
        result, after = one_update(torch.amp.GradScaler("cpu", enabled=enabled), poison=True)
        assert result.bad_step == 1 and not result.applied  # type: ignore[attr-defined]
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_loss_is_next_token_cross_entropy() -> None:
    model = adapted().eval()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))  # [B, T]
    logits = model(x).logits  # [B, T, V]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(forward_loss(model, x, contextlib.nullcontext), expected)


def test_the_batch_of_an_update_depends_only_on_seed_and_step() -> None:
    train = torch.arange(10 * 4).reshape(10, 4)  # [n, T]: each row is recognisable
    blocks = Blocks(train=train, val=None, steps_per_epoch=2)  # batch 2 x accumulation 2 = 4 rows per step
    config = TrainConfig(batch_size=2, grad_accum_steps=2, seed=3)
    walked = BatchOrder(blocks, config, torch.device("cpu"))
    seen = [torch.cat(walked.micro_batches(s)) for s in range(1, 6)]  # crosses two epoch boundaries
    jumped = BatchOrder(blocks, config, torch.device("cpu"))  # as a resumed run does
    assert torch.equal(torch.cat(jumped.micro_batches(5)), seen[4])
    epoch_rows = torch.cat(seen[:2])[:, 0] // 4
    assert len(set(epoch_rows.tolist())) == 8  # no row twice within an epoch
    other = BatchOrder(blocks, TrainConfig(batch_size=2, grad_accum_steps=2, seed=4), torch.device("cpu"))
    assert not torch.equal(torch.cat(other.micro_batches(1)), seen[0])
