"""Forward+backward time of one LoRA layer: the frozen base, ours, PEFT's, and ours merged.

For each dtype (fp32, bf16) and LoRA dropout (0, 0.05), the layers run in one process, interleaved
round by round (base ours modules peft merged, then ours modules peft merged base, ...: each round starts one
layer later, so no layer always runs right after the same one), so machine noise hits them alike; the script prints
the base's median time and, per layer, the median over rounds of its time / the base's time in that round:

* ours / base     (target <= 1.04: LoRA adds 3 r / d = 2.3% of the FLOPs at d=2048, r=16)
* ours / PEFT     (target <= 1.00)
* merged / base   (a merged adapter costs exactly the base: target 1.00 within noise)
* modules / base  (ours without the fused node: base layer, A and B called as modules, as before)

On a machine shared with other jobs, ``--threads 1 --clock cpu`` times the CPU the process itself used, so
the time it spends waiting for a core (often most of the wall time there) drops out of both sides of a ratio;
cache and memory contention from the other jobs still count.

The input requires grad, as it does for any layer inside a network, so the frozen layer's backward
computes dX (its weight gets no gradient). With dropout the LoRA branch sees ``dropout(x)``, a new [N, d]
tensor and a random mask: every implementation pays for that copy.

On CUDA (``--device cuda``) each slot times ``--repeat`` calls (20) between two synchronizes; the clock is the
wall clock.

Usage: python benchmarks/bench_lora_layer.py [--d 2048] [--r 16] [--tokens 2048] [--rounds 15]
       [--dtypes fp32,bf16] [--dropouts 0,0.05] [--threads N] [--clock wall|cpu] [--device cpu|cuda]
       [--repeat N]
Run it with PYTHONPATH=. from a checkout so that it measures that checkout's code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lora_widgets.lora.layers import LoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig as PeftConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = PeftConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    try:  # peft >= 0.18 passes the whole config
        layer = PeftLinear(base, "default", config, r=r, lora_alpha=alpha, lora_dropout=dropout)
    except TypeError:  # older peft
        layer = PeftLinear(base, "default", r=r, lora_alpha=alpha, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer.to(base.weight.dtype)


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _time_once(
    layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, clock: Callable[[], float], repeat: int = 1
) -> float:
    """Seconds per forward+backward, over ``repeat`` calls back to back. On CUDA the kernels run asynchronously:
    the clock reads after a synchronize on both sides, and ``repeat`` calls amortise the launch of the first."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = clock()
    for _ in range(repeat):
        y = layer(x)  # [tokens, d]
        y.backward(grad_out)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    sync()
    return (clock() - start) / repeat


def _layers(d: int, r: int, dtype: torch.dtype, dropout: float, device: str = "cpu") -> dict[str, nn.Module]:
    """base / ours / peft / merged, each on its own copy of one frozen base layer, in training mode."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, dtype=dtype, device=device).requires_grad_(False)
    ours = LoRALinear(copy.deepcopy(base), r, 2 * r, dropout)
    nn.init.normal_(ours.lora_B.weight, std=0.01)
    merged = copy.deepcopy(ours)
    merged.merge()
    unfused = copy.deepcopy(ours)  # a no-op hook on the base keeps the layer on its module-by-module path
    unfused.base_layer.register_forward_hook(lambda module, args, out: None)
    layers: dict[str, nn.Module] = {"base": base, "ours": ours, "modules": unfused}
    with contextlib.suppress(ImportError):
        layers["peft"] = _peft_layer(copy.deepcopy(base), r, 2 * r, dropout)
    layers["merged"] = merged
    return layers


def measure(
    d: int,
    r: int,
    tokens: int,
    rounds: int,
    dtype: torch.dtype,
    dropout: float,
    clock: str = "wall",
    device: str = "cpu",
    repeat: int = 1,
) -> tuple[float, dict[str, float]]:
    """The base layer's median forward+backward seconds, and each layer's median per-round ratio to the base.

    Each round times every layer back to back, so a ratio within a round compares runs seconds apart; the
    median of those ratios follows the machine's load far less than a ratio of medians taken minutes apart."""
    layers = _layers(d, r, dtype, dropout, device)
    x = torch.randn(tokens, d, dtype=dtype, device=device, requires_grad=True)  # [tokens, d]
    grad_out = torch.randn(tokens, d, dtype=dtype, device=device)  # [tokens, d]
    for layer in layers.values():  # warm-up
        for _ in range(2):
            _time_once(layer, x, grad_out, CLOCKS[clock], repeat)
    times: dict[str, list[float]] = {name: [] for name in layers}
    order = list(layers)
    for i in range(rounds):
        # round i starts at layer i mod n: every layer runs in every slot equally often, since the layer that
        # runs right after another finds its inputs still in the caches (2-7% faster here in bf16)
        for name in order[i % len(order) :] + order[: i % len(order)]:
            times[name].append(_time_once(layers[name], x, grad_out, CLOCKS[clock], repeat))
    ratios = {
        name: statistics.median(t / b for t, b in zip(series, times["base"], strict=True))
        for name, series in times.items()
    }
    return statistics.median(times["base"]), ratios


def _where(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--dropouts", default="0,0.05", help="comma-separated LoRA dropout rates")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (wall clock, synchronized)")
    parser.add_argument(
        "--repeat", type=int, default=0, help="calls timed together per slot (0: 1 on the CPU, 20 on CUDA)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time, which leaves out the time a shared machine "
        "takes the process off its core (meaningful with --threads 1, where it is the work done)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the host process, not the GPU; use --clock wall on CUDA")
    repeat = args.repeat or (20 if args.device == "cuda" else 1)
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    dropouts = [float(p) for p in args.dropouts.split(",")]
    print(
        f"LoRA layer fwd+bwd, d={args.d}, r={args.r}, tokens={args.tokens}, torch {torch.__version__}, "
        f"{_where(args.device)}, {args.clock} clock, {args.rounds} interleaved rounds, "
        "medians of per-round ratios"
    )
    print(f"{'dtype':5s} {'dropout':>7s} {'base ms':>8s} {'ours/base':>9s} {'peft/base':>9s} "
          f"{'ours/peft':>9s} {'merged/base':>11s} {'modules/base':>12s}")  # fmt: skip
    for dtype in dtypes:
        for dropout in dropouts:
            base_s, ratio = measure(
                args.d, args.r, args.tokens, args.rounds, dtype, dropout, args.clock, args.device, repeat
            )
            peft = ratio.get("peft", float("nan"))
            name = next(k for k, v in DTYPES.items() if v == dtype)
            print(
                f"{name:5s} {dropout:7.2f} {base_s * 1e3:8.1f} {ratio['ours']:9.3f} {peft:9.3f} "
                f"{ratio['ours'] / peft:9.3f} {ratio['merged']:11.3f} {ratio['modules']:12.3f}",
                flush=True,
            )
    print("targets: ours/base <= 1.04 at dropout 0, ours/peft <= 1.00, merged/base = 1.00")


if __name__ == "__main__":
    main()
