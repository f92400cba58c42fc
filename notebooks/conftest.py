"""pytest settings for executing the notebooks with nbval (``python -m pytest --nbval-lax notebooks/``).

nbval waits a fixed 5 s for each iopub message after a cell's reply; on a loaded 2-core runner a
kernel that has just finished a training cell can be starved for longer than that, and the cell
fails although it ran correctly. A minute is still far below the cell timeout.

Notebooks 02 and 03 keep their runs (metrics, checkpoints, adapters) in ``runs/`` next to the notebook, so
that the paths in their saved summary tables stay valid for a reader. Under pytest they write into a
temporary folder instead (``LORA_WIDGETS_NOTEBOOK_RUNS``, read by the notebooks), removed when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

NBVAL_OUTPUT_TIMEOUT_S = 60
RUNS_ENV = "LORA_WIDGETS_NOTEBOOK_RUNS"
_created_runs_dir: str | None = None
if RUNS_ENV not in os.environ:
    _created_runs_dir = tempfile.mkdtemp(prefix="lora_widgets_notebook_runs_")
    os.environ[RUNS_ENV] = _created_runs_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's IPyNbCell
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _created_runs_dir is not None:
        shutil.rmtree(_created_runs_dir, ignore_errors=True)
