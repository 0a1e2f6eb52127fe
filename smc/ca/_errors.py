"""Errors of the certificate issuers (``smc.ca``).

Role: the one exception tree of this package; every class derives from
:class:`CAError`, itself a :class:`smc.errors.SMCError`.
Concurrency: plain classes, no state; safe everywhere.

No message built here ever carries a private key, a token or any other credential:
callers put only identities, serials, paths, URLs and server error texts in them.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = [
    "CAError",
    "CAStateError",
    "CertificateVerificationError",
    "InvalidCSR",
    "InvalidIdentity",
    "InvalidLifetime",
    "InvalidRotationPolicy",
    "InvalidSerial",
    "IssuerRejected",
    "IssuerUnavailable",
    "KeyFilePermissionError",
]


class CAError(SMCError):
    """Base class of every error raised by ``smc.ca``."""


class InvalidIdentity(CAError, ValueError):
    """A SPIFFE identity is malformed, or lies outside the issuer's trust domain.

    ``part`` names the faulty component (``scheme``, ``trust-domain``, ``path``,
    ``namespace``, ``service-account``...).
    """

    def __init__(self, value: str, *, part: str, reason: str) -> None:
        self.value = value
        self.part = part
        self.reason = reason
        super().__init__(f"invalid SPIFFE identity {value!r}: {part}: {reason}")


class InvalidSerial(CAError, ValueError):
    """A certificate serial number is not a hexadecimal string."""

    def __init__(self, value: str, *, reason: str) -> None:
        self.value = value
        super().__init__(f"invalid certificate serial {value!r}: {reason}")


class InvalidLifetime(CAError, ValueError):
    """A requested certificate lifetime is not positive or exceeds the issuer's bound."""

    def __init__(self, lifetime: object, *, reason: str) -> None:
        self.lifetime = lifetime
        super().__init__(f"invalid certificate lifetime {lifetime!s}: {reason}")


class InvalidRotationPolicy(CAError, ValueError):
    """A renewal fraction, jitter or backoff parameter is out of range."""

    def __init__(self, *, field: str, value: object, reason: str) -> None:
        self.field = field
        super().__init__(f"invalid {field}={value!r}: {reason}")


class KeyFilePermissionError(CAError, PermissionError):
    """A CA key file is readable or writable by other users than its owner."""

    def __init__(self, path: str, *, mode: int) -> None:
        self.path = path
        self.mode = mode
        super().__init__(
            f"CA key file {path} has mode {mode:04o}; it must be 0600 (owner read/write only)"
            f" or stricter: run `chmod 600 {path}`"
        )


class CAStateError(CAError):
    """The issuer's on-disk or configured state does not allow the operation
    (for example: retiring the active root, a corrupt CA directory)."""


class CertificateVerificationError(CAError):
    """A certificate does not chain to the trust bundle, is expired, or carries no
    valid SPIFFE identity."""


class IssuerUnavailable(CAError):
    """The issuer cannot be reached or cannot serve now (connection refused, timeout,
    5xx, sealed Vault). Retrying later may succeed; existing certificates stay valid."""

    def __init__(self, message: str, *, issuer: str, operation: str) -> None:
        self.issuer = issuer
        self.operation = operation
        super().__init__(f"issuer {issuer!r} unavailable during {operation}: {message}")


class IssuerRejected(CAError):
    """The issuer answered and refused the request (permission denied, role does not
    allow the identity, bad CSR, unknown serial). Retrying the same request will not help."""

    def __init__(self, message: str, *, issuer: str, operation: str) -> None:
        self.issuer = issuer
        self.operation = operation
        super().__init__(f"issuer {issuer!r} rejected {operation}: {message}")


class InvalidCSR(CAError, ValueError):
    """A certificate signing request that cannot be signed (names the faulty part)."""

    def __init__(self, *, part: str, reason: str) -> None:
        super().__init__(f"CSR {part}: {reason}")
        self.part = part
        self.reason = reason
