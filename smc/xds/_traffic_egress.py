"""Egress: OSM Egress policies and ``enableEgress`` on the sidecars of the source identities.

Role: HTTP by Host (virtual hosts on the outbound route configuration, clusters resolving
the host by DNS; an Egress naming HTTPRouteGroups in ``matches`` routes only their paths,
methods and headers), HTTPS by SNI and TCP by IP range (explicit sidecars: listeners
``egress|<port>`` on the workload address; transparent sidecars: chains on the ``outbound``
listener to the original destination), and the deny-all default chain with
``enableEgress: false``. Clusters ``egress|<host or address>|<port>``. Imports
:mod:`smc.xds._traffic_model`, :mod:`smc.xds._traffic_observe` (access logs on its TCP
proxies) and :mod:`smc.xds._traffic_upstream` (the connection settings of an
UpstreamTrafficSetting an Egress names in its ``matches``).
Concurrency: pure functions of an immutable :class:`~smc.xds._traffic_model.TrafficPolicy`
returning frozen :class:`EgressParts`; called on the builder's thread (the asyncio loop).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import (  # noqa: F401
    tls_inspector_pb2 as _tls_inspector_pb2,
)
from google.protobuf import json_format

from smc.smi import EgressPolicy, HTTPMatch
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic_model import _T, TrafficPolicy, _sockaddr, log
from smc.xds._traffic_observe import observe_tcp
from smc.xds._traffic_upstream import cluster_settings
from smc.xds._types import CLUSTER, LISTENER

__all__ = [
    "NO_EGRESS",
    "TLS_INSPECTOR_FILTER",
    "EgressParts",
    "egress_cluster_name",
    "egress_denied_chain",
    "egress_parts",
    "explicit_egress_listeners",
    "transparent_egress_chains",
]

_TLS_INSPECTOR = _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_NET_RBAC = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
TLS_INSPECTOR_FILTER = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {"@type": _TLS_INSPECTOR},
}


def egress_cluster_name(target: str, port: int) -> str:
    """``egress|<host or address>|<port>``."""
    return f"egress|{target}|{port}"


@dataclass(frozen=True, slots=True)
class EgressParts:
    """Identity-level egress: virtual hosts for the outbound route configuration, clusters,
    and the TLS (port -> SNI hosts) and TCP (port -> CIDRs) destinations."""

    vhosts: tuple[dict[str, Any], ...] = ()
    clusters: tuple[ResourceEntry, ...] = ()
    http_ports: tuple[int, ...] = ()
    tls: tuple[tuple[int, tuple[str, ...]], ...] = ()
    tcp: tuple[tuple[int, tuple[str, ...]], ...] = ()


#: No egress at all (the default of an identity without Egress policies).
NO_EGRESS = EgressParts()


#: Turns an SMI HTTP match into an Envoy route ``match`` (the builder's, shared with SMI routes).
RouteMatch = Callable[[HTTPMatch], dict[str, Any]]
_ANY_PATH: tuple[dict[str, Any], ...] = ({"prefix": "/"},)


def egress_parts(tp: TrafficPolicy, identity: str, *, route_match: RouteMatch) -> EgressParts:
    policies = tp.egress_of(identity)
    if not policies:
        return NO_EGRESS
    # (host, port) -> the route matches allowed to it (the union over the policies)
    http: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    tls: dict[int, set[str]] = {}
    tcp: dict[int, set[str]] = {}
    # cluster target (host or address, port) -> the connection settings of an Egress naming
    # an UpstreamTrafficSetting (the first policy's, in the policies' order)
    settings: dict[tuple[str, int], dict[str, Any]] = {}
    for e in policies:
        found, uts = _connection_settings(tp, e)
        if not found:
            continue  # names a setting that does not exist: ignored, like OSM
        matches = _http_matches(tp, e, route_match)
        for p in e.ports:
            targets: list[str] = []
            if p.protocol == "http":
                for h in e.hosts:
                    allowed = http.setdefault((h, p.number), {})
                    for m in matches:
                        allowed.setdefault(json.dumps(m, sort_keys=True), m)
                targets = list(e.hosts)
            elif p.protocol == "https":
                tls.setdefault(p.number, set()).update(e.hosts)
                targets = list(e.hosts)
            else:
                tcp.setdefault(p.number, set()).update(e.ip_addresses)
                targets = [c.split("/")[0] for c in e.ip_addresses]
            if uts:
                for t in targets:
                    settings.setdefault((t, p.number), uts)
    vhosts: list[dict[str, Any]] = []
    clusters: dict[str, ResourceEntry] = {}
    for (host, port), allowed in sorted(http.items()):
        name = egress_cluster_name(host, port)
        clusters[name] = _dns_cluster(name, host, port, settings.get((host, port)))
        domains = [f"{host}:{port}"] + ([host] if port == 80 else [])
        vhosts.append(
            {
                "name": name,
                "domains": domains,
                # A request matching none of the routes has no route (404).
                "routes": [
                    {"match": allowed[key], "route": {"cluster": name}} for key in sorted(allowed)
                ],
            }
        )
    for port, hosts in tls.items():
        for host in sorted(hosts):
            if not host.startswith("*."):
                name = egress_cluster_name(host, port)
                clusters[name] = _dns_cluster(name, host, port, settings.get((host, port)))
    for port, cidrs in tcp.items():
        for cidr in sorted(cidrs):
            net = ipaddress.ip_network(cidr)
            if net.num_addresses == 1:
                address = str(net.network_address)
                name = egress_cluster_name(address, port)
                clusters[name] = _static_cluster(name, address, port, settings.get((address, port)))
    return EgressParts(
        vhosts=tuple(vhosts),
        clusters=tuple(clusters[k] for k in sorted(clusters)),
        http_ports=tuple(sorted({p for _, p in http})),
        tls=tuple((p, tuple(sorted(h))) for p, h in sorted(tls.items())),
        tcp=tuple((p, tuple(sorted(c))) for p, c in sorted(tcp.items())),
    )


def _connection_settings(tp: TrafficPolicy, e: EgressPolicy) -> tuple[bool, dict[str, Any]]:
    """The cluster fields of the UpstreamTrafficSetting an Egress names in its ``matches``
    (OSM: its connection settings, i.e. circuit breakers, connect timeout, requests per
    connection, on the Egress's clusters); False when it names one that does not exist."""
    for ref in e.matches:
        if ref.kind != "UpstreamTrafficSetting":
            continue
        uts = tp.settings.get((e.namespace, ref.name))
        if uts is None:
            log.warning(
                "Egress %s/%s: UpstreamTrafficSetting %s does not exist; the Egress is ignored",
                e.namespace,
                e.name,
                ref.name,
            )
            return False, {}
        fields = cluster_settings(uts)
        fields.pop("outlier_detection", None)  # connection settings only, as in OSM
        return True, fields
    return True, {}


def _http_matches(
    tp: TrafficPolicy, e: EgressPolicy, route_match: RouteMatch
) -> tuple[dict[str, Any], ...]:
    """The route matches an Egress allows on its HTTP ports: every match of the HTTPRouteGroups
    in its ``matches`` (OSM: only those paths, methods and headers reach the hosts), or any
    request when it names none. A group that does not exist (yet) allows nothing."""
    refs = [ref for ref in e.matches if ref.kind == "HTTPRouteGroup"]
    if not refs:
        return _ANY_PATH
    out: list[dict[str, Any]] = []
    for ref in refs:
        group = tp.route_groups.get((e.namespace, ref.name))
        if group is None:
            log.warning(
                "Egress %s/%s: HTTPRouteGroup %s does not exist; it allows nothing",
                e.namespace,
                e.name,
                ref.name,
            )
            continue
        out.extend(route_match(m) for m in group.matches)
    return tuple(out)


def _dns_cluster(
    name: str, host: str, port: int, settings: dict[str, Any] | None = None
) -> ResourceEntry:
    spec = {
        "connect_timeout": "2s",
        **(settings or {}),
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sockaddr(host, port)}}]}],
        },
    }
    return make_entry(json_format.ParseDict(spec, cluster_pb2.Cluster()), type_url=CLUSTER)


