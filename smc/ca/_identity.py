"""SPIFFE identities of workloads: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

Role: parse, validate and format the identity a certificate's URI SAN carries.
Validation follows the SPIFFE ID rules (lowercase trust domain of ``[a-z0-9._-]``, no
port, user info, query or fragment, no empty, ``.`` or ``..`` segments) and, for the
path, Kubernetes naming (namespace: DNS-1123 label; service account: DNS-1123
subdomain). Errors name the faulty part.
Concurrency: pure functions and immutable values; safe from any thread or task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smc.ca._errors import InvalidIdentity

__all__ = [
    "SpiffeId",
    "format_spiffe_id",
    "issuer_identity",
    "parse_spiffe_id",
    "validate_trust_domain",
]

_SCHEME = "spiffe://"
_MAX_URI = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")


def validate_trust_domain(trust_domain: str, *, value: str | None = None) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain name, else raise
    :class:`InvalidIdentity` (``value`` is the full identity quoted in the error)."""
    shown = trust_domain if value is None else value
    if not trust_domain:
        raise InvalidIdentity(shown, part="trust-domain", reason="is empty")
    if len(trust_domain) > 255:
        raise InvalidIdentity(shown, part="trust-domain", reason="longer than 255 characters")
    if ":" in trust_domain:
        raise InvalidIdentity(shown, part="trust-domain", reason="must not carry a port")
    if "@" in trust_domain:
        raise InvalidIdentity(shown, part="trust-domain", reason="must not carry user info")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        bad = next(c for c in trust_domain if not _TRUST_DOMAIN.fullmatch(c))
        raise InvalidIdentity(
            shown,
            part="trust-domain",
            reason=f"character {bad!r} not allowed (only lowercase a-z, 0-9, '.', '-', '_')",
        )
    return trust_domain


def _check_namespace(namespace: str, value: str) -> None:
    if not namespace:
        raise InvalidIdentity(value, part="namespace", reason="is empty")
    if len(namespace) > 63:
        raise InvalidIdentity(value, part="namespace", reason="longer than 63 characters")
    if not _DNS_LABEL.fullmatch(namespace):
        raise InvalidIdentity(
            value,
            part="namespace",
            reason=f"{namespace!r} is not a DNS-1123 label (lowercase alphanumerics and '-',"
            " starting and ending with an alphanumeric)",
        )


def _check_service_account(sa: str, value: str) -> None:
    if not sa:
        raise InvalidIdentity(value, part="service-account", reason="is empty")
    if len(sa) > 253:
        raise InvalidIdentity(value, part="service-account", reason="longer than 253 characters")
    if not _DNS_SUBDOMAIN.fullmatch(sa) or ".." in sa:
        raise InvalidIdentity(
            value,
            part="service-account",
            reason=f"{sa!r} is not a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.',"
            " starting and ending with an alphanumeric)",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class SpiffeId:
    """A validated workload identity. Build it with :func:`parse_spiffe_id` or
    :meth:`SpiffeId.of`; ``str(identity)`` is the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def of(cls, *, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """Validate the three parts and build the identity."""
        uri = f"{_SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        validate_trust_domain(trust_domain, value=uri)
        _check_namespace(namespace, uri)
        _check_service_account(service_account, uri)
        return cls(trust_domain=trust_domain, namespace=namespace, service_account=service_account)

    @property
    def uri(self) -> str:
        """The identity as a ``spiffe://`` URI."""
        return f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def format_spiffe_id(*, trust_domain: str, namespace: str, service_account: str) -> str:
    """Return the validated URI ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""
    return SpiffeId.of(
        trust_domain=trust_domain, namespace=namespace, service_account=service_account
    ).uri


def parse_spiffe_id(value: str, *, trust_domain: str | None = None) -> SpiffeId:
    """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``.

    If ``trust_domain`` is given, the identity must belong to it. Raises
    :class:`InvalidIdentity` naming the faulty part.
    """
    if not isinstance(value, str):
        raise InvalidIdentity(repr(value), part="type", reason="identity must be a string")
    if len(value) > _MAX_URI:
        raise InvalidIdentity(value[:64] + "...", part="uri", reason="longer than 2048 characters")
    if not value.startswith(_SCHEME):
        if value[:9].lower() == _SCHEME:
            raise InvalidIdentity(value, part="scheme", reason="scheme must be lowercase 'spiffe'")
        raise InvalidIdentity(value, part="scheme", reason="must start with 'spiffe://'")
    rest = value[len(_SCHEME) :]
    for ch, what in (("?", "query"), ("#", "fragment")):
        if ch in rest:
            raise InvalidIdentity(value, part=what, reason=f"a SPIFFE ID carries no {what}")
    td, slash, path = rest.partition("/")
    validate_trust_domain(td, value=value)
    if trust_domain is not None and td != trust_domain:
        raise InvalidIdentity(
            value,
            part="trust-domain",
            reason=f"{td!r} is not the issuer's trust domain {trust_domain!r}",
        )
    if not slash or not path:
        raise InvalidIdentity(value, part="path", reason="missing; expected /ns/<ns>/sa/<sa>")
    segments = path.split("/")
    for seg in segments:
        if seg == "":
            raise InvalidIdentity(value, part="path", reason="empty segment (or trailing '/')")
        if seg in (".", ".."):
            raise InvalidIdentity(value, part="path", reason=f"segment {seg!r} not allowed")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise InvalidIdentity(
            value, part="path", reason=f"'/{path}' is not of the form /ns/<ns>/sa/<sa>"
        )
    _check_namespace(segments[1], value)
    _check_service_account(segments[3], value)
    return SpiffeId(trust_domain=td, namespace=segments[1], service_account=segments[3])


def issuer_identity(identity: str | SpiffeId, *, trust_domain: str) -> SpiffeId:
    """``identity`` parsed (when a string) and checked to belong to an issuer's
    ``trust_domain``; raises :class:`InvalidIdentity` naming the trust domain otherwise."""
    sid = (
        identity
        if isinstance(identity, SpiffeId)
        else parse_spiffe_id(identity, trust_domain=trust_domain)
    )
    if sid.trust_domain != trust_domain:
        raise InvalidIdentity(
            sid.uri,
            part="trust-domain",
            reason=f"not the issuer's trust domain {trust_domain!r}",
        )
    return sid
