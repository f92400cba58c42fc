"""``<directory>/sweep.json``: a sweep's plan and every finished run, rewritten atomically after each run.

A sweep killed mid-run (a kernel restart, a crash) loses only the run in progress: the file is replaced
whole by :func:`lora_widgets.atomic.atomic_write_json` (write, fsync, rename), so it always holds the plan and
the rows of the runs that ended. A new :class:`~lora_widgets.sweep.runner.Sweep` on the same directory with
the same plan reads the rows back; a different plan is refused, so that two sweeps never mix in one table.
When it runs, :meth:`SweepStore.keep_current` keeps only the rows whose fingerprint matches the sweep's
(:func:`lora_widgets.sweep.fingerprint.stale_parts`, the one rule): the others are dropped and run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_widgets.atomic import atomic_write_json
from lora_widgets.sweep.events import SweepRunEnded, sweep_event_from_dict
from lora_widgets.sweep.fingerprint import Fingerprint, stale_parts

__all__ = ["SweepStore"]

VERSION = 1


class SweepStore:
    """The plan and the rows of one sweep directory."""

    def __init__(self, directory: str | Path, plan: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "sweep.json"
        self.plan = json.loads(json.dumps(plan))  # what it reads back as, for comparison
        self.rows: list[SweepRunEnded] = []

    def load(self) -> list[SweepRunEnded]:
        """Rows of an earlier session with the same plan (none if the file is new). Raises ``ValueError`` when
        the directory holds another sweep or a damaged file."""
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            rows = [sweep_event_from_dict(r) for r in doc["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{str(self.path)!r} cannot be read ({exc}); give the sweep another directory, or delete the file "
                "to start it again"
            ) from exc
        if doc.get("plan") != self.plan:
            raise ValueError(
                f"{str(self.directory)!r} holds another sweep (its sweep.json has a different plan); give this "
                "sweep its own directory, or delete that sweep.json to start afresh"
            )
        self.rows = [r for r in rows if isinstance(r, SweepRunEnded)]
        return list(self.rows)

    def keep_current(self, fingerprint: Fingerprint) -> list[list[str]]:
        """Keep the rows :func:`~lora_widgets.sweep.fingerprint.stale_parts` lets ``fingerprint`` reuse, drop the
        others (rewriting the file when any was dropped); returns each dropped row's reasons, in order."""
        kept, stale = [], []
        for row in self.rows:
            reasons = stale_parts(row.fingerprint, fingerprint)
            if reasons:
                stale.append(reasons)
            else:
                kept.append(row)
        if stale:
            self.rows = kept
            self.save()
        return stale

    def add(self, row: SweepRunEnded) -> None:
        """Record a finished run and rewrite the file atomically."""
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Write the plan and every row (atomically)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {"version": VERSION, "plan": self.plan, "runs": [r.to_dict() for r in self.rows]}
        atomic_write_json(self.path, doc, indent=1)
