"""AccessGrant matching shared by the API's authorizer and the log's verifier.

Role: the pure rule "does this grant cover this principal doing this": used by
:mod:`smc.auth` when the API authorizes a request, and by :class:`smc.events.ChainVerifier`
when it re-checks, from the log alone, that a policy record the API sealed on behalf of a
principal was allowed by that principal's AccessGrants at that point of the log. Both use
this one function, so the API and every replica decide alike.
Concurrency: pure functions and immutable values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ADMINS_GROUP", "GrantSpec", "grant_covers", "grant_spec", "resource_of_kind"]

#: Members may do everything (the local admin credential; the bootstrap of every grant).
ADMINS_GROUP = "smc:admins"


def resource_of_kind(kind: str) -> str:
    """The resource name of a manifest kind, as Kubernetes names them (``TrafficTarget`` ->
    ``traffictargets``, ``MeshConfig`` -> ``meshconfigs``)."""
    low = kind.lower()
    return low if low.endswith("s") else low + "s"


@dataclass(frozen=True, slots=True)
class GrantSpec:
    """The matching part of an AccessGrant: subjects x verbs x resources x namespaces."""

    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    resources: tuple[str, ...]
    namespaces: tuple[str, ...]


def grant_covers(
    spec: GrantSpec,
    *,
    name: str,
    groups: Sequence[str],
    verb: str,
    resource: str,
    namespace: str,
) -> bool:
    """Whether ``spec`` lets principal ``name`` (member of ``groups``) ``verb`` ``resource``
    in ``namespace`` (empty: all namespaces / cluster-scoped, needs ``*``)."""
    subject_ok = "*" in spec.subjects or any(
        s == name or (s.startswith("group:") and s[6:] in groups) for s in spec.subjects
    )
    if not subject_ok:
        return False
    if "*" not in spec.verbs and verb not in spec.verbs:
        return False
    if "*" not in spec.resources and resource not in spec.resources:
        return False
    return "*" in spec.namespaces or (bool(namespace) and namespace in spec.namespaces)


def grant_spec(manifest_json: str) -> GrantSpec | None:
    """The spec of a recorded AccessGrant manifest (as the API validated it), or None when
    it is not one (such a grant allows nothing)."""
    try:
        spec = json.loads(manifest_json)["spec"]
        lists = [spec[k] for k in ("subjects", "verbs", "resources", "namespaces")]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
        return None
    subjects, verbs, resources, namespaces = (tuple(v) for v in lists)
    resources = tuple(
        r if r == "*" or not any(c.isupper() for c in r) else resource_of_kind(r) for r in resources
    )
    return GrantSpec(subjects, verbs, resources, namespaces)
