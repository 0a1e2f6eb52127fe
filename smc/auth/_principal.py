"""Who is calling, and what they ask to do.

Role: :class:`Principal` is an authenticated identity (name, groups, how it was proven);
:class:`Access` is one request for authorization (verb x resource x namespace); :func:`actor`
is the string recorded as the actor of events (``real as target`` under impersonation, as
Kubernetes audit records both the user and the impersonated user).
Concurrency: immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass

from smc.events._grantcheck import ADMINS_GROUP, resource_of_kind

__all__ = [
    "ADMINS_GROUP",
    "AUTHENTICATED_GROUP",
    "VERBS",
    "Access",
    "Principal",
    "actor_matches",
    "resource_of_kind",
]

#: Members are allowed everything (the local admin credential; like ``system:masters``).
#: Every authenticated principal is in this group.
AUTHENTICATED_GROUP = "smc:authenticated"
#: The verbs of SMC's authorization.
VERBS = ("get", "apply", "delete", "debug", "certs", "impersonate")


@dataclass(frozen=True, kw_only=True, slots=True)
class Principal:
    """An authenticated caller.

    ``name`` is a SPIFFE id or certificate subject (client certificates), a Kubernetes user
    name (``system:serviceaccount:NS:SA`` for service-account tokens), ``local:admin`` (the
    local credential) or ``unix:USER`` (an operator writing to the log directly). ``method``
    says how it was proven; ``impersonated_by`` is the real caller when this principal is
    the target of an impersonation. ``extra`` holds the extra fields of the authenticator's
    answer as sorted ``(key, values)`` pairs (a TokenReview's ``user.extra``: for a pod-bound
    service-account token, ``authentication.kubernetes.io/pod-name`` and ``pod-uid``);
    ``expires_at`` is when the credential stops being valid (epoch seconds), when known.
    """

    name: str
    method: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    impersonated_by: Principal | None = None
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    expires_at: float | None = None

    def extra_value(self, key: str) -> str:
        """The first value of the extra field ``key``, or ``""``."""
        for k, values in self.extra:
            if k == key:
                return values[0] if values else ""
        return ""

    @property
    def actor(self) -> str:
        """The actor recorded on events: the name, or ``REAL as TARGET`` when impersonated."""
        if self.impersonated_by is not None:
            return f"{self.impersonated_by.name} as {self.name}"
        return self.name

    @property
    def is_admin(self) -> bool:
        return ADMINS_GROUP in self.groups

    def impersonate(self, name: str, *, groups: tuple[str, ...] = ()) -> Principal:
        """The principal ``name`` as impersonated by this one (authorize ``impersonate`` first)."""
        return Principal(
            name=name,
            method="impersonation",
            groups=(*groups, AUTHENTICATED_GROUP),
            impersonated_by=self,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Access:
    """One authorization question: may the principal ``verb`` ``resource`` in ``namespace``
    (empty: all namespaces / cluster-scoped), optionally the object ``name``."""

    verb: str
    resource: str
    namespace: str = ""
    name: str = ""

    def describe(self) -> str:
        where = f"namespace {self.namespace!r}" if self.namespace else "all namespaces"
        what = f"{self.resource}/{self.name}" if self.name else self.resource
        return f"{self.verb} {what} in {where}"


def actor_matches(actor: str, name: str) -> bool:
    """Whether an event's ``actor`` is ``name``, or ``name`` took part in an impersonation
    recorded as ``REAL as TARGET``."""
    if actor == name:
        return True
    real, sep, target = actor.partition(" as ")
    return bool(sep) and name in (real, target)
