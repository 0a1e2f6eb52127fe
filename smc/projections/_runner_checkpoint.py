"""Checkpoints of the projection runner: a position, every projection's state, the ids
already applied and (when verifying) the verifier's state, as data.

Role: :class:`Checkpoint` (JSON form) and :class:`CheckpointStore` (one file, replaced
atomically). Split from :mod:`smc.projections._runner`, which re-exports both.
Concurrency: values; a store is used from one thread at a time.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smc.events import (
    Position,
)
from smc.projections._errors import CheckpointError

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A position plus every projection's state and the ids already applied, as data."""

    position: Position
    states: dict[str, dict[str, Any]]
    digests: dict[str, str]
    seen: frozenset[int]
    applied: int
    #: The verifier's state (chain heads, writers, held records) when the runner verifies.
    integrity: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        packed = struct.pack(f"<{len(self.seen)}Q", *sorted(self.seen))
        out = {
            "format": CHECKPOINT_FORMAT,
            "position": self.position.to_json(),
            "states": self.states,
            "digests": self.digests,
            "seen": base64.b64encode(packed).decode(),
            "applied": self.applied,
        }
        if self.integrity is not None:
            out["integrity"] = self.integrity
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        try:
            if data.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"checkpoint format {data.get('format')!r} not supported")
            raw = base64.b64decode(data["seen"])
            seen = frozenset(struct.unpack(f"<{len(raw) // 8}Q", raw))
            return cls(
                position=Position.from_json(data["position"]),
                states=dict(data["states"]),
                digests=dict(data["digests"]),
                seen=seen,
                applied=int(data["applied"]),
                integrity=data.get("integrity"),
            )
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise CheckpointError(f"checkpoint is malformed: {exc!r}") from exc


class CheckpointStore:
    """Checkpoints in one JSON file, replaced atomically (write, fsync, rename)."""

    def __init__(
        self, path: str | os.PathLike[str], *, history: str | os.PathLike[str] | None = None
    ) -> None:
        self.path = Path(path)
        #: A directory that also keeps every checkpoint saved (see ``CheckpointDir``).
        self.history = Path(history) if history is not None else None

    def load(self) -> Checkpoint | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from exc
        return Checkpoint.from_json(data)

    def save(self, cp: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cp.to_json(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self.history is not None:
            from smc.projections._checkpoints import CheckpointDir

            CheckpointDir(self.history).save(cp)
