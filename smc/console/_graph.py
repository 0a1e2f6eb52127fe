"""The mesh map: projections -> nodes and edges for the console.

Role: a pure translation of the registry and policy projections (through
:class:`~smc.projections._policyview.PolicyView`) into JSON-able nodes (services, and client
identities that back no service), the edges SMI allows (with the grants behind each) and the
TrafficSplit edges (with weights). Which workloads back a service follows the same rule as
``PolicyView.workloads_of_service`` (tested against it), but through a label index so a mesh of
1,000 services and 10,000 workloads maps in milliseconds rather than O(services x workloads).
Concurrency: pure reads of the projections; call on the thread that applies events to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from smc.projections._policyview import BACKS_LABEL_PREFIX, PolicyView
from smc.projections._registry import Service, Workload
from smc.smi import Grant
from smc.xds._metrics_sink import EdgeTraffic

__all__ = ["ProxyState", "backing_index", "mesh_graph"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyState:
    """What the ADS server knows of one connected proxy (node id ``ns/workload``)."""

    node_id: str
    acked: bool
    nacked: bool


def backing_index(view: PolicyView) -> dict[str, tuple[Workload, ...]]:
    """Service key ``ns/name`` -> the workloads backing it (as PolicyView decides), sorted."""
    registry = view.registry
    by_label: dict[tuple[str, str, str], set[tuple[str, str, str]]] = {}
    for key, w in registry.workloads.items():
        for k, v in w.labels:
            by_label.setdefault((w.namespace, k, v), set()).add(key)
    out: dict[str, tuple[Workload, ...]] = {}
    for (ns, name), svc in registry.services.items():
        found: set[tuple[str, str, str]] = set()
        explicit = by_label.get((ns, BACKS_LABEL_PREFIX + name, "true"), set())
        found.update(k for k in explicit if k[0] == "vm")
        if svc.selector:
            sets = [by_label.get((ns, k, v), set()) for k, v in svc.selector]
            matched = set.intersection(*sets) if sets else set()
            want_vm = svc.backing == "vm"
            found.update(k for k in matched if (k[0] == "vm") == want_vm)
        ws = [registry.workloads[k] for k in found]
        out[f"{ns}/{name}"] = tuple(sorted(ws, key=lambda w: (w.kind, w.namespace, w.name)))
    return out


def _grant_json(g: Grant) -> dict[str, Any]:
    return {
        "trafficTarget": g.target,
        "source": g.source,
        "destination": g.destination,
        "port": g.port,
        "http": [
            {
                "name": m.name,
                "pathRegex": m.path_regex,
                "methods": list(m.methods),
                "headers": [list(h) for h in m.headers],
            }
            for m in g.http
        ],
        "tcpPorts": None if g.tcp_ports is None else list(g.tcp_ports),
        "udpPorts": None if g.udp_ports is None else list(g.udp_ports),
    }


def _service_node(
    key: str, svc: Service, workloads: tuple[Workload, ...], proxies: Mapping[str, ProxyState]
) -> dict[str, Any]:
    states = [proxies.get(f"{w.namespace}/{w.name}") for w in workloads]
    return {
        "id": f"svc:{key}",
        "kind": "service",
        "label": svc.name,
        "namespace": svc.namespace,
        "name": svc.name,
        "backing": svc.backing,
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in svc.ports],
        "pods": sum(1 for w in workloads if w.kind != "vm"),
        "vms": sum(1 for w in workloads if w.kind == "vm"),
        "identities": sorted({w.identity for w in workloads}),
        "proxies": {
            "connected": sum(1 for s in states if s is not None),
            "acked": sum(1 for s in states if s is not None and s.acked),
            "nacked": sum(1 for s in states if s is not None and s.nacked),
        },
    }


def mesh_graph(
    view: PolicyView,
    *,
    proxies: Iterable[ProxyState] = (),
    traffic: Iterable[EdgeTraffic] = (),
    namespace: str | None = None,
) -> dict[str, Any]:
    """The map of the mesh (see the module docstring); ``traffic`` (from the proxies' stats)
    marks the edges carrying requests with their rate and error/deny ratios, adding edges the
    policy does not name (permissive mode); ``namespace`` keeps the services of one namespace
    and the edges touching them."""
    registry = view.registry
    proxy_map = {p.node_id: p for p in proxies}
    backing = backing_index(view)
    nodes: dict[str, dict[str, Any]] = {}
    services_of_identity: dict[str, list[str]] = {}
    for (ns, name), svc in sorted(registry.services.items()):
        key = f"{ns}/{name}"
        ws = backing[key]
        for ident in {w.identity for w in ws}:
            services_of_identity.setdefault(ident, []).append(key)
        if namespace is None or ns == namespace:
            nodes[f"svc:{key}"] = _service_node(key, svc, ws, proxy_map)

    def sources_of(identity: str) -> list[str]:
        svcs = services_of_identity.get(identity)
        if svcs:
            return [f"svc:{s}" for s in svcs]
        node = f"id:{identity}"
        if node not in nodes:
            ns, _, sa = identity.partition("/")
            clients = [
                w
                for w in registry.workloads.values()
                if w.namespace == ns and w.service_account == sa
            ]
            states = [proxy_map.get(f"{w.namespace}/{w.name}") for w in clients]
            nodes[node] = {
                "id": node,
                "kind": "identity",
                "label": sa,
                "namespace": ns,
                "name": sa,
                "pods": sum(1 for w in clients if w.kind != "vm"),
                "vms": sum(1 for w in clients if w.kind == "vm"),
                "identities": [identity],
                "proxies": {
                    "connected": sum(1 for s in states if s is not None),
                    "acked": sum(1 for s in states if s is not None and s.acked),
                    "nacked": sum(1 for s in states if s is not None and s.nacked),
                },
            }
        return [node]

    edges: dict[str, dict[str, Any]] = {}
    policy = view.evaluated
    for dest_identity in policy.destinations():
        dest_services = [
            s
            for s in services_of_identity.get(dest_identity, [])
            if f"svc:{s}" in nodes or namespace is None
        ]
        if not dest_services:
            continue
        for g in policy.allowed_sources(dest_identity):
            for src in sources_of(g.source):
                for dst in dest_services:
                    eid = f"allow:{src}->svc:{dst}"
                    edge = edges.setdefault(
                        eid,
                        {
                            "id": eid,
                            "kind": "allow",
                            "source": src,
                            "target": f"svc:{dst}",
                            "rules": [],
                        },
                    )
                    edge["rules"].append(_grant_json(g))
    for (ns, name), _svc in sorted(registry.services.items()):
        if namespace is not None and ns != namespace:
            continue
        plan = view.split_for(f"{ns}/{name}")
        if plan is None:
            continue
        total = sum(b.weight for b in plan.backends) or 1
        for b in plan.backends:
            target = f"svc:{ns}/{b.service}"
            eid = f"split:svc:{ns}/{name}->{target}"
            edges[eid] = {
                "id": eid,
                "kind": "split",
                "source": f"svc:{ns}/{name}",
                "target": target,
                "weight": b.weight,
                "percent": round(100 * b.weight / total, 1),
                "split": plan.default_split,
            }
    by_node = {(w.namespace, w.name): w for w in registry.workloads.values()}
    flows: dict[str, list[float]] = {}
    for t in traffic:
        ns, _, name = t.node_id.partition("/")
        w = by_node.get((ns, name))
        target = f"svc:{t.service}"
        if w is None or (namespace is not None and target not in nodes):
            continue
        for src in sources_of(w.identity):
            acc = flows.setdefault(f"{src}->{target}", [0.0, 0.0, 0.0, 0.0])
            acc[0] += t.rps
            acc[1] += t.requests
            acc[2] += t.error_ratio * t.requests
            acc[3] += t.deny_ratio * t.requests
    for pair, (rps, requests, errors, denied) in flows.items():
        src, _, target = pair.partition("->")
        stats = {
            "rps": round(rps, 2),
            "requests": int(requests),
            "errorRatio": round(errors / requests, 3) if requests else 0.0,
            "denyRatio": round(denied / requests, 3) if requests else 0.0,
        }
        found = edges.get(f"allow:{pair}")
        if found is None:
            eid = f"traffic:{pair}"
            found = edges[eid] = {"id": eid, "kind": "traffic", "source": src, "target": target}
        found["traffic"] = stats
    # an edge may name a node outside the namespace filter or a split backend not registered
    for e in edges.values():
        for end in (e["source"], e["target"]):
            if end not in nodes:
                ns, _, name = end.partition(":")[2].partition("/")
                nodes[end] = {
                    "id": end,
                    "kind": "external" if end.startswith("svc:") else "identity",
                    "label": name,
                    "namespace": ns,
                    "name": name,
                    "pods": 0,
                    "vms": 0,
                    "identities": [],
                    "proxies": {"connected": 0, "acked": 0, "nacked": 0},
                }
    return {
        "permissive": view.permissive,
        "trustDomain": view.trust_domain,
        "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
        "edges": sorted(edges.values(), key=lambda e: e["id"]),
    }
