"""What the model says now: greedy answers to a few fixed prompts, base model beside the current adapter.

Loss curves say that something changes; sample answers say what. At each evaluation the trainer calls
:func:`generate_samples` with the same prompts: the base model's answer (adapters switched off) and the current
adapter's answer, decoded greedily so that a change in the text is a change in the model, not in the dice. For
chat data, whether each answer ended with the end-of-turn token shows whether the model has learned to stop.

The cost is bounded by ``max_new_tokens`` and :data:`MAX_PROMPTS`, and reported in the record. Greedy decoding
of a frozen base is deterministic, so passing the previous record as ``reuse_base`` skips the base half.
Prompts are strings or token-id lists: no chat template is applied here (render it before, if you want one).
The model is left as it was found: adapters enabled or not per layer, train/eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_widgets.events.types import SampleGenerations, SamplePair
from lora_widgets.lora.layers import has_peft_layers, lora_layers, set_adapters_enabled
from lora_widgets.models import check_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["MAX_PROMPTS", "generate_samples"]

MAX_PROMPTS = 8
"""At most this many prompts per call: each costs two generations of up to ``max_new_tokens`` tokens."""

Prompt = str | Sequence[int]


def _prompt_ids(prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"prompts must be a non-empty list of strings or token-id lists, got {prompts!r:.80}; "
            "wrap a single prompt in a list"
        )
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(
            f"{len(prompts)} prompts given; at most {MAX_PROMPTS} are generated per evaluation (each costs two "
            "generations): pass fewer"
        )
    if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"tokenizer must be the model's transformers tokenizer (it encodes the prompts and decodes the "
            f"answers), got {type(tokenizer).__name__}"
        )
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        ids = list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(
                f"prompts[{i}] must be a non-empty string or a list of token ids >= 0, got {p!r:.80}"
            )
        out.append(ids)
    return out


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back each adapter's ``enabled`` flag and the train/eval mode, whatever happens inside."""
    flags = {name: layer.enabled for name, layer in lora_layers(model).items()}
    was_training = model.training
    try:
        yield
    finally:
        for name, layer in lora_layers(model).items():
            layer.enabled = flags.get(name, layer.enabled)
        model.train(was_training)


def _greedy(
    model: nn.Module, ids: list[int], max_new_tokens: int, stop: list[int], pad: int | None
) -> list[int]:
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    options: dict[str, Any] = {"eos_token_id": stop} if stop else {}
    output = model.generate(  # type: ignore[operator]
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        **options,
    )  # [1, T + new]
    return [int(t) for t in output[0, len(ids) :].tolist()]


def _answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    eot: int | None,
) -> tuple[list[tuple[str, bool | None]], float]:
    stop = [t for t in (eot, tokenizer.eos_token_id) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = []
    for ids in prompts:
        new = _greedy(model, ids, max_new_tokens, stop, pad)
        ended = None if eot is None else bool(new) and new[-1] == eot
        out.append((str(tokenizer.decode(new, skip_special_tokens=True)), ended))
    return out, time.perf_counter() - start


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    step: int,
    *,
    max_new_tokens: int = 32,
    eot_token_id: int | None = None,
    reuse_base: SampleGenerations | None = None,
) -> SampleGenerations:
    """Greedy answers of the base model and of the current adapter to each prompt, with their cost.

    Args:
        model: a model with lora_widgets LoRA layers (not merged: the base model must be reachable).
        tokenizer: encodes string prompts (as ``tokenizer(prompt)``, special tokens as it adds them) and
            decodes answers (special tokens skipped).
        prompts: at most :data:`MAX_PROMPTS` strings or lists of token ids.
        step: optimizer updates completed, recorded in the event.
        max_new_tokens: generation length bound (1 .. 1024).
        eot_token_id: end-of-turn token (e.g. ``<|im_end|>``'s id): generation stops there and the record says
            whether each answer ended with it. Generation always stops at the tokenizer's EOS.
        reuse_base: an earlier record for the same prompts and ``max_new_tokens`` (and ``eot_token_id``): its base
            answers are reused.

    Raises:
        ValueError: bad prompts, ``max_new_tokens``, ``eot_token_id`` or ``step``; a model without adapters, or
            with merged adapters.
    """
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not 1 <= max_new_tokens <= 1024
    ):
        raise ValueError(f"max_new_tokens must be an int in 1..1024, got {max_new_tokens!r}")
    if eot_token_id is not None and (
        isinstance(eot_token_id, bool) or not isinstance(eot_token_id, int) or eot_token_id < 0
    ):
        raise ValueError(f"eot_token_id must be a token id (int >= 0) or None, got {eot_token_id!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 (updates completed), got {step!r}")
    layers = lora_layers(model)
    if not layers:
        peft = (
            " (this model's adapters are PEFT's, which it does not switch)" if has_peft_layers(model) else ""
        )
        raise ValueError(
            f"generate_samples needs a model with lora_widgets LoRA layers (apply_lora) to compare against its "
            f"base{peft}; for a PEFT model, compare model.generate() inside and outside `with model.disable_adapter():`"
        )
    if any(layer.merged for layer in layers.values()):
        raise ValueError(
            "the adapters are merged into the weights, so the base model is not reachable: unmerge_lora first"
        )
    ids = _prompt_ids(prompts, tokenizer)
    check_vocab(model, ids)
    texts = [str(tokenizer.decode(p, skip_special_tokens=True)) for p in ids]
    reusable = (
        reuse_base is not None
        and reuse_base.max_new_tokens == max_new_tokens
        and [s.prompt for s in reuse_base.samples] == texts
    )
    with _restored(model):
        model.eval()
        set_adapters_enabled(model, True)
        current, current_s = _answers(model, tokenizer, ids, max_new_tokens, eot_token_id)
        if reusable:
            assert reuse_base is not None
            base, base_s = [(s.base, s.base_ended) for s in reuse_base.samples], 0.0
        else:
            set_adapters_enabled(model, False)
            base, base_s = _answers(model, tokenizer, ids, max_new_tokens, eot_token_id)
    pairs = tuple(SamplePair(t, b[0], c[0], b[1], c[1]) for t, b, c in zip(texts, base, current, strict=True))
    return SampleGenerations(step, pairs, max_new_tokens, base_s, current_s, reusable)
