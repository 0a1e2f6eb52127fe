"""Certificate projection: the lifecycle of every workload certificate and the trust bundles.

Role: folds ``smc.certs`` events into, per identity, the current certificate (serial, validity,
issuer, fingerprint), every serial ever issued with its status (active, superseded, revoked),
and the trusted roots per issuer; and, per proxy (node id), the certificates signed over the
CSRs of its agent (``ProxyCertificateIssued`` / ``ProxyCertificateRevoked``) and the one-time
join tokens made for VMs (by SHA-256, with the certificate that used each). No key material
ever reaches it: events carry none.
Concurrency: single-threaded (see :mod:`smc.projections._base`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from smc.events import (
    CERTS,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Event,
    JoinTokenIssued,
    ProxyCertificateIssued,
    ProxyCertificateRevoked,
    TrustBundleChanged,
)
from smc.projections._base import canonical_digest

__all__ = ["CertRecord", "CertsProjection", "JoinToken", "ProxyCertRecord"]

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


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyCertRecord:
    """One proxy's certificate (its key is the agent's, on the proxy's host)."""

    proxy: str
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str
    proof: str
    status: str = "active"  # active | superseded | revoked
    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinToken:
    """A VM's one-time join token, by digest; ``used_by`` is the serial it got (or "")."""

    token_sha256: str
    proxy: str
    identity: str
    expires_at: datetime
    used_by: str = ""


def _token_key(t: JoinToken) -> tuple[str, str, datetime]:
    return (t.proxy, t.identity, t.expires_at)


_Rec = TypeVar("_Rec", CertRecord, ProxyCertRecord)


def _issued(
    records: dict[str, dict[str, _Rec]], current: dict[str, str], key: str, record: _Rec
) -> None:
    """Fold an issued certificate of ``key`` (an identity or a proxy): it becomes current, and
    the one it replaces, if still active, is superseded."""
    mine = dict(records.get(key, {}))
    prev = current.get(key)
    if (
        prev is not None
        and prev != record.serial
        and prev in mine
        and mine[prev].status == "active"
    ):
        mine[prev] = replace(mine[prev], status="superseded")
    mine[record.serial] = record
    records[key] = mine
    current[key] = record.serial


def _revoked(
    records: dict[str, dict[str, _Rec]], current: dict[str, str], key: str, serial: str, reason: str
) -> None:
    """Fold a revocation of ``key``'s certificate ``serial`` (no longer current if it was)."""
    mine = records.get(key, {})
    old = mine.get(serial)
    if old is not None:
        mine[serial] = replace(old, status="revoked", reason=reason)
    if current.get(key) == serial:
        del current[key]


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
        #: proxy node id -> serial -> record; proxy -> its current serial
        self.proxy_certs: dict[str, dict[str, ProxyCertRecord]] = {}
        self.proxy_current: dict[str, str] = {}
        self.join_tokens: dict[str, JoinToken] = {}  # by digest, without used_by
        self.join_used: dict[str, str] = {}  # digest -> serial of the certificate it got

    def _apply_proxy(self, event: Event) -> None:
        if isinstance(event, ProxyCertificateIssued):
            record = ProxyCertRecord(
                proxy=event.proxy,
                serial=event.serial,
                identity=event.identity,
                not_before=event.not_before,
                not_after=event.not_after,
                issuer=event.issuer,
                fingerprint=event.fingerprint,
                proof=event.proof,
            )
            _issued(self.proxy_certs, self.proxy_current, event.proxy, record)
            kind, _, digest = event.proof.partition(":")
            if kind == "join-token":  # the smallest serial wins: independent of read order
                used = self.join_used.get(digest)
                if used is None or event.serial < used:
                    self.join_used[digest] = event.serial
        elif isinstance(event, ProxyCertificateRevoked):
            _revoked(self.proxy_certs, self.proxy_current, event.proxy, event.serial, event.reason)
        elif isinstance(event, JoinTokenIssued):
            token = JoinToken(
                token_sha256=event.token_sha256,
                proxy=event.proxy,
                identity=event.identity,
                expires_at=event.expires_at,
            )
            held = self.join_tokens.get(event.token_sha256)
            # one digest per token; were one repeated, the smallest record wins in any order
            if held is None or _token_key(token) < _token_key(held):
                self.join_tokens[event.token_sha256] = token

    def apply(self, event: Event) -> None:
        if isinstance(event, ProxyCertificateIssued | ProxyCertificateRevoked | JoinTokenIssued):
            self._apply_proxy(event)
        elif isinstance(event, CertificateIssued | CertificateRenewed):
            rec = CertRecord(
                serial=event.serial,
                identity=event.identity,
                not_before=event.not_before,
                not_after=event.not_after,
                issuer=event.issuer,
                fingerprint=event.fingerprint,
            )
            _issued(self.certs, self.current, event.identity, rec)
        elif isinstance(event, CertificateRevoked):
            _revoked(self.certs, self.current, event.identity, event.serial, event.reason)
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

    def proxy_cert(self, proxy: str) -> ProxyCertRecord | None:
        """The current certificate of proxy ``proxy`` (node id), or None."""
        serial = self.proxy_current.get(proxy)
        return self.proxy_certs.get(proxy, {}).get(serial) if serial else None

    def join_token(self, digest: str) -> JoinToken | None:
        """The join token with SHA-256 ``digest`` (``used_by`` set once used), or None."""
        token = self.join_tokens.get(digest)
        if token is None:
            return None
        return replace(token, used_by=self.join_used.get(digest, ""))

    def proxy_serial(self, serial: str) -> ProxyCertRecord | None:
        """The proxy certificate with ``serial`` (any proxy, any status), or None."""
        for m in self.proxy_certs.values():
            found = m.get(serial)
            if found is not None:
                return found
        return None

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
            **self._plain_proxies(),
        }

    def _plain_proxies(self) -> dict[str, Any]:
        # Only present once a proxy certificate or join token exists, so the digest of a log
        # without any stays what it was before proxy certificates existed.
        if not (self.proxy_certs or self.join_tokens or self.join_used):
            return {}
        return {
            "proxy_certs": {
                proxy: {
                    s: [
                        r.identity,
                        _ms(r.not_before),
                        _ms(r.not_after),
                        r.issuer,
                        r.fingerprint,
                        r.proof,
                        r.status,
                        r.reason,
                    ]
                    for s, r in m.items()
                }
                for proxy, m in self.proxy_certs.items()
            },
            "proxy_current": dict(self.proxy_current),
            "join_tokens": {
                d: [t.proxy, t.identity, _ms(t.expires_at)] for d, t in self.join_tokens.items()
            },
            "join_used": dict(self.join_used),
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
        self.proxy_certs = {
            proxy: {
                s: ProxyCertRecord(
                    proxy=proxy,
                    serial=s,
                    identity=ident,
                    not_before=_EPOCH + timedelta(milliseconds=nb),
                    not_after=_EPOCH + timedelta(milliseconds=na),
                    issuer=issuer,
                    fingerprint=fp,
                    proof=proof,
                    status=status,
                    reason=reason,
                )
                for s, (ident, nb, na, issuer, fp, proof, status, reason) in m.items()
            }
            for proxy, m in data.get("proxy_certs", {}).items()
        }
        self.proxy_current = dict(data.get("proxy_current", {}))
        self.join_tokens = {
            d: JoinToken(
                token_sha256=d,
                proxy=proxy,
                identity=ident,
                expires_at=_EPOCH + timedelta(milliseconds=exp),
            )
            for d, (proxy, ident, exp) in data.get("join_tokens", {}).items()
        }
        self.join_used = dict(data.get("join_used", {}))
