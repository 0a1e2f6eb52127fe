"""The one exception tree of ``smc.agent``.

Concurrency: plain classes; safe everywhere.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["AgentError", "InvalidMessage", "SigningRefused"]


class AgentError(SMCError):
    """Base class of every error raised by ``smc.agent``."""


class InvalidMessage(AgentError, ValueError):
    """A certificate-service message that is not well formed (names the field)."""


class SigningRefused(AgentError):
    """The control plane refused to sign (``code`` is the gRPC status name)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
