"""Errors of the event layer (codec and logs).

Role: one exception tree for ``smc.events``; every error names where it happened.
Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = [
    "DecodeError",
    "EventError",
    "InvalidEvent",
    "LogCorrupt",
    "LogError",
    "LogFull",
    "LogUnavailable",
    "UnknownSchema",
]


class EventError(SMCError):
    """Base of every error raised by :mod:`smc.events`."""


class InvalidEvent(EventError):
    """An event cannot be built or encoded: a field is missing or has the wrong type."""

    def __init__(self, *, event_type: str, field: str, reason: str) -> None:
        self.event_type = event_type
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {event_type}: field {field!r}: {reason}")


class DecodeError(EventError):
    """A record on the log cannot be decoded; names the record's position."""

    def __init__(self, *, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"cannot decode record at {where}: {reason}")


class UnknownSchema(DecodeError):
    """A record's writer-schema fingerprint matches no schema in ``schemas/``."""


class LogError(EventError):
    """The log refused an operation."""


class LogUnavailable(LogError):
    """The log cannot be reached (after retries, where the caller asked for them)."""


class LogFull(LogUnavailable):
    """An append failed because the disk holding the log is full; nothing was appended."""


class LogCorrupt(LogError):
    """The log's storage is damaged where a record should be read; names the record.

    Not retried: serve stops (exit 1) and ``/healthz`` fails, so a supervisor notices."""

    def __init__(self, *, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"the event log is corrupt at {where}: {reason}")
