"""Access grants: SMC's own authorization resources, on the log.

Role: without Kubernetes, who may do what is declared as ``AccessGrant`` resources
(``smc.dev/v1alpha1``, cluster-scoped): subjects (principal names, or ``group:NAME``) x verbs
x resources x namespaces, ``*`` for any. They are recorded like every other resource (a
``SmiResourceApplied``/``SmiResourceDeleted`` event with kind ``AccessGrant`` on
``smc.policy``, carrying the actor), so the policy projection holds them and ``smc audit``
shows who granted what. The first grant is made with the local admin credential
(``smc:admins`` may do everything). :func:`parse_grant` validates a grant and names the field
of any error; :class:`GrantAuthorizer` decides from the grants in a policy projection
(re-parsed only when its generation changed).
Concurrency: used on the loop that feeds the projection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smc.auth._errors import AuthError
from smc.auth._principal import VERBS, Access, Principal, resource_of_kind
from smc.events._grantcheck import GrantSpec, grant_covers
from smc.projections import PolicyProjection

__all__ = [
    "GRANT_API_VERSION",
    "GRANT_KIND",
    "Grant",
    "GrantAuthorizer",
    "GrantError",
    "parse_grant",
]

GRANT_KIND = "AccessGrant"
GRANT_API_VERSION = "smc.dev/v1alpha1"
_NAME = re.compile(r"^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
_TEXT = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,252}$")


class GrantError(AuthError):
    """An AccessGrant is invalid; ``field`` names the offending field."""

    def __init__(self, *, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"AccessGrant {field}: {reason}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Grant:
    name: str
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    resources: tuple[str, ...]
    namespaces: tuple[str, ...]

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": GRANT_API_VERSION,
            "kind": GRANT_KIND,
            "metadata": {"name": self.name},
            "spec": {
                "subjects": list(self.subjects),
                "verbs": list(self.verbs),
                "resources": list(self.resources),
                "namespaces": list(self.namespaces),
            },
        }

    def manifest_json(self) -> str:
        return json.dumps(self.manifest(), sort_keys=True, separators=(",", ":"))

    def covers(self, principal: Principal, access: Access) -> bool:
        return grant_covers(
            GrantSpec(self.subjects, self.verbs, self.resources, self.namespaces),
            name=principal.name,
            groups=principal.groups,
            verb=access.verb,
            resource=access.resource,
            namespace=access.namespace,
        )


def _strings(spec: Mapping[str, Any], key: str, *, check: Any = None) -> tuple[str, ...]:
    value = spec.get(key)
    if not isinstance(value, list) or not value:
        raise GrantError(field=f"spec.{key}", reason="required: a non-empty list of strings")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _TEXT.match(item):
            raise GrantError(
                field=f"spec.{key}[{i}]", reason="must be 1-253 printable ASCII characters"
            )
        out.append(check(item, f"spec.{key}[{i}]") if check else item)
    return tuple(dict.fromkeys(out))


def _verb(v: str, path: str) -> str:
    if v != "*" and v not in VERBS:
        raise GrantError(field=path, reason=f"unknown verb {v!r} (one of {', '.join(VERBS)}, *)")
    return v


def _resource(r: str, path: str) -> str:
    if r == "*":
        return r
    if not re.match(r"^[A-Za-z][A-Za-z0-9]*$", r):
        raise GrantError(field=path, reason=f"{r!r} is not a resource or kind name")
    return resource_of_kind(r) if any(c.isupper() for c in r) else r


def parse_grant(obj: object) -> Grant:
    """Validate an AccessGrant manifest (a mapping); raises :class:`GrantError`."""
    if not isinstance(obj, Mapping):
        raise GrantError(field="", reason="must be a mapping")
    if obj.get("apiVersion") != GRANT_API_VERSION:
        raise GrantError(field="apiVersion", reason=f"must be {GRANT_API_VERSION}")
    if obj.get("kind") != GRANT_KIND:
        raise GrantError(field="kind", reason=f"must be {GRANT_KIND}")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not _NAME.match(name):
        raise GrantError(field="metadata.name", reason="required: a DNS subdomain name")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise GrantError(field="spec", reason="required: a mapping")
    unknown = sorted(set(spec) - {"subjects", "verbs", "resources", "namespaces"})
    if unknown:
        raise GrantError(field=f"spec.{unknown[0]}", reason="unknown field")
    return Grant(
        name=name,
        subjects=_strings(spec, "subjects"),
        verbs=_strings(spec, "verbs", check=_verb),
        resources=_strings(spec, "resources", check=_resource),
        namespaces=_strings(spec, "namespaces"),
    )


class GrantAuthorizer:
    """Decide from the AccessGrants held by ``policy`` (see the module docstring)."""

    def __init__(self, policy: PolicyProjection) -> None:
        self.policy = policy
        self._generation = -1
        self._grants: Sequence[Grant] = ()

    def grants(self) -> Sequence[Grant]:
        if self._generation != self.policy.generation:
            out = []
            for stored in self.policy.of_kind(GRANT_KIND):
                try:
                    out.append(parse_grant(stored.manifest()))
                except GrantError:
                    continue  # validated when applied; a newer SMC's shape is not ours
            self._grants = tuple(out)
            self._generation = self.policy.generation
        return self._grants

    async def allowed(self, principal: Principal, access: Access) -> tuple[bool, str]:
        for g in self.grants():
            if g.covers(principal, access):
                return True, f"AccessGrant {g.name}"
        return False, "no AccessGrant allows it"
