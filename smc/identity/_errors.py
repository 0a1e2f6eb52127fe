"""The one exception tree of ``smc.identity``.

Concurrency: plain classes; safe everywhere.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["IdentityError", "ProofRefused", "ServiceNotReady"]


class IdentityError(SMCError):
    """Base class of every error raised by ``smc.identity``."""


class ProofRefused(IdentityError, PermissionError):
    """A caller did not prove the identity it asked a certificate for.

    ``kind`` is a short stable label (counted per kind: ``token-invalid``, ``token-expired``,
    ``token-audience``, ``token-replayed``, ``service-account-deleted``, ``not-pod-bound``,
    ``proxy-mismatch``, ``join-token-*``, ``certificate-*``); ``reason`` is the detail."""

    def __init__(self, *, kind: str, reason: str) -> None:
        super().__init__(f"refused ({kind}): {reason}")
        self.kind = kind
        self.reason = reason


class ServiceNotReady(IdentityError):
    """The certificate service cannot sign yet (projections not caught up, no issuer)."""
