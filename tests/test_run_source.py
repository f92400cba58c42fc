"""The one run contract (issue 18, item 2): every source is a RunBase, and adding one is the small class
CONTRIBUTING.md shows (that very code is run here, so the page cannot drift from the API)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from lora_widgets.events import (
    Event,
    Replay,
    RunBase,
    RunDirWatch,
    RunFinished,
    RunSource,
    RunStopped,
    StepMetrics,
)

ROOT = Path(__file__).resolve().parents[1]


def _contributing_example() -> type:
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("## Add a run source", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "CONTRIBUTING.md lost its run-source example"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "CONTRIBUTING.md", "exec"), namespace)
    return namespace["ListRun"]


def _steps(n: int) -> list[Event]:
    return [StepMetrics(i, n, i / n, 5.0 - i, 1e-3, 1.0, 10.0, float(i), 1.0, 0) for i in range(1, n + 1)]


def test_every_source_in_the_package_is_one_runbase() -> None:
    from lora_widgets import LoRATrainer
    from lora_widgets.hf import HFRun

    for cls in (LoRATrainer, HFRun, Replay, RunDirWatch):
        assert issubclass(cls, RunBase), cls
        own = set(vars(cls)) & {
            "subscribe",
            "pause",
            "resume",
            "running",
            "_publish_from_thread",
            "_in_thread",
        }
        assert not own, f"{cls.__name__} redefines what RunBase holds: {own}"


def test_the_contributing_example_is_a_run_source_the_dashboard_can_drive() -> None:
    list_run = _contributing_example()
    end = RunFinished(3, 3.0, 2.0, None, None, "done")
    source = list_run([*_steps(3), end], tick=0.0)
    assert isinstance(source, RunSource)
    seen: list[Event] = []
    source.subscribe(seen.append)
    assert asyncio.run(source.run()) == end and seen == [*_steps(3), end]
    assert source.state == "finished" and source.history.step.tolist() == [1, 2, 3] and not source.running


def test_the_example_pauses_resumes_and_stops_like_any_source() -> None:
    source = _contributing_example()(_steps(50), tick=0.01)
    states: list[str] = []

    async def main() -> Any:
        task = asyncio.ensure_future(source.run())
        await asyncio.sleep(0.05)
        source.pause()
        await asyncio.sleep(0.05)
        held = len(source.history)
        await asyncio.sleep(0.1)
        states.append(f"held {held == len(source.history)}")
        source.resume()
        await asyncio.sleep(0.05)
        source.stop()
        return await asyncio.wait_for(task, 5)

    end = asyncio.run(main())
    assert states == ["held True"] and isinstance(end, RunStopped) and 0 < end.step < 50


def test_a_second_run_while_one_is_in_progress_is_refused() -> None:
    source = _contributing_example()(_steps(20), tick=0.01)

    async def main() -> None:
        task = asyncio.ensure_future(source.run())
        await asyncio.sleep(0.02)
        with pytest.raises(RuntimeError, match="already running"):
            await source.run()
        source.stop()
        await task

    asyncio.run(main())


def test_a_cancelled_run_waits_for_its_worker_thread() -> None:
    """The cancel shield: the task is cancelled mid-phase; the thread's work finishes before CancelledError."""
    import threading
    import time

    done = threading.Event()

    class Blocking(RunBase):
        async def run(self) -> Any:
            self._begin_run("busy")
            try:
                await self._in_thread(lambda: (time.sleep(0.2), done.set()))
            finally:
                self._end_run()

    source = Blocking()

    async def main() -> None:
        task = asyncio.ensure_future(source.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set()  # the worker was awaited, not abandoned

    asyncio.run(main())
    assert source._requests.stop_requested and not source.running
