"""What a CPU training step costs in resident memory beyond its tensors: torch's runtime overhead.

    python benchmarks/bench_cpu_runtime.py

For each configuration a fresh child process (so nothing of an earlier step is cached) builds the model,
its batch and AdamW, reads its resident set (``VmRSS``), resets the peak mark
(``/proc/self/clear_refs`` = 5), runs two training steps and reads the peak (``VmHWM``). The growth of the
resident set, minus the growth of live tensor bytes over the same steps (the dispatch tracker of
:func:`lora_widgets.memory.fit.measure_memory`, exact), is what torch's CPU runtime adds: thread pools and
their stacks, oneDNN/BLAS packing buffers, autograd's engine, allocator slack. The child runs with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so that glibc returns freed tensor memory at
once (otherwise a peak-RSS read is both above and below the live bytes, by tens of percent; see
docs/memory.md). The median of the rows is ``lora_widgets.memory.estimate.CPU_RUNTIME_BYTES``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from transformers import AutoModelForCausalLM
from lora_widgets.lora.layers import LoRAConfig, apply_lora
from lora_widgets.memory.fit import measure_memory
from lora_widgets.memory.measure import storage_bytes
from tests.test_memory_accuracy import MODELS

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

model_name, r, b, s, dtype = {args!r}
dtype = getattr(torch, dtype)
lora = LoRAConfig(r=r, target_modules="all-linear") if r else None
torch.manual_seed(0)
net = AutoModelForCausalLM.from_config(MODELS[model_name]).to(dtype)
if lora is not None:
    apply_lora(net, lora)
net.train()
batch = torch.randint(0, net.config.vocab_size, (b, s))
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5, foreach=True)
resident = storage_bytes(iter([*net.parameters(), *net.buffers(), batch]))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
for _ in range(2):
    net(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
rss_growth = status("VmHWM") - before
live = measure_memory(MODELS[model_name], lora, b, s, dtype)
print(json.dumps({{"rss_growth": rss_growth, "live_growth": live.peak_bytes - resident,
                   "threads": torch.get_num_threads()}}))
"""

ROWS = [  # model, LoRA rank (0: full fine-tuning), batch, seq_len, dtype
    ("llama-0.9M", 8, 4, 64, "float32"),
    ("llama-0.9M", 0, 8, 128, "float32"),
    ("llama-3.4M", 16, 8, 128, "float32"),
    ("llama-3.4M", 0, 8, 128, "float32"),
    ("llama-8.1M", 16, 8, 128, "bfloat16"),
    ("llama-21.5M", 0, 4, 128, "float32"),
]


def run_row(row: tuple[str, int, int, int, str]) -> dict[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    code = CHILD.format(root=str(ROOT), args=row)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    mib = 1024**2
    print(f"{'configuration':<42} {'RSS growth':>11} {'live growth':>12} {'runtime':>9}  (MiB)")
    overheads = []
    for row in ROWS:
        res = run_row(row)
        overhead = res["rss_growth"] - res["live_growth"]
        overheads.append(overhead)
        model, r, b, s, dtype = row
        label = f"{model} {'LoRA r=' + str(r) if r else 'full'} b={b} s={s} {dtype}"
        print(
            f"{label:<42} {res['rss_growth'] / mib:11.1f} {res['live_growth'] / mib:12.1f} "
            f"{overhead / mib:9.1f}  ({res['threads']} threads)"
        )
    print(
        f"runtime overhead: median {statistics.median(overheads) / mib:.1f} MiB, "
        f"range {min(overheads) / mib:.1f} to {max(overheads) / mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()
