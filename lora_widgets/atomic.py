"""Atomic writes: a file or a directory appears under its final name complete, or not at all.

One rule for every writer in the package: write under a temporary name in the destination's own
directory (so on the same file system), flush it to disk, then ``os.replace`` it onto the final name,
which POSIX and Windows do atomically. A crash or a kill leaves at most a temporary entry named
``.<name>.tmp-<pid>-<random>``; :func:`remove_stale_temporaries` deletes those once the process that made
them is gone. An ``OSError`` raised while writing names the destination (not the temporary name), so
a full disk is reported as "No space left on device: '<the file you asked for>'".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "atomic_directory",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "naming_file",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

# ".<name>.tmp-<pid>-<random>"; the pid lets a later run tell a dead writer's leftovers from live work.
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:-.*)?$")
# What releases before the pid was added left: ".<name>.tmp-<8 random characters>" (tempfile.mkdtemp).
_LEGACY = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")

# Temporary directories this process is writing right now (another LoRATrainer may be checkpointing).
_IN_PROGRESS: set[Path] = set()


def _prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-{os.getpid()}-"


def _naming(exc: OSError, temp: Path, dest: Path) -> OSError:
    """``exc`` with its file name moved from the temporary path to the destination it stands for."""
    if exc.errno is None:
        return exc
    name = os.fspath(exc.filename) if exc.filename is not None else ""
    shown = name.replace(os.fspath(temp), os.fspath(dest), 1) if name.startswith(os.fspath(temp)) else ""
    renamed = OSError(exc.errno, exc.strerror or str(exc), shown or os.fspath(dest))
    return renamed  # OSError(errno, ...) builds the matching subclass (FileNotFoundError, ...)


@contextlib.contextmanager
def naming_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Give an ``OSError`` raised inside without a file name (a full disk noticed at ``close()``) ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(dest: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, fsync the file, then rename it to ``dest``; returns ``dest``.

    On any failure the temporary file is removed and ``dest`` is untouched (an earlier version stays).
    """
    dest = Path(dest)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=_prefix(dest))
    os.close(fd)
    temp = Path(name)
    try:
        with naming_file(temp):
            write(temp)
        _fsync(temp)
        os.replace(temp, dest)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _naming(exc, temp, dest) from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return dest


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""

    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return atomic_write(dest, write)


def atomic_write_json(dest: str | os.PathLike[str], data: Any, **dump_kwargs: Any) -> Path:
    """Write ``data`` as JSON to ``dest`` atomically (``dump_kwargs`` go to :func:`json.dumps`)."""
    return atomic_write_text(dest, json.dumps(data, **dump_kwargs))


def _replace_directory(temp: Path, dest: Path) -> None:
    """``os.replace`` cannot replace a non-empty directory: move the old one aside first."""
    if not dest.exists():
        os.replace(temp, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-{os.getpid()}-"))
    os.replace(dest, old / dest.name)
    try:
        os.replace(temp, dest)
    except BaseException:
        os.replace(old / dest.name, dest)  # put the earlier version back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_directory(dest) as temp: <write files into temp>``; on success every file is fsynced
    and ``temp`` replaces ``dest`` (an earlier ``dest`` is swapped out); on failure ``temp`` is removed and
    ``dest`` is as before. An ``OSError`` names the file under ``dest`` that was being written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_prefix(dest)))
    _IN_PROGRESS.add(temp)
    try:
        yield temp
        for path in temp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _replace_directory(temp, dest)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise _naming(exc, temp, dest) from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        _IN_PROGRESS.discard(temp)


def _is_stale(path: Path) -> bool:
    match = _TEMP.match(path.name)
    if match is None:
        return _LEGACY.match(path.name) is not None
    pid = int(match.group(1))
    if pid == os.getpid():
        return path not in _IN_PROGRESS
    return not psutil.pid_exists(pid)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files and directories that killed writers left in ``directory``.

    Only entries named as this module names them, whose process no longer runs (or, for this process,
    that no write is using now), are removed. Returns what was removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if not _is_stale(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            logger.warning("could not remove the stale temporary %s: %s", path, exc)
            continue
        removed.append(path)
    return removed
