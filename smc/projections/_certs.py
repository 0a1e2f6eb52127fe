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
    """Certificate lifecycle, rebuilt from ``smc.certs``.

    State is kept per identity (the aggregate of certificate events), so events of different
    identities commute whatever order partitions are read in.
    """

    name = "certs"
    streams = frozenset({CERTS})
    #: Event types that set their aggregate\'s whole state here (earlier events of that
    #: aggregate stop mattering); lets a rebuild skip superseded records.
    replacing_types = frozenset({TrustBundleChanged.TYPE})

    def __init__(self) -> None:
        self.certs: dict[str, dict[str, CertRecord]] = {}
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
            mine = dict(self.certs.get(event.identity, {}))
            prev = self.current.get(event.identity)
            if (
                prev is not None
                and prev != event.serial
                and prev in mine
                and mine[prev].status == "active"
            ):
                mine[prev] = replace(mine[prev], status="superseded")
            mine[event.serial] = rec
            self.certs[event.identity] = mine
            self.current[event.identity] = event.serial
        elif isinstance(event, CertificateRevoked):
            mine = self.certs.get(event.identity, {})
            old = mine.get(event.serial)
            if old is not None:
                mine[event.serial] = replace(old, status="revoked", reason=event.reason)
            if self.current.get(event.identity) == event.serial:
                del self.current[event.identity]
        elif isinstance(event, TrustBundleChanged):
            self.trust[event.issuer] = tuple(event.roots_pem)

    # -- queries ----------------------------------------------------------------------------
    def current_cert(self, identity: str) -> CertRecord | None:
        serial = self.current.get(identity)
        return self.certs.get(identity, {}).get(serial) if serial else None

    def all_certs(self) -> list[CertRecord]:
        return sorted(
            (r for m in self.certs.values() for r in m.values()),
            key=lambda r: (r.identity, r.not_before, r.serial),
        )

    def revoked(self) -> set[str]:
        return {r.serial for m in self.certs.values() for r in m.values() if r.status == "revoked"}

    # -- state as data ----------------------------------------------------------------------
    def _plain(self) -> dict[str, Any]:
        return {
            "certs": {
                ident: {
                    s: [
                        _ms(r.not_before),
                        _ms(r.not_after),
                        r.issuer,
                        r.fingerprint,
                        r.status,
                        r.reason,
                    ]
                    for s, r in m.items()
                }
                for ident, m in self.certs.items()
            },
            "current": dict(self.current),
            "trust": {k: list(v) for k, v in self.trust.items()},
        }

    def digest(self) -> str:
        return canonical_digest(self._plain())

    def checkpoint(self) -> dict[str, Any]:
        return self._plain()

    def restore(self, data: dict[str, Any]) -> None:
        certs: dict[str, dict[str, CertRecord]] = {}
        for ident, m in data["certs"].items():
            certs[ident] = {
                s: CertRecord(
                    serial=s,
                    identity=ident,
                    not_before=_EPOCH + timedelta(milliseconds=nb),
                    not_after=_EPOCH + timedelta(milliseconds=na),
                    issuer=issuer,
                    fingerprint=fp,
                    status=status,
                    reason=reason,
                )
                for s, (nb, na, issuer, fp, status, reason) in m.items()
            }
        self.certs = certs
        self.current = dict(data["current"])
        self.trust = {k: tuple(v) for k, v in data["trust"].items()}
