"""Bad inputs and injected faults on the newer surfaces (issue 19, items 2 and 5): instruction rows and files,
chat templates, batching, text data, sample answers, alerts, attached transformers trainers, the loaders and
checkpoints. Each is refused with a message naming the value (or file, row, line) and the user's objects are
exactly as they were.

Every case is one line in ``CASES``: an id, the exception type, the texts its message must contain, ``make``
(builds the user's objects from a temporary directory: a model, a tokenizer, rows, files, a trainer) and
``call`` (the failing call on them). Before the call every object is recorded (:func:`state_of`: a model's full
snapshot, a file tree's bytes, a trainer's callbacks, arguments, step and model, a deep copy of plain data) and
compared after it. The same as ``tests/test_bad_inputs.py`` for the older surfaces.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from lora_widgets import (  # noqa: E402
    LoRAConfig,
    LoRADashboard,
    LoRATrainer,
    apply_lora,
    load_base_model,
    merge_lora,
)
from lora_widgets.data.passages import passage_groups, passage_overlap  # noqa: E402
from lora_widgets.data.rows import load_rows, normalize_rows  # noqa: E402
from lora_widgets.data.sft import prepare_sft  # noqa: E402
from lora_widgets.data.sft_batches import collate, length_grouped_batches, masked_lm_loss  # noqa: E402
from lora_widgets.data.sft_eval import end_of_turn_share  # noqa: E402
from lora_widgets.data.split import split_groups  # noqa: E402
from lora_widgets.data.text import load_texts, pack_blocks, prepare_data  # noqa: E402
from lora_widgets.events import Replay, read_events, send_request  # noqa: E402
from lora_widgets.health.alerts import AlertMonitor, count_trained_tokens, val_loss_alert  # noqa: E402
from lora_widgets.health.samples import generate_samples  # noqa: E402
from lora_widgets.hf import HFRun  # noqa: E402
from lora_widgets.models import generate, load_model  # noqa: E402
from lora_widgets.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lora_widgets.widget import attach  # noqa: E402
from tests.helpers import assert_unchanged, snapshot, tiny_llama  # noqa: E402
from tests.test_hf_bridge import _hf_trainer  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The user's objects, and what "unchanged" means for each
# ----------------------------------------------------------------------------------------------


@functools.cache
def _shipped_tokenizer() -> Any:
    return load_base_model()[1]


def tok() -> Any:
    """The shipped model's tokenizer (it has a chat template); every case checks it is left as it was."""
    return _shipped_tokenizer()


CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
QA = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "And 3 + 3?", "answer": "6"}] * 4


def state_of(obj: Any) -> Any:
    """What a failed call must leave as it was, for one of the user's objects."""
    if isinstance(obj, torch.nn.Module):
        return ("model", snapshot(obj))
    if isinstance(obj, Path):
        files = sorted(obj.rglob("*")) if obj.is_dir() else [obj] if obj.exists() else []
        return ("files", {str(p): p.read_bytes() for p in files if p.is_file()})
    if isinstance(obj, transformers.Trainer):
        cbs = [id(c) for c in obj.callback_handler.callbacks]
        return ("trainer", cbs, obj.args.to_dict(), obj.state.global_step, snapshot(obj.model))
    if isinstance(obj, transformers.PreTrainedTokenizerBase):
        return ("tokenizer", obj.chat_template, len(obj), obj.pad_token, obj.eos_token)
    if isinstance(obj, datasets.Dataset):
        return ("dataset", obj.to_list())
    if isinstance(obj, datasets.DatasetDict):
        return ("datasets", {k: v.to_list() for k, v in obj.items()})
    if isinstance(obj, HFRun):
        return ("hfrun", obj.running, obj.state, obj.last_event)
    if isinstance(obj, torch.optim.Optimizer):
        return ("optimizer", _plain(obj.state_dict()))
    if isinstance(obj, LoRADashboard):
        return ("dashboard", obj.state, len(obj.runs))
    return ("data", copy.deepcopy(obj))


