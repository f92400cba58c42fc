"""Watch a run another process writes (issue 24, item 3): a RunDirWatch follows a growing metrics.jsonl
(a partial last line is waited for), waits with a message for a directory or file not written yet, and steers
the run through control.json, which our trainer and our HF callback read every step."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lora_widgets.events import (
    Event,
    Notice,
    RunDirWatch,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    StateChanged,
    StepMetrics,
    read_events,
    send_request,
)
from lora_widgets.events.run_files import CONTROL_FILE, METRICS_FILE, ControlReader

ROOT = Path(__file__).resolve().parents[1]


def _started() -> RunStarted:
    return RunStarted("r", "/tmp/r", {"learning_rate": 1e-3}, None, "cpu", "CPU", 1, 2, 4, 8, 0.0)


def _step(step: int, loss: float) -> StepMetrics:
    return StepMetrics(step, 4, 0.1 * step, loss, 1e-3, 1.0, 100.0, float(step), 1.0, 0)


def _line(event: Event) -> bytes:
    return (json.dumps(event.to_dict()) + "\n").encode()


def _not_notice(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, Notice)]


def test_waits_for_the_run_then_follows_it_line_by_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    written = [_started(), _step(1, 4.0), _step(2, 3.0), RunFinished(2, 2.0, 3.0, None, None, "Finished.")]
    watch = RunDirWatch(run_dir, poll_interval=0.01)
    seen: list[Event] = []
    watch.subscribe(seen.append)

    async def writer() -> None:
        await asyncio.sleep(0.1)
        run_dir.mkdir()
        await asyncio.sleep(0.1)
        with open(run_dir / METRICS_FILE, "ab", buffering=0) as f:
            for event in written:
                line = _line(event)
                f.write(line[:10])  # half a line: the watch must wait for the rest
                await asyncio.sleep(0.05)
                f.write(line[10:])
                await asyncio.sleep(0.02)

    async def main() -> Any:
        task = asyncio.ensure_future(writer())
        end = await asyncio.wait_for(watch.run(), 10)
        await task
        return end

    end = asyncio.run(main())
    assert end == written[-1] and _not_notice(seen) == written  # nothing misread, nothing lost
    waiting = [e for e in seen if isinstance(e, Notice)]
    assert "No run directory at" in waiting[0].message and str(run_dir) in waiting[0].message
    assert any("No metrics.jsonl at" in n.message for n in waiting[1:-1])
    assert waiting[-1].message == "" and seen.index(waiting[-1]) < seen.index(written[0])  # cleared first
    assert watch.history.step.tolist() == [1, 2] and watch.state == "finished"


def test_a_bad_line_in_a_followed_file_is_named_and_skipped(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_bytes(_line(_started()) + b'{"event": "step", "step": "x"}\n'
                                          + _line(RunFinished(0, 0.0, None, None, None, "done")))  # fmt: skip
    seen: list[Event] = []
    watch = RunDirWatch(tmp_path / METRICS_FILE, poll_interval=0.01)  # the file itself names its folder
    watch.subscribe(seen.append)
    asyncio.run(watch.run())
    notices = [e for e in seen if isinstance(e, Notice)]
    assert len(notices) == 1 and "line 2" in notices[0].message
    assert _not_notice(seen)[-1].kind == "finished"


def test_a_followed_file_from_a_newer_version_is_named(tmp_path: Path) -> None:
    newer = _started().to_dict() | {"schema_version": 99}
    future = {"event": "gradient_histogram", "step": 1}
    text = json.dumps(newer) + "\n" + json.dumps(future) + "\n" + _line(_step(1, 2.0)).decode()
    (tmp_path / METRICS_FILE).write_text(text + _line(RunFinished(1, 1.0, 2.0, None, None, "ok")).decode())
    seen: list[Event] = []
    watch = RunDirWatch(tmp_path, poll_interval=0.01)
    watch.subscribe(seen.append)
    asyncio.run(watch.run())
    said = [e.message for e in seen if isinstance(e, Notice) and e.key == "newer-version"]
    assert said and "schema 99" in said[0] and "'gradient_histogram' x1" in said[-1]
    assert [e.kind for e in _not_notice(seen)] == ["run_started", "step", "finished"]


def test_a_stop_to_a_run_that_already_ended_is_said_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_bytes(
        _line(_started()) + _line(RunFinished(3, 1.0, 2.0, None, None, "ok"))
    )
    answer = send_request(tmp_path, "stop")
    assert "already ended (finished at step 3)" in answer and not (tmp_path / CONTROL_FILE).exists()
    watch = RunDirWatch(tmp_path, poll_interval=0.01)
    asyncio.run(watch.run())
    watch.stop()  # after the watch: said, nothing breaks
    assert "already ended" in watch.last_answer and not (tmp_path / CONTROL_FILE).exists()
    gone = RunDirWatch(tmp_path / "missing")
    gone.stop()
    assert "no run directory" in gone.last_answer


def test_a_stop_the_run_does_not_answer_ends_the_watch_after_the_timeout(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_bytes(_line(_started()) + _line(_step(1, 4.0)))  # a process that died
    watch = RunDirWatch(tmp_path, poll_interval=0.01, stop_timeout=0.3)
    watch.subscribe(lambda e: watch.stop() if isinstance(e, StepMetrics) else None)
    t0 = time.monotonic()
    end = asyncio.run(watch.run())
    assert isinstance(end, RunStopped) and end.step == 1 and "did not answer the stop request" in end.message
    assert 0.3 <= time.monotonic() - t0 < 5
    assert json.loads((tmp_path / CONTROL_FILE).read_text())["request"] == "stop"


def test_stop_while_waiting_for_a_run_that_never_came(tmp_path: Path) -> None:
    watch = RunDirWatch(tmp_path / "never", poll_interval=0.01)

    async def main() -> Any:
        task = asyncio.ensure_future(watch.run())
        await asyncio.sleep(0.05)
        watch.stop()
        return await asyncio.wait_for(task, 5)

    end = asyncio.run(main())
    assert isinstance(end, RunStopped) and "stopped waiting" in end.message


@pytest.mark.parametrize("bad", [{"poll_interval": 0}, {"stop_timeout": -1}, {"poll_interval": True}])
def test_bad_settings_are_named(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RunDirWatch(tmp_path, **bad)
    with pytest.raises(TypeError, match="run_dir"):
        RunDirWatch(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request must be one of"):
        send_request(tmp_path, "halt")


def test_a_path_that_is_no_run_directory_is_named(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a run")
    with pytest.raises(ValueError, match=r"notes\.txt.* is a file, not a run directory: pass the folder"):
        RunDirWatch(notes)
    (tmp_path / "odd" / METRICS_FILE).mkdir(parents=True)
    for path in (tmp_path / "odd", tmp_path / "odd" / METRICS_FILE):
        with pytest.raises(ValueError, match="is a folder, not a run's event file"):
            RunDirWatch(path)


def test_a_metrics_file_that_cannot_be_read_ends_the_watch_with_the_reason(tmp_path: Path) -> None:
    watch = RunDirWatch(tmp_path, poll_interval=0.01)  # nothing there yet: fine, it waits
    seen: list[Event] = []
    watch.subscribe(seen.append)

    async def main() -> Any:
        task = asyncio.ensure_future(watch.run())
        await asyncio.sleep(0.05)
        (tmp_path / METRICS_FILE).mkdir()  # appears as a folder while the watch waits
        return await asyncio.wait_for(task, 5)

    end = asyncio.run(main())
    assert isinstance(end, RunFailed) and end.reason == "bad_input" and end.error_type == "IsADirectoryError"
    assert str(tmp_path / METRICS_FILE) in end.message and end.suggestions
    assert seen[-1] == end  # shown like any run's end


def test_the_control_file_is_read_once_per_request_and_a_stale_one_is_discarded(tmp_path: Path) -> None:
    (tmp_path / CONTROL_FILE).write_text('{"request": "stop"}')  # left by an earlier run
    reader = ControlReader(tmp_path)
    assert reader.poll() is None and not (tmp_path / CONTROL_FILE).exists()
    send_request(tmp_path, "pause")
    assert reader.poll() == "pause" and reader.poll() is None
    send_request(tmp_path, "pause")  # the same request again is a new request
    assert reader.poll() == "pause"
    (tmp_path / CONTROL_FILE).write_text('{"request": "explode"}')
    assert reader.poll() is None


_CHILD = """
import sys
from lora_widgets import LoRAConfig, LoRATrainer, TrainConfig, load_base_model
from lora_widgets.data.text import as_blocks
model, tok = load_base_model()
blocks = as_blocks(["def add(a, b):\\n    return a + b\\n" * 40] * 8, tok, 32)  # [n, 32]
config = TrainConfig(max_steps=400, batch_size=4, block_size=32, eval_every=None, log_every=1,
                     output_dir=sys.argv[1])
