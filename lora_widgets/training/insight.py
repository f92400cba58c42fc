"""Is LoRA learning? What a run shows of its adapters: statistics, sample answers and alerts (issue 14).

The trainer asks one :class:`Insight` per run at three points of its loop, each a one-line hook::

    one update (worker thread)     probe(step, lr)   only on measured updates (the first, every eval_every-th,
                                                     the last): snapshot_adapters just before optimizer.step(),
                                                     adapter_stats just after it and before zero_grad (the
                                                     gradients exist only then)           -> AdapterStats
    after an evaluation (worker)   samples(step)     greedy answers, base model beside the current adapter
                                                                                          -> SampleGenerations
    every published event          alerts(event)     an AlertMonitor; each alert once per run -> AlertRaised
    the run's first update         gradient_alerts   trainable parameters without a gradient (any model,
                                                     lora_widgets.health.gradient_check)            -> AlertRaised

Statistics and the alerts read from them need LoRA layers (ours or PEFT's); samples need ours (they switch the adapters off for
the base model's answers), a tokenizer and a model with ``generate``. What runs is what :class:`TrainConfig`
asks (``adapter_stats``, ``sample_prompts``, ``sample_max_new_tokens``). The cost, measured side by side with
training steps: ``benchmarks/bench_adapter_stats.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lora_widgets.data.sft_batches import IGNORE_INDEX
from lora_widgets.events.types import AlertRaised, Event, RunStarted, SampleGenerations
from lora_widgets.health.alerts import AlertMonitor
from lora_widgets.health.gradient_check import GradientReport
from lora_widgets.health.notices import samples_off_notice, warmup_notice
from lora_widgets.health.samples import generate_samples
from lora_widgets.lora.layers import has_lora, lora_layers
from lora_widgets.lora.statistics import adapter_stats, snapshot_adapters
from lora_widgets.training.batches import Examples
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.step import Probe

__all__ = ["DEFAULT_PROMPTS", "PROMPT_TOKENS", "Insight", "end_of_turn_id"]

logger = logging.getLogger(__name__)


DEFAULT_PROMPTS = 2
PROMPT_TOKENS = 16
"""Without ``sample_prompts``: the first :data:`PROMPT_TOKENS` tokens of the first :data:`DEFAULT_PROMPTS`
validation blocks are the prompts (text the model should learn to continue)."""

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # ChatML, Llama 3, Gemma, Phi-3


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The end-of-turn token of a chat tokenizer (one with a ``chat_template``): the first of the usual markers
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``) in its
    vocabulary, else its EOS token. ``None`` for a tokenizer without a chat template (plain text data)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN:
        if token in vocab:
            return int(vocab[token])
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _default_prompts(val: torch.Tensor | Examples | None) -> list[list[int]]:
    """The first validation blocks' opening tokens; for instruction examples, each example's prompt (every
    token before its first trained one, so the template's generation prompt included): the model answers it."""
    if val is None:
        return []
    if isinstance(val, Examples):
        prompts = []
        for example in val.items[:DEFAULT_PROMPTS]:
            first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)
            prompts.append(list(example.input_ids[: max(first, 1)]))
        return prompts
    return [[int(t) for t in row[:PROMPT_TOKENS]] for row in val[:DEFAULT_PROMPTS].tolist()]  # [<=2, <=16]


def _samples_notice(model: nn.Module, tokenizer: Any, config: TrainConfig, val: Any) -> AlertRaised | None:
    """Why sample answers that were asked for (``sample_prompts``, or by default the validation data's
    openings) cannot be made in this run; ``None`` when they can, or were switched off (``sample_prompts=()``)."""
    given = config.sample_prompts
    off = "sample_prompts=() switches this notice off"
    if given == ():
        return None
    if has_lora(model) and not lora_layers(model):
        return samples_off_notice(
            "the model's adapters are PEFT's: sample answers set the base model's answer (adapters switched "
            "off) beside the current adapter's, which lora_widgets does for its own adapters",
            f"train lora_widgets' adapters (pass the base model with lora=LoRAConfig(...)); {off}",
        )
    if not lora_layers(model):
        return None if given is None else samples_off_notice(
            "the model has no LoRA adapters to switch off for the base model's answers",
            f"pass lora=LoRAConfig(...) to train an adapter; {off}",
        )  # fmt: skip
    if val is None:
        asked = (
            "sample_prompts are answered at each evaluation"
            if given
            else "the default sample prompts are the validation data's first tokens"
        )
        return samples_off_notice(
            f"{asked}, and this run has no validation data",
            f"pass eval_data=..., or keep val_fraction > 0; {off}",
        )
    decodes = callable(getattr(tokenizer, "decode", None))
    if given and (not decodes or not callable(getattr(model, "generate", None))):  # default prompts: ids
        return samples_off_notice(
            "sample answers need a tokenizer (to decode them) and a model with generate()",
            f"pass the model's tokenizer; {off}",
        )
    return None


