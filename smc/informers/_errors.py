"""Errors of the informers package (VM providers).

Role: one exception tree for :mod:`smc.informers`. Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["InformersError", "ProviderNotFound"]


class InformersError(SMCError):
    """Base of every error raised by :mod:`smc.informers`."""


class ProviderNotFound(InformersError):
    """No VM provider of that name is registered (entry point group ``smc.vm_providers``)."""