def _static_cluster(
    name: str, address: str, port: int, settings: dict[str, Any] | None = None
) -> ResourceEntry:
    spec = {
        "connect_timeout": "2s",
        **(settings or {}),
        "name": name,
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sockaddr(address, port)}}]}],
        },
    }
    return make_entry(json_format.ParseDict(spec, cluster_pb2.Cluster()), type_url=CLUSTER)


def _tcp_proxy(tp: TrafficPolicy, stat_prefix: str, cluster: str, node: str) -> dict[str, Any]:
    flt = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster},
    }
    return observe_tcp(tp, flt, node=node, direction="egress")


def explicit_egress_listeners(
    tp: TrafficPolicy, parts: EgressParts, *, address: str, taken: set[int], node: str
) -> list[ResourceEntry]:
    """Listeners ``egress|<port>`` on the workload address: HTTPS by SNI (TLS inspector, a
    chain per host), TCP to single addresses (a range wider than one address needs the
    transparent model and is skipped with a warning)."""
    chains: dict[int, list[dict[str, Any]]] = {}
    for port, hosts in parts.tls:
        for host in hosts:
            if host.startswith("*."):
                log.warning(
                    "proxy %s: wildcard egress host %s needs the transparent model", node, host
                )
                continue
            chains.setdefault(port, []).append(
                {
                    "name": f"egress|{host}|{port}",
                    "filter_chain_match": {"server_names": [host]},
                    "filters": [
                        _tcp_proxy(tp, f"egress_tls_{port}", egress_cluster_name(host, port), node)
                    ],
                }
            )
    for port, cidrs in parts.tcp:
        singles = [c for c in cidrs if ipaddress.ip_network(c).num_addresses == 1]
        if len(singles) != 1 or len(cidrs) != 1:
            log.warning(
                "proxy %s: egress TCP port %d to %s needs the transparent model (one address"
                " per port in the explicit model); skipped",
                node,
                port,
                ",".join(cidrs),
            )
            continue
        target = str(ipaddress.ip_network(singles[0]).network_address)
        chains.setdefault(port, []).append(
            {
                "name": f"egress|{target}|{port}",
                "filters": [
                    _tcp_proxy(tp, f"egress_tcp_{port}", egress_cluster_name(target, port), node)
                ],
            }
        )
    out: list[ResourceEntry] = []
    for port in sorted(chains):
        if port in taken:
            log.warning(
                "proxy %s: egress port %d clashes with another listener; skipped", node, port
            )
            continue
        spec = {
            "name": f"egress|{port}",
            "address": _sockaddr(address, port),
            "enable_reuse_port": False,
            "listener_filters": [TLS_INSPECTOR_FILTER],
            "filter_chains": chains[port],
        }
        out.append(
            make_entry(json_format.ParseDict(spec, listener_pb2.Listener()), type_url=LISTENER)
        )
    return out


