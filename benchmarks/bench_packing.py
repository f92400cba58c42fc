"""Tokens/s of instruction batches padded vs packed padding-free, side by side in one run.

The shipped model with LoRA (default targets) trains on ``python-instruct``: each micro-batch of ``--batch``
examples runs forward and backward (the loss over the answers) in four layouts, interleaved batch by batch so
machine noise hits them alike; the script prints median real (non-padding) tokens/s and the ratios to the
trainer's padded default:

* padded, length-grouped  (``TrainConfig.packing=False``: what the trainer does without packing)
* padded, random order    (the baseline of Hugging Face's "packing-with-FA2" blog: no length grouping)
* packed, length-grouped  (``packing=True``: one row, position ids restarting per example)
* packed, random order
* packed per-example, grouped / random: the same packed rows, attention per example
  (``lora_widgets.training.packed_attention``, what a packed run of the trainer uses on SDPA)

Packing removes the padding but, through transformers' SDPA or eager attention, each packed row's attention covers
the whole row under a block-diagonal mask (``R W^2`` instead of ``sum L_i^2``); variable-length kernels
(FlashAttention 2, or the per-example SDPA here) skip the blocks between examples.

Usage: PYTHONPATH=. python benchmarks/bench_packing.py [--batch 8] [--rounds 12] [--threads N] [--attention sdpa]
       [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

from lora_widgets import load_base_model
from lora_widgets.data.corpora import read_instructions
from lora_widgets.data.sft import prepare_sft
from lora_widgets.data.sft_batches import SFTExample, collate, length_grouped_batches, pack
from lora_widgets.lora.layers import apply_lora
from lora_widgets.training.packed_attention import use_packed_sdpa
from lora_widgets.training.step import forward_loss


def _step(
    model: torch.nn.Module, examples: list[SFTExample], packed: bool | str, device: str = "cpu"
) -> None:
    nc = contextlib.nullcontext
    if packed:
        c = {k: v.to(device) for k, v in pack(examples, pad_id=0).items()}  # [1, sum of lengths] each
        per_example = use_packed_sdpa(model) if packed == "per-example" else nc()
        with per_example:
            loss = forward_loss(model, c["input_ids"], nc, labels=c["labels"], position_ids=c["position_ids"])
    else:
        c = {k: v.to(device) for k, v in collate(examples, pad_id=0).items()}  # [B, longest] each
        loss = forward_loss(model, c["input_ids"], nc, attention_mask=c["attention_mask"], labels=c["labels"])
    loss.backward()
    model.zero_grad(set_to_none=True)


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the clock reads after a synchronize)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model(device=args.device)
    model.config._attn_implementation = args.attention
    apply_lora(model)
    model.train()
    items, _ = prepare_sft(read_instructions("python-instruct", "train"), tokenizer, 512, "answers")
    lengths = [len(e) for e in items]
    grouped = length_grouped_batches(lengths, args.batch, seed=0, epoch=0)
    order = np.random.default_rng(0).permutation(len(items)).tolist()
    shuffled = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    layouts: dict[str, tuple[list[list[int]], bool | str]] = {
        "padded, length-grouped": (grouped, False),
        "padded, random order": (shuffled, False),
        "packed, length-grouped": (grouped, True),
        "packed, random order": (shuffled, True),
        "packed per-example, grouped": (grouped, "per-example"),
        "packed per-example, random": (shuffled, "per-example"),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(batch: list[int], packed: bool | str) -> None:
        _step(model, [items[i] for i in batch], packed, args.device)
        sync()

    for batches, packed in layouts.values():  # warm-up
        run(batches[1], packed)
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    pad: dict[str, list[float]] = {name: [] for name in layouts}
    for k in range(args.rounds):
        for name, (batches, packed) in layouts.items():
            batch = batches[1 + k % (len(batches) - 1)]  # full batches (the last may be partial)
            real = sum(lengths[i] for i in batch)
            sync()
            start = time.perf_counter()
            run(batch, packed)
            rates[name].append(real / (time.perf_counter() - start))
            pad[name].append(0.0 if packed else 1 - real / (len(batch) * max(lengths[i] for i in batch)))
    med = {name: statistics.median(r) for name, r in rates.items()}
    base = med["padded, length-grouped"]
    print(
        f"python-instruct ({len(items)} examples, mean {np.mean(lengths):.0f} tokens), shipped model + LoRA, "
        f"batch {args.batch}, {args.attention}, torch {torch.__version__}, {_where(args.device)}, "
        f"{args.rounds} interleaved rounds, medians of real tokens/s"
    )
    for name, value in med.items():
        print(f"  {name:28s} {value:8.0f} tok/s  {value / base:5.2f}x  padding {np.mean(pad[name]):5.1%}")
    print("target: packed >= 1.3x the trainer's padded default where packing is on by default")


if __name__ == "__main__":
    main()
