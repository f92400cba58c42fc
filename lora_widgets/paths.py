"""The one check that a path argument is a path, so a stray value fails before anything is read or written.

``str(3)`` is ``"3"``: code that turns its argument into a path with ``str()`` or ``Path()`` first would save a
model into ``./3`` (or read from it) instead of refusing. Every public function that takes a folder or file calls
:func:`as_path` before it touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["as_path"]


def as_path(value: Any, owner: str, name: str) -> Path:
    """``value`` as a ``Path``; ``TypeError`` naming ``owner``, the argument ``name`` and the value otherwise.

    Raises:
        TypeError: ``value`` is not a ``str`` or an ``os.PathLike`` (a number, ``None``, a list).
    """
    if not isinstance(value, str | os.PathLike):
        raise TypeError(
            f"{owner}: {name} must be a path (a str or pathlib.Path), got {type(value).__name__} {value!r}"
        )
    return Path(value)
