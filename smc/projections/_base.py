"""The ``Projection`` protocol and the canonical encoding digests are computed over.

Role: a projection is a deterministic fold over the events of some streams. ``apply`` touches
only the projection's own state, and either applies an event whole or raises leaving the state
as it was (validate first, then write). State is keyed by aggregate, so any interleaving of
partitions that keeps each aggregate's order yields the same state; ``digest`` hashes a
canonical (sorted) encoding, so it does not depend on insertion order. ``checkpoint`` returns
the state as JSON-able data, ``restore`` takes it back.
Concurrency: a projection is not thread-safe; the runner applies events and readers query it
from one thread (the asyncio loop, or the CLI's thread).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, runtime_checkable

from smc.events import Event

__all__ = ["Projection", "canonical_digest", "canonical_json"]


@runtime_checkable
class Projection(Protocol):
    name: str
    streams: frozenset[str]
    #: Event types (Avro full names) after which the aggregate's earlier events no longer
    #: affect this projection's state. Empty means "every event matters".
    replacing_types: frozenset[str]

    def apply(self, event: Event) -> None: ...

    def digest(self) -> str: ...

    def checkpoint(self) -> dict[str, Any]: ...

    def restore(self, data: dict[str, Any]) -> None: ...


def canonical_json(data: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_digest(data: Any) -> str:
    """sha256 over :func:`canonical_json` of ``data``, hex."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()