def _plain(value: Any) -> Any:
    """Tensors as nested lists, so an optimizer's state compares with ``==``."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def assert_same(before: Any, after: Any, name: str) -> None:
    assert before[0] == after[0]
    if before[0] == "model":
        assert_unchanged(before[1], after[1])
    elif before[0] == "trainer":
        assert after[1] == before[1], f"{name}: the trainer's callbacks changed"
        assert after[2] == before[2], f"{name}: the trainer's arguments changed"
        assert after[3] == before[3], f"{name}: the trainer's step changed"
        assert_unchanged(before[4], after[4])
    else:
        assert after == before, f"{name} changed"


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _jsonl(tmp: Path, rows: list[Any], name: str = "rows.jsonl") -> Path:
    return _file(tmp, name, "\n".join(json.dumps(r) for r in rows) + "\n")


def _adapted() -> torch.nn.Module:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    return model


def _peft() -> torch.nn.Module:
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))


def _merged() -> torch.nn.Module:
    model = _adapted()
    merge_lora(model)
    return model


def _checkpoints(tmp: Path, damage: str) -> dict[str, Any]:
    """A run's checkpoints at steps 2 and 4 of an adapted model; ``damage`` truncates one file of step 4."""
    model = _adapted()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=torch.arange(8)[None]).logits.sum().backward()
    optimizer.step()
    root = tmp / "run" / "checkpoints"
    for step in (2, 4):
        save_checkpoint(root / f"step-{step:06d}", model, optimizer, step)
    if damage:
        path = root / "step-000004" / damage
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return {"model": model, "optimizer": optimizer, "dir": root / "step-000004", "files": tmp / "run"}


def _attached(tmp: Path, **args: Any) -> dict[str, Any]:
    """A transformers Trainer (a PEFT model) with a dashboard attached, then ``args`` set on ``hf.args``."""
    hf = _hf_trainer(tmp, max_steps=2)
    dash = LoRADashboard(trainer=hf)
    for name, value in args.items():
        setattr(hf.args, name, value)
    return {"hf": hf, "dash": dash}


def _press_train(dash: LoRADashboard) -> Any:
    async def press() -> Any:
        return dash.start()

    return asyncio.run(press())


def _hf_checkpoints(tmp: Path, damage: str) -> dict[str, Any]:
    """A transformers run saved at steps 1 and 2; ``damage`` truncates one file of checkpoint-2."""
    hf = _hf_trainer(tmp, max_steps=2, save_strategy="steps", save_steps=1)
    hf.train()
    path = Path(hf.args.output_dir) / "checkpoint-2" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return {"hf": hf, "run": HFRun(hf), "files": Path(hf.args.output_dir)}


def _resume(run: HFRun, checkpoint: str | bool) -> Any:
    path = checkpoint if checkpoint is True else str(Path(run.hf_trainer.args.output_dir) / checkpoint)
    return asyncio.run(run.run(resume_from_checkpoint=path))


def _with_printer(tmp: Path) -> dict[str, Any]:
    hf = _hf_trainer(tmp)
    hf.add_callback(transformers.PrinterCallback)
    return {"hf": hf}


def _construct_with_fault(hf: Any) -> Any:
    with mock.patch.object(attach, "show_source", side_effect=RuntimeError("injected fault in show_source")):
        return LoRADashboard(trainer=hf)


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------

Objects = dict[str, Any]


DOCS = [f"def f{i}(x):\n    return x * {i}\n" * 4 for i in range(20)]  # 20 documents to split


@dataclass(frozen=True)
class Case:
    id: str
    exc: type[BaseException]
    needles: tuple[str, ...]  # each must appear in the message: the value, the row, the line or the file
    call: Callable[[Objects], Any]
    make: Callable[[Path], Objects] = lambda tmp: {}


def _c(
    id: str,
    exc: type[BaseException],
    needles: str | tuple[str, ...],
    call: Callable[[Objects], Any],
    make: Callable[[Path], Objects] | None = None,
) -> Case:
    return Case(id, exc, (needles,) if isinstance(needles, str) else needles, call, make or (lambda tmp: {}))


