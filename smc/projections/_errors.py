"""Errors of the projection layer.

Role: one exception tree for ``smc.projections``. Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["CheckpointError", "ProjectionError", "ProjectionsError"]


class ProjectionsError(SMCError):
    """Base of every error raised by :mod:`smc.projections`."""


class ProjectionError(ProjectionsError):
    """An event could not be applied; the projection's state is unchanged."""

    def __init__(self, *, projection: str, where: str, reason: str) -> None:
        self.projection = projection
        self.where = where
        self.reason = reason
        super().__init__(f"projection {projection} cannot apply record at {where}: {reason}")


class CheckpointError(ProjectionsError):
    """A checkpoint cannot be read, or does not fit the projections it is restored into."""
