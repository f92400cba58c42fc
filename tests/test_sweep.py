"""Sweep, headless: bad input named before any run, failures recorded, halving, stop/skip, resume after a kill."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from lora_widgets import EarlyStopping, LoRAConfig, TrainConfig, apply_lora
from lora_widgets.events import Event, RunFinished, RunStopped, StepMetrics
from lora_widgets.sweep import Halving, LogUniform, Points, RandomSearch, Sweep
from lora_widgets.sweep.events import SweepEnded, SweepRunEnded, SweepRunStarted, SweepStarted
from lora_widgets.sweep.space import expand
from tests.helpers import patterned_batch, tiny_llama

DATA = patterned_batch(32, 16)  # [32, 16]


def _config(tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(max_steps=4, batch_size=4, eval_every=2, val_fraction=0.25, warmup_steps=0,
                                adapter_stats=False, sample_prompts=(), device="cpu", output_dir=str(tmp_path))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _sweep(tmp_path: Path, model: Any = None, **kw: Any) -> Sweep:
    args: dict[str, Any] = dict(space={"r": [2, 4]}, seeds=[0], lora=LoRAConfig(target_modules=["q_proj"]),
                                config=_config(tmp_path), directory=tmp_path / "sweep")  # fmt: skip
    return Sweep(model if model is not None else tiny_llama(), None, DATA, **{**args, **kw})


class _Recorder(list):  # type: ignore[type-arg]
    def __call__(self, event: Any) -> None:
        self.append(event)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self if isinstance(e, cls)]


# -- bad input, before any run -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"space": {}}, "grid is empty"),
        ({"space": {"r": []}}, "axis 'r' is empty"),
        ({"space": []}, "list of points is empty"),
        ({"space": {"rank": [4]}}, r"unknown sweep setting 'rank'.*did you mean \['r'\]"),
        ({"space": {"learnig_rate": [1e-3]}}, r"did you mean \['learning_rate'\]"),
        (
            {"space": {"r": [4, 0]}},
            r'the sweep point \{"r": 0\} is refused: LoRAConfig: r must be an integer >= 1',
        ),
        ({"space": {"learning_rate": [3e-3, 2.0]}}, "TrainConfig.learning_rate=2.0 is invalid"),
        ({"space": {"seed": [1, 2]}}, r"set by the sweep itself: use Sweep\(seeds"),
        ({"space": {"r": 4}}, "must be a list of values"),
        ({"seeds": []}, "non-empty list of integers"),
        ({"seeds": [0, 0]}, "repeats a seed"),
        ({"halving": Halving(eta=2, min_steps=4)}, "min_steps=4 must be below the runs' max_steps=4"),
    ],
)
def test_bad_input_is_named_before_any_run(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sweep(tmp_path, **kw)
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("python-docs", "a tokenizer is needed"),  # text without a tokenizer
        ("no-such-corpus", "'no-such-corpus' is neither a built-in corpus nor an existing file"),
    ],
)
def test_bad_data_is_refused_before_any_run(tmp_path: Path, data: str, message: str) -> None:
    sweep = Sweep(tiny_llama(), None, data, space={"r": [2]}, directory=tmp_path / "sweep")
    rec = _Recorder()
    sweep.subscribe(rec)
    with pytest.raises(ValueError, match=message):
        sweep.run_sync()
    assert rec == [] and not sweep.running and sweep.rows == []


def test_a_model_with_adapters_and_another_sweeps_directory_are_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        _sweep(tmp_path, model)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text(
        json.dumps({"version": 1, "plan": {"other": 1}, "runs": []})
    )
    with pytest.raises(ValueError, match="holds another sweep"):
        _sweep(tmp_path)


def test_spaces_expand_as_documented() -> None:
    from lora_widgets.sweep import Grid

    assert expand(Grid({"r": [4, 8], "alpha": [8, 16]})) == [
        {"r": 4, "alpha": 8}, {"r": 4, "alpha": 16}, {"r": 8, "alpha": 8}, {"r": 8, "alpha": 16}
    ]  # fmt: skip
    assert expand(Points([{"r": 4}, {"r": 8, "target_modules": ("q_proj",)}]))[1]["target_modules"] == [
        "q_proj"
    ]
    sample = expand(RandomSearch({"learning_rate": LogUniform(1e-4, 1e-2), "r": [4, 8]}, n=20, seed=3))
    assert len(sample) == 20 and all(1e-4 <= p["learning_rate"] <= 1e-2 and p["r"] in (4, 8) for p in sample)
    assert sample == expand(
        RandomSearch({"learning_rate": LogUniform(1e-4, 1e-2), "r": [4, 8]}, n=20, seed=3)
    )


# -- real runs on a tiny model ---------------------------------------------------------------------------------


def test_runs_are_normal_runs_and_the_base_is_untouched(tmp_path: Path) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep = _sweep(tmp_path, model, seeds=[0, 1])
    rec = _Recorder()
    sweep.subscribe(rec)
    rows = sweep.run_sync()
    assert [(r.settings, r.seed, r.outcome) for r in rows] == [
        ({"r": 2}, 0, "finished"), ({"r": 2}, 1, "finished"), ({"r": 4}, 0, "finished"), ({"r": 4}, 1, "finished")
    ]  # fmt: skip
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit-identical
    ended = rec.of(SweepEnded)[0]
    assert ended.base_unchanged is True and ended.state == "finished" and ended.runs == 4
    for r in rows:  # each its own run directory, with its events
        assert r.run_dir is not None and (Path(r.run_dir) / "metrics.jsonl").is_file()
        assert r.adapter_bytes is not None and r.adapter_bytes > 0
        assert (
            r.trainable_params == r.settings["r"] * (32 + 32) * 2
        )  # q_proj of 2 layers: r (d + k), d = k = 32
    assert len({r.run_dir for r in rows}) == 4
    from lora_widgets.events import EvalMetrics, read_events

    base_evals = {next(e.val_loss for e in read_events(Path(r.run_dir) / "metrics.jsonl")
                       if isinstance(e, EvalMetrics)) for r in rows}  # fmt: skip
    assert len(base_evals) == 1  # every run, every seed, validates on the same held-out blocks
    kinds = [e.kind for e in rec]  # sweep events around each run's own events
    assert kinds[0] == "sweep_started" and kinds[1] == "sweep_run_started" and kinds[2] == "state"
    assert kinds.count("run_started") == 4 and kinds[-1] == "sweep_ended"
    table = sweep.results()
    assert [(s.settings, s.seeds, s.ok) for s in table] == [({"r": 2}, 2, 2), ({"r": 4}, 2, 2)]
    for s in table:
        vals = [r.best_val_loss for r in rows if r.point == s.point]
        assert s.mean_best_val == pytest.approx(sum(vals) / 2)
        assert s.std_best_val == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert sweep.best() in ({"r": 2}, {"r": 4}) and "± " in sweep.format_table()


@pytest.mark.parametrize("fault", ["oom", "nan"])
def test_a_failed_run_is_marked_with_its_diagnosis_and_the_sweep_goes_on(tmp_path: Path, fault: str) -> None:
    model = tiny_llama()
    sweep = _sweep(tmp_path, model, space={"r": [2, 4, 8]})
    current = {"index": -1}

    def on(event: Any) -> None:
        if isinstance(event, SweepRunStarted):
            current["index"] = event.index

    def inject(_m: Any, _inp: Any, out: Any) -> Any:
        if current["index"] == 1 and torch.is_grad_enabled():
            if fault == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            out.logits = out.logits * math.nan
        return out

    sweep.subscribe(on)
    handle = model.register_forward_hook(inject)
    try:
        rows = sweep.run_sync()
    finally:
        handle.remove()
    assert [r.outcome for r in rows] == ["finished", "failed", "finished"]
    assert (
        rows[1].reason == fault and rows[1].suggestions and rows[1].best_val_loss is not None
    )  # base's eval
    assert [s.ok for s in sweep.results()] == [1, 0, 1] and sweep.best() != {"r": 4}


def test_early_stopping_ends_a_too_high_learning_rate_inside_a_sweep(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=12, early_stopping=EarlyStopping(patience=2))
    rows = _sweep(tmp_path, space={"learning_rate": [0.5]}, config=config).run_sync()
    assert (
        rows[0].outcome == "early_stopped"
        and rows[0].step < 12
        and rows[0].reason in ("patience", "diverged")
    )
    assert rows[0].message.startswith(f"Stopped early at step {rows[0].step}")


# -- halving, stop and skip, with a stand-in trainer (the sweep's logic, no training) --------------------------


class _FakeTrainer:
    """Ends with best_val_loss = |log10(lr) + 2.5| + r / 100 after ``max_steps`` steps; or waits for stop()."""

    hold = False

    def __init__(self, model: Any, tok: Any, train: Any, val: Any, *, lora: LoRAConfig, config: TrainConfig):
        self.lora, self.config, self.run_dir = lora, config, None
        self._stop = asyncio.Event()
        self._subs: list[Any] = []

    def subscribe(self, cb: Any) -> Any:
        self._subs.append(cb)
        return lambda: None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> Any:
        steps = self.config.max_steps or 0
        for cb in self._subs:
            cb(StepMetrics(1, steps, 0.0, 1.0, 1e-3, 1.0, 1.0, 0.0, 0.0, 0))
        if _FakeTrainer.hold:
            await self._stop.wait()
            return RunStopped(1, 0.1, 1.0, None, None, "stopped")
        val = abs(math.log10(self.config.learning_rate) + 2.5) + self.lora.r / 100
        return RunFinished(steps, 0.1, 1.0, val, None, "done")


def test_successive_halving_keeps_the_best_third_per_rung(tmp_path: Path) -> None:
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1e-5]
    sweep = _sweep(tmp_path, space={"learning_rate": lrs}, config=_config(tmp_path, max_steps=18),
                   halving=Halving(eta=3, min_steps=2))  # fmt: skip
    sweep.trainer_factory = _FakeTrainer
    assert sweep.budgets == [2, 6, 18]
    rows = sweep.run_sync()
    by_rung = {k: [(r.settings["learning_rate"], r.max_steps) for r in rows if r.rung == k] for k in range(3)}
    assert by_rung[0] == [(lr, 2) for lr in lrs]
    assert by_rung[1] == [(1e-3, 6), (3e-3, 6), (1e-2, 6)]  # the 3 of 9 closest to 10**-2.5
    assert by_rung[2] == [(3e-3, 18)] and sweep.best() == {"learning_rate": 3e-3}


def test_skip_ends_one_run_and_stop_ends_the_sweep_which_resumes(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, space={"r": [2, 4, 8]})
    sweep.trainer_factory = _FakeTrainer
    rec = _Recorder()
    sweep.subscribe(rec)

    async def main() -> None:
        _FakeTrainer.hold = True
        task = asyncio.get_running_loop().create_task(sweep.run())
        await asyncio.sleep(0.05)
        sweep.skip()  # run 0: recorded as skipped, and the sweep goes on
        await asyncio.sleep(0.05)
        sweep.stop()  # during run 1: not recorded, the sweep ends
        await task

    try:
        asyncio.run(main())
    finally:
        _FakeTrainer.hold = False
    assert [(r.settings, r.outcome) for r in sweep.rows] == [({"r": 2}, "skipped")]
    assert rec.of(SweepEnded)[0].state == "stopped"
    again = _sweep(tmp_path, space={"r": [2, 4, 8]})  # a new session on the same directory
    again.trainer_factory = _FakeTrainer
    assert again.run_sync() and [(r.settings, r.outcome) for r in again.rows] == [
        ({"r": 2}, "skipped"), ({"r": 4}, "finished"), ({"r": 8}, "finished")
    ]  # fmt: skip


class _GatedTrainer(_FakeTrainer):
    """Finishes when ``gate`` is set (pause or not); records the requests the sweep forwards to it."""

    gate: asyncio.Event
    requests: ClassVar[list[str]] = []

    def pause(self) -> None:
        _GatedTrainer.requests.append("pause")

    def resume(self) -> None:
        _GatedTrainer.requests.append("resume")

    async def run(self) -> Any:
        await _GatedTrainer.gate.wait()
        return RunFinished(1, 0.1, 1.0, 1.0, None, "done")


def test_requests_go_to_the_run_in_progress_and_a_pause_between_runs_holds_the_next(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, space={"r": [2, 4]})
    sweep.trainer_factory = _GatedTrainer
    rec = _Recorder()
    sweep.subscribe(rec)
    _GatedTrainer.requests = []

    async def main() -> None:
        _GatedTrainer.gate = asyncio.Event()
        task = asyncio.get_running_loop().create_task(sweep.run())
        await asyncio.sleep(0.05)  # run 0 in progress
        sweep.pause()
        sweep.resume()
        assert _GatedTrainer.requests == ["pause", "resume"]  # forwarded as they came
        sweep.pause()  # still in force when run 0 ends by itself
        _GatedTrainer.gate.set()
        await asyncio.sleep(0.1)
        assert len(rec.of(SweepRunStarted)) == 1 and len(rec.of(SweepRunEnded)) == 1 and sweep.running
        sweep.resume()  # releases the sweep: run 1 starts and ends
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert [r.outcome for r in sweep.rows] == ["finished", "finished"] and not sweep.running
    assert rec.of(SweepEnded)[0].state == "finished"


_KILLED_SCRIPT = """
import sys, time, torch
from lora_widgets import LoRAConfig, TrainConfig
from lora_widgets.events import StepMetrics
from lora_widgets.sweep import Sweep
from lora_widgets.sweep.events import SweepRunStarted
from tests.helpers import patterned_batch, tiny_llama
out = sys.argv[1]
config = TrainConfig(max_steps=40, batch_size=4, eval_every=10, val_fraction=0.25, warmup_steps=0,
                     adapter_stats=False, sample_prompts=(), device="cpu")
