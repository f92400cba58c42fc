"""Forward+backward time of one LoRA layer: ours vs PEFT's vs the frozen base layer alone.

All three run in one process, interleaved round by round (A B C A B C ...), so machine noise hits them
alike; the script prints medians and the ratios that matter:

* ours / PEFT     (target <= 1.00)
* ours / frozen   (target <= 1.15)

The input requires grad, as it does for any layer inside a network, so the frozen layer's backward
computes dX (its weight gets no gradient). Dropout is 0 (measured on a 2-core CPU: dropout 0.05 costs ~35% more because
it copies x, in every implementation).

Usage: python benchmarks/bench_lora_layer.py [--d 2048] [--r 16] [--tokens 2048] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lora_widgets import LoRAConfig
from lora_widgets.lora.layers import LoRALinear


def _peft_layer(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig as PeftConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = PeftConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    try:  # peft >= 0.18 passes the whole config
        layer = PeftLinear(base, "default", config, r=r, lora_alpha=alpha, lora_dropout=0.0)
    except TypeError:  # older peft
        layer = PeftLinear(base, "default", r=r, lora_alpha=alpha, lora_dropout=0.0)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer


def _time_once(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    start = time.perf_counter()
    y = layer(x)  # [tokens, d]
    y.backward(grad_out)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    d, r = args.d, args.r
    cfg = LoRAConfig(r=r, alpha=2 * r)
    frozen = nn.Linear(d, d)
    frozen.requires_grad_(False)
    ours = LoRALinear(nn.Linear(d, d), cfg.r, cfg.alpha)
    nn.init.normal_(ours.lora_B.weight, std=0.01)
    layers: dict[str, nn.Module] = {"frozen base": frozen, "ours": ours}
    try:
        peft_base = nn.Linear(d, d)
        peft_base.requires_grad_(False)
        layers["peft"] = _peft_layer(peft_base, r, cfg.alpha)
    except ImportError:
        print("peft is not installed: comparing against the frozen base only")

    x = torch.randn(args.tokens, d, requires_grad=True)  # [tokens, d]
    grad_out = torch.randn(args.tokens, d)
    run: Callable[[nn.Module], float] = lambda layer: _time_once(layer, x, grad_out)  # noqa: E731
    for layer in layers.values():  # warm-up
        for _ in range(3):
            run(layer)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            times[name].append(run(layer))

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"LoRA layer fwd+bwd, d={d}, r={r}, tokens={args.tokens}, fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    for name, value in med.items():
        print(f"  {name:12s} median {value * 1e3:8.1f} ms")
    print(f"  ours / frozen = {med['ours'] / med['frozen base']:.3f}  (target <= 1.15)")
    if "peft" in med:
        print(f"  ours / peft   = {med['ours'] / med['peft']:.3f}  (target <= 1.00)")
        print(f"  peft / frozen = {med['peft'] / med['frozen base']:.3f}")


if __name__ == "__main__":
    main()
