"""Bad inputs and injected faults across the public API: each is refused with a message naming the value,
and the user's model is exactly as it was (issue 11, items 1, 2 and 6).

Every case is one line in ``CASES``: an id, how to build the model under test, the failing call, the
exception type, and a text the message must contain (the bad value, or the name of the file). The test
takes a full snapshot of the model (every state-dict tensor, every ``requires_grad`` flag, the module tree
with each module's type and attribute names, and the merge/enable state of every LoRA layer) before the
call and compares it after. ``atol`` is non-zero only where a rollback has to unmerge or re-merge
(W + BA - BA is exact only up to floating-point rounding, as ``unmerge_lora`` is).

To add a case: write one ``Case(...)`` line below; helpers build adapter directories and inject faults.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_widgets import (
    LoRAConfig,
    apply_lora,
    estimate_memory,
    load_adapter,
    lora_layers,
    measure_memory,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lora_widgets.lora import LoRALinear, peft_format
from lora_widgets.lora import layers as lora_mod
from lora_widgets.lora.layers import set_adapters_enabled
from lora_widgets.memory import preflight, suggest_fit
from tests.helpers import assert_unchanged, snapshot, tiny_llama

peft = pytest.importorskip("peft")

# ----------------------------------------------------------------------------------------------
# Models under test
# ----------------------------------------------------------------------------------------------


def _randomise_b(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def base() -> nn.Module:
    """A tiny Llama with one parameter frozen by the user (so restoring flags is checked, not assumed)."""
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    return model


def adapted(r: int = 4) -> nn.Module:
    """LoRA on q and v (4 layers) with trained-looking (non-zero) B."""
    model = base()
    apply_lora(model, LoRAConfig(r=r, alpha=8))
    _randomise_b(model)
    return model


def merged() -> nn.Module:
    model = adapted()
    merge_lora(model)
    return model


def one_disabled() -> nn.Module:
    model = adapted()
    next(iter(lora_layers(model).values())).enabled = False
    return model


# ----------------------------------------------------------------------------------------------
# Helpers for the calls: adapter directories and injected faults
# ----------------------------------------------------------------------------------------------


def adapter(
    tmp: Path, r: int = 4, config: Callable[[dict], Any] | None = None, name: str = "adapter"
) -> Path:
    """A valid adapter saved from another tiny Llama, optionally with its config edited."""
    src = tiny_llama(seed=5)
    apply_lora(src, LoRAConfig(r=r, alpha=8))
    _randomise_b(src, seed=9)
    directory = save_adapter(src, tmp / name)
    if config is not None:
        path = directory / "adapter_config.json"
        edited = config(json.loads(path.read_text()))
        path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    return directory


def truncated(tmp: Path) -> Path:
    directory = adapter(tmp)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    return directory


def utf16_config(tmp: Path) -> Path:
    directory = adapter(tmp)
    path = directory / "adapter_config.json"
    path.write_bytes(path.read_text().encode("utf-16"))
    return directory


def nan_weights(tmp: Path) -> Path:
    directory = adapter(tmp)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = math.nan
    save_file(tensors, path)
    return directory


@contextlib.contextmanager
def fault(target: Any, attr: str, at: int) -> Iterator[None]:
    """Make the ``at``-th call of ``target.attr`` raise RuntimeError("injected fault ..."); others run."""
    original = getattr(target, attr)
    calls = itertools.count(1)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == at:
            raise RuntimeError(f"injected fault in {attr} call {at}")
        return original(*args, **kwargs)

    with mock.patch.object(target, attr, wrapper):
        yield


def faulty(target: Any, attr: str, at: int, fn: Callable[..., Any], *args: Any) -> Any:
    with fault(target, attr, at):
        return fn(*args)


def q_proj(model: nn.Module) -> nn.Module:
    return model.get_submodule("model.layers.0.self_attn.q_proj")


NO_CUDA = not torch.cuda.is_available()
ROUNDING = 1e-6  # rollback through unmerge/merge: exact up to fp32 rounding of W + BA - BA


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    exc: type[BaseException]
    needle: str  # must appear in the message: the bad value, the file or the injected fault
    call: Callable[[nn.Module, Path], Any]  # (model under test, a temporary directory) -> raises
    model: Callable[[], nn.Module] = base
    atol: float = 0.0
    skip: str = ""


CASES = [
    # -- LoRA settings ------------------------------------------------------------------------------------
    Case("config-rslora-string", ValueError, "use_rslora='no'", lambda m, d: LoRAConfig(use_rslora="no")),
    Case("config-alpha-inf", ValueError, "alpha=inf", lambda m, d: LoRAConfig(alpha=math.inf)),
    Case("config-alpha-nan", ValueError, "alpha=nan", lambda m, d: LoRAConfig(alpha=math.nan)),
    Case("config-alpha-bool", ValueError, "alpha=True", lambda m, d: LoRAConfig(alpha=True)),
    Case("config-r-float", ValueError, "r=2.5", lambda m, d: LoRAConfig(r=2.5)),
    Case("config-dropout-nan", ValueError, "dropout=nan", lambda m, d: LoRAConfig(dropout=math.nan)),
    Case("config-targets-int", ValueError, "5", lambda m, d: LoRAConfig(target_modules=5)),
    Case("config-from-dict-unknown", TypeError, "rank", lambda m, d: LoRAConfig.from_dict({"rank": 4})),
    # -- apply_lora: values refused before anything changes --------------------------------------------------
    Case("apply-dict-config", TypeError, "{'r': 4}", lambda m, d: apply_lora(m, {"r": 4})),
    Case("apply-string-config", TypeError, "'q_proj'", lambda m, d: apply_lora(m, "q_proj")),
    Case("apply-not-a-module", TypeError, "'gpt2'", lambda m, d: apply_lora("gpt2")),
    Case("apply-state-dict", TypeError, "OrderedDict", lambda m, d: apply_lora(m.state_dict())),
    Case(
        "apply-peft-fast-pissa",
        ValueError,
        "'pissa_niter_4'",
        lambda m, d: apply_lora(m, peft.LoraConfig(r=4, init_lora_weights="pissa_niter_4")),
    ),
    Case(
        "apply-peft-olora-init",
        ValueError,
        "'olora'",
        lambda m, d: apply_lora(m, peft.LoraConfig(r=4, init_lora_weights="olora")),
    ),
    Case(
        "apply-peft-modules-to-save",
        ValueError,
        "modules_to_save",
        lambda m, d: apply_lora(m, peft.LoraConfig(r=4, modules_to_save=["lm_head"])),
    ),
    Case(
        "apply-nothing-matches",
        ValueError,
        "['query']",
        lambda m, d: apply_lora(m, LoRAConfig(target_modules=["query"])),
    ),
    Case(
        "apply-twice",
        ValueError,
        "already has LoRA",
        lambda m, d: apply_lora(m, LoRAConfig(r=2)),
        model=adapted,
    ),
    # -- apply_lora: failures part-way are rolled back --------------------------------------------------------
    Case(
        "apply-init-fails-in-3rd-layer",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "reset_lora_parameters", 3, apply_lora, m, LoRAConfig(r=4)),
    ),
    Case(
        "apply-swap-fails-at-3rd-module",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(lora_mod, "_set_submodule", 3, apply_lora, m, LoRAConfig(r=4)),
    ),
    Case(
        "apply-absurd-rank", MemoryError, "r=1099511627776", lambda m, d: apply_lora(m, LoRAConfig(r=2**40))
    ),
    # -- LoRALinear on the user's own layer: refused before the layer is frozen -------------------------------
    Case("layer-r-zero", ValueError, "r=0", lambda m, d: LoRALinear(q_proj(m), r=0, alpha=1)),
    Case(
        "layer-dropout-negative",
        ValueError,
        "dropout=-0.5",
        lambda m, d: LoRALinear(q_proj(m), 4, 8, dropout=-0.5),
    ),
    Case("layer-alpha-inf", ValueError, "alpha=inf", lambda m, d: LoRALinear(q_proj(m), 4, math.inf)),
    Case(
        "layer-rslora-string",
        ValueError,
        "use_rslora='yes'",
        lambda m, d: LoRALinear(q_proj(m), 4, 8, use_rslora="yes"),
    ),
    Case("layer-not-linear", TypeError, "LlamaRMSNorm", lambda m, d: LoRALinear(m.model.norm, 4, 8)),
    # -- merge, unmerge, remove, enable --------------------------------------------------------------------
    Case("merge-no-adapters", ValueError, "merge_lora", lambda m, d: merge_lora(m)),
    Case("merge-not-a-module", TypeError, "list", lambda m, d: merge_lora([m])),
    Case("merge-one-disabled", RuntimeError, "q_proj", lambda m, d: merge_lora(m), model=one_disabled),
    Case(
        "merge-fails-at-3rd-layer",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "merge", 3, merge_lora, m),
        model=adapted,
        atol=ROUNDING,
    ),
    Case(
        "unmerge-fails-at-2nd-layer",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "unmerge", 2, unmerge_lora, m),
        model=merged,
        atol=ROUNDING,
    ),
    Case(
        "remove-merged-unmerge-fails",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "unmerge", 3, remove_lora, m),
        model=merged,
        atol=ROUNDING,
    ),
    Case(
        "remove-swap-fails",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(lora_mod, "_set_submodule", 3, remove_lora, m),
        model=adapted,
    ),
    Case(
        "merge-and-unload-fails-at-3rd-merge",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "merge", 3, lambda m: merge_lora(m, unload=True), m),
        model=adapted,
        atol=ROUNDING,
    ),
    Case(
        "merge-and-unload-swap-fails",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(lora_mod, "_set_submodule", 2, lambda m: merge_lora(m, unload=True), m),
        model=adapted,
        atol=ROUNDING,
    ),
    Case(
        "merge-and-unload-disabled",
        RuntimeError,
        "q_proj",
        lambda m, d: merge_lora(m, unload=True),
        model=one_disabled,
    ),
    Case("enable-string", TypeError, "'no'", lambda m, d: set_adapters_enabled(m, "no"), model=adapted),
    Case(
        "disable-merged",
        RuntimeError,
        "unmerge_lora",
        lambda m, d: set_adapters_enabled(m, False),
        model=merged,
    ),
    # -- adapter files ------------------------------------------------------------------------------------
    Case("load-missing-dir", FileNotFoundError, "nowhere", lambda m, d: load_adapter(m, d / "nowhere")),
    Case("load-not-a-path", TypeError, "42", lambda m, d: load_adapter(m, 42)),
    Case(
        "load-file-not-dir",
        FileNotFoundError,
        "is a file",
        lambda m, d: load_adapter(m, adapter(d) / "adapter_model.safetensors"),
    ),
    Case(
        "load-truncated-safetensors",
        ValueError,
        "adapter_model.safetensors",
        lambda m, d: load_adapter(m, truncated(d)),
    ),
    Case(
        "load-config-not-object",
        ValueError,
        "JSON list",
        lambda m, d: load_adapter(m, adapter(d, config=lambda c: [c])),
    ),
    Case(
        "load-config-not-json",
        ValueError,
        "adapter_config.json",
        lambda m, d: load_adapter(m, adapter(d, config=lambda c: json.dumps(c)[:-9])),
    ),
    Case("load-config-utf16", ValueError, "UTF-8", lambda m, d: load_adapter(m, utf16_config(d))),
    Case(
        "load-config-rslora-string",
        ValueError,
        "use_rslora='false'",
        lambda m, d: load_adapter(m, adapter(d, config=lambda c: {**c, "use_rslora": "false"})),
    ),
    Case(
        "load-config-alpha-inf",
        ValueError,
        "alpha=inf",
        lambda m, d: load_adapter(m, adapter(d, config=lambda c: {**c, "lora_alpha": math.inf})),
    ),
    Case(
        "load-config-dora-without-magnitudes",
        ValueError,
        "lora_magnitude_vector",
        lambda m, d: load_adapter(m, adapter(d, config=lambda c: {**c, "use_dora": True})),
    ),
    Case("load-nan-weights", ValueError, "lora_A", lambda m, d: load_adapter(m, nan_weights(d))),
    Case(
        "load-other-rank-into-merged",
        ValueError,
        "r=2",
        lambda m, d: load_adapter(m, adapter(d, r=2)),
        model=merged,
    ),
    Case(
        "load-into-merged-fails-part-way",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(LoRALinear, "merge", 2, load_adapter, m, adapter(d)),
        model=merged,
        atol=ROUNDING,
    ),
    Case(
        "load-into-fresh-fails-part-way",
        RuntimeError,
        "injected fault",
        lambda m, d: faulty(peft_format, "_put", 3, load_adapter, m, adapter(d)),
    ),
    Case(
        "save-onto-a-file",
        FileExistsError,
        "adapter_config.json",
        lambda m, d: save_adapter(m, adapter(d) / "adapter_config.json"),
        model=adapted,
    ),
    # -- memory -------------------------------------------------------------------------------------------
    Case("estimate-dict-lora", TypeError, "{'r': 4}", lambda m, d: estimate_memory(m, lora={"r": 4})),
    Case(
        "estimate-checkpointing-string",
        ValueError,
        "'no'",
        lambda m, d: estimate_memory(m, gradient_checkpointing="no"),
    ),
    Case("estimate-dtype", ValueError, "'float8'", lambda m, d: estimate_memory(m, dtype="float8")),
    Case("estimate-not-a-model", TypeError, "int", lambda m, d: estimate_memory(42)),
    Case(
        "preflight-cuda-on-cpu-build",
        ValueError,
        "device='cuda'",
        lambda m, d: preflight(m, LoRAConfig(r=4), device="cuda"),
        skip="a CUDA GPU is present" if not NO_CUDA else "",
    ),
    Case("preflight-gpu-index", ValueError, "cuda:99", lambda m, d: preflight(m, device="cuda:99")),
    Case("preflight-negative-budget", ValueError, "-1", lambda m, d: preflight(m, available_bytes=-1)),
    Case("suggest-fit-zero-budget", ValueError, "0", lambda m, d: suggest_fit(m, None, 2, 16, "fp32", 0)),
    Case("measure-batch-zero", ValueError, "batch_size=0", lambda m, d: measure_memory(m, batch_size=0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_and_leaves_the_model_unchanged(case: Case, tmp_path: Path) -> None:
    if case.skip:
        pytest.skip(case.skip)
    model = case.model()
    before = snapshot(model)
    with pytest.raises(case.exc) as info:
        case.call(model, tmp_path)
    assert case.needle in str(info.value), f"message does not name {case.needle!r}: {info.value}"
    assert_unchanged(before, snapshot(model), case.atol)


def test_the_suite_is_big_enough_and_ids_are_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_rolled_back_model_still_works() -> None:
    """After a failed apply_lora the model takes a good one, and after a failed merge a good merge works."""
    model = base()
    with pytest.raises(RuntimeError, match="injected"), fault(LoRALinear, "reset_lora_parameters", 2):
        apply_lora(model, LoRAConfig(r=4))
    apply_lora(model, LoRAConfig(r=4))
    _randomise_b(model)
    with pytest.raises(RuntimeError, match="injected"), fault(LoRALinear, "merge", 2):
        merge_lora(model)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    remove_lora(model)
    assert not lora_layers(model)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["model.norm.weight"]