class Insight:
    """One run's statistics, samples and alerts (see the module docstring); ``Insight()`` does nothing (no run
    prepared yet), :meth:`for_run` is a run's."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.config = TrainConfig()
        self.total = 0
        self.monitor: AlertMonitor | None = None
        self.gradients = AlertMonitor()  # the gradient check, for any model (each alert once per run)
        self.stats = False
        self.prompts: Sequence[str | list[int]] = ()
        self.end_of_turn: int | None = None
        self._last: SampleGenerations | None = None
        self.notices: list[AlertRaised] = []  # settings that cannot take effect: published once, at the start

    @classmethod
    def for_run(
        cls,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        val: torch.Tensor | Examples | None,
        total: int,
    ) -> Insight:
        """What a run of ``model`` with ``config`` shows, until update ``total``.

        ``tokenizer`` encodes string prompts and decodes answers (``None``: no samples); ``val``: the
        validation blocks ``[n, T]`` (default prompts; ``None``: no evaluations, so no samples).
        """
        self = cls()
        self.model, self.tokenizer, self.config, self.total = model, tokenizer, config, total
        lora = has_lora(model)
        self.monitor = AlertMonitor(peak_learning_rate=config.learning_rate) if lora else None
        self.stats = lora and config.adapter_stats
        decodes = callable(getattr(tokenizer, "decode", None))
        if decodes and lora_layers(model) and callable(getattr(model, "generate", None)):
            given = config.sample_prompts
            self.prompts = list(given) if given is not None else _default_prompts(val)
        # whether an answer ended its turn means something only for chat data (instruction examples)
        chat = isinstance(val, Examples)
        self.end_of_turn = end_of_turn_id(tokenizer) if self.prompts and chat else None
        notices = (_samples_notice(model, tokenizer, config, val), warmup_notice(config.warmup_steps, total,
                   config.learning_rate))  # fmt: skip
        self.notices = [n for n in notices if n is not None]
        return self

    def measures(self, step: int) -> bool:
        """Whether update ``step`` (1-based) is measured: the first, every ``eval_every``-th and the last."""
        every = self.config.eval_every
        return self.stats and (step in (1, self.total) or (every is not None and step % every == 0))

    def probe(self, step: int, lr: float) -> Probe | None:
        """For a measured update ``step`` at rate ``lr``: the step function's probe whose result is the update's
        :class:`~lora_widgets.events.types.AdapterStats`; ``None`` for the others."""
        model = self.model
        if model is None or not self.measures(step):
            return None

        def before_step() -> Callable[[], object]:
            snapshot = snapshot_adapters(model)  # the factors before optimizer.step()
            return lambda: adapter_stats(model, step, before=snapshot, after_backward=True, learning_rate=lr)

        return before_step

    def samples(
        self, step: int, autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> SampleGenerations | None:
        """(worker thread) The sample answers after ``step`` updates, or ``None`` when samples are off.

        The base half is computed once (greedy decoding of a frozen base repeats itself) and reused. A failure
        is logged with its reason and switches samples off for the rest of the run: they are a view of the
        training, never a reason to end it.
        """
        if not self.prompts or self.model is None:
            return None
        try:
            with autocast():
                self._last = generate_samples(
                    self.model, self.tokenizer, self.prompts, step,
                    max_new_tokens=self.config.sample_max_new_tokens, eot_token_id=self.end_of_turn,
                    reuse_base=self._last,
                )  # fmt: skip
        except Exception as exc:  # logged and switched off; training goes on
            logger.warning(
                "sample generations failed at step %d and are switched off for this run: %s: %s",
                step, type(exc).__name__, exc,
            )  # fmt: skip
            self.prompts = ()
            return None
        return self._last

    def check_labels(self, labels: torch.Tensor, step: int) -> list[AlertRaised]:
        """The "nothing is trained" alert for a batch's ``labels`` ``[B, T]`` (Hugging Face convention, -100 =
        ignored) whose every target is masked, once per run: for data with loss masks (prompt/completion, chat),
        where a template that matches nothing or a truncation that cuts every answer trains nothing."""
        if self.monitor is None:
            return []
        return list(self.monitor.check_labels(labels, step))

    def alerts(self, event: Event) -> list[AlertRaised]:
        """The alerts ``event`` raises that this run has not raised before; the run's ``RunStarted`` also
        brings its :attr:`notices` (settings that cannot take effect), once."""
        if isinstance(event, AlertRaised):
            return []
        said = list(self.notices) if isinstance(event, RunStarted) else []
        return said if self.monitor is None else [*said, *self.monitor.feed(event)]

    def gradient_alerts(self, report: GradientReport, step: int) -> list[AlertRaised]:
        """The "no gradient" alert for what update ``step``'s gradients show (any model: this package's LoRA,
        PEFT's, the user's own modules), once per run."""
        return list(self.gradients.check_gradients(report, step))
