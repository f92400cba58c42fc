"""Shared fixtures. The environment (passive OpenMP waiting, one thread per xdist worker, no hub downloads) is
set in the repository's root ``conftest.py``, before torch is imported."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_gpt2 as _tiny_gpt2
from tests.helpers import tiny_llama as _tiny_llama


@pytest.fixture
def tiny_llama():  # type: ignore[no-untyped-def]
    return _tiny_llama()


@pytest.fixture
def tiny_gpt2():  # type: ignore[no-untyped-def]
    return _tiny_gpt2()
