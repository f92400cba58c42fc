"""A real IPython kernel for tests: start one, run a cell, and watch a background run progress between cells."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jupyter_client

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_kernel() -> Iterator[Any]:
    """A real IPython kernel started in the repository (so ``tests.helpers`` imports), ready; its client."""
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(REPO))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_cell(kc: Any, code: str) -> str:
    """Execute ``code`` and return its stdout; fail on an error reply."""
    chunks: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            chunks.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(chunks)
    return "".join(chunks).strip()


def assert_progresses_between_cells(kc: Any, probe: str, timeout: float = 120) -> None:
    """Run ``probe`` (which prints ``<state> <steps seen>``) as separate cells until the step count grows
    between two of them, asserting the run stays ``running``: the run goes on while other cells execute."""
    first: int | None = None  # steps seen by the first cell that saw any
    latest = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, n = run_cell(kc, probe).splitlines()[-1].split()
        assert state == "running"
        latest = int(n)
        if first is None and latest > 0:
            first = latest
        elif first is not None and latest > first:
            return  # it progressed between two of our cells
        time.sleep(0.1)
    raise AssertionError(f"no progress between cells: first {first}, latest {latest}")
