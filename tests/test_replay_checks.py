"""Replays that tell the truth (issue 19, item 4): every line of a metrics.jsonl is checked, types included; a
bad line is named by number and skipped (or refused with ``strict``), never drawn at the wrong step; an empty
file is said to be empty; a file from a newer version replays what this one understands and says what it
skipped. Also the one metrics.jsonl writer: it never leaves a partial line."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lora_widgets.events import (
    EvalMetrics,
    Event,
    MetricsWriter,
    Notice,
    Replay,
    RunFinished,
    RunStarted,
    StepMetrics,
    check_events,
    event_from_dict,
    read_events,
)
from lora_widgets.events.types import SCHEMA_VERSION


def _started(**extra: Any) -> RunStarted:
    return RunStarted("r", "/tmp/r", {"learning_rate": 1e-3}, None, "cpu", "CPU", 1, 2, 4, 8, 0.0, **extra)


def _step(step: int, loss: float) -> StepMetrics:
    return StepMetrics(step, 4, 0.1 * step, loss, 1e-3, 1.0, 100.0, float(step), 1.0, 0)


def _end() -> RunFinished:
    return RunFinished(4, 4.0, 1.0, 1.5, None, "Finished 4 steps.")


def _lines(events: list[Event]) -> list[str]:
    return [json.dumps(e.to_dict()) for e in events]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _replayed(source: Replay) -> list[Event]:
    seen: list[Event] = []
    source.subscribe(seen.append)
    asyncio.run(source.run())
    return seen


def test_a_loss_that_is_not_a_number_is_named_by_line_and_never_drawn(tmp_path: Path) -> None:
    good = [_started(), _step(1, 4.0), _step(2, 3.0), _step(3, 2.0), _step(4, 1.0), _end()]
    lines = _lines(good)
    lines[2] = lines[2].replace('"loss": 3.0', '"loss": "abc"')  # line 3: step 2's loss
    path = _write(tmp_path / "metrics.jsonl", lines)

    events, notices = check_events(path)
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [1, 3, 4]  # each at its own step
    assert len(notices) == 1 and notices[0].severity == "warning"
    assert "line 3" in notices[0].message and "'loss'" in notices[0].message and "'abc'" in notices[0].message

    seen = _replayed(Replay(path))
    assert seen[0] == notices[0]  # said before the run's own events
    steps = [(e.step, e.loss) for e in seen if isinstance(e, StepMetrics)]
    assert steps == [(1, 4.0), (3, 2.0), (4, 1.0)]
    assert isinstance(seen[-1], RunFinished)

    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: .*'loss' should be float, got 'abc'"):
        read_events(path, strict=True)
    with pytest.raises(ValueError, match="line 3"):
        Replay(path, strict=True)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d.update(step="2"), "'step' should be int"),
        (lambda d: d.update(step=True), "'step' should be int"),
        (lambda d: d.pop("loss"), "loss"),
        (lambda d: d.update(memory_reserved_bytes="lots"), "'memory_reserved_bytes'"),
        (lambda d: d.update(extra={"acc": "high"}), "'extra'"),
    ],
)
def test_every_field_is_type_checked(edit: Any, named: str) -> None:
    data = _step(2, 3.0).to_dict()
    edit(data)
    with pytest.raises((ValueError, TypeError), match=named):
        event_from_dict(data)


def test_nan_and_optional_fields_still_round_trip() -> None:
    step = StepMetrics(1, 4, 0.1, math.nan, 1e-3, math.inf, 1.0, 1.0, 1.0, 0, None, None, {"acc": math.nan})
    back = event_from_dict(json.loads(json.dumps(step.to_dict())))
    assert isinstance(back, StepMetrics) and math.isnan(back.loss) and math.isinf(back.grad_norm)
    assert math.isnan(back.extra["acc"])


def test_a_step_that_goes_back_is_skipped_not_drawn_earlier(tmp_path: Path) -> None:
    lines = _lines([_started(), _step(1, 4.0), _step(2, 3.0), _step(1, 9.0), _step(3, 2.0), _end()])
    events, notices = check_events(_write(tmp_path / "metrics.jsonl", lines))
    assert [(e.step, e.loss) for e in events if isinstance(e, StepMetrics)] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert "line 4: step 1 comes after step 2" in notices[0].message


def test_two_runs_appended_to_one_file_each_count_their_own_steps(tmp_path: Path) -> None:
    # an HF output_dir trained twice holds two runs: the second's steps restart after its RunStarted
    lines = _lines([_started(), _step(1, 4.0), _end(), _started(), _step(1, 3.5), _end()])
    events, notices = check_events(_write(tmp_path / "metrics.jsonl", lines))
    assert not notices and len([e for e in events if isinstance(e, StepMetrics)]) == 2


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_an_empty_file_is_said_to_be_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl is empty: the run wrote no event"):
        read_events(path)
    with pytest.raises(ValueError, match="is empty"):
        Replay(path)


def test_a_newer_file_replays_what_it_understands_and_says_what_it_skipped(tmp_path: Path) -> None:
    started = _started().to_dict() | {"schema_version": SCHEMA_VERSION + 1, "tokenizer": "new-field"}
    future_kind = {"event": "gradient_histogram", "step": 1, "bins": [1, 2, 3]}
    lines = [json.dumps(started), *_lines([_step(1, 4.0)]), json.dumps(future_kind), json.dumps(future_kind)]
    lines += _lines([_step(2, 3.0), _end()])
    path = _write(tmp_path / "metrics.jsonl", lines)

    seen = _replayed(Replay(path))
    notices = [e for e in seen if isinstance(e, Notice)]
    assert len(notices) == 1 and notices[0].key == "newer-version"
    text = notices[0].message
    assert "'gradient_histogram' x2" in text and f"schema {SCHEMA_VERSION + 1}" in text and "Upgrade" in text
    assert [e.step for e in seen if isinstance(e, StepMetrics)] == [1, 2]
    started_back = next(e for e in seen if isinstance(e, RunStarted))
    assert started_back.schema_version == SCHEMA_VERSION + 1 and isinstance(seen[-1], RunFinished)


def test_a_file_written_before_versions_were_recorded_reads_as_version_1(tmp_path: Path) -> None:
    old = _started().to_dict()
    del old["schema_version"]
    events, notices = check_events(_write(tmp_path / "metrics.jsonl", [json.dumps(old), *_lines([_end()])]))
    assert isinstance(events[0], RunStarted) and events[0].schema_version == 1 and not notices


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    end = RunFinished(1, 1.0, 1.0, None, None, "done\u2028with a separator\u0085inside")
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(e.to_dict(), ensure_ascii=False) for e in [_started(), end]) + "\n")
    events, notices = check_events(path)
    assert events[-1] == end and not notices


def test_the_dashboard_shows_what_a_replay_skipped(tmp_path: Path) -> None:
    from lora_widgets import LoRADashboard, TrainConfig
    from tests.helpers import patterned_batch, tiny_llama

    lines = _lines([_started(), _step(1, 4.0), _step(2, 3.0), _end()])
    lines[2] = "not json at all"
    path = _write(tmp_path / "metrics.jsonl", lines)
    dash = LoRADashboard(
        model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32), train=TrainConfig()
    )

    async def main() -> None:
        dash.replay(path)
        await dash.wait()

    asyncio.run(main())
    shown = [c for c in dash.panel.callouts if "line 3" in c["message"]]
    assert shown and shown[0]["kind"] == "warning"
    assert list(dash.runs[0].history.step) == [1]


def test_the_writer_leaves_no_partial_line_when_the_disk_fills(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    assert writer.write(_started())
    real_write = writer._file.write

    def half_then_full(data: bytes) -> int:  # the disk fills part-way through the line
        real_write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer._file, "write", half_then_full)
    assert not writer.write(_step(1, 4.0))
    assert writer.failures == 1
    monkeypatch.undo()
    assert writer.write(EvalMetrics(1, 2.0, math.exp(2.0), 2.0))  # the disk has room again
    writer.close()
    text = path.read_text()
    assert text.endswith("\n") and read_events(path) == [_started(), EvalMetrics(1, 2.0, math.exp(2.0), 2.0)]
