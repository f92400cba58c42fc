"""One trainer, one training at a time, whoever started it (issue 19, item 1).

The crash this guards against: ``LoRADashboard(trainer=hf).start()`` while the user's own thread is inside
``hf.train()`` started a second ``train()`` on the same trainer; the process died in 3 of 10 runs (SIGSEGV in
gradient clipping) and reported "Finished" at step 31 of 30 in the others. Here the user's ``train()`` runs in
a thread held at a step by a callback, the second start is made there, and the first run is then let go and
must end exactly as it would have alone.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_widgets import LoRADashboard, LoRATrainer  # noqa: E402
from lora_widgets.hf import HFRun  # noqa: E402
from lora_widgets.hf.guard import training_now  # noqa: E402
from lora_widgets.widget import attach  # noqa: E402
from tests.test_hf_bridge import _hf_trainer  # noqa: E402


class _HoldAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Holds ``train()`` at the end of update ``step`` until :meth:`release`; ``reached`` is set there."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.reached = threading.Event()
        self._go = threading.Event()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.reached.set()
            assert self._go.wait(60), "never released"

    def release(self) -> None:
        self._go.set()


def _train_in_thread(hf: Any, hold: _HoldAt) -> tuple[threading.Thread, list[Any]]:
    """The user's own ``hf.train()`` in a thread named ``user-train``, held at ``hold.step``."""
    out: list[Any] = []
    hf.add_callback(hold)
    thread = threading.Thread(target=lambda: out.append(hf.train()), name="user-train", daemon=True)
    thread.start()
    assert hold.reached.wait(60), "the user's train() never reached the held step"
    return thread, out


def _finish(thread: threading.Thread, hold: _HoldAt, out: list[Any], hf: Any) -> None:
    """Release the user's run and check it ended as it would have alone: every update once, no more."""
    hold.release()
    thread.join(120)
    assert not thread.is_alive()
    assert out and out[0].global_step == hf.args.max_steps == hf.state.global_step
    assert hf.is_in_train is False


def test_the_dashboard_refuses_to_start_while_the_users_train_runs(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=6)
    dash = LoRADashboard(trainer=hf)  # attached first; the user then calls train() in another thread
    hold = _HoldAt(2)
    thread, out = _train_in_thread(hf, hold)
    try:
        assert training_now(hf) == "Trainer.train() is running in thread 'user-train'"
        callbacks = list(hf.callback_handler.callbacks)

        async def press_train() -> None:
            with pytest.raises(RuntimeError) as info:
                dash.start()
            message = str(info.value)
            assert "Trainer.train() is running in thread 'user-train'" in message
            assert "Kernel > Interrupt" in message and "one trainer trains once at a time" in message
            assert dash.state == "idle" and not dash.running and dash.runs == []
            callout = dash.panel.callouts[0]
            assert callout["kind"] == "danger" and "user-train" in callout["message"]

        asyncio.run(press_train())
        assert hf.state.global_step == 2  # still held: nothing was started or changed
        assert list(hf.callback_handler.callbacks) == callbacks
    finally:
        _finish(thread, hold, out, hf)

    async def train_now() -> Any:  # once the user's run ended, Train works (the refusal is not sticky)
        return await dash.run()

    hf.remove_callback(hold)
    hf.args.max_steps = 2
    end = asyncio.run(train_now())
    assert end is not None and end.kind == "finished" and hf.state.global_step == 2


def test_attaching_to_a_trainer_that_is_training_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=4)
    hf.add_callback(transformers.PrinterCallback)
    hold = _HoldAt(1)
    thread, out = _train_in_thread(hf, hold)
    try:
        before = list(hf.callback_handler.callbacks)
        with pytest.raises(RuntimeError, match=r"cannot attach a dashboard.*thread 'user-train'"):
            LoRADashboard(trainer=hf)
        with pytest.raises(RuntimeError, match="thread 'user-train'"):
            asyncio.run(HFRun(hf).run())
        assert [type(c) for c in hf.callback_handler.callbacks][: len(before)] == [type(c) for c in before]
        assert "PrinterCallback" in [type(c).__name__ for c in hf.callback_handler.callbacks]
    finally:
        _finish(thread, hold, out, hf)


def test_a_train_that_raised_does_not_block_the_next_start(tmp_path: Path) -> None:
    """transformers leaves ``is_in_train`` True after ``train()`` raised; that alone must not refuse."""
    hf = _hf_trainer(tmp_path, max_steps=2)
    with mock.patch.object(hf, "compute_loss", side_effect=RuntimeError("boom")), pytest.raises(RuntimeError):
        hf.train()
    assert hf.is_in_train is True and training_now(hf) is None
    end = asyncio.run(HFRun(hf).run())
    assert end.kind == "finished"


def test_while_the_dashboard_trains_a_second_run_and_a_lora_trainer_are_refused(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=6)
    hold = _HoldAt(2)
    hf.add_callback(hold)
    run = HFRun(hf)

    async def main() -> Any:
        task = asyncio.ensure_future(run.run())
        while not hold.reached.is_set():
            await asyncio.sleep(0.01)
        assert training_now(hf) == "the dashboard (HFRun) is already training it"
        with pytest.raises(RuntimeError, match=r"dashboard \(HFRun\) is already training it.*press Stop"):
            await HFRun(hf).run()
        with pytest.raises(RuntimeError, match="another LoRATrainer is training this model"):
            await LoRATrainer(hf.model, None, [[1, 2, 3]]).run()
        hold.release()
        return await task

    end = asyncio.run(main())
    assert end.kind == "finished" and end.step == 6 == hf.state.global_step


def test_logging_steps_zero_on_the_args_is_refused_at_start(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=3)
    dash = LoRADashboard(trainer=hf)
    hf.args.logging_steps = 0  # the ready callout invites changes on hf_trainer.args

    async def press_train() -> None:
        with pytest.raises(
            ValueError, match=r"logging_steps=0 with logging_strategy='steps'.*logging_steps = 10"
        ):
            dash.start()
        assert dash.state == "idle" and dash.runs == [] and hf.state.global_step == 0

    asyncio.run(press_train())


def test_a_failed_dashboard_construction_leaves_the_trainers_callbacks_as_they_were(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path)
    hf.add_callback(transformers.PrinterCallback)
    before = list(hf.callback_handler.callbacks)
    with (
        mock.patch.object(attach, "show_source", side_effect=RuntimeError("injected fault in show_source")),
        pytest.raises(RuntimeError, match="injected fault"),
    ):
        LoRADashboard(trainer=hf)
    assert hf.callback_handler.callbacks == before  # the printer is back, no EventCallback left behind
