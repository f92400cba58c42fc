"""pytest settings for executing the notebooks with nbval (``python -m pytest --nbval-lax notebooks/``).

nbval waits a fixed 5 s for each iopub message after a cell's reply; on a loaded 2-core runner a
kernel that has just finished a training cell can be starved for longer than that, and the cell
fails although it ran correctly. A minute is still far below the cell timeout.
"""

from __future__ import annotations

import os

import pytest

# Idle OpenMP threads that busy-wait starve the kernel process on small machines; passive waiting
# changes no result. Kernels started by nbval inherit this environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's IPyNbCell
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
