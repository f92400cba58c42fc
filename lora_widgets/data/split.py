"""How a run's validation part is chosen, so that no validation text has its neighbours in training.

Why not random blocks: text is packed into one stream and cut into blocks (:mod:`lora_widgets.data.text`), so a
document of 5,000 tokens fills ~40 blocks of 128. Holding out random blocks leaves the other ~36 blocks of the
same document in training: the validation loss then partly measures memorised neighbours, not generalisation
(the same reason held-out sets are split by document, e.g. Raffel et al. 2020's C4 and Gao et al. 2020's Pile
validation sets are whole documents). So:

* **by document** (text with enough groups of documents that ``round(n * val_fraction) >= 1``): documents are
  grouped first, identical texts into one group and texts that share a passage of 40 words or more into one
  group (:mod:`lora_widgets.data.passages`: a topic reprinted inside another, a quoted page), so neither a
  duplicated nor a reprinted document can sit on both sides. A seeded permutation of the ``n`` groups picks
  ``round(n * val_fraction)`` of them (at most ``n - 1``) for validation; each side is then packed on its own.
  The fraction counts groups, not tokens (as scikit-learn's ``GroupShuffleSplit``), so a part's share of the
  tokens varies with which groups it draws: ``DataSplit.split`` gives the counts.
* **by example** (instruction/chat rows): the same rule over examples, identical examples grouped.
* **by position** (the fallback, said in the run's ``DataPrepared.split``): a source that is one document, or too
  few documents to hold out ``val_fraction`` of them (two documents and 10% would hold out half), or whose
  validation documents hold fewer tokens than one block, or blocks given as a tensor (document boundaries
  unknown): the last ``round(n_blocks * val_fraction)`` blocks (at least one) validate. They are one contiguous
  piece, so training shares only the one boundary where it starts.

A **test part** (``test_fraction`` > 0, documents or examples only): when validation loss chooses anything (a
learning rate, a rank, when to stop), the chosen run's validation loss is biased low, since it won a comparison
on that very set; a number reported for the choice must come from data the choice never saw (Hastie, Tibshirani
& Friedman, *The Elements of Statistical Learning*, 2nd ed., sec. 7.2: training, validation and test sets).
The test groups are taken from the same seeded permutation right after the validation groups, so asking for a
test part leaves the validation part exactly as it was and takes the test part from training.

The split depends only on the data, ``val_fraction``, ``test_fraction`` and ``seed``.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GroupSplit",
    "check_fractions",
    "check_val_fraction",
    "describe_tail",
    "split_groups",
    "tail_split",
]


@dataclass(frozen=True)
class GroupSplit:
    """Which items (documents or examples, by index in load order) train, validate and test; each sorted."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int
    test: tuple[int, ...] = ()

    def describe(self, unit: str) -> str:
        """``"by document: 410 train / 46 validation documents, seed 0"`` (``unit``: ``"document"``, ...); with a
        test part, ``"by document: 364 train / 46 validation / 46 test documents, seed 0"``."""
        test = f" / {len(self.test):,} test" if self.test else ""
        return f"by {unit}: {len(self.train):,} train / {len(self.val):,} validation{test} {unit}s, seed {self.seed}"


def _check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (not a bool or a string) with ``0 <= value < 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_val_fraction(val_fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 <= val_fraction < 1``."""
    _check_fraction("val_fraction", val_fraction)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in ``[0, 1)`` and together leave something to train on."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise ValueError(
            f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r} hold out everything: "
            "together they must be below 1"
        )


def split_groups(
    keys: Sequence[Hashable], val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.0
) -> GroupSplit | None:
    """Split items by their ``keys`` (equal keys go to the same side) with a seeded permutation of the groups.

    ``round(n_groups * val_fraction)`` groups validate (the first of the permutation), then
    ``round(n_groups * test_fraction)`` test; at least one group is left to train.

    Returns:
        The split, or ``None`` when the validation part rounds to no group (``val_fraction`` is 0, or there are
        too few distinct keys to hold out that share of them: the caller falls back).

    Raises:
        ValueError: ``keys`` not a list, or a key that is not hashable (a list, a dict); a fraction outside
            ``[0, 1)``, or the two together at 1 or more; a test part asked for that
            rounds to no group, or that leaves nothing to train (names the number of groups and the fix).
    """
    check_fractions(val_fraction, test_fraction)
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise ValueError(
            f"keys must be a list with one key per item (e.g. a text each), got {type(keys).__name__}"
        )
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, Hashable):
            raise ValueError(
                f"keys[{i}] is a {type(key).__name__}, which cannot be a key: pass a str, int or tuple"
            )
        groups.setdefault(key, []).append(i)
    n = len(groups)
    n_val = min(round(n * val_fraction), n - 1)
    if n_val < 1:
        return None
    n_test = round(n * test_fraction)
    if test_fraction > 0 and not 1 <= n_test <= n - n_val - 1:
        raise ValueError(
            f"{n} distinct group(s) cannot give {n_val} to validation, {n_test} to test and at least one to "
            f"training (test_fraction={test_fraction!r}); use more documents or examples, or another test_fraction"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    members = list(groups.values())  # in order of first occurrence

    def items(part: list[int]) -> tuple[int, ...]:
        return tuple(sorted(i for g in part for i in members[g]))

    held = n_val + n_test
    return GroupSplit(items(perm[held:]), items(perm[:n_val]), int(seed), items(perm[n_val:held]))


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
