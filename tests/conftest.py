"""Shared fixtures. Tests never touch the network: hub downloads are switched off here."""

from __future__ import annotations

import os

import pytest

# OpenMP threads that busy-wait starve each other (and notebook kernels started by nbval, which inherit
# this environment) on a shared 2-core machine: measured 0.12 s vs 6-8 s for the same step. Passive
# waiting changes no result, only how idle threads wait. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.helpers import tiny_gpt2 as _tiny_gpt2
from tests.helpers import tiny_llama as _tiny_llama


@pytest.fixture
def tiny_llama():  # type: ignore[no-untyped-def]
    return _tiny_llama()


@pytest.fixture
def tiny_gpt2():  # type: ignore[no-untyped-def]
    return _tiny_gpt2()
