r"""Attention for packed rows that runs each example on its own: a variable-length kernel built from SDPA.

A packed row holds several examples back to back, ``position_ids`` restarting at 0 for each (Hugging Face,
"Improve training efficiency with packing and Flash Attention 2", 2024). Attention must never cross an example.
transformers' SDPA path builds a block-diagonal mask over the whole row and computes every score in it:
``W^2`` per row of ``W`` tokens, against ``sum_i L_i^2`` for the examples alone, and a masked SDPA call leaves
the fused causal kernel. FlashAttention's variable-length kernels skip the blocks between examples, but they need
CUDA. Here the same is done with the kernels every device has::

    q, k, v: [B, H, T, hd]  --(each token to its slot)-->    [n, H, L_max, hd]   (example i, right-padded with 0)
             --(SDPA, is_causal=True)-->                  [n, H, L_max, hd]
             --(each token read back from its slot)-->    [B, T, H, hd]

A token's slot is ``i * L_max + t`` (example ``i``, position ``t`` in it), so the layout change is one
``index_copy`` per input and one ``index_select`` for the output, whatever the number of examples: on the shipped
model that put a packed step at 0.98-0.99 of a padded length-grouped one, against 0.93-0.95 with a copy per
example (``benchmarks/bench_packing.py``, one thread).

Right padding is safe without a mask: a causal query at position ``t < L_i`` attends keys ``0..t``, all of its
own example; the outputs at padded positions are dropped. The cost is ``n L_max^2`` scores, the same as a padded
length-grouped batch, while the projections and the MLP, which are most of a step, see no padding at all.

Anything that is not a packed training forward (a padding mask, a KV cache, one query against many keys) goes
to transformers' own SDPA attention and mask unchanged, so generation and evaluation behave as with ``"sdpa"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "PACKED_SDPA",
    "attention_of",
    "packed_sdpa_attention",
    "restore_attention",
    "switch_to_packed_sdpa",
    "use_packed_sdpa",
]

#: The name this attention is registered under in transformers' ``AttentionInterface`` and
#: ``AttentionMaskInterface`` (a model's ``config._attn_implementation`` while a packed run trains).
PACKED_SDPA = "lora_widgets_packed_sdpa"


def _example_lengths(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Lengths of the examples laid out in ``position_ids`` ``[B, T]``, row by row (a ``LongTensor[n]``), or
    ``None`` when no row restarts (nothing is packed). An example starts where a position is not its left
    neighbour + 1 (as transformers' ``find_packed_sequence_indices``) and at the start of every row."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # [B, T]
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if int(starts.sum()) == position_ids.shape[0]:
        return None
    flat_starts = torch.nonzero(starts.flatten()).flatten()  # [n]
    ends = torch.cat([flat_starts[1:], flat_starts.new_tensor([position_ids.numel()])])
    return ends - flat_starts  # [n]


def _per_example(
    query: torch.Tensor,  # [B, H, T, hd]
    key: torch.Tensor,  # [B, H, T, hd] (key/value heads already repeated)
    value: torch.Tensor,  # [B, H, T, hd]
    lengths: torch.Tensor,  # [n], summing to B * T
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:  # [B, T, H, hd]
    batch, heads, width, head_dim = query.shape
    n, longest = lengths.numel(), int(lengths.max())
    lengths = lengths.to(query.device)
    example = torch.arange(n, device=query.device).repeat_interleave(lengths)  # [B T]: each token's example
    starts = torch.cumsum(lengths, 0) - lengths  # [n]: each example's first token in the packed row(s)
    token = torch.arange(batch * width, device=query.device)  # [B T]
    slot = example * longest + token - starts[example]  # [B T]: where each token sits in [n L_max]

    def padded(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, hd] -> [n, H, L_max, hd], 0 after each example
        flat = t.transpose(1, 2).reshape(batch * width, heads, head_dim)  # [B T, H, hd]
        rows = flat.new_zeros(n * longest, heads, head_dim).index_copy(0, slot, flat)  # [n L_max, H, hd]
        return rows.view(n, longest, heads, head_dim).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), dropout_p=dropout, is_causal=True, scale=scaling
    )  # [n, H, L_max, hd]
    flat_out = out.transpose(1, 2).reshape(n * longest, heads, head_dim)  # [n L_max, H, hd]
    return flat_out.index_select(0, slot).view(batch, width, heads, head_dim)  # [B, T, H, hd]


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, T, hd]
    key: torch.Tensor,  # [B, H_kv, S, hd]
    value: torch.Tensor,  # [B, H_kv, S, hd]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (``AttentionInterface``): per-example causal attention when
    the rows are packed (``attention_mask`` is ``None`` and ``position_ids`` restart), transformers' SDPA
    attention otherwise. Returns ``([B, T, H, hd], None)`` as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    lengths = None
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]:
        lengths = _example_lengths(position_ids.expand(query.shape[0], -1))
    if lengths is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [B, H, T, hd]
    return _per_example(query, key, value, lengths, dropout, scaling), None


def _packed_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for a training forward without padding (the attention reads the examples from ``position_ids``);
    transformers' SDPA mask for anything else (padding, a cache, chunked prefill)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its sub-configs that carry an attention implementation (multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found.append(sub)
    return found


def attention_of(model: nn.Module) -> list[tuple[Any, str]]:
    """Each config of ``model`` with its attention implementation now: what :func:`restore_attention` puts
    back after a run that switched it."""
    return [(c, str(getattr(c, "_attn_implementation", ""))) for c in _configs(model)]


def switch_to_packed_sdpa(model: nn.Module) -> bool:
    """Make ``model`` (a transformers model on ``"sdpa"``) attend per example in packed rows; ``False`` (nothing
    changed) for any other attention: eager attention is left as the user chose it, FlashAttention already
    runs per example."""
    configs = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"]
    if not configs:
        return False
    _register()
    for c in configs:
        c._attn_implementation = PACKED_SDPA
    return True


def restore_attention(saved: list[tuple[Any, str]]) -> None:
    """Put back the attention implementations :func:`attention_of` recorded."""
    for config, implementation in saved:
        if implementation:
            config._attn_implementation = implementation


@contextmanager
def use_packed_sdpa(model: nn.Module) -> Iterator[None]:
    """While inside, ``model`` (a transformers model using ``"sdpa"``) attends per example in packed rows;
    its attention implementation is restored on the way out, whatever happens inside."""
    saved = attention_of(model)
    switch_to_packed_sdpa(model)
    try:
        yield
    finally:
        restore_attention(saved)