sweep = Sweep(tiny_llama(), None, patterned_batch(32, 16), space={"r": [2, 4, 8]}, seeds=[0],
              lora=LoRAConfig(target_modules=["q_proj"]), config=config, directory=out)
started = []
def hold_mid_run(event):  # the second run's fifth step: wait there for the kill, whatever the machine's speed
    if isinstance(event, SweepRunStarted):
        started.append(event.index)
    if isinstance(event, StepMetrics) and started == [0, 1] and event.step == 5:
        print("held", flush=True)
        time.sleep(600)
sweep.subscribe(hold_mid_run)
sweep.run_sync()
"""


def test_a_sweep_killed_mid_run_resumes_with_its_finished_runs_kept(tmp_path: Path) -> None:
    directory = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, str(directory)], env=env, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.stdout is not None
    try:
        lines = iter(proc.stdout.readline, "")  # until the script prints "held" or ends
        assert any(line.strip() == "held" for line in lines), "the sweep ended before its second run's step 5"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = directory / "sweep.json"
    kept = json.loads(state.read_text())["runs"]
    assert len(kept) == 1, "killed in the second run: the first is kept"
    config = TrainConfig(max_steps=40, batch_size=4, eval_every=10, val_fraction=0.25, warmup_steps=0,
                         adapter_stats=False, sample_prompts=(), device="cpu")  # fmt: skip
    sweep = Sweep(tiny_llama(), None, patterned_batch(32, 16), space={"r": [2, 4, 8]}, seeds=[0],
                  lora=LoRAConfig(target_modules=["q_proj"]), config=config, directory=directory)  # fmt: skip
    assert [r.to_dict() for r in sweep.rows] == kept
    rec = _Recorder()
    sweep.subscribe(rec)
    rows = sweep.run_sync()
    assert [r.settings["r"] for r in rows] == [2, 4, 8] and [r.index for r in rows] == [0, 1, 2]
    assert [r.to_dict() for r in rows[: len(kept)]] == kept  # finished runs kept, not rerun
    assert rec.of(SweepStarted)[0].resumed == len(kept) and rec.of(SweepStarted)[0].rerun == 0
    assert sweep.note == f"resumed {len(kept)} of 3 runs from {directory}" == rec.of(SweepStarted)[0].note
    assert len(rec.of(SweepRunStarted)) == 3 - len(kept)
    assert all(r.outcome == "finished" for r in rows)


def test_sweep_events_read_back() -> None:
    from lora_widgets.sweep.events import sweep_event_from_dict

    row = SweepRunEnded(0, 1, {"r": 4, "target_modules": ["q_proj"]}, 2, 0, 10, "failed", 3, 1.5, math.nan, 2.0,
                        "boom", "oom", None, "/x", 123, ("lower r",))  # fmt: skip
    back = sweep_event_from_dict(json.loads(json.dumps(row.to_dict())))
    assert (
        isinstance(back, SweepRunEnded)
        and back.suggestions == ("lower r",)
        and math.isnan(back.best_val_loss or 0)
    )
    _ = Event  # the run events' union, forwarded as they are


# -- resuming: a stored run is reused only with the same data, base weights and code --------------------------


def _session(tmp_path: Path, model: Any = None, data: torch.Tensor = DATA) -> tuple[Sweep, _Recorder]:
    """A sweep on ``tmp_path / "sweep"`` with the stand-in trainer (fingerprints are computed all the same)."""
    sweep = Sweep(model if model is not None else tiny_llama(), None, data, space={"r": [2, 4]}, seeds=[0],
                  lora=LoRAConfig(target_modules=["q_proj"]), config=_config(tmp_path),
                  directory=tmp_path / "sweep")  # fmt: skip
    sweep.trainer_factory = _FakeTrainer
    rec = _Recorder()
    sweep.subscribe(rec)
    return sweep, rec


def test_a_run_is_reused_on_the_same_data_and_base_and_the_sweep_says_so(tmp_path: Path) -> None:
    first, _ = _session(tmp_path)
    rows = first.run_sync()
    assert first.note == "" and all(r.fingerprint is not None for r in rows)  # nothing stored: nothing said
    again, rec = _session(tmp_path)  # a new session: the same data, a base built the same way
    again.run_sync()
    note = f"resumed 2 of 2 runs from {tmp_path / 'sweep'}"
    started, ended = rec.of(SweepStarted)[0], rec.of(SweepEnded)[0]
    assert (started.resumed, started.rerun, started.note) == (2, 0, note)
    assert rec.of(SweepRunStarted) == [] and [r.to_dict() for r in again.rows] == [r.to_dict() for r in rows]
    assert again.format_table().splitlines()[0] == note and f"({note})" in ended.message


def test_changed_data_runs_again_and_says_why(tmp_path: Path) -> None:
    _session(tmp_path)[0].run_sync()
    changed = DATA.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 128  # one token of one block
    again, rec = _session(tmp_path, data=changed)
    rows = again.run_sync()
    started = rec.of(SweepStarted)[0]
    assert (started.resumed, started.rerun) == (0, 2) and len(rec.of(SweepRunStarted)) == 2
    assert (
        started.note
        == f"resumed 0 of 2 runs from {tmp_path / 'sweep'}; 2 stored runs run again: the data changed"
    )
    stored = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert [r["fingerprint"] for r in stored] == [r.fingerprint for r in rows]  # the old rows are gone
    assert [r.settings["r"] for r in rows] == [2, 4]


def test_changed_base_weights_run_again(tmp_path: Path) -> None:
    _session(tmp_path)[0].run_sync()
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-4  # one weight of one layer
    again, rec = _session(tmp_path, model)
    again.run_sync()
    assert rec.of(SweepStarted)[0].rerun == 2 and len(rec.of(SweepRunStarted)) == 2
    assert rec.of(SweepStarted)[0].note.endswith("2 stored runs run again: the base model changed")


def test_a_large_base_is_fingerprinted_from_a_sample_of_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_widgets.sweep import fingerprint

    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 0)  # every base counts as large: values are sampled
    base = fingerprint.model_fingerprint(tiny_llama())
    assert fingerprint.model_fingerprint(tiny_llama()) == base  # the sample is deterministic
    model = tiny_llama()
    weight = model.model.layers[1].mlp.down_proj.weight  # [32, 64]: values 0, 32, ..., 2047 of 2048 sampled
    with torch.no_grad():
        weight.view(-1)[1] += 1e-4  # between two sampled values: the documented blind spot
        assert fingerprint.model_fingerprint(model) == base
        weight.view(-1)[32] += 1e-4  # a sampled value
    assert fingerprint.model_fingerprint(model) != base


def test_a_stored_run_without_a_fingerprint_runs_again(tmp_path: Path) -> None:
    _session(tmp_path)[0].run_sync()
    path = tmp_path / "sweep" / "sweep.json"
    doc = json.loads(path.read_text())
    del doc["runs"][0]["fingerprint"]  # as an older version wrote it
    doc["runs"][1]["fingerprint"] = "not a fingerprint"  # damaged
    path.write_text(json.dumps(doc))
    again, rec = _session(tmp_path)
    assert len(again.rows) == 2  # read back, not yet checked
    rows = again.run_sync()
    assert rec.of(SweepStarted)[0].note.endswith(
        "2 stored runs run again: no fingerprint (written before sweeps kept one)"
    )
    assert len(rec.of(SweepRunStarted)) == 2 and all(r.fingerprint is not None for r in rows)


def test_the_reuse_rule_names_what_changed() -> None:
    from lora_widgets.sweep.fingerprint import Fingerprint, resume_note, stale_parts

    now = Fingerprint("d", "m", "c")
    assert stale_parts(now.to_dict(), now) == []
    assert stale_parts({"data": "d", "model": "m", "code": "old"}, now) == ["code"]
    assert stale_parts({"data": "x", "model": "y", "code": "c"}, now) == ["data", "model"]
    assert stale_parts(None, now) == stale_parts({"data": "d"}, now) == ["fingerprint"]
    note = resume_note(1, 4, "sweeps/x", [["data", "model"], ["code"]])
    assert note == (
        "resumed 1 of 4 runs from sweeps/x; 2 stored runs run again: the data and the base model and the "
        "package code changed"
    )
