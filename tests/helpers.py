"""Tiny models built from transformers configs: no network, no hub, a few kB each."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lora_widgets.lora.layers import lora_layers


def tiny_llama(seed: int = 0, vocab_size: int = 128) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 (about 30 k parameters), deterministically initialised."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.2,  # the default 0.02 leaves a frozen random head too weak to learn through
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 128) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with n_embd 32; its attention and MLP use transformers' Conv1D."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def patterned_batch(batch: int = 4, seq: int = 32, vocab_size: int = 128) -> torch.Tensor:
    """Token ids [batch, seq] following next = (current + 3) mod vocab: learnable in a few steps."""
    offsets = torch.tensor([[0], [5], [17], [40], [63], [90], [101], [120]])[:batch]
    return (torch.arange(seq)[None, :] * 3 + offsets) % vocab_size


def random_batch(batch: int = 2, seq: int = 16, vocab_size: int = 128, seed: int = 1) -> torch.Tensor:
    """Token ids [batch, seq] from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


class FakeLoop:
    """A fake clock with ``call_later``: ``advance(dt)`` runs the callbacks that fall due, in order.

    Stands in for the asyncio loop behind the dashboard's throttle, so tests and the streaming benchmark
    decide exactly as a live kernel would, without waiting.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._ids = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._ids), callback))

    def advance(self, dt: float) -> None:
        end = self.now + dt
        while self._queue and self._queue[0][0] <= end:
            when, _, cb = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            cb()
        self.now = end


class ScriptedRun:
    """A :class:`~lora_widgets.events.types.RunSource` that publishes scripted events on a :class:`FakeLoop` clock.

    After each ``StepMetrics`` the fake clock advances by ``step_s`` (running the dashboard's throttled
    flushes that fall due), so tests and benchmarks feed a run of any length through the dashboard's own
    path (``dash.watch(source)``) in no real time. Ends with the scripted terminal event, or a
    ``RunFinished`` at the last step.
    """

    def __init__(self, events: Any, loop: FakeLoop, step_s: float) -> None:
        self.events, self.loop, self.step_s = events, loop, step_s
        self._subscribers: list[Callable[[Any], None]] = []
        self.running = False

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def stop(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    async def run(self) -> Any:
        from lora_widgets.events.types import RunEnded, RunFinished, StepMetrics

        self.running = True
        last: Any = None
        for event in self.events:
            for cb in list(self._subscribers):
                cb(event)
            if isinstance(event, RunEnded):
                self.running = False
                return event
            if isinstance(event, StepMetrics):
                last = event
                self.loop.advance(self.step_s)
        end = RunFinished(last.step if last else 0, self.loop.now, None, None, None, "done")
        for cb in list(self._subscribers):
            cb(end)
        self.running = False
        return end


LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scripted_adapter_stats(step: int, n_layers: int = 4, rank: int = 8) -> Any:
    """Deterministic :class:`~lora_widgets.events.types.AdapterStats` of a Llama-shaped model with LoRA on all 7 linear
    kinds of each block (the shipped model: 4 blocks, 28 adapters); ``||dW||/||W||`` grows with the step, the
    layer and the module, so every cell of a heatmap differs."""
    from lora_widgets.events.types import AdapterLayerStats, AdapterStats

    layers = []
    for i in range(n_layers):
        for j, module in enumerate(LLAMA_MODULES):
            rel = 1e-3 * math.sqrt(step) * (1 + i) * (1 + j / 7)
            part = "self_attn" if j < 4 else "mlp"
            layers.append(
                AdapterLayerStats(
                    name=f"model.layers.{i}.{part}.{module}", layer=i, module=module, rank=rank, scaling=2.0,
                    weight_norm=10.0, delta_norm=10 * rel, relative_update=rel, a_norm=1.0, b_norm=rel,
                    a_grad_norm=1e-2, b_grad_norm=2e-2, singular_values=tuple(10 * rel / (k + 1) for k in range(rank)),
                    update_ratio=1e-3,
                )
            )  # fmt: skip
    return AdapterStats(step, tuple(layers), True, 1e-3, 0.01)


def scripted_samples(step: int) -> Any:
    """Two prompts' answers of about 100 characters each, the current one changing with the step."""
    from lora_widgets.events.types import SampleGenerations, SamplePair

    pairs = tuple(
        SamplePair(f"def function_{k}(x):", "    return x  # the base model's answer, the same every time " * 2,
                   f"    return x + {step}  # the adapter's answer after {step} steps " * 2, None, None)
        for k in range(2)
    )  # fmt: skip
    return SampleGenerations(step, pairs, 32, 0.0, 0.25, base_reused=step > 0)


def random_blocks(n: int = 40, seq: int = 32, seed: int = 0, vocab_size: int = 128) -> torch.Tensor:
    """Seeded random token blocks ``[n, seq]`` for a tiny model's training data."""
    return torch.randint(0, vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


def cpu_config(tmp_path: Any, **fields: Any) -> Any:
    """A ``TrainConfig`` that trains on the CPU and writes its runs under ``tmp_path / "runs"``."""
    from lora_widgets import TrainConfig

    return TrainConfig(**{"output_dir": str(tmp_path / "runs"), "device": "cpu", **fields})


def tiny_trainer(tmp_path: Any, model: Any = None, data: Any = None, r: int = 4, **fields: Any) -> Any:
    """A ``LoRATrainer`` with rank-``r`` adapters on a tiny Llama (or ``model``) over random blocks (or
    ``data``), configured by :func:`cpu_config`: the one factory the trainer tests share."""
    from lora_widgets import LoRAConfig, LoRATrainer

    return LoRATrainer(
        model if model is not None else tiny_llama(),
        None,
        random_blocks() if data is None else data,
        lora=LoRAConfig(r=r),
        config=cpu_config(tmp_path, **fields),
    )


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed operation must leave as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "tree": [
            (n, type(m).__name__, sorted(vars(m))) for n, m in model.named_modules(remove_duplicate=False)
        ],
        "lora": {
            n: (layer.merged, layer.enabled, layer.r, layer.alpha, layer.use_rslora, layer.scaling)
            for n, layer in lora_layers(model).items()
        },
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any], atol: float = 0.0) -> None:
    assert after["tree"] == before["tree"], "module tree or module attributes changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["lora"] == before["lora"], "LoRA merge/enable state changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, old in before["tensors"].items():
        new = after["tensors"][key]
        assert new.dtype == old.dtype and new.shape == old.shape, key
        if atol == 0.0:
            assert torch.equal(new, old), f"{key} changed"
        else:
            assert torch.allclose(new, old, rtol=0.0, atol=atol), (
                f"{key} changed by {(new - old).abs().max()}"
            )
