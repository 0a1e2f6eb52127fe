"""The root of SMC's exception tree.

Role: every exception SMC raises on purpose derives from :class:`SMCError`, so a
caller can catch all of them at once; each subpackage defines its own subclasses
in a private ``_errors`` module and re-exports them from its ``__init__``.
Concurrency: plain classes, no state; safe everywhere.
"""

from __future__ import annotations

__all__ = ["SMCError"]


class SMCError(Exception):
    """Base class of every error SMC raises deliberately."""
