"""Plain JSON views of the projections, shared by ``smc get`` and the HTTP API.

Role: turns registry/policy projection state into sorted, JSON-able rows (services, workloads,
policies, traffic targets, splits, mesh config) and answers policy checks through
:class:`~smc.projections._policyview.PolicyView`.
Concurrency: pure reads of the projections; call on the thread that applies events to them.
"""

from __future__ import annotations

from typing import Any

from smc.api._changes import BACKS_LABEL_PREFIX, MANAGED_BY_LABEL, pending_reason
from smc.projections import PolicyProjection, RegistryProjection
from smc.projections._policyview import PolicyView
from smc.smi import ManifestErrors, Resource, parse_manifest, unresolved_references

__all__ = [
    "meshconfig_view",
    "policies_view",
    "policy_check",
    "services_view",
    "vmgroups_view",
    "workloads_view",
]


def services_view(registry: RegistryProjection) -> list[dict[str, Any]]:
    """Every service, sorted by namespace/name, with ports and endpoint count."""
    out = []
    for (ns, name), s in sorted(registry.services.items()):
        eps = registry.endpoints_of(ns, name)
        out.append(
            {
                "namespace": ns,
                "name": name,
                "backing": s.backing,
                "ports": [
                    {
                        "name": p.name,
                        "port": p.port,
                        "protocol": p.protocol,
                        "targetPort": p.target_port,
                    }
                    for p in s.ports
                ],
                "selector": dict(s.selector),
                "managedBy": dict(s.labels).get(MANAGED_BY_LABEL),
                "endpoints": [
                    {"address": e.address, "port": e.port, "workload": e.workload, "ready": e.ready}
                    for e in eps
                ],
            }
        )
    return out


def workloads_view(registry: RegistryProjection) -> list[dict[str, Any]]:
    """Every workload (pods and VMs), sorted by kind/namespace/name."""
    out = []
    for (kind, ns, name), w in sorted(registry.workloads.items()):
        labels = dict(w.labels)
        out.append(
            {
                "kind": kind,
                "namespace": ns,
                "name": name,
                "address": w.address,
                "serviceAccount": w.service_account,
                "identity": w.identity,
                "labels": {
                    k: v
                    for k, v in labels.items()
                    if k != MANAGED_BY_LABEL and not k.startswith(BACKS_LABEL_PREFIX)
                },
                "services": sorted(
                    k[len(BACKS_LABEL_PREFIX) :] for k in labels if k.startswith(BACKS_LABEL_PREFIX)
                ),
                "managedBy": labels.get(MANAGED_BY_LABEL),
                "ports": [
                    {"name": p.name, "port": p.port, "protocol": p.protocol} for p in w.ports
                ],
            }
        )
    return out


def policies_view(policy: PolicyProjection, *, kind: str | None = None) -> list[dict[str, Any]]:
    """Stored SMI resources (optionally of one kind), with their canonical manifests and
    ``status``: ``ready``, or ``pending`` with the references to missing resources in
    ``pending`` (such a resource grants or routes nothing through them until they exist)."""
    parsed: list[Resource] = []
    for (k, ns, name), r in policy.resources.items():
        try:
            parsed.append(parse_manifest(r.manifest(), document=f"{k}/{ns}/{name}"))
        except (ManifestErrors, ValueError):
            continue  # written by another SMC version: shown, not checked
    waiting: dict[str, list[str]] = {}
    for e in unresolved_references(parsed):
        waiting.setdefault(e.document, []).append(pending_reason(e))
    out = []
    for (k, ns, name), r in sorted(policy.resources.items()):
        if k == "AccessGrant" or (kind is not None and k != kind):
            continue  # access grants are listed by GET /v1/grants (their own permission)
        why = waiting.get(f"{k}/{ns}/{name}", [])
        out.append(
            {
                "kind": k,
                "namespace": ns,
                "name": name,
                "apiVersion": r.api_version,
                "manifest": r.manifest(),
                "status": "pending" if why else "ready",
                "pending": why,
            }
        )
    return out


