"""More than one process: our trainer and an attached transformers Trainer under torchrun (gloo, 2 CPU processes).

One ``torchrun`` launch (tests/distributed_worker.py) runs three runs in each of two processes; the tests below
read what each rank saw and what the run directories hold, and compare with a 1-process run of the same global
batch made here. The unit tests after them check the pieces without processes: the per-rank slices of a batch,
the loss scaling of instruction examples, and the clear errors of a bad launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import lora_widgets
from lora_widgets.events.replay import read_events
from lora_widgets.events.types import RunStarted, StepMetrics
from lora_widgets.training.distributed import World
from tests import distributed_worker as worker
from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


# torchrun's report of a rank killed by an abort or a segfault, as opposed to one that raised or failed a check
_KILLED = re.compile(r"Signal \d+ \(SIG(ABRT|SEGV)\) received")


def _launch(launcher: list[str], out: Path, *runs: str) -> tuple[Path, list[dict[str, Any]]]:
    """Start the worker under ``launcher`` (2 processes) in a clean environment; (its folder, each rank's results).

    A launch whose rank was killed by SIGABRT or SIGSEGV is started once more, in a fresh folder, saying so: that
    happened once in about 17 launches on the CI machine (gloo's threads, "terminate called without an active
    exception"; the worker's faulthandler prints the Python stacks). A rank that raises, a check that fails, or a
    second crash fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    for attempt in (1, 2):
        folder = out if attempt == 1 else out / "again"
        script = [
            str(ROOT / "tests" / "distributed_worker.py"),
            str(folder),
            *([",".join(runs)] if runs else []),
        ]
        t0 = time.monotonic()
        done = subprocess.run(
            [*launcher, *script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        print(f"{' '.join(launcher[2:4])} took {time.monotonic() - t0:.1f} s")
        if done.returncode == 0 or attempt == 2 or not _KILLED.search(done.stderr):
            break
        print(f"a rank was killed by a signal; launching once more:\n{done.stderr[-4000:]}", file=sys.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]  # every process exited 0
    return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """``torchrun --nproc_per_node 2 --standalone`` of the worker; (its output folder, each rank's results)."""
    out = tmp_path_factory.mktemp("ddp")
    return _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"], out
    )


def _reference(tmp_path: Path) -> dict[str, Any]:
    """The same run in this one process with the global batch (2 per rank x 2 ranks = 4)."""
    train, val = worker.data()
    model = tiny_llama()
    rows = worker.record_rows(model)
    trainer = lora_widgets.LoRATrainer(model, None, train, val, worker.lora(), worker.config(tmp_path, 4))
    assert not trainer.world.distributed
    events: list[Any] = []
    trainer.subscribe(events.append)
    end = trainer.run_sync()
    return {
        "loss": [[e.step, e.loss] for e in events if isinstance(e, StepMetrics)],
        "val": [[e.step, e.val_loss] for e in events if e.kind == "eval"],
        "adapter": end.adapter_path,
        "rows": rows,
    }


def _adapter(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_same_global_batch(
    launched: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, ranks = launched
    ref = _reference(tmp_path)
    for r, seen in enumerate(ranks):
        got = seen["equal"]
        assert got["world"] == [r, 2] and got["end"] == "finished" and got["step"] == worker.STEPS
        assert [s for s, _ in got["loss"]] == list(range(1, worker.STEPS + 1))
        for key in ("loss", "val"):  # every rank reads the global loss; validation over both ranks' rows
            assert [s for s, _ in got[key]] == [s for s, _ in ref[key]]
            assert [v for _, v in got[key]] == pytest.approx([v for _, v in ref[key]], rel=1e-5)
    assert len(ref["rows"]) == worker.STEPS
    for step, whole in enumerate(ref["rows"]):  # each rank trained on its own half of the global batch
        halves = [seen["equal"]["rows"][step] for seen in ranks]
        assert [len(h) for h in halves] == [2, 2] and sorted(halves[0] + halves[1]) == sorted(whole)
    one, two = _adapter(ref["adapter"]), _adapter(ranks[0]["equal"]["adapter"])
    assert one.keys() == two.keys() and len(one) == 8
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_only_rank_0_writes_the_run_directory(launched: tuple[Path, list[dict[str, Any]]]) -> None:
    out, ranks = launched
    for name in ("equal", "stop", "early"):
        run_dirs = list((out / name).iterdir())
        assert [str(d) for d in run_dirs] == [ranks[0][name]["run_dir"]] == [ranks[1][name]["run_dir"]]
        events = read_events(run_dirs[0] / "metrics.jsonl")
        assert sum(isinstance(e, RunStarted) for e in events) == 1  # one writer: no event twice
        steps = [e.step for e in events if isinstance(e, StepMetrics)]
        assert steps == sorted(set(steps)) and steps[-1] == ranks[0][name]["step"]
        assert (
            ranks[1][name]["adapter"] is None
            and "Process 1 of 2: rank 0 writes the run directory" in ranks[1][name]["message"]
        )
        assert Path(ranks[0][name]["adapter"]).is_dir()
    config = json.loads((Path(ranks[0]["equal"]["run_dir"]) / "config.json").read_text())
    assert config["train"]["batch_size"] == 2  # per process, as given
    started = next(
        e
        for e in read_events(Path(ranks[0]["equal"]["run_dir"]) / "metrics.jsonl")
        if isinstance(e, RunStarted)
    )
    assert (
        started.config["world_size"] == 2 and started.tokens_per_step == 4 * worker.BLOCK
    )  # every rank's tokens


@pytest.mark.slow
def test_a_pause_and_a_stop_through_the_run_directory_reach_both_ranks(
    launched: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, ranks = launched
    for seen in ranks:
        got = seen["stop"]
        assert got["end"] == "stopped" and got["step"] == 4  # stop written after step 4: no rank runs step 5
        assert got["states"] == ["running", "paused", "running", "stopped"]  # rank 0's pause held both
        assert [s for s, _ in got["loss"]] == [1, 2, 3, 4]
    assert ranks[0]["stop"]["loss"] == ranks[1]["stop"]["loss"]


@pytest.mark.slow
def test_an_early_stopping_verdict_ends_every_rank_at_the_same_step(
    launched: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, ranks = launched
    for seen in ranks:
        got = seen["early"]
        assert got["end"] == "early_stopped" and got["step"] == 2, got["message"]
        assert [s for s, _ in got["val"]] == [0, 1, 2]  # evaluated on both ranks' rows, then stopped
    assert ranks[0]["early"]["val"] == ranks[1]["early"]["val"]


@pytest.mark.slow
def test_an_hf_trainer_under_ddp_reports_from_rank_0_and_stops_every_rank(
    launched: tuple[Path, list[dict[str, Any]]],
) -> None:
    pytest.importorskip("peft")  # the worker runs the transformers Trainer only where peft is installed
    out, ranks = launched
    zero, one = ranks[0]["hf"], ranks[1]["hf"]
    assert zero["end"] == one["end"] == "stopped"
    assert zero["global_step"] == one["global_step"] == 4  # stop read at the end of step 4 on rank 0, agreed
    assert (
        one["kinds"] == []
        and zero["kinds"][:2] == ["state", "run_started"]
        and zero["kinds"][-1] == "stopped"
    )
    events = read_events(out / "hf" / "metrics.jsonl")
    assert [e.kind for e in events] == zero["kinds"]  # what rank 0 published, once


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_script(
    launched: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` (it starts the processes through torchrun; on this CPU
    machine the trainer's device="cpu" makes them gloo processes). ``--cpu --num_processes 2`` would start one
    process: Accelerate runs several CPU processes only through MPI."""
    pytest.importorskip("accelerate")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    ranks = _launch(launcher, tmp_path, "equal")[1]
    for r, seen in enumerate(ranks):
        assert seen["equal"]["world"] == [r, 2]
        assert seen["equal"]["loss"] == launched[1][0]["equal"]["loss"]  # same processes, same numbers


# -- the pieces, in one process ---------------------------------------------------------------------------


def test_the_ranks_slices_of_a_batch_are_disjoint_and_make_the_global_batch() -> None:
    from lora_widgets.training.batches import BatchOrder, Blocks, eval_batches

    train, val = worker.data()
    config = worker.config(Path("unused"), batch_size=4).replace(grad_accum_steps=2)
    blocks = Blocks(train, val, steps_per_epoch=4)
    whole = BatchOrder(blocks, config, torch.device("cpu"))
    parts = [BatchOrder(blocks, config, torch.device("cpu"), shard=(r, 2)) for r in (0, 1)]
    for step in (1, 3, 5):  # 5: the second epoch
        for m, global_batch in enumerate(whole.micro_batches(step)):
            halves = [cast(torch.Tensor, p.micro_batches(step)[m]) for p in parts]
            assert all(h.shape == (2, worker.BLOCK) for h in halves)
            want = cast(torch.Tensor, global_batch).sort(0).values
            torch.testing.assert_close(torch.cat(halves).sort(0).values, want)
    shards = [eval_batches(val, 4, None, torch.device("cpu"), (r, 2)) for r in (0, 1)]
    rows = [torch.cat([cast(torch.Tensor, b) for b in shard]) for shard in shards]
    assert rows[0].shape[0] + rows[1].shape[0] == worker.N_VAL  # 10 rows: 5 each, none twice
    torch.testing.assert_close(torch.cat(rows).sort(0).values, val.sort(0).values)


def test_instruction_examples_scaled_by_the_ranks_average_to_the_one_process_gradient() -> None:
    """Ranks with different trained-token counts: DDP's mean of the ranks' gradients of ``batch_loss(..., ranks=2)``
    equals the 1-process gradient of the whole update (each token weighs the same)."""
    from lora_widgets.data.sft_batches import SFTExample
    from lora_widgets.training.batches import BatchOrder, Blocks, Examples
    from lora_widgets.training.step import batch_loss

    g = torch.Generator().manual_seed(0)
    items = []
    for i, n in enumerate((5, 9, 14, 6, 11, 7, 12, 8)):
        ids = tuple(int(t) for t in torch.randint(1, 128, (n,), generator=g))
        labels = tuple(-100 if t < n // 2 else ids[t] for t in range(n))  # answers: the second half
        items.append(SFTExample(ids, labels, i))
    examples = Examples(tuple(items), pad_id=0)
    config = worker.config(Path("unused"), batch_size=4).replace(grad_accum_steps=2, packing=False)
    blocks = Blocks(examples, None, steps_per_epoch=1)
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2 and p.shape[0] == 32)  # a few trainable matrices

    def grads(order: BatchOrder, ranks: int) -> list[torch.Tensor]:
        model.zero_grad()
        micro = order.micro_batches(1)
        for x in micro:
            batch_loss(model, x, contextlib.nullcontext, len(micro), ranks).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]  # type: ignore[union-attr]

    one = grads(BatchOrder(blocks, config, torch.device("cpu")), 1)
    per_rank = [grads(BatchOrder(blocks, config, torch.device("cpu"), shard=(r, 2)), 2) for r in (0, 1)]
    for want, a, b in zip(one, *per_rank, strict=True):
        torch.testing.assert_close((a + b) / 2, want, rtol=1e-5, atol=1e-7)  # DDP averages the two


def test_a_plain_process_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = World.from_env("cpu")
    assert (world.rank, world.size, world.distributed, world.is_main) == (0, 1, False, True)
    assert world.data_config(worker.config(Path("x"), 2)).batch_size == 2


def test_a_launch_without_its_rendezvous_says_to_use_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    model = tiny_llama()
    train, val = worker.data()
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set.*torchrun"):
        lora_widgets.LoRATrainer(model, None, train, val, worker.lora(), worker.config(Path("x"), 2))
    assert not lora_widgets.lora_layers(model)  # the model is as it was
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but RANK='5'"):
        World.from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        World.from_env("cpu")


def _fake_group(monkeypatch: pytest.MonkeyPatch, size: int, backend: str) -> None:
    """A process group as the launcher left it (what torch.distributed reports), without starting one."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: size)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)


def test_a_process_group_of_another_size_or_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fake_group(monkeypatch, 4, "gloo")
    with pytest.raises(ValueError, match=r"initialised with world size 4 but WORLD_SIZE=2"):
        World.from_env("cpu")
    _fake_group(monkeypatch, 2, "nccl")
    with pytest.raises(ValueError, match=r"backend 'nccl' has no collectives for 'cpu'.*'gloo'"):
        World.from_env("cpu")
    with pytest.raises(ValueError, match=r"not on 'mps'"):
        World.from_env("mps")
    _fake_group(monkeypatch, 2, "cpu:gloo,cuda:nccl")
    assert World.from_env("cpu").size == 2  # torch's default pair of backends serves the CPU


def test_our_hf_callback_on_another_rank_publishes_and_writes_nothing(tmp_path: Path) -> None:
    """The callback's hooks as a transformers Trainer calls them on rank 1 (``is_world_process_zero`` False)."""
    from types import SimpleNamespace

    from lora_widgets.hf import EventCallback

    cb = EventCallback()
    seen: list[Any] = []
    cb.subscribe(seen.append)
    args = SimpleNamespace(
        output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=2, gradient_accumulation_steps=1,
        world_size=2, should_save=True, logging_steps=1, save_strategy="no", learning_rate=1e-3, max_steps=3,
    )  # fmt: skip
    state = SimpleNamespace(
        max_steps=3, global_step=0, is_world_process_zero=False, num_input_tokens_seen=0, epoch=0
    )
    control = SimpleNamespace(should_training_stop=False, should_log=False, should_save=False)
    cb.on_train_begin(args, state, control)
    state.global_step = 1
    cb.on_step_end(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3})
    cb.on_train_end(args, state, control)
    assert seen == [] and not (tmp_path / "metrics.jsonl").exists()
    assert cb.state == "finished" and cb.last_event is not None  # it still knows how its train() ended
