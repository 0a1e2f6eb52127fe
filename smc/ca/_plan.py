"""The CA's plan: what certificates the projections call for, as pure functions.

Role: :func:`plan_certificates` decides which identity gets a first certificate, a renewal
or a revocation from the registry identities, the mesh config, the certificate projection,
the fingerprints whose keys this process holds, the issuer name and ``now``; so it is
testable and every replica computes the same plan. :func:`served_bundle` and
:func:`active_issuer_name` say which trust bundle SDS serves, from the log alone.
Concurrency: pure functions and frozen dataclasses; the projections are read on the loop
that applies them (the caller's).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from smc.ca._errors import CAStateError, InvalidIdentity
from smc.ca._identity import format_spiffe_id
from smc.ca._rotation import DEFAULT_FRACTION, DEFAULT_JITTER, renew_at
from smc.events import (
    WRITER_NAMESPACE,
)
from smc.projections import (
    CertRecord,
    CertsProjection,
    ProjectionRunner,
)


# ---------------------------------------------------------------------- the pure plan
@dataclass(frozen=True, kw_only=True, slots=True)
class IssueAction:
    """Issue a first certificate for ``identity`` (a SPIFFE URI)."""

    identity: str
    reason: str = "new-identity"


@dataclass(frozen=True, kw_only=True, slots=True)
class RenewAction:
    """Replace ``previous_serial``, the identity's current certificate."""

    identity: str
    previous_serial: str
    reason: str  # due | expired | key-missing | issuer-changed | forced


@dataclass(frozen=True, kw_only=True, slots=True)
class RevokeAction:
    """Revoke ``serial``: its identity left the registry."""

    identity: str
    serial: str
    reason: str = "identity-removed"


Action = IssueAction | RenewAction | RevokeAction


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What to do now, and when to look again."""

    actions: tuple[Action, ...]
    #: Earliest renewal instant among the certificates kept as they are.
    next_due: datetime | None
    #: ``(ns/sa, reason)`` of registry identities that cannot be SPIFFE ids.
    skipped: tuple[tuple[str, str], ...] = ()


def _desired(
    identities: Iterable[str], trust_domain: str
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    out: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for short in sorted(identities):
        ns, sep, sa = short.partition("/")
        if not sep:
            skipped.append((short, "not of the form namespace/service-account"))
            continue
        if ns == WRITER_NAMESPACE:  # log writer identities: never a workload's certificate
            skipped.append((short, f"namespace {ns} is reserved for log writers"))
            continue
        try:
            out[format_spiffe_id(trust_domain=trust_domain, namespace=ns, service_account=sa)] = (
                short
            )
        except InvalidIdentity as exc:
            skipped.append((short, str(exc)))
    return out, skipped


def renewal_instant(
    rec: CertRecord,
    *,
    lifetime: timedelta,
    fraction: float = DEFAULT_FRACTION,
    jitter: float = DEFAULT_JITTER,
) -> datetime:
    """When ``rec`` is due: :func:`smc.ca.renew_at` seeded by ``identity|serial``, over
    the validity counted from ``max(not_before, not_after - lifetime)`` so an issuer's
    back-dated ``not_before`` (clock-skew allowance) does not make a short-lived
    certificate due as soon as it is issued."""
    start = max(rec.not_before, rec.not_after - lifetime)
    if start >= rec.not_after:
        start = rec.not_before
    return renew_at(
        not_before=start,
        not_after=rec.not_after,
        seed=f"{rec.identity}|{rec.serial}",
        fraction=fraction,
        jitter=jitter,
    )


def plan_certificates(
    *,
    identities: Iterable[str],
    trust_domain: str,
    lifetime: timedelta,
    current: Mapping[str, CertRecord],
    now: datetime,
    held: Collection[str] | None = None,
    issuer: str | None = None,
    fraction: float = DEFAULT_FRACTION,
    jitter: float = DEFAULT_JITTER,
) -> Plan:
    """The certificate actions that bring ``current`` in line with the registry.

    ``identities`` are registry identities (``ns/sa``); ``current`` maps SPIFFE URI to the
    identity's current certificate (``CertsProjection``); ``held`` the fingerprints whose
    keys this process holds (None: don't check); ``issuer`` the active issuer's name (None:
    don't check). Per desired identity: no certificate -> issue; expired, due
    (:func:`renewal_instant`), key not held, or signed by another issuer -> renew.
    Every current certificate of an identity no longer desired -> revoke. Pure.
    """
    desired, skipped = _desired(identities, trust_domain)
    actions: list[Action] = []
    next_due: datetime | None = None
    for uri in sorted(desired):
        rec = current.get(uri)
        if rec is None:
            actions.append(IssueAction(identity=uri))
            continue
        due = renewal_instant(rec, lifetime=lifetime, fraction=fraction, jitter=jitter)
        reason: str | None = None
        if now >= rec.not_after:
            reason = "expired"
        elif now >= due:
            reason = "due"
        elif held is not None and rec.fingerprint not in held:
            reason = "key-missing"
        elif issuer is not None and rec.issuer != issuer:
            reason = "issuer-changed"
        if reason is not None:
            actions.append(RenewAction(identity=uri, previous_serial=rec.serial, reason=reason))
        elif next_due is None or due < next_due:
            next_due = due
    for uri in sorted(set(current) - set(desired)):
        actions.append(RevokeAction(identity=uri, serial=current[uri].serial))
    return Plan(actions=tuple(actions), next_due=next_due, skipped=tuple(skipped))


def _current_records(certs: CertsProjection) -> dict[str, CertRecord]:
    out: dict[str, CertRecord] = {}
    for identity in certs.current:
        rec = certs.current_cert(identity)
        if rec is not None:
            out[identity] = rec
    return out


def served_bundle(
    *, trust: Mapping[str, Sequence[str]], current: Mapping[str, CertRecord], issuer_name: str
) -> list[str]:
    """The trust bundle SDS serves: the roots of the active issuer ``issuer_name`` first,
    then those of every other issuer with a current certificate (by name), without
    repeats. Pure: every replica at the same offset computes the same bundle."""
    names = {issuer_name} | {r.issuer for r in current.values()}
    roots: list[str] = []
    for name in sorted(names, key=lambda n: (n != issuer_name, n)):
        for pem in trust.get(name, ()):
            if pem not in roots:
                roots.append(pem)
    return roots


def active_issuer_name(certs: CertsProjection) -> str | None:
    """The issuer the log says is signing now: the one of the newest current certificate
    (latest ``not_before``, then serial), else the only issuer with a trust bundle, else
    None. What a replica that does not issue (:class:`CertificateFollower`) orders the
    served bundle by, as the issuing replica orders it by its own issuer."""
    current = _current_records(certs)
    if current:
        newest = max(current.values(), key=lambda r: (r.not_before, r.serial))
        return newest.issuer
    if len(certs.trust) == 1:
        return next(iter(certs.trust))
    return None


P = TypeVar("P")


def _projection(runner: ProjectionRunner, cls: type[P]) -> P:
    for p in runner.projections:
        if isinstance(p, cls):
            return p
    raise CAStateError(f"the projection runner has no {cls.__name__}; the CA needs it")