end = LoRATrainer(model, tok, blocks, lora=LoRAConfig(r=4), config=config).run_sync()
print("END", end.kind, end.step)
"""


def _run_dir_of(output: Path, proc: subprocess.Popen[str], timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in output.glob("*") if (p / METRICS_FILE).is_file()]
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("the training process wrote no run directory")


@pytest.mark.slow
def test_a_dashboard_watch_follows_and_steers_a_trainer_in_another_process(tmp_path: Path) -> None:
    """A LoRATrainer on the shipped model in a subprocess; the watch gets its events, pauses, resumes, stops it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        run_dir = _run_dir_of(tmp_path, proc)
        watch = RunDirWatch(run_dir, poll_interval=0.05)
        seen: list[Event] = []

        def steer(event: Event) -> None:  # pause at step 2; once paused, resume; at the next step, stop
            seen.append(event)
            paused = any(isinstance(e, StateChanged) and e.state == "paused" for e in seen)
            if isinstance(event, StepMetrics) and event.step == 2:
                watch.pause()
            elif isinstance(event, StateChanged) and event.state == "paused":
                watch.resume()
            elif isinstance(event, StepMetrics) and paused and not watch.last_answer.startswith("stop"):
                watch.stop()

        watch.subscribe(steer)
        end = asyncio.run(asyncio.wait_for(watch.run(), 300))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert isinstance(end, RunStopped) and "stopped by the user" in end.message, end
    assert 3 <= end.step < 100 and out.strip().endswith(f"END stopped {end.step}")  # not run to its 400 steps
    states = [e.state for e in seen if isinstance(e, StateChanged)]
    assert "paused" in states and states[states.index("paused") + 1] == "running"  # paused and resumed
    assert _not_notice(seen) == read_events(run_dir / METRICS_FILE)  # the same events as the file holds
    assert not (run_dir / CONTROL_FILE).exists()  # nothing left to act on a later run


