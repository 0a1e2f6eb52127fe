"""Errors of ``smc demo``.

Role: one exception tree for :mod:`smc.demo` (subclasses of :class:`smc.errors.SMCError`); the CLI
prints them as one line and exits 1. Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["DemoError"]


class DemoError(SMCError):
    """The demo could not be set up or run; the message names the step and the reason."""
