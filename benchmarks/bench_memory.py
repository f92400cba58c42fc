"""Estimated vs measured peak memory of one training step, over the accuracy grid (CPU).

    python benchmarks/bench_memory.py            # the grid of tests/test_memory_accuracy.py
    python benchmarks/bench_memory.py --markdown # as a Markdown table (for docs/memory.md)

Measured: :func:`lora_widgets.memory.measure_memory` (two AdamW steps, dispatch-level live-bytes tracker on
CPU, ``torch.cuda.max_memory_allocated`` on a GPU). "Naive" is the textbook sum of weights, gradients,
optimizer state and activations, the figure the phase model replaces.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_memory_accuracy import GRID, run_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = []
    start = time.perf_counter()
    for case in GRID:
        est, meas, naive = run_case(case)
        rows.append((case.label, est, meas, (est - meas) / meas * 100, (naive - meas) / meas * 100))
    elapsed = time.perf_counter() - start
    mib = 1024**2
    if args.markdown:
        print("| Configuration | Estimate (MiB) | Measured (MiB) | Error | Naive sum error |")
        print("|---|---:|---:|---:|---:|")
        for label, est, meas, err, naive in rows:
            print(f"| {label} | {est / mib:.2f} | {meas / mib:.2f} | {err:+.1f}% | {naive:+.0f}% |")
    else:
        width = max(len(r[0]) for r in rows)
        print(f"{'configuration':<{width}}  {'estimate':>10}  {'measured':>10}  {'error':>7}  {'naive':>6}")
        for label, est, meas, err, naive in rows:
            print(
                f"{label:<{width}}  {est / mib:>7.2f}MiB  {meas / mib:>7.2f}MiB  {err:>+6.1f}%  {naive:>+5.0f}%"
            )
    errors = [abs(r[3]) for r in rows]
    print(
        f"\n{len(rows)} configurations, max |error| {max(errors):.1f}%, mean {sum(errors) / len(errors):.1f}%; "
        f"naive sum max |error| {max(abs(r[4]) for r in rows):.0f}%  ({elapsed:.1f} s)"
    )


if __name__ == "__main__":
    main()