def egress_denied_chain(tp: TrafficPolicy, *, passthrough: str, node: str) -> dict[str, Any]:
    """The transparent ``outbound`` listener's default chain with ``enableEgress: false``:
    an RBAC filter allowing nothing closes every connection no other chain took."""
    return {
        "name": "egress-denied",
        "filters": [
            {
                "name": "envoy.filters.network.rbac",
                "typed_config": {
                    "@type": _NET_RBAC,
                    "stat_prefix": "outbound_egress_denied",
                    "rules": {"action": "ALLOW", "policies": {}},
                },
            },
            _tcp_proxy(tp, "outbound_egress_denied", passthrough, node),
        ],
    }


def transparent_egress_chains(
    tp: TrafficPolicy, parts: EgressParts, *, passthrough: str, node: str
) -> list[dict[str, Any]]:
    """Chains of the transparent ``outbound`` listener: HTTPS by SNI and TCP by IP range, to
    the original destination."""
    out: list[dict[str, Any]] = []
    for port, hosts in parts.tls:
        out.append(
            {
                "name": f"egress-tls|{port}",
                "filter_chain_match": {
                    "destination_port": port,
                    "transport_protocol": "tls",
                    "server_names": list(hosts),
                },
                "filters": [_tcp_proxy(tp, f"egress_tls_{port}", passthrough, node)],
            }
        )
    for port, cidrs in parts.tcp:
        ranges = []
        for c in cidrs:
            net = ipaddress.ip_network(c)
            ranges.append({"address_prefix": str(net.network_address), "prefix_len": net.prefixlen})
        out.append(
            {
                "name": f"egress-tcp|{port}",
                "filter_chain_match": {"destination_port": port, "prefix_ranges": ranges},
                "filters": [_tcp_proxy(tp, f"egress_tcp_{port}", passthrough, node)],
            }
        )
    return out
