"""One process of the multi-process tests (tests/test_distributed.py), started by ``torchrun`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/distributed_worker.py OUT [RUNS]`` runs, in
each process, the same runs (``RUNS``: some of ``equal,stop,early,hf``; all by default) and writes what this rank saw to
``OUT/rank<r>.json``:

* ``equal``: our trainer, 6 updates of batch 2 per rank (global batch 4), evaluated at steps 3 and 6;
* ``stop``: our trainer, 40 updates asked, paused at step 2 and resumed, and stopped at step 4, both through
  the run directory's control.json (rank 0 writes the requests, as a watcher in another process would);
* ``early``: our trainer with an early-stopping rule that stops it at step 2 (a decision every rank makes alike);
* ``hf``: a transformers ``Trainer`` with our ``EventCallback`` under DDP, stopped at step 3 through control.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch

# the same data and settings as the 1-process reference in tests/test_distributed.py
N_BLOCKS, BLOCK, N_VAL, STEPS = 32, 16, 10, 6


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random token blocks ``[N_BLOCKS, BLOCK]`` and ``[N_VAL, BLOCK]`` (validation: not a multiple of the batch)."""
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 128, (N_BLOCKS, BLOCK), generator=g), torch.randint(
        0, 128, (N_VAL, BLOCK), generator=g
    )


def config(out: Path, batch_size: int, max_steps: int = STEPS) -> Any:
    from lora_widgets import TrainConfig

    return TrainConfig(
        batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-2,
        warmup_steps=0,
        schedule="constant",
        log_every=1,
        eval_every=3,
        precision="fp32",
        device="cpu",
        output_dir=str(out),
        sample_prompts=(),
        eval_batches=None,
        seed=0,
    )


def lora() -> Any:
    from lora_widgets import LoRAConfig

    return LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def record_rows(model: torch.nn.Module) -> list[list[list[int]]]:
    """The token rows of every training forward pass of ``model`` (one list per pass), as they happen."""
    rows: list[list[list[int]]] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and "input_ids" in kwargs:  # training, not evaluation
            rows.append(kwargs["input_ids"].tolist())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def _trainer_run(out: Path, max_steps: int, requests: dict[int, str], **settings: Any) -> dict[str, Any]:
    """A LoRATrainer run (``settings``: TrainConfig fields to change); rank 0 writes ``requests``
    ({step: "stop" | "pause"}) to control.json after that step's StepMetrics (a pause is resumed 1 s later)."""
    from lora_widgets import LoRATrainer
    from lora_widgets.events.run_files import send_request
    from lora_widgets.events.types import EvalMetrics, StateChanged, StepMetrics
    from tests.helpers import tiny_llama

    train, val = data()
    model = tiny_llama()
    trainer = LoRATrainer(model, None, train, val, lora(), config(out, 2, max_steps).replace(**settings))
    seen: dict[str, list[Any]] = {"loss": [], "val": [], "states": [], "rows": record_rows(model)}

    def on_event(event: Any) -> None:
        if isinstance(event, StepMetrics):
            seen["loss"].append([event.step, event.loss])
            request = requests.get(event.step) if trainer.world.is_main else None
            if request is not None:
                send_request(trainer.run_dir, request)  # type: ignore[arg-type]
            if request == "pause":
                threading.Timer(1.0, send_request, (trainer.run_dir, "resume")).start()
        elif isinstance(event, EvalMetrics):
            seen["val"].append([event.step, event.val_loss])
        elif isinstance(event, StateChanged):
            seen["states"].append(event.state)

    trainer.subscribe(on_event)
    end = trainer.run_sync()
    return {**seen, "end": end.kind, "step": end.step, "message": end.message, "run_dir": str(trainer.run_dir),
            "adapter": end.adapter_path, "world": [trainer.world.rank, trainer.world.size]}  # fmt: skip


def _hf_run(out: Path) -> dict[str, Any]:
    """A transformers Trainer with our callback, stopped through control.json at step 3."""
    import transformers

    from lora_widgets.events.run_files import send_request
    from lora_widgets.events.types import StepMetrics
    from lora_widgets.hf import EventCallback
    from tests.test_hf_bridge import _peft_model, _rows

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=40, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
        ddp_find_unused_parameters=False,
    )  # fmt: skip
    callback = EventCallback()
    hf = transformers.Trainer(model=_peft_model(), args=args, train_dataset=_rows(), callbacks=[callback])
    hf.remove_callback(transformers.PrinterCallback)
    kinds: list[str] = []

    def on_event(event: Any) -> None:
        kinds.append(event.kind)
        if isinstance(event, StepMetrics) and event.step == 3:
            send_request(out, "stop")

    callback.subscribe(on_event)
    hf.train()
    end = callback.last_event
    return {"kinds": kinds, "global_step": int(hf.state.global_step), "end": end.kind if end else None}


def main(out: Path, runs: list[str]) -> None:
    from lora_widgets import EarlyStopping

    rank = int(os.environ.get("RANK", "0"))
    result: dict[str, Any] = {}
    if "equal" in runs:
        result["equal"] = _trainer_run(out / "equal", STEPS, {})
    if "stop" in runs:
        result["stop"] = _trainer_run(out / "stop", 40, {2: "pause", 4: "stop"})
    if "early" in runs:  # no evaluation improves by 1 nat: the patience rule stops the run after 2 of them
        rule = EarlyStopping(patience=2, min_delta=1.0, divergence_factor=None)
        result["early"] = _trainer_run(out / "early", 40, {}, eval_every=1, early_stopping=rule)
    if "hf" in runs:
        result["hf"] = _hf_run(out / "hf")
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def default_runs() -> list[str]:
    """Every run; the transformers Trainer one only where peft is installed (the lowest-versions job has none)."""
    import importlib.util

    return ["equal", "stop", "early"] + (["hf"] if importlib.util.find_spec("peft") else [])


if __name__ == "__main__":  # worker.py OUT [equal,stop,early,hf]
    # a rank that dies on a signal (SIGABRT from a C++ std::terminate, seen once in CI) prints every thread's
    # Python stack to stderr, which the test's failure message includes
    faulthandler.enable()
    main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else default_runs())
