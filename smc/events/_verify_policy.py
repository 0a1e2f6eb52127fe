"""Policy records under the verifier: a principal's AccessGrants, re-checked from the log.

Role: :class:`_PolicyChecks`, the part of :class:`smc.events.ChainVerifier` (mixed into it)
that decides whether a policy record the API sealed on behalf of a principal was allowed by
that principal's AccessGrants at that point of the partition (and, under version-3 seals,
whether the caller of an impersonation had the right to impersonate), and that follows the
AccessGrants of each policy partition. Split from :mod:`smc.events._verify`.
Concurrency: not thread-safe, like the verifier it is part of.
"""

from __future__ import annotations

from typing import Any

from smc.events._codec import Codec
from smc.events._errors import EventError
from smc.events._grantcheck import (
    ADMINS_GROUP,
    GrantSpec,
    grant_covers,
    grant_spec,
    resource_of_kind,
)
from smc.events._log import Record
from smc.events._types import MeshConfigChanged, SmiResourceApplied, SmiResourceDeleted


class _PolicyChecks:
    """Principals and AccessGrants (mixed into ``ChainVerifier``)."""

    codec: Codec
    #: Per policy partition: AccessGrant name -> its spec, as of the records read.
    grants: dict[tuple[str, int], dict[str, GrantSpec | None]]

    def _unauthorized(
        self,
        x: Record,
        part: int,
        vouched: dict[str, tuple[str, tuple[str, ...]]],
        version: int = 2,
    ) -> str:
        """Why the principal a policy record names may not make that change, as of this
        point of the partition ("" when allowed): its AccessGrants on the log, admins
        (``smc:admins``, not impersonated) allowed everything; a principal the writer
        authorized by Kubernetes RBAC (``basis`` ``kubernetes``) is taken on its word.
        Under a version-3 seal an impersonated actor (``REAL as TARGET``) also needs
        ``REAL``'s right to impersonate, from the seal's principals and the grants."""
        try:
            event = self.codec.decode(x.value, where=f"{x.stream}[{x.partition}]@{x.offset}")
        except EventError as exc:
            return f"cannot read the record to check its principal: {exc}"
        if isinstance(event, SmiResourceApplied):
            verb, resource, ns = "apply", resource_of_kind(event.kind), event.namespace
        elif isinstance(event, SmiResourceDeleted):
            verb, resource, ns = "delete", resource_of_kind(event.kind), event.namespace
        elif isinstance(event, MeshConfigChanged):
            verb, resource, ns = "apply", "meshconfigs", ""
        else:
            return f"{type(event).__name__} has no access rule"
        actor = event.envelope.actor
        basis, groups = vouched.get(actor, ("grants", ()))
        if basis == "kubernetes":
            return ""
        real, sep, target = actor.partition(" as ")
        name = target if sep else real
        if sep and version >= 3:
            why = self._no_impersonation(real, target, x.stream, part, vouched)
            if why:
                return why
        if ADMINS_GROUP in groups and not sep:
            return ""
        for spec in self.grants.get((x.stream, part), {}).values():
            if spec is not None and grant_covers(
                spec, name=name, groups=groups, verb=verb, resource=resource, namespace=ns
            ):
                return ""
        where = f"namespace {ns!r}" if ns else "all namespaces"
        return f"principal {actor!r}: no AccessGrant on the log allows {verb} {resource} in {where}"

    def _no_impersonation(
        self,
        real: str,
        target: str,
        stream: str,
        part: int,
        vouched: dict[str, tuple[str, tuple[str, ...]]],
    ) -> str:
        """Why ``real`` may not act as ``target`` ("" when it may): the seal must vouch for
        ``real`` (its groups, how it was authorized); an admin may, a principal authorized
        by Kubernetes RBAC is taken on the writer's word, anyone else needs an AccessGrant
        on the log allowing ``impersonate`` on ``users`` (all namespaces), as the API
        requires."""
        got = vouched.get(real)
        if got is None:
            return f"the seal does not vouch for {real!r}, who acted as {target!r}"
        basis, groups = got
        if basis == "kubernetes" or ADMINS_GROUP in groups:
            return ""
        for spec in self.grants.get((stream, part), {}).values():
            if spec is not None and grant_covers(
                spec, name=real, groups=groups, verb="impersonate", resource="users",
                namespace="",
            ):  # fmt: skip
                return ""
        return f"principal {real!r}: no AccessGrant on the log allows impersonate users"

    def _track_grant(self, x: Record, part: int) -> None:
        """Follow the AccessGrants of a policy partition (applied, replaced, deleted)."""
        grants = self.grants.setdefault((x.stream, part), {})
        name = _s(x.key).rsplit("/", 1)[-1]
        try:
            event = self.codec.decode(x.value, where=f"{x.stream}[{x.partition}]@{x.offset}")
        except EventError:
            grants.pop(name, None)
            return
        if isinstance(event, SmiResourceApplied):
            grants[name] = grant_spec(event.manifest_json)
        else:
            grants.pop(name, None)


def _s(key: Any) -> str:
    if key.__class__ is bytes:
        return key.decode()  # type: ignore[no-any-return]
    return "" if key is None else key  # type: ignore[no-any-return]
