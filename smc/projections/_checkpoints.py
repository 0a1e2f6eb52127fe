"""Checkpoint history: many checkpoints of one log in a directory, for travel to any point.

Role: :class:`CheckpointDir` keeps a checkpoint per save (``cp-<applied>.json``, written
atomically) and picks the newest one at or before a position, so rebuilding the state as
of a past point replays only the records after that checkpoint. ``smc serve
--checkpoint-history DIR`` adds one at every checkpoint save; ``smc proxy config --at`` and
``smc policy check --at`` start from them (a verifying runner still proves each one's chain
heads against the log before trusting it).
Concurrency: files are replaced atomically; readers skip unreadable files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smc.events import Position
from smc.projections._errors import CheckpointError
from smc.projections._runner_checkpoint import Checkpoint

__all__ = ["CheckpointDir"]


class CheckpointDir:
    """A directory of checkpoints (``cp-<applied>.json``), for fast travel to any point:
    :meth:`save` adds one, :meth:`best_for` picks the newest one at or before a position."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save(self, cp: Checkpoint) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        out = self.path / f"cp-{cp.applied:012d}.json"
        for path, data in (
            (out, cp.to_json()),
            # the position alone, so picking a checkpoint reads no state
            (out.with_suffix(".position"), cp.position.to_json()),
        ):
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "w") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        return out

    def best_for(self, position: Position) -> Checkpoint | None:
        """The newest checkpoint at or before ``position`` (None if there is none)."""
        found = sorted(self.path.glob("cp-*.position"), reverse=True) if self.path.exists() else []
        for f in found:
            try:
                at = Position.from_json(json.loads(f.read_text()))
                if not position.covers(at):
                    continue
                return Checkpoint.from_json(json.loads(f.with_suffix(".json").read_text()))
            except (OSError, ValueError, CheckpointError):
                continue
        return None
