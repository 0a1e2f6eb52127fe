"""Certificate projection: the lifecycle of every workload certificate and the trust bundles.

Role: folds ``smc.certs`` events into, per identity, the current certificate (serial, validity,
issuer, fingerprint), every serial ever issued with its status (active, superseded, revoked),
and the trusted roots per issuer. No key material ever reaches it: events carry none.
Concurrency: single-threaded (see :mod:`smc.projections._base`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from smc.events import (
    CERTS,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Event,
    TrustBundleChanged,
)
from smc.projections._base import canonical_digest

__all__ = ["CertRecord", "CertsProjection"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class CertRecord:
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str
    status: str = "active"  # active | superseded | revoked
    reason: str = ""


class CertsProjection:
    """Certificate lifecycle, rebuilt from ``smc.certs``."""

    name = "certs"
    streams = frozenset({CERTS})

    def __init__(self) -> None:
        self.by_serial: dict[str, CertRecord] = {}
        self.current: dict[str, str] = {}
        self.trust: dict[str, tuple[str, ...]] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, CertificateIssued | CertificateRenewed):
            rec = CertRecord(
                serial=event.serial,
                identity=event.identity,
                not_before=event.not_before,
                not_after=event.not_after,
                issuer=event.issuer,
                fingerprint=event.fingerprint,
            )
            prev = self.current.get(event.identity)
            self.by_serial[event.serial] = rec
            self.current[event.identity] = event.serial
            if prev is not None and prev != event.serial and prev in self.by_serial:
                old = self.by_serial[prev]
                if old.status == "active":
                    self.by_serial[prev] = replace(old, status="superseded")
        elif isinstance(event, CertificateRevoked):
            revoked = self.by_serial.get(event.serial)
            if revoked is not None:
                self.by_serial[event.serial] = replace(
                    revoked, status="revoked", reason=event.reason
                )
            if self.current.get(event.identity) == event.serial:
                del self.current[event.identity]
        elif isinstance(event, TrustBundleChanged):
            self.trust[event.issuer] = tuple(event.roots_pem)

    # -- queries ----------------------------------------------------------------------------
    def current_cert(self, identity: str) -> CertRecord | None:
        serial = self.current.get(identity)
        return self.by_serial.get(serial) if serial else None

    def revoked(self) -> set[str]:
        return {s for s, r in self.by_serial.items() if r.status == "revoked"}

    # -- state as data ----------------------------------------------------------------------
    def _plain(self) -> dict[str, Any]:
        return {
            "certs": {
                s: [
                    r.identity,
                    _ms(r.not_before),
                    _ms(r.not_after),
                    r.issuer,
                    r.fingerprint,
                    r.status,
                    r.reason,
                ]
                for s, r in self.by_serial.items()
            },
            "current": dict(self.current),
            "trust": {k: list(v) for k, v in self.trust.items()},
        }

    def digest(self) -> str:
        return canonical_digest(self._plain())

    def checkpoint(self) -> dict[str, Any]:
        return self._plain()

    def restore(self, data: dict[str, Any]) -> None:
        by_serial = {}
        for s, (ident, nb, na, issuer, fp, status, reason) in data["certs"].items():
            by_serial[s] = CertRecord(
                serial=s,
                identity=ident,
                not_before=_EPOCH + timedelta(milliseconds=nb),
                not_after=_EPOCH + timedelta(milliseconds=na),
                issuer=issuer,
                fingerprint=fp,
                status=status,
                reason=reason,
            )
        self.by_serial = by_serial
        self.current = dict(data["current"])
        self.trust = {k: tuple(v) for k, v in data["trust"].items()}