def meshconfig_view(policy: PolicyProjection) -> dict[str, Any]:
    """The mesh configuration in force."""
    m = policy.mesh
    settings = dict(m.settings)
    return {
        "resource": settings.get("resource"),
        "permissiveTrafficMode": m.permissive,
        "trustDomain": m.trust_domain,
        "certificateLifetimeSeconds": m.cert_lifetime_seconds,
        "settings": settings,
    }


def policy_check(
    view: PolicyView,
    *,
    source: str,
    destination: str,
    path: str | None = None,
    method: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """Whether ``source`` may reach ``destination`` (identities ``ns/sa``), and why."""
    allowed = view.is_allowed(
        source=source, destination=destination, path=path, method=method, port=port
    )
    grants = [g for g in view.allowed_sources(destination) if g.source == source]
    if view.permissive:
        reason = "permissive traffic mode"
    elif allowed:
        reason = "allowed by " + ", ".join(sorted({g.target for g in grants}))
    elif grants:
        reason = "no rule of " + ", ".join(sorted({g.target for g in grants})) + " matches"
    else:
        reason = f"no TrafficTarget lets {source} reach {destination} (deny by default)"
    return {
        "allowed": allowed,
        "decision": "allow" if allowed else "deny",
        "reason": reason,
        "source": source,
        "destination": destination,
        "sourceSpiffeId": view.spiffe_id(source),
        "destinationSpiffeId": view.spiffe_id(destination),
        "grants": [
            {
                "trafficTarget": g.target,
                "port": g.port,
                "http": [
                    {"name": m.name, "pathRegex": m.path_regex, "methods": list(m.methods)}
                    for m in g.http
                ],
                "tcpPorts": None if g.tcp_ports is None else list(g.tcp_ports),
                "udpPorts": None if g.udp_ports is None else list(g.udp_ports),
            }
            for g in grants
        ],
    }


def vmgroups_view(registry: RegistryProjection, policy: PolicyProjection) -> list[dict[str, Any]]:
    """Every VirtualMachineGroup: its membership source, provider status (``stale`` while the
    provider cannot be read: the last known instances are kept) and its instances."""
    from smc.smi import ManifestErrors, VirtualMachineGroup, parse_manifest

    specs: dict[tuple[str, str], VirtualMachineGroup] = {}
    for stored in policy.of_kind(VirtualMachineGroup.KIND):
        try:
            g = parse_manifest(stored.manifest(), document=f"{stored.namespace}/{stored.name}")
        except (ManifestErrors, ValueError):
            continue
        if isinstance(g, VirtualMachineGroup):
            specs[(g.namespace, g.name)] = g
    out = []
    for key in sorted(set(specs) | set(registry.vm_groups.groups)):
        spec = specs.get(key)
        state = registry.vm_groups.groups.get(key)
        instances = sorted(state.instances.values(), key=lambda i: i.instance_id) if state else []
        out.append(
            {
                "namespace": key[0],
                "name": key[1],
                "provider": spec.provider if spec else None,
                "cloudGroup": spec.cloud_group if spec else None,
                "selector": dict(spec.selector) if spec else {},
                "serviceAccount": spec.service_account if spec else None,
                "services": list(spec.services) if spec else [],
                "status": state.status if state else ("ok" if spec else "removed"),
                "reason": state.reason if state else "",
                "statusSince": state.since if state else "",
                "joined": sum(1 for i in instances if i.phase in ("joined", "serving")),
                "warming": sum(
                    1
                    for i in instances
                    if i.phase == "joined"
                    and ("smc.dev/warming", "true")
                    in getattr(registry.workloads.get(("vm", key[0], i.workload)), "labels", ())
                ),
                "draining": sum(1 for i in instances if i.phase == "draining"),
                "instances": [
                    {
                        "instanceId": i.instance_id,
                        "workload": i.workload,
                        "nodeId": f"{key[0]}/{i.workload}",
                        "phase": i.phase,
                        "cause": i.cause,
                        "address": i.address,
                        "state": i.state,
                        "since": i.since,
                    }
                    for i in instances
                ],
            }
        )
    return out