def _split_case(id: str, needles: tuple[str, ...], **fractions: Any) -> Case:
    """A split of :data:`DOCS` into blocks of 16 tokens with these fractions, refused with ``needles``."""
    return _c(
        id,
        ValueError,
        needles,
        lambda o: prepare_data(o["docs"], o["tok"], 16, **fractions),
        lambda t: {"tok": tok(), "docs": DOCS},
    )


CASES = [
    # -- instruction rows and files (data/rows.py) ------------------------------------------------------
    _c("rows-int", TypeError, "type int", lambda o: load_rows(42)),
    _c(
        "rows-single-dict",
        ValueError,
        "single dict",
        lambda o: normalize_rows(o["row"]),
        lambda t: {"row": {"prompt": "a", "completion": "b"}},
    ),
    _c("rows-empty", ValueError, "no rows", lambda o: normalize_rows(o["rows"]), lambda t: {"rows": []}),
    _c(
        "rows-unknown-role",
        ValueError,
        ("row 0", "'robot'"),
        lambda o: normalize_rows(o["rows"]),
        lambda t: {"rows": [{"messages": [{"role": "robot", "content": "x"}]}]},
    ),
    _c(
        "rows-content-none",
        ValueError,
        ("message 0", "NoneType"),
        lambda o: normalize_rows(o["rows"]),
        lambda t: {"rows": [{"messages": [{"role": "user", "content": None}]}]},
    ),
    _c(
        "rows-prompt-only",
        ValueError,
        "missing 'completion'",
        lambda o: normalize_rows(o["rows"]),
        lambda t: {"rows": [{"prompt": "a"}]},
    ),
    _c(
        "rows-prompt-int",
        ValueError,
        "'prompt' is int",
        lambda o: normalize_rows(o["rows"]),
        lambda t: {"rows": [{"prompt": 5, "completion": "b"}]},
    ),
    _c(
        "rows-file-csv",
        ValueError,
        ("'.csv'", "data.csv"),
        lambda o: load_rows(o["path"]),
        lambda t: {"path": _file(t, "data.csv", "a,b\n")},
    ),
    _c(
        "rows-file-missing",
        ValueError,
        "nowhere.jsonl",
        lambda o: load_rows(o["dir"] / "nowhere.jsonl"),
        lambda t: {"dir": t},
    ),
    _c(
        "rows-jsonl-bad-line",
        ValueError,
        ("rows.jsonl, line 2", "not valid JSON"),
        lambda o: load_rows(o["path"]),
        lambda t: {"path": _file(t, "rows.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n')},
    ),
    _c(
        "rows-json-object",
        ValueError,
        ("rows.json", "JSON dict"),
        lambda o: load_rows(o["path"]),
        lambda t: {"path": _file(t, "rows.json", '{"prompt": "a"}')},
    ),
    _c(
        "rows-latin1-file",
        ValueError,
        ("latin.jsonl", "not UTF-8", "\\xe9"),
        lambda o: load_rows(o["path"]),
        lambda t: {"path": _file(t, "latin.jsonl", '{"text": "caf\xe9"}'.encode("latin-1"))},
    ),
    _c(
        "rows-datasetdict",
        ValueError,
        "dataset['train']",
        lambda o: load_rows(o["ds"]),
        lambda t: {"ds": datasets.DatasetDict({"train": datasets.Dataset.from_list(QA)})},
    ),
    # the share of replies that end their turn (data/sft_eval.py): a bad batch size
    *[
        _c(
            f"end-of-turn-batch-size-{name}",
            ValueError,
            ("batch_size", repr(value)),
            lambda o, value=value: end_of_turn_share(o["model"], o["tok"], o["rows"], batch_size=value),
            lambda t: {
                "model": tiny_llama(),
                "tok": tok(),
                "rows": [{"messages": [{"role": "user", "content": "hi"}]}],
            },
        )
        for name, value in (("zero", 0), ("float", 2.5), ("bool", True))
    ],
    # documents that share a passage (data/passages.py) and the split over their groups (data/split.py)
    *[
        _c(
            f"passages-words-{name}",
            ValueError,
            ("words", repr(value)),
            lambda o, value=value: passage_groups(o["texts"], words=value),
            lambda t: {"texts": ["a b c", "d e"]},
        )
        for name, value in (("zero", 0), ("float", 2.5), ("bool", True))
    ],
    _c(
        "passages-one-string",
        ValueError,
        ("texts", "list of strings", "str"),
        lambda o: passage_groups(o["text"]),
        lambda t: {"text": "one long document"},
    ),
    _c(
        "passages-overlap-none-item",
        ValueError,
        ("others[1]", "NoneType"),
        lambda o: passage_overlap(o["held"], o["others"]),
        lambda t: {"held": ["a b"], "others": ["c", None]},
    ),
    _c(
        "split-groups-unhashable-key",
        ValueError,
        ("keys[1]", "list"),
        lambda o: split_groups(o["keys"], 0.5),
        lambda t: {"keys": ["a", ["b"], "c"]},
    ),
    _c(
        "split-groups-string-keys",
        ValueError,
        ("keys", "str"),
        lambda o: split_groups(o["keys"], 0.5),
        lambda t: {"keys": "abc"},
    ),
    # question/answer rows: one message, with the renaming, whatever holds them
    _c(
        "rows-question-answer-list",
        ValueError,
        ("'question', 'answer'", "r['question']", "rename_columns"),
        lambda o: LoRADashboard(o["model"], o["tok"], o["rows"]),
        lambda t: {"model": tiny_llama(), "tok": tok(), "rows": QA},
    ),
    _c(
        "rows-question-answer-dataset",
        ValueError,
        ("'question', 'answer'", "r['question']", "rename_columns"),
        lambda o: LoRADashboard(o["model"], o["tok"], o["ds"]),
        lambda t: {"model": tiny_llama(), "tok": tok(), "ds": datasets.Dataset.from_list(QA)},
    ),
    _c(
        "rows-question-answer-jsonl",
        ValueError,
        ("qa.jsonl", "'question', 'answer'", "rename_columns"),
        lambda o: LoRADashboard(o["model"], o["tok"], str(o["path"])),
        lambda t: {"model": tiny_llama(), "tok": tok(), "path": _jsonl(t, QA, "qa.jsonl")},
    ),
    # -- chat templates and tokenising (data/sft.py) ----------------------------------------------------
    _c(
        "sft-template-syntax",
        ValueError,
        ("chat_template is not a valid Jinja template", "'{% if %}'"),
        lambda o: prepare_sft(CHAT, o["tok"], chat_template="{% if %}"),
        lambda t: {"tok": tok()},
    ),
    _c(
        "sft-template-raises",
        ValueError,
        ("row 0", "roles must alternate"),
        lambda o: prepare_sft(CHAT, o["tok"], chat_template="{{ raise_exception('roles must alternate') }}"),
        lambda t: {"tok": tok()},
    ),
    _c(
        "sft-template-not-str",
        TypeError,
        "got int",
        lambda o: prepare_sft(CHAT, o["tok"], chat_template=5),
        lambda t: {"tok": tok()},
    ),
    _c("sft-tokenizer-name", TypeError, ("got str", "'gpt2'"), lambda o: prepare_sft(CHAT, "gpt2")),
    _c(
        "sft-max-length-0",
        ValueError,
        "max_length must be an int >= 2",
        lambda o: prepare_sft(CHAT, o["tok"], 0),
        lambda t: {"tok": tok()},
    ),
    _c(
        "sft-train-on",
        ValueError,
        "'everything'",
        lambda o: prepare_sft(CHAT, o["tok"], train_on="everything"),
        lambda t: {"tok": tok()},
    ),
    _c(
        "sft-all-truncated",
        ValueError,
        ("max_length=2", "no token would be trained"),
        lambda o: prepare_sft([{"prompt": "a long prompt here", "completion": "b"}], o["tok"], 2),
        lambda t: {"tok": tok()},
    ),
    _c(
        "sft-assistant-spans",
        ValueError,
        "'bogus'",
        lambda o: prepare_sft(CHAT, o["tok"], assistant_spans="bogus"),
        lambda t: {"tok": tok()},
    ),
    # -- batching (data/sft_batches.py) -------------------------------------------------------------------
    _c("collate-empty", ValueError, "at least one example", lambda o: collate([], 0)),
    _c(
        "collate-pad-negative",
        ValueError,
        "got -1",
        lambda o: collate(o["ex"], -1),
        lambda t: {"ex": [{"input_ids": [1], "labels": [1]}]},
    ),
    _c(
        "collate-length-mismatch",
        ValueError,
        ("example 0", "2 input ids and 1 labels"),
        lambda o: collate(o["ex"], 0),
        lambda t: {"ex": [{"input_ids": [1, 2], "labels": [1]}]},
    ),
    _c(
        "collate-string-example",
        TypeError,
        ("got str", "'abc'"),
        lambda o: collate(o["ex"], 0),
        lambda t: {"ex": ["abc"]},
    ),
    _c("batches-size-0", ValueError, "got 0", lambda o: length_grouped_batches([3, 4], 0)),
    _c(
        "batches-negative-length",
        ValueError,
        ("lengths[0]", "-1"),
        lambda o: length_grouped_batches([-1, 4], 2),
    ),
    _c(
        "masked-loss-shapes",
        ValueError,
        "(2, 4)",
        lambda o: masked_lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
    ),
    # -- text data (data/text.py) -----------------------------------------------------------------------
    _c(
        "texts-unknown-corpus",
        ValueError,
        ("'pyhton-docs'", "python-docs"),
        lambda o: load_texts("pyhton-docs"),
    ),
    _c(
        "texts-int-row",
        ValueError,
        ("row 1", "int"),
        lambda o: load_texts(o["rows"]),
        lambda t: {"rows": ["a", 5]},
    ),
    _c(
        "texts-jsonl-no-field",
        ValueError,
        ("t.jsonl, line 1", "'text'"),
        lambda o: load_texts(o["path"]),
        lambda t: {"path": _jsonl(t, [{"body": "x"}], "t.jsonl")},
    ),
    _c(
        "pack-block-size-1",
        ValueError,
        "got 1",
        lambda o: pack_blocks(["hello"], o["tok"], 1),
        lambda t: {"tok": tok()},
    ),
    # -- the test part of a split (data/split.py) -------------------------------------------------------
    _split_case("split-test-fraction-string", ("test_fraction", "'0.1'"), test_fraction="0.1"),
    _split_case("split-test-fraction-bool", ("test_fraction", "True"), test_fraction=True),
    _split_case("split-test-fraction-one", ("test_fraction", "got 1.0"), test_fraction=1.0),
    _split_case(
        "split-fractions-hold-out-everything",
        ("val_fraction=0.6", "test_fraction=0.4"),
        val_fraction=0.6,
        test_fraction=0.4,
    ),
    _split_case(
        "split-test-without-validation",
        ("test_fraction=0.2", "val_fraction too"),
        val_fraction=0.0,
        test_fraction=0.2,
    ),
    _split_case(
        "split-test-too-few-documents",
        ("test_fraction=0.01", "cannot give"),
        val_fraction=0.2,
        test_fraction=0.01,
    ),
    # -- sample answers (health/samples.py) ---------------------------------------------------------------
    _c(
        "samples-peft-model",
        ValueError,
        ("PEFT", "disable_adapter"),
        lambda o: generate_samples(o["m"], o["tok"], ["hi"], 1),
        lambda t: {"m": _peft(), "tok": tok()},
    ),
    _c(
        "samples-no-tokenizer",
        TypeError,
        "got NoneType",
        lambda o: generate_samples(o["m"], None, ["hi"], 1),
        lambda t: {"m": _adapted()},
    ),
    _c(
        "samples-token-outside-vocab",
        ValueError,
        ("token id 99999", "128 tokens"),
        lambda o: generate_samples(o["m"], o["tok"], [[99999]], 1),
        lambda t: {"m": _adapted(), "tok": tok()},
    ),
    _c(
        "samples-one-string",
        ValueError,
        "'hi'",
        lambda o: generate_samples(o["m"], o["tok"], "hi", 1),
        lambda t: {"m": _adapted(), "tok": tok()},
    ),
    _c(
        "samples-merged",
        ValueError,
        "unmerge_lora",
        lambda o: generate_samples(o["m"], o["tok"], ["hi"], 1),
        lambda t: {"m": _merged(), "tok": tok()},
    ),
    _c(
        "samples-too-many",
        ValueError,
        "9 prompts",
        lambda o: generate_samples(o["m"], o["tok"], ["hi"] * 9, 1),
        lambda t: {"m": _adapted(), "tok": tok()},
    ),
    # -- alerts (health/alerts.py) ---------------------------------------------------------------------------
    _c("monitor-negative-lr", ValueError, "got -1", lambda o: AlertMonitor(peak_learning_rate=-1)),
    _c("val-alert-window-0", ValueError, "window=0", lambda o: val_loss_alert([], window=0)),
    _c("count-tokens-1d", ValueError, "(3,)", lambda o: count_trained_tokens(torch.zeros(3))),
    # -- loaders and generation (models.py), adapters on float8 ----------------------------------------------
    _c("load-model-tpu", ValueError, "device='tpu'", lambda o: load_model(device="tpu")),
    _c("load-model-dtype", ValueError, "'float7'", lambda o: load_model(dtype="float7")),
    _c(
        "generate-other-tokenizer",
        ValueError,
        ("vocabulary has 16 tokens", "tokenizer"),
        lambda o: generate(o["m"], o["tok"], "hello world"),
        lambda t: {"m": tiny_llama(vocab_size=16), "tok": tok()},
    ),
    _c(
        "generate-prompt-int",
        TypeError,
        "got int (5)",
        lambda o: generate(o["m"], o["tok"], 5),
        lambda t: {"m": tiny_llama(), "tok": tok()},
    ),
    _c(
        "apply-lora-float8",
        TypeError,
        ("float8_e4m3fn", "q_proj", "bfloat16"),
        lambda o: apply_lora(o["m"]),
        lambda t: {"m": tiny_llama().to(torch.float8_e4m3fn)},
    ),
    # -- checkpoints (training/checkpoint.py) ----------------------------------------------------------------
    _c(
        "ckpt-truncated-weights",
        ValueError,
        ("trainable.safetensors", "step-000004", "step-000002"),
        lambda o: load_checkpoint(o["dir"], o["model"], o["optimizer"]),
        lambda t: _checkpoints(t, "trainable.safetensors"),
    ),
    _c(
        "ckpt-truncated-state",
        ValueError,
        ("state.safetensors", "step-000002"),
        lambda o: load_checkpoint(o["dir"], o["model"], o["optimizer"]),
        lambda t: _checkpoints(t, "state.safetensors"),
    ),
    _c(
        "ckpt-truncated-trainer-state",
        ValueError,
        ("trainer_state.json", "step-000002"),
        lambda o: load_checkpoint(o["dir"], o["model"], o["optimizer"]),
        lambda t: _checkpoints(t, "trainer_state.json"),
    ),
    _c(
        "ckpt-not-a-checkpoint",
        ValueError,
        "no trainer_state.json",
        lambda o: load_checkpoint(o["files"], o["model"], o["optimizer"]),
        lambda t: _checkpoints(t, ""),
    ),
    # -- attached transformers trainers (hf/*, widget/attach.py) ---------------------------------------------
    _c(
        "hf-resume-truncated-adapter",
        ValueError,
        ("checkpoint-2/adapter_model.safetensors", "checkpoint-1"),
        lambda o: _resume(o["run"], "checkpoint-2"),
        lambda t: _hf_checkpoints(t, "adapter_model.safetensors"),
    ),
    _c(
        "hf-resume-latest-truncated-state",
        ValueError,
        ("checkpoint-2/trainer_state.json", "checkpoint-1"),
        lambda o: _resume(o["run"], True),
        lambda t: _hf_checkpoints(t, "trainer_state.json"),
    ),
    _c("hf-not-a-trainer", TypeError, "got str", lambda o: HFRun("my_trainer")),
    _c("attach-not-a-trainer", TypeError, "got str", lambda o: LoRADashboard(trainer="my_trainer")),
    _c(
        "attach-with-lora",
        TypeError,
        "got lora too",
        lambda o: LoRADashboard(trainer=o["hf"], lora=LoRAConfig()),
        _with_printer,
    ),
    _c(
        "attach-construction-fails",
        RuntimeError,
        "injected fault",
        lambda o: _construct_with_fault(o["hf"]),
        _with_printer,
    ),
    _c(
        "hf-save-adapter-not-a-path",
        TypeError,
        ("save_adapter: path must be a path", "int 3"),
        lambda o: o["run"].save_adapter(3),  # str(3) would have saved the model to ./3, then raised
        lambda t: {"run": HFRun(_hf_trainer(t))},
    ),
    _c(
        "replay-not-events",
        TypeError,
        ("events must be a path to a run's metrics.jsonl or a list of run events", "got int 3"),
        lambda o: Replay(3),  # type: ignore[arg-type]
    ),
    _c(
        "trainer-save-adapter-not-a-path",
        TypeError,
        ("save_adapter: path must be a path", "got int 3"),
        lambda o: LoRATrainer(o["m"], None, torch.randint(0, 64, (8, 16))).save_adapter(3),  # type: ignore[arg-type]
        lambda t: {"m": _adapted()},
    ),
    _c(
        "read-events-not-a-path",
        TypeError,
        ("read_events: path must be a path", "int 3"),
        lambda o: read_events(3),
    ),
    _c(
        "send-request-not-a-path",
        TypeError,
        ("send_request: run_dir must be a path", "int 3"),
        lambda o: send_request(3, "stop"),  # type: ignore[arg-type]
    ),
    _c(
        "trainer-resume-from-not-a-path",
        TypeError,
        ("LoRATrainer.run: resume_from must be a path", "int 3"),
        lambda o: LoRATrainer(o["m"], None, torch.randint(0, 64, (8, 16))).run_sync(resume_from=3),  # type: ignore[arg-type]
        lambda t: {"m": _adapted()},
    ),
    _c(
        "attach-trainer-as-model",
        TypeError,
        ("model is a Trainer", "trainer="),
        lambda o: LoRADashboard(o["hf"]),
        _with_printer,
    ),
    _c(
        "hf-logging-steps-0",
        ValueError,
        "logging_steps=0",
        lambda o: _press_train(o["dash"]),
        lambda t: _attached(t, logging_steps=0),
    ),
    _c(
        "hf-eval-steps-0",
        ValueError,
        "eval_steps=0",
        lambda o: _press_train(o["dash"]),
        lambda t: _attached(t, eval_strategy="steps", eval_steps=0),
    ),
    _c(
        "hf-save-steps-fraction",
        ValueError,
        "save_steps=2.5",
        lambda o: _press_train(o["dash"]),
        lambda t: _attached(t, save_strategy="steps", save_steps=2.5),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_and_leaves_the_users_objects_unchanged(case: Case, tmp_path: Path) -> None:
    objects = case.make(tmp_path)
    before = {k: state_of(v) for k, v in objects.items()}
    tokenizer_before = state_of(tok())
    with pytest.raises(case.exc) as info:
        case.call(objects)
    for needle in case.needles:
        assert needle in str(info.value), f"message does not name {needle!r}: {info.value}"
    for name, obj in objects.items():
        assert_same(before[name], state_of(obj), name)
    assert state_of(tok()) == tokenizer_before, "the shared tokenizer changed"


def test_the_suite_covers_the_newer_surfaces_and_ids_are_unique() -> None:
    assert len(CASES) >= 55
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------
# Valid input that was refused, and settings that cannot take effect (said, not skipped)
# ----------------------------------------------------------------------------------------------


def test_a_line_separator_inside_a_json_string_is_data_not_a_new_line(tmp_path: Path) -> None:
    """JSON Lines are split on ``\\n`` only: U+2028/U+2029/U+0085 inside a string are valid JSON."""
    rows = [{"prompt": "a\u2028b\u2029c\x85d", "completion": "x"}, {"prompt": "p", "completion": "q"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert load_rows(path) == rows
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "one\u2028line"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_texts(texts) == ["one\u2028line"]
