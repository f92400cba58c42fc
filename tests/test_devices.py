"""Device discovery on this (CPU-only) machine, and the errors that tell users how to get a GPU."""

from __future__ import annotations

import pytest
import torch

from lora_widgets import devices


def test_cpu_is_listed_last_with_details() -> None:
    found = devices.list_devices()
    cpu = found[-1]
    assert cpu.kind == "cpu" and cpu.device == torch.device("cpu")
    assert cpu.name and cpu.threads == torch.get_num_threads()
    assert cpu.total_memory is not None and cpu.total_memory > 2**28
    assert "cpu" in str(cpu)


@pytest.mark.skipif(torch.cuda.is_available() or devices._mps_available(), reason="needs a GPU-less machine")
def test_auto_picks_cpu_and_require_gpu_explains() -> None:
    assert devices.select_device() == torch.device("cpu")
    with pytest.raises(RuntimeError) as info:
        devices.select_device(require_gpu=True)
    msg = str(info.value)
    assert "Found: cpu" in msg and "Runtime > Change runtime type" in msg and "CUDA build" in msg
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        devices.select_device("cuda")
    assert devices.gpu_utilization("cpu") is None


def test_bad_device_name() -> None:
    with pytest.raises(ValueError, match="not a device name"):
        devices.select_device("gpu-please")


def test_memory_in_use_on_cpu_is_rss() -> None:
    allocated, reserved = devices.memory_in_use("cpu")
    assert reserved is None
    before = allocated
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after, _ = devices.memory_in_use("cpu")
    assert after - before > 32 * 2**20
    del block
    assert "threads" in devices.describe_device("cpu")
    assert devices.total_memory("cpu") == devices.list_devices()[-1].total_memory
