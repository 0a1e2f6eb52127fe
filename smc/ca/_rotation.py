"""When to renew a certificate: pure, deterministic rotation policy.

Role: ``renew_at`` places the renewal point at ``fraction`` of the validity period
(2/3 by default) shifted by a jitter drawn from a hash of ``seed`` (use the identity, or
identity + serial), so every control-plane replica computes the same instant for the
same certificate while different identities spread out instead of renewing in a herd.
Concurrency: pure functions on immutable values; safe everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from smc.ca._errors import InvalidRotationPolicy
from smc.ca._model import IssuedCertificate

__all__ = ["RotationPolicy", "due_for_renewal", "renew_at"]

DEFAULT_FRACTION = 2 / 3
DEFAULT_JITTER = 0.05


def _unit(seed: str) -> float:
    """A number in [0, 1) derived from ``seed`` (SHA-256; identical on every replica)."""
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check(fraction: float, jitter: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise InvalidRotationPolicy(
            field="fraction", value=fraction, reason="must lie strictly between 0 and 1"
        )
    if jitter < 0.0 or jitter >= min(fraction, 1.0 - fraction):
        raise InvalidRotationPolicy(
            field="jitter",
            value=jitter,
            reason=f"must be >= 0 and < min(fraction, 1 - fraction) = {min(fraction, 1 - fraction):.4f}",
        )


def renew_at(
    *,
    not_before: datetime,
    not_after: datetime,
    seed: str,
    fraction: float = DEFAULT_FRACTION,
    jitter: float = DEFAULT_JITTER,
) -> datetime:
    """The instant to renew: ``not_before + lifetime * (fraction + j)`` where ``j`` is in
    ``[-jitter, +jitter)`` and fixed by ``seed``. Always strictly inside the validity."""
    _check(fraction, jitter)
    if not_after <= not_before:
        raise InvalidRotationPolicy(
            field="not_after", value=not_after.isoformat(), reason="must be after not_before"
        )
    point = fraction + (2.0 * _unit(seed) - 1.0) * jitter
    lifetime = not_after - not_before
    return not_before + timedelta(seconds=lifetime.total_seconds() * point)


def due_for_renewal(
    *,
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    seed: str,
    fraction: float = DEFAULT_FRACTION,
    jitter: float = DEFAULT_JITTER,
) -> bool:
    """True once ``now`` has reached :func:`renew_at` (and for an expired certificate)."""
    return now >= renew_at(
        not_before=not_before, not_after=not_after, seed=seed, fraction=fraction, jitter=jitter
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class RotationPolicy:
    """Lifetime of new workload certificates and when to renew them (default: 24h,
    renew at 2/3 +- 5% of the lifetime, seeded by identity and serial)."""

    lifetime: timedelta = timedelta(hours=24)
    fraction: float = DEFAULT_FRACTION
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        _check(self.fraction, self.jitter)
        if self.lifetime < timedelta(seconds=1):
            raise InvalidRotationPolicy(
                field="lifetime", value=str(self.lifetime), reason="must be at least one second"
            )

    def renew_at(self, cert: IssuedCertificate) -> datetime:
        """Renewal instant of ``cert`` (seed: ``identity|serial``)."""
        return renew_at(
            not_before=cert.not_before,
            not_after=cert.not_after,
            seed=f"{cert.identity}|{cert.serial}",
            fraction=self.fraction,
            jitter=self.jitter,
        )

    def due(self, cert: IssuedCertificate, *, now: datetime) -> bool:
        """True once ``cert`` should be renewed."""
        return now >= self.renew_at(cert)
