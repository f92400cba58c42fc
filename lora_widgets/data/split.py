"""How a run's validation part is chosen, so that no validation text has its neighbours in training.

Why not random blocks: text is packed into one stream and cut into blocks (:mod:`lora_widgets.data.text`), so a
document of 5,000 tokens fills ~40 blocks of 128. Holding out random blocks leaves the other ~36 blocks of the
same document in training: the validation loss then partly measures memorised neighbours, not generalisation
(the same reason held-out sets are split by document, e.g. Raffel et al. 2020's C4 and Gao et al. 2020's Pile
validation sets are whole documents). So:

* **by document** (text with enough distinct documents that ``round(n * val_fraction) >= 1``): a seeded
  permutation of the distinct documents picks ``round(n * val_fraction)`` of them (at most ``n - 1``) for
  validation; each side is then packed on its own. Identical texts form one group, so a duplicated document
  cannot sit on both sides.
* **by example** (instruction/chat rows): the same rule over examples, identical examples grouped.
* **by position** (the fallback, said in the run's ``DataPrepared.split``): a source that is one document, or too
  few documents to hold out ``val_fraction`` of them (two documents and 10% would hold out half), or whose
  validation documents hold fewer tokens than one block, or blocks given as a tensor (document boundaries
  unknown): the last ``round(n_blocks * val_fraction)`` blocks (at least one) validate. They are one contiguous
  piece, so training shares only the one boundary where it starts.

The split depends only on the data, ``val_fraction`` and ``seed``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["GroupSplit", "check_val_fraction", "describe_tail", "split_groups", "tail_split"]


@dataclass(frozen=True)
class GroupSplit:
    """Which items (documents or examples, by index in load order) train and which validate; both sorted."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int

    def describe(self, unit: str) -> str:
        """``"by document: 410 train / 46 validation documents, seed 0"`` (``unit``: ``"document"``, ...)."""
        return (
            f"by {unit}: {len(self.train):,} train / {len(self.val):,} validation {unit}s, seed {self.seed}"
        )


def check_val_fraction(val_fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 <= val_fraction < 1``."""
    if isinstance(val_fraction, bool) or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def split_groups(keys: Sequence[Hashable], val_fraction: float = 0.1, seed: int = 0) -> GroupSplit | None:
    """Split items by their ``keys`` (equal keys go to the same side) with a seeded permutation of the groups.

    ``round(n_groups * val_fraction)`` groups validate, at most ``n_groups - 1``.

    Returns:
        The split, or ``None`` when that rounds to no group (``val_fraction`` is 0, or there are too few
        distinct keys to hold out that share of them: the caller falls back).

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    check_val_fraction(val_fraction)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    n = len(groups)
    n_val = min(round(n * val_fraction), n - 1)
    if n_val < 1:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    members = list(groups.values())  # in order of first occurrence
    val = sorted(i for g in perm[:n_val] for i in members[g])
    train = sorted(i for g in perm[n_val:] for i in members[g])
    return GroupSplit(tuple(train), tuple(val), int(seed))


def tail_split(blocks: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``round(n * val_fraction)`` blocks (at least one) validate, the rest train (the fallback rule).

    Args:
        blocks: ``[n, T]`` in stream order.

    Returns:
        ``(train[n - n_val, T], val[n_val, T])``.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``, or fewer than two blocks.
    """
    check_val_fraction(val_fraction)
    n = int(blocks.shape[0])
    n_val = max(1, round(n * val_fraction))
    if val_fraction == 0 or n - n_val < 1:
        raise ValueError(
            f"only {n} block(s) of {blocks.shape[1]} tokens: too few to hold out {val_fraction:.0%} for "
            "validation and still train; add more text, lower block_size, or set val_fraction=0"
        )
    return blocks[: n - n_val], blocks[n - n_val :]


def describe_tail(reason: str, n_val: int, n_blocks: int) -> str:
    """The fallback's line for ``DataPrepared.split``."""
    return (
        f"by position ({reason}): the last {n_val:,} of {n_blocks:,} blocks validate, one contiguous piece "
        "(not random blocks, whose neighbours would be in training)"
    )
