"""Evidence that LoRA adapts the shipped pretrained model: r=8, 200 steps on CPU, >= 12% lower target loss.

The loop is written out with plain torch (AdamW) so that this test depends only on the LoRA core and the
shipped model, not on the trainer. Same recipe as ``scripts/build_base_model.py``'s evidence run, whose
figures are in the model card.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_widgets.data.text import prepare_data
from lora_widgets.lora.layers import LoRAConfig, apply_lora, count_parameters
from lora_widgets.models import load_base_model

STEPS = 200
BATCH_SIZE = 8
LEARNING_RATE = 3e-3


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one torch thread, then restore the setting.

    Measured here: on a 2-core machine shared with other jobs, two threads spend most of their time
    waiting for each other on these small matrices (this run took 476 s of wall time with two threads and
    41 s with one). With the machine to itself, two threads are at best modestly faster.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _val_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token cross-entropy over ``blocks[n, T]`` (all blocks have the same length)."""
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in blocks.split(64)]
    weights = [len(b) for b in blocks.split(64)]
    return sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)


@pytest.mark.slow
def test_lora_r8_200_steps_lowers_target_domain_loss_by_12_percent(one_thread: None) -> None:
    start = time.perf_counter()
    model, tokenizer = load_base_model()
    data = prepare_data("python-docs", tokenizer, block_size=128, val_fraction=0.1, seed=0)
    base_loss = _val_loss(model, data.val)

    torch.manual_seed(0)
    report = apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    trainable, total = count_parameters(model)
    assert trainable == report.trainable_params < 0.1 * total
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    per_epoch = len(data.train) // BATCH_SIZE  # a fresh permutation each epoch, incomplete batch dropped
    order = [
        perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
        for perm in (
            torch.randperm(len(data.train), generator=generator) for _ in range(-(-STEPS // per_epoch))
        )
        for i in range(per_epoch)
    ]
    model.train()
    for step in range(STEPS):
        batch = data.train[order[step]]  # [8, 128]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lora_loss = _val_loss(model, data.val)

    reduction = (base_loss - lora_loss) / base_loss
    print(
        f"\npython-docs val loss {base_loss:.3f} -> {lora_loss:.3f} ({reduction:.1%} lower), "
        f"{trainable:,} trainable params, {time.perf_counter() - start:.1f} s"
    )
    # 14.8% on the split that keeps documents sharing a 40-word passage together (7 Dec 2026); the model card's 21.5%
    # was measured on the build's own split, and earlier splits held a topic reprinted word for word in training
    assert reduction >= 0.12, (
        f"LoRA lowered the target-domain loss by only {reduction:.1%} ({base_loss:.3f} -> {lora_loss:.3f})"
    )


@pytest.mark.slow
def test_instruction_tuning_through_the_trainer_learns_the_answers_and_to_stop(
    one_thread: None, tmp_path: Path
) -> None:
    """Issue 12's evidence, through the public ``LoRATrainer`` on ``"python-instruct"`` (its held-out split
    validates): the loss on the held-out answers drops by >= 15%, and the share of held-out prompts whose
    greedy reply ends with the end-of-turn token within 128 new tokens rises to >= 80%. Settings of
    ``benchmarks/bench_sft_evidence.py`` (LoRA r=8, alpha=16, all linear layers; AdamW 5e-3, 10 warm-up
    steps then cosine; 150 steps of 8 examples; max_length 256)."""
    from lora_widgets import LoRATrainer, TrainConfig
    from lora_widgets.data import end_of_turn_share, read_instructions

    start = time.perf_counter()
    model, tokenizer = load_base_model()
    val_rows = read_instructions("python-instruct", "validation")
    base_eot = end_of_turn_share(model, tokenizer, val_rows)
    config = TrainConfig(
        learning_rate=5e-3, batch_size=8, max_steps=150, warmup_steps=10, schedule="cosine",
        eval_every=None, eval_batches=None, max_length=256, seed=0, output_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    trainer = LoRATrainer(
        model, tokenizer, "python-instruct", lora=LoRAConfig(r=8, alpha=16, target_modules="all-linear"),
        config=config,
    )  # fmt: skip
    end = trainer.run_sync()
    assert end.kind == "finished", end.message
    base_loss, tuned_loss = float(trainer.history.val_loss[0]), float(trainer.history.val_loss[-1])
    tuned_eot = end_of_turn_share(model, tokenizer, val_rows)

    drop = (base_loss - tuned_loss) / base_loss
    print(
        f"\npython-instruct held-out answer loss {base_loss:.3f} -> {tuned_loss:.3f} ({drop:.1%} lower); "
        f"end-of-turn within 128 tokens {base_eot:.0%} -> {tuned_eot:.0%}; {time.perf_counter() - start:.0f} s"
    )
    assert drop >= 0.15, f"answer loss fell by only {drop:.1%} ({base_loss:.3f} -> {tuned_loss:.3f})"
    assert tuned_eot >= 0.8 > base_eot, f"end-of-turn share {base_eot:.0%} -> {tuned_eot:.0%}"
