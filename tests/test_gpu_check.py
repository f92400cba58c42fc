"""benchmarks/gpu_check.py keeps working: its quick CPU mode runs every check on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_mode_runs_every_check() -> None:
    pytest.importorskip("peft")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
    }  # the CPU mode, even on a GPU box
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    checks = [r.split(" | ")[0].removeprefix("| ") for r in rows]
    assert sum(c.startswith("train ours") for c in checks) == 2
    assert sum(c.startswith("train HF Trainer + PEFT via HFRun") for c in checks) == 2
    assert all(r.endswith("| ok |") for r in rows if r.startswith("| train"))
    oom = [r for r in rows if r.startswith("| OOM HF")]
    assert len(oom) == 1 and "reason=oom" in oom[0] and oom[0].endswith("| ok |")
    memory = [r for r in rows if r.startswith("| memory estimate")]
    assert len(memory) >= 8 and all(" vs " in r for r in memory)
    qlora = [r for r in rows if r.startswith("| qlora")]
    assert (
        sum(r.startswith("| qlora train") and r.endswith("| ok |") for r in qlora) == 2
    )  # ours and HF + PEFT
    memory_4bit = [r for r in qlora if r.startswith("| qlora memory estimate")]
    assert len(memory_4bit) == 1 and memory_4bit[0].endswith("| ok |")  # 4-bit weights: estimate = storage
    assert any(r.startswith("| qlora tokens/s ours / HF") for r in qlora)
    layer = [r for r in rows if r.startswith("| LoRA layer fwd+bwd")]
    assert len(layer) == 1 and "ours / base" in layer[0] and "merged / base" in layer[0]
    assert "all functional checks passed" in proc.stdout
