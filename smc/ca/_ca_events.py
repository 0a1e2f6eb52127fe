"""The CA's events: the public facts of a certificate's life, with deterministic ids.

Role: builds ``CertificateIssued`` / ``CertificateRenewed`` / ``CertificateRevoked`` and
``TrustBundleChanged`` (never a key) so that every replica appending the same fact appends
the same event id.
Concurrency: pure functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from smc.ca._model import IssuedCertificate
from smc.events import (
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    TrustBundleChanged,
    deterministic_id,
    make_event,
)

SOURCE = "smc-ca"


# ---------------------------------------------------------------------- events
def certificate_event(
    cert: IssuedCertificate,
    *,
    previous_serial: str | None = None,
    source: str = SOURCE,
    actor: str = "ca",
    occurred_at: datetime | None = None,
) -> CertificateIssued | CertificateRenewed:
    """``CertificateIssued`` (or ``CertificateRenewed`` with ``previous_serial``) carrying
    :meth:`IssuedCertificate.record` and ``not_before``: never a key. Event id:
    ``deterministic_id("ca", identity, serial)``."""
    rec = cert.record()
    facts: dict[str, Any] = {
        "serial": rec.serial,
        "identity": rec.identity,
        "not_before": cert.not_before,
        "not_after": rec.not_after,
        "issuer": rec.issuer,
        "fingerprint": rec.fingerprint,
    }
    event_id = deterministic_id("ca", rec.identity, rec.serial)
    if previous_serial is None:
        return make_event(
            CertificateIssued,
            source=source,
            actor=actor,
            occurred_at=occurred_at,
            event_id=event_id,
            **facts,
        )
    return make_event(
        CertificateRenewed,
        source=source,
        actor=actor,
        occurred_at=occurred_at,
        event_id=event_id,
        previous_serial=previous_serial,
        **facts,
    )


def revocation_event(
    *,
    identity: str,
    serial: str,
    reason: str,
    source: str = SOURCE,
    actor: str = "ca",
    occurred_at: datetime | None = None,
) -> CertificateRevoked:
    """``CertificateRevoked``; id ``deterministic_id("ca", "revoke", identity, serial)`` so
    replicas revoking the same certificate append it once."""
    return make_event(
        CertificateRevoked,
        source=source,
        actor=actor,
        occurred_at=occurred_at,
        event_id=deterministic_id("ca", "revoke", identity, serial),
        serial=serial,
        identity=identity,
        reason=reason,
    )


def _bundle_digest(roots: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(roots).encode("ascii")).hexdigest()


def trust_bundle_event(
    *,
    issuer: str,
    roots: Sequence[str],
    previous: Sequence[str],
    source: str = SOURCE,
    actor: str = "ca",
    salt: str = "",
) -> TrustBundleChanged:
    """``TrustBundleChanged`` (PEM roots only); id from the issuer and the digests of
    the previous and new bundles (plus ``salt`` to re-record a bundle seen before)."""
    parts = ["ca", "trust", issuer, _bundle_digest(previous), _bundle_digest(roots)]
    if salt:
        parts.append(salt)
    return make_event(
        TrustBundleChanged,
        source=source,
        actor=actor,
        event_id=deterministic_id(*parts),
        issuer=issuer,
        roots_pem=tuple(roots),
    )
