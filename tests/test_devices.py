"""Device discovery on this (CPU-only) machine, and the errors that tell users how to get a GPU."""

from __future__ import annotations

import mmap

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


def test_parse_device_names_without_checking_the_machine() -> None:
    # planning for another machine: a GPU name parses even where there is none
    assert devices.parse_device("cuda:1") == torch.device("cuda", 1)
    assert devices.parse_device("mps") == torch.device("mps")
    assert devices.parse_device(torch.device("cpu")) == torch.device("cpu")
    assert devices.parse_device("AUTO") == devices.select_device("auto")
    with pytest.raises(ValueError, match="'gpu-please' is not a device name"):
        devices.parse_device("gpu-please")
    with pytest.raises(ValueError, match="'meta' is not supported"):
        devices.parse_device("meta")


def test_format_bytes_is_the_one_byte_formatter() -> None:
    assert devices.format_bytes(None) == "unknown"
    assert devices.format_bytes(512) == "512 B"
    assert devices.format_bytes(1536) == "1.5 KiB"
    assert devices.format_bytes(456 * 2**20) == "456.0 MiB"
    assert devices.format_bytes(1.234 * 2**30) == "1.23 GiB"
    assert devices.format_bytes(16 * 2**30, digits=1) == "16.0 GiB"  # describe_device's form


def test_memory_in_use_on_cpu_is_rss() -> None:
    allocated, reserved = devices.memory_in_use("cpu")
    assert reserved is None
    before = allocated
    # A fresh anonymous mapping, every page written: resident memory must grow by about 64 MiB. (A tensor
    # would not do: malloc may serve it from pages an earlier test freed but kept, so RSS need not move.)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\x01" * (64 * 2**20))
    after, _ = devices.memory_in_use("cpu")
    block.close()
    assert after - before > 32 * 2**20
    assert "threads" in devices.describe_device("cpu")
    assert devices.total_memory("cpu") == devices.list_devices()[-1].total_memory


def test_cuda_reporting_with_a_simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branches, exercised on this CPU machine through a stand-in torch.cuda."""
    import subprocess
    from types import SimpleNamespace

    props = SimpleNamespace(name="NVIDIA Test GPU", total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (4 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 123)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 456)
    monkeypatch.setattr(devices, "_nvml", False)  # no pynvml: fall back to nvidia-smi
    monkeypatch.setattr(devices, "_smi_failed_at", None)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> SimpleNamespace:
        calls.append(cmd)
        assert kwargs.get("timeout") is not None  # never wait on a hung driver
        return SimpleNamespace(stdout="37\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert devices.select_device() == torch.device("cuda", 0)
    assert devices.select_device(require_gpu=True) == torch.device("cuda", 0)
    gpu = devices.list_devices()[0]
    assert (gpu.kind, gpu.name, gpu.total_memory, gpu.used_memory) == (
        "cuda",
        "NVIDIA Test GPU",
        16 * 2**30,
        12 * 2**30,
    )
    assert gpu.utilization == 37.0 and "--id=0" in calls[0]
    assert devices.describe_device("cuda") == "NVIDIA Test GPU (cuda:0, 16.0 GiB)"
    assert devices.memory_in_use("cuda") == (123, 456)
    assert devices.total_memory("cuda:0") == 16 * 2**30
    with pytest.raises(RuntimeError, match="only 1 CUDA device"):
        devices.select_device("cuda:3")

    def broken(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.TimeoutExpired(cmd, 2.0)

    monkeypatch.setattr(subprocess, "run", broken)
    monkeypatch.setattr(devices, "_smi_failed_at", None)
    assert devices.gpu_utilization("cuda:0") is None  # unknown, not an error