def test_our_hf_callback_honours_the_control_file(tmp_path: Path) -> None:
    """An attached transformers Trainer stops when control.json asks (written as another process would);
    a request left in output_dir by an earlier run does not act on this one."""
    pytest.importorskip("peft")
    from lora_widgets.hf import HFRun
    from tests.test_hf_bridge import _hf_trainer

    hf = _hf_trainer(tmp_path, max_steps=40)
    out = Path(hf.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONTROL_FILE).write_text('{"request": "stop"}')  # stale: from an earlier run
    run = HFRun(hf)
    steps: list[int] = []

    def on_event(event: Event) -> None:
        if isinstance(event, StepMetrics):
            steps.append(event.step)
            if event.step == 3:
                send_request(out, "stop")  # as a watcher in another process does

    run.subscribe(on_event)
    end = asyncio.run(run.run())
    assert isinstance(end, RunStopped) and 3 <= end.step < 40, end
    assert steps[:3] == [1, 2, 3]  # the stale request did not stop it at step 1
    assert not (out / CONTROL_FILE).exists()
    assert read_events(out / METRICS_FILE)[-1] == end  # what a watcher of output_dir reads


def test_dash_watch_of_a_run_directory_says_it_waits_then_draws_the_run(tmp_path: Path) -> None:
    from lora_widgets import LoRADashboard, TrainConfig
    from tests.helpers import patterned_batch, tiny_llama

    dash = LoRADashboard(
        model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32), train=TrainConfig()
    )
    dash.flush_interval = 0.02
    run_dir = tmp_path / "run"
    written = [_started(), _step(1, 4.0), _step(2, 3.0), RunFinished(2, 2.0, 3.0, None, None, "Finished.")]

    async def main() -> list[str]:
        dash.watch(run_dir)
        await asyncio.sleep(0.3)
        titles = [c["title"] for c in dash.panel.callouts]
        run_dir.mkdir()
        (run_dir / METRICS_FILE).write_bytes(b"".join(_line(e) for e in written))
        await asyncio.wait_for(dash.wait(), 10)
        return titles

    waiting_titles = asyncio.run(main())
    assert "Waiting for the run" in waiting_titles
    assert "Waiting for the run" not in [c["title"] for c in dash.panel.callouts]
    assert dash.state == "finished" and dash.runs[0].history.step.tolist() == [1, 2]
    assert list(dash.charts.raw_loss.y) == [4.0, 3.0]
