"""Cross-resource validation: do the references between resources resolve?

Role: ``check_references`` looks at a whole set of resources (what the policy projection would
hold after an apply) and reports TrafficTarget rules naming missing route resources or missing
named matches, TrafficSplit matches naming missing HTTPRouteGroups, splits whose weights sum to
zero, VMs naming missing MeshServices, duplicate resources and more than one MeshConfig.
``unresolved_references`` reports only the references to missing resources: the API stores
such resources as *pending* (GitOps tools apply files in any order), so only the set-level
problems refuse a change.
Concurrency: pure function; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from smc.smi._errors import ManifestError
from smc.smi._model import (
    HTTPRouteGroup,
    MeshConfig,
    MeshService,
    Resource,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    VirtualMachineGroup,
)
from smc.smi._render import resource_key

__all__ = ["SET_LEVEL_KINDS", "check_references", "references_of", "unresolved_references"]

#: The kinds :func:`check_references` reports set-level errors on (besides one key defined twice
#: with different content): more than one MeshConfig, a TrafficSplit whose weights sum to
#: zero. For a set with unique keys, checking only its resources of these kinds gives the same
#: set-level errors, which is what lets a small change be checked without the whole mesh
#: (tests/test_write_path_scale.py holds this; extend both when adding a set-level check).
SET_LEVEL_KINDS: tuple[type[Resource], ...] = (MeshConfig, TrafficSplit)


def _error(resource: Resource, path: str, reason: str) -> ManifestError:
    return ManifestError(
        document=resource_key(resource),
        path=path,
        reason=reason,
        kind=resource.KIND,
        name=f"{resource.namespace}/{resource.name}",
    )


def check_references(
    resources: Iterable[Resource], *, unresolved: bool = True
) -> list[ManifestError]:
    """Every unresolved reference or set-level inconsistency in ``resources`` (empty: all good).

    References are namespace-local, as in SMI: a rule of a TrafficTarget in namespace ``ns``
    names a route resource in ``ns``. With ``unresolved=False`` only the set-level errors are
    reported (duplicates with different content, more than one MeshConfig, splits whose weights
    sum to zero): references to missing resources are then not errors but pending state (see
    :func:`unresolved_references`), which is how the API treats them (apply order never
    matters).
    """
    hard, soft = _check(resources)
    return hard + soft if unresolved else hard


def unresolved_references(resources: Iterable[Resource]) -> list[ManifestError]:
    """References in ``resources`` to resources (or named matches) that do not exist: a
    TrafficTarget rule naming a missing route resource or match, a TrafficSplit match naming a
    missing HTTPRouteGroup, a VirtualMachine naming a missing MeshService. Such a resource is
    *pending*: it is stored, and the missing part grants or routes nothing until it exists."""
    return _check(resources)[1]


def references_of(resource: Resource) -> tuple[str, ...]:
    """The keys (``Kind/ns/name``) of the resources ``resource`` names: the only ones its
    unresolved references (:func:`unresolved_references`) depend on."""
    ns = resource.namespace
    if isinstance(resource, TrafficTarget):
        return tuple(f"{rule.kind}/{ns}/{rule.name}" for rule in resource.rules)
    if isinstance(resource, TrafficSplit):
        return tuple(f"HTTPRouteGroup/{ns}/{m.name}" for m in resource.matches)
    if isinstance(resource, VirtualMachine | VirtualMachineGroup):
        return tuple(f"MeshService/{ns}/{s}" for s in resource.services)
    return ()


def _check(resources: Iterable[Resource]) -> tuple[list[ManifestError], list[ManifestError]]:
    """``(set-level errors, unresolved references)`` of ``resources``."""
    items = list(resources)
    hard: list[ManifestError] = []
    errors: list[ManifestError] = []  # unresolved references
    by_key: dict[str, Resource] = {}
    for r in items:
        key = resource_key(r)
        if key in by_key and by_key[key] != r:
            hard.append(_error(r, "", f"{key} is defined more than once with different content"))
        by_key.setdefault(key, r)
    unique = list(by_key.values())

    groups = {(g.namespace, g.name): g for g in unique if isinstance(g, HTTPRouteGroup)}
    tcp = {(t.namespace, t.name): t for t in unique if isinstance(t, TCPRoute)}
    udp = {(u.namespace, u.name): u for u in unique if isinstance(u, UDPRoute)}
    services = {(s.namespace, s.name) for s in unique if isinstance(s, MeshService)}

    configs = [c for c in unique if isinstance(c, MeshConfig)]
    if len(configs) > 1:
        names = ", ".join(resource_key(c) for c in configs)
        for c in configs[1:]:
            hard.append(_error(c, "", f"only one MeshConfig may exist, found {names}"))

    for r in unique:
        if isinstance(r, TrafficTarget):
            for i, rule in enumerate(r.rules):
                path = f"spec.rules[{i}]"
                ref_key = (r.namespace, rule.name)
                if rule.kind == "HTTPRouteGroup":
                    group = groups.get(ref_key)
                    if group is None:
                        errors.append(
                            _error(
                                r,
                                f"{path}.name",
                                f"HTTPRouteGroup {r.namespace}/{rule.name} does not exist",
                            )
                        )
                        continue
                    known = {m.name for m in group.matches}
                    for j, match in enumerate(rule.matches):
                        if match not in known:
                            errors.append(
                                _error(
                                    r,
                                    f"{path}.matches[{j}]",
                                    f"HTTPRouteGroup {r.namespace}/{rule.name} has no match named "
                                    f"{match!r} (it has: {', '.join(sorted(known))})",
                                )
                            )
                else:
                    table: dict[tuple[str, str], TCPRoute] | dict[tuple[str, str], UDPRoute]
                    table = tcp if rule.kind == "TCPRoute" else udp
                    route = table.get(ref_key)
                    if route is None:
                        errors.append(
                            _error(
                                r,
                                f"{path}.name",
                                f"{rule.kind} {r.namespace}/{rule.name} does not exist",
                            )
                        )
                        continue
                    for j, match in enumerate(rule.matches):
                        if match != route.match_name:
                            have = route.match_name or "no named match"
                            errors.append(
                                _error(
                                    r,
                                    f"{path}.matches[{j}]",
                                    f"{rule.kind} {r.namespace}/{rule.name} has no match named "
                                    f"{match!r} (it has: {have})",
                                )
                            )
        elif isinstance(r, TrafficSplit):
            if r.total_weight == 0:
                hard.append(
                    _error(
                        r, "spec.backends", "the weights sum to zero: no traffic could be routed"
                    )
                )
            for i, ref in enumerate(r.matches):
                if (r.namespace, ref.name) not in groups:
                    errors.append(
                        _error(
                            r,
                            f"spec.matches[{i}].name",
                            f"HTTPRouteGroup {r.namespace}/{ref.name} does not exist",
                        )
                    )
        elif isinstance(r, VirtualMachine | VirtualMachineGroup):
            base = (
                "spec.template.services" if isinstance(r, VirtualMachineGroup) else "spec.services"
            )
            for i, svc in enumerate(r.services):
                if (r.namespace, svc) not in services:
                    errors.append(
                        _error(
                            r,
                            f"{base}[{i}]",
                            f"MeshService {r.namespace}/{svc} does not exist",
                        )
                    )
    return hard, errors
