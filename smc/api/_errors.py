"""Errors of the mesh-change service and the HTTP API.

Role: one exception tree for :mod:`smc.api`. Per-document problems are not exceptions here (they
are reported per document in a :class:`~smc.api.ChangeReport`); these are whole-request failures.
Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["ApiError", "BodyError", "ChangeNotApplied"]


class ApiError(SMCError):
    """Base of every error raised by :mod:`smc.api`."""


class BodyError(ApiError):
    """A request body cannot be read at all (not UTF-8, empty, malformed JSON envelope)."""

    def __init__(self, *, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"request body{' field ' + field if field else ''}: {reason}")


class ChangeNotApplied(ApiError):
    """Events were appended but the projections did not reach them in time."""
