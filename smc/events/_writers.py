"""Writers of the log: their identities, the trust placed in their certificates, and what
each role is entitled to append.

Role: a writer is named by a mesh-CA certificate for
``spiffe://<trust-domain>/ns/smc-writers/sa/<role>.<name>``; the role decides which event
types its records may carry (:data:`ENTITLEMENTS`): only the CA writes certificate events,
informers registry events and the SMI resources of their cluster, VM providers registry
events, the API and operators registry and policy events. :class:`WriterTrust` checks a
writer's certificate chain against the trust roots at the time a seal says it was signed
(so rotated or expired writer keys keep verifying the records they sealed while valid) and
refuses seals made after a writer certificate was revoked.
Concurrency: :class:`WriterTrust` caches verified writers; use one per thread (the runner's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from smc.events._integrity import IntegrityError, key_id
from smc.events._types import CERTS, EVENT_TYPES, POLICY, REGISTRY

__all__ = [
    "ENTITLEMENTS",
    "ROLES",
    "SEAL_V3_SINCE",
    "WRITER_NAMESPACE",
    "Writer",
    "WriterTrust",
    "entitled",
    "parse_writer_identity",
    "writer_identity",
]

WRITER_NAMESPACE = "smc-writers"
#: Since when SMC seals with version 3 (both backends). A writer certificate valid from this
#: time on was issued for an SMC that seals with version 3 only, so a seal of an older
#: version under it is a downgrade (refused: it would skip the impersonation re-check);
#: certificates issued before keep verifying the older versions they sealed.
SEAL_V3_SINCE = datetime(2026, 12, 7, 18, 15, tzinfo=UTC)
ROLES = ("ca", "informer", "provider", "api", "operator")
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_URI = re.compile(
    r"spiffe://(?P<td>[a-z0-9._-]+)/ns/" + WRITER_NAMESPACE + r"/sa/(?P<role>[a-z]+)\.(?P<name>.+)"
)


def _types(*streams: str) -> frozenset[str]:
    return frozenset(t for t, cls in EVENT_TYPES.items() if cls.STREAM in streams)


_SMI = frozenset({"smc.policy.SmiResourceApplied", "smc.policy.SmiResourceDeleted"})

#: Event types each writer role may append.
ENTITLEMENTS: Mapping[str, frozenset[str]] = {
    "ca": _types(CERTS),
    "informer": _types(REGISTRY) | _SMI,
    "provider": _types(REGISTRY),
    "api": _types(REGISTRY, POLICY),
    "operator": _types(REGISTRY, POLICY),
}


def writer_identity(*, trust_domain: str, role: str, name: str) -> str:
    """The SPIFFE id a writer certificate carries."""
    if role not in ROLES:
        raise IntegrityError(f"writer role {role!r} unknown; one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name) or len(name) > 200:
        raise IntegrityError(
            f"writer name {name!r} must be lowercase alphanumerics and '-', "
            "starting and ending with an alphanumeric"
        )
    return f"spiffe://{trust_domain}/ns/{WRITER_NAMESPACE}/sa/{role}.{name}"


def parse_writer_identity(uri: str) -> tuple[str, str, str] | None:
    """``(trust_domain, role, name)`` of a writer identity, None for anything else."""
    m = _URI.fullmatch(uri)
    if m is None or m["role"] not in ROLES or not _NAME.fullmatch(m["name"]):
        return None
    return m["td"], m["role"], m["name"]


def entitled(role: str, event_type: str) -> bool:
    """May a writer of ``role`` append an event of ``event_type``?"""
    return event_type in ENTITLEMENTS.get(role, frozenset())


@dataclass(frozen=True, slots=True)
class Writer:
    """A verified writer: who (identity, role, name) and the key its seals verify with."""

    key_id: bytes
    identity: str
    role: str
    name: str
    serial: int
    not_before: datetime
    not_after: datetime
    public_key: ec.EllipticCurvePublicKey = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.role}.{self.name}"


class WriterTrust:
    """Trust roots (PEM) plus revoked writer serials (serial -> revocation time)."""

    def __init__(
        self,
        *,
        roots_pem: Iterable[str],
        revoked: Mapping[int, datetime] | None = None,
        trust_domain: str | None = None,
    ) -> None:
        self.roots = [c for pem in roots_pem for c in x509.load_pem_x509_certificates(pem.encode())]
        if not self.roots:
            raise IntegrityError("writer trust: no root certificate given")
        self.revoked = dict(revoked or {})
        self.trust_domain = trust_domain
        self._store = Store(self.roots)

    @classmethod
    def from_file(cls, path: str, **kw: object) -> WriterTrust:
        try:
            with open(path) as f:
                pem = f.read()
        except OSError as exc:
            raise IntegrityError(f"cannot read trust roots {path}: {exc}") from exc
        try:
            return cls(roots_pem=[pem], **kw)  # type: ignore[arg-type]
        except ValueError as exc:
            raise IntegrityError(f"trust roots {path} are not PEM certificates: {exc}") from exc

    def writer(self, certs: tuple[bytes, ...], *, at: datetime) -> Writer:
        """Verify a writer certificate chain (leaf first, DER) as of ``at``."""
        try:
            parsed = [x509.load_der_x509_certificate(c) for c in certs]
        except ValueError as exc:
            raise IntegrityError(f"writer certificate is not DER: {exc}") from exc
        leaf = parsed[0]
        verifier = PolicyBuilder().store(self._store).time(at).build_client_verifier()
        try:
            verified = verifier.verify(leaf, [c for c in parsed[1:] if c.subject != c.issuer])
        except VerificationError as exc:
            raise IntegrityError(f"writer certificate does not verify: {exc}") from exc
        uris = [
            s.value
            for s in verified.subjects or []
            if isinstance(s, x509.UniformResourceIdentifier)
        ]
        who = parse_writer_identity(uris[0]) if len(uris) == 1 else None
        if who is None:
            raise IntegrityError(f"certificate {uris} does not name a log writer")
        td, role, name = who
        if self.trust_domain is not None and td != self.trust_domain:
            raise IntegrityError(f"writer {uris[0]} is outside trust domain {self.trust_domain}")
        pub = leaf.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise IntegrityError("writer key is not an EC key")
        return Writer(
            key_id=key_id(certs[0]),
            identity=uris[0],
            role=role,
            name=name,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            public_key=pub,
        )

    def revoked_at(self, serial: int) -> datetime | None:
        return self.revoked.get(serial)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
