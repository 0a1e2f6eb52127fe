"""The ``EventLog`` protocol every log backend implements, and the values it trades in.

Role: the narrow interface between sources/projections and storage. A log holds one stream per
domain (``smc.registry``, ``smc.policy``, ``smc.certs``), each split in partitions; records of
one aggregate stay in one partition, in order. A :class:`Position` is the next offset to read per
(stream, partition). Records carry raw bytes: decoding is the codec's job (raw payloads stay
apart from translation).
Concurrency: implementations document their own; the protocol is synchronous (blocking) so it
can be driven from a thread (``asyncio.to_thread``) or a plain CLI.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol, runtime_checkable

from smc.events._integrity import Signer
from smc.events._types import Event

__all__ = ["Appended", "EventLog", "Position", "Record", "TopicPartition"]

TopicPartition = tuple[str, int]


class Record(NamedTuple):
    """One record as stored: where it is, when it was appended, and its encoded event.

    ``event_type`` and ``event_id`` repeat what the encoded value holds (SQLite columns, Kafka
    headers) so replay can route and de-duplicate records without decoding them; empty when
    the backend did not store them.
    """

    stream: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str
    value: bytes
    event_type: str = ""
    event_id: str = ""
    #: Integrity data (see ``docs/log-integrity.md``): the writer session a ``WRITER``-mode
    #: record names, and the seal closing a batch (empty on every other record).
    writer: bytes = b""
    seal: bytes = b""
    #: Kafka, seal version 3: on the first record of a batch, the batch's size (else 0).
    batch: int = 0

    @property
    def where(self) -> str:
        return f"{self.stream}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Appended:
    """Outcome of appending one event: where it lives and whether it was new."""

    event_id: str
    stream: str
    partition: int
    offset: int
    duplicate: bool


class Position:
    """Next offset to read per (stream, partition); immutable; JSON-friendly via ``to_json``."""

    __slots__ = ("_offsets",)

    def __init__(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self._offsets: dict[TopicPartition, int] = dict(offsets or {})

    def get(self, tp: TopicPartition) -> int:
        return self._offsets.get(tp, 0)

    def items(self) -> Iterator[tuple[TopicPartition, int]]:
        return iter(sorted(self._offsets.items()))

    def advanced(self, records: Sequence[Record]) -> Position:
        """The position after ``records`` (in order within each partition, as logs return)."""
        offsets = dict(self._offsets)
        for r in records:
            offsets[(r[0], r[1])] = r[2] + 1
        return Position(offsets)

    def covers(self, other: Position) -> bool:
        """True when this position is at or past ``other`` on every partition ``other`` names."""
        return all(self.get(tp) >= off for tp, off in other.items())

    def to_json(self) -> dict[str, int]:
        return {f"{s}:{p}": o for (s, p), o in self.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Position:
        out: dict[TopicPartition, int] = {}
        for k, v in data.items():
            stream, _, part = k.rpartition(":")
            out[(stream, int(part))] = int(v)
        return cls(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Position) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(tuple(self.items()))

    def __repr__(self) -> str:
        return f"Position({self.to_json()})"


@runtime_checkable
class EventLog(Protocol):
    """A durable, append-only, partitioned log of encoded events."""

    url: str
    #: True when the backend itself drops an append whose event id it already holds.
    dedupes_on_append: bool
    #: Seals appends that name no signer (None: appends are not sealed).
    signer: Signer | None

    def append(self, events: Sequence[Event], *, signer: Signer | None = None) -> list[Appended]:
        """Append events durably; returns once every one is acknowledged (or raises).

        Idempotent by event id where ``dedupes_on_append``; otherwise duplicates may be stored
        and the projection runner drops them by id. With a signer (``signer``, else the log's
        own), the batch is sealed (``docs/log-integrity.md``).
        """
        ...

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        """Records at or after ``start``, in order within each partition.

        Waits up to ``timeout`` seconds for at least one record when none is available yet.
        """
        ...

    def end_position(self) -> Position:
        """The position just past the last record of every partition (the high watermarks)."""
        ...

    def position_at(self, when: datetime) -> Position:
        """The first position whose records were appended at or after ``when``."""
        ...

    def close(self) -> None: ...
