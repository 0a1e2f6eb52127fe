"""Outbound side of the snapshot builder: what a proxy's identity may call.

Role: the outbound listeners (explicit HTTP and TCP, transparent ``outbound``), the ``outbound``
route config (virtual hosts per reachable service port, TrafficSplit weights and matches), EDS
clusters with upstream mTLS and their endpoints, memoised per identity and per service port. See
:mod:`smc.xds._builder` for the full model. Concurrency: part of one
:class:`~smc.xds.BuildPass` (the loop thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from smc.events import ServicePort
from smc.projections import Service, Workload
from smc.smi import HTTPMatch
from smc.xds._builder_common import (
    _ADS,
    _HCM,
    _RETRY,
    _ROUTER_FILTER,
    _SDS_ROOT,
    _UPSTREAM_TLS,
    OUTBOUND_LISTENER,
    OUTBOUND_ROUTE,
    PASSTHROUGH_CLUSTER,
    _listener,
    _methods_matcher,
    _Outbound,
    _parse,
    _PassBase,
    _passthrough_chain,
    _sockaddr,
    _tcp_proxy,
    log,
    outbound_cluster_name,
)
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic import (
    TLS_INSPECTOR_FILTER,
    apply_retries,
    cluster_settings,
    egress_denied_chain,
    egress_parts,
    observe_cluster,
    observe_hcm,
    observe_tcp,
    settings_tag,
    transparent_egress_chains,
)
from smc.xds._types import CLUSTER, ENDPOINT, ROUTE

__all__ = ["OutboundParts"]


class OutboundParts(_PassBase):
    """Outbound listeners, routes, clusters and endpoints (a base of :class:`BuildPass`)."""

    def _outbound_listener(self, workload: Workload) -> ResourceEntry:
        hcm = observe_hcm(
            self.traffic,
            _outbound_http_filter("outbound"),
            node=f"{workload.namespace}/{workload.name}",
            direction="outbound",
        )
        return _listener(
            OUTBOUND_LISTENER,
            _sockaddr(workload.address or "127.0.0.1", self.outbound_port),
            [{"filters": [hcm]}],
            direction="OUTBOUND",
        )

    def _outbound_tcp_listener(self, workload: Workload, port: int, cluster: str) -> ResourceEntry:
        return _listener(
            f"outbound-tcp|{port}",
            _sockaddr(workload.address or "127.0.0.1", port),
            [
                {
                    "filters": [
                        observe_tcp(
                            self.traffic,
                            _tcp_proxy(f"outbound_tcp_{port}", cluster),
                            node=f"{workload.namespace}/{workload.name}",
                            direction="outbound",
                        )
                    ]
                }
            ],
            direction="OUTBOUND",
        )

    def _transparent_outbound(self, node_id: str, outbound: _Outbound) -> ResourceEntry:
        """The transparent ``outbound`` listener: a chain per destination port."""
        chains: list[dict[str, Any]] = []
        tp = self.traffic
        for port in outbound.http_ports:
            hcm = _outbound_http_filter(f"outbound_{port}")
            chains.append(
                {
                    "name": f"outbound|{port}",
                    "filter_chain_match": {"destination_port": port},
                    "filters": [observe_hcm(tp, hcm, node=node_id, direction="outbound")],
                }
            )
        for port, cluster in _free_tcp_ports(node_id, outbound.tcp, set(outbound.http_ports)):
            flt = _tcp_proxy(f"outbound_tcp_{port}", cluster)
            chains.append(
                {
                    "name": f"outbound-tcp|{port}",
                    "filter_chain_match": {"destination_port": port},
                    "filters": [observe_tcp(tp, flt, node=node_id, direction="outbound")],
                }
            )
        egress = transparent_egress_chains(
            tp, outbound.egress, passthrough=PASSTHROUGH_CLUSTER, node=node_id
        )
        chains.extend(egress)
        return _listener(
            OUTBOUND_LISTENER,
            _sockaddr("0.0.0.0", self.outbound_port),
            chains,
            default=(
                _passthrough_chain("outbound_passthrough")
                if tp.enable_egress
                else egress_denied_chain(tp, passthrough=PASSTHROUGH_CLUSTER, node=node_id)
            ),
            listener_filters=[TLS_INSPECTOR_FILTER] if outbound.egress.tls else None,
            direction="OUTBOUND",
        )

    def _passthrough_cluster(self) -> ResourceEntry:
        if self._passthrough is None:
            self._passthrough = make_entry(
                _parse(
                    {
                        "name": PASSTHROUGH_CLUSTER,
                        "type": "ORIGINAL_DST",
                        "lb_policy": "CLUSTER_PROVIDED",
                        "connect_timeout": "1s",
                    },
                    cluster_pb2.Cluster(),
                ),
                type_url=CLUSTER,
            )
        return self._passthrough

    def reachable_services(self, identity: str) -> tuple[tuple[str, ...], frozenset[str]]:
        """Services ``identity`` may call and the dependency keys of that answer."""
        allowed = self.view.outbound_identities(identity)
        if allowed is None:
            return self.services(), frozenset({"svc-all"})
        deps = frozenset(f"dst:{d}" for d in allowed)
        wanted = set(allowed)
        return (
            tuple(s for s in self.services() if wanted.intersection(self.service_identities(s))),
            deps,
        )

    def _outbound_of(self, identity: str) -> _Outbound:
        found = self._outbound.get(identity)
        if found is not None:
            return found
        services, base_deps = self.reachable_services(identity)
        deps = set(base_deps)
        own_ns = identity.partition("/")[0]
        vhosts: list[dict[str, Any]] = []
        clusters: set[tuple[str, int]] = set()
        tcp: list[tuple[int, str]] = []
        http_ports: set[int] = set()
        for svc_key in services:
            svc = self._service(svc_key)
            deps.add(f"svc:{svc_key}")
            if svc is None or not svc.ports:
                continue
            plan = self.view.split_for(svc_key)
            for sp in svc.ports:
                if sp.protocol == "tcp":
                    clusters.add((svc_key, sp.port))
                    tcp.append((sp.port, outbound_cluster_name(svc_key, sp.port)))
            svc_http = [p for p in svc.ports if p.protocol in ("http", "grpc")]
            http_ports.update(p.port for p in svc_http)
            for index, sp in enumerate(svc_http):
                routes: list[dict[str, Any]] = []
                if plan is not None:
                    for ab in plan.ab_routes:
                        action = self._split_action(svc, sp, ab.backends, deps, clusters)
                        for m in ab.matches:
                            routes.append({"match": _route_match(m), "route": action})
                    default = self._split_action(svc, sp, plan.backends, deps, clusters)
                else:
                    default = self._split_action(svc, sp, (), deps, clusters)
                routes.append({"match": {"prefix": "/"}, "route": default})
                apply_retries(self.traffic, identity, svc_key, routes)
                vhosts.append(
                    {
                        "name": f"{svc_key}|{sp.port}",
                        "domains": _domains(svc, sp, own_ns=own_ns, primary=index == 0),
                        "routes": routes,
                    }
                )
        egress = egress_parts(self.traffic, identity, route_match=_route_match)
        vhosts.extend(egress.vhosts)
        http_ports.update(egress.http_ports)
        entries: list[ResourceEntry] = [
            make_entry(
                _parse(
                    {"name": OUTBOUND_ROUTE, "virtual_hosts": vhosts},
                    route_pb2.RouteConfiguration(),
                ),
                type_url=ROUTE,
            )
        ]
        for key in sorted(clusters):
            entries.extend(self._cluster(*key))
        entries.extend(egress.clusters)
        made = _Outbound(
            entries=tuple(entries),
            deps=frozenset(deps),
            tcp=tuple(sorted(tcp)),
            http_ports=tuple(sorted(http_ports)),
            egress=egress,
        )
        self._outbound[identity] = made
        return made

    def _split_action(
        self,
        root: Service,
        sp: ServicePort,
        backends: Iterable[Any],
        deps: set[str],
        clusters: set[tuple[str, int]],
    ) -> dict[str, Any]:
        return self.route_action(
            root,
            sp,
            backends,
            deps,
            clusters,
            cluster_name=outbound_cluster_name,
            extra={"retry_policy": _RETRY},
        )

    def route_action(
        self,
        root: Service,
        sp: ServicePort,
        backends: Iterable[Any],
        deps: set[str],
        clusters: set[tuple[str, int]],
        *,
        cluster_name: Callable[[str, int], str],
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The route action sending ``root``'s port ``sp`` to its split ``backends`` (weights
        above zero whose service exists; the root itself when none does), naming clusters with
        ``cluster_name`` and adding ``extra`` (e.g. a retry policy). Records the services it
        depends on in ``deps`` and the (service, port) clusters it needs in ``clusters``."""
        weighted: list[tuple[str, int]] = []
        for b in backends:
            if b.weight <= 0:
                continue
            key = f"{root.namespace}/{b.service}"
            deps.add(f"svc:{key}")
            target = self._service(key)
            if target is None or not target.ports:
                continue
            port = _matching_port(target, sp)
            clusters.add((key, port.port))
            weighted.append((cluster_name(key, port.port), b.weight))
        if not weighted:
            clusters.add((root.key, sp.port))
            return {"cluster": cluster_name(root.key, sp.port), **extra}
        if len(weighted) == 1:
            return {"cluster": weighted[0][0], **extra}
        return {
            "weighted_clusters": {
                "clusters": [{"name": n, "weight": w} for n, w in weighted],
            },
            **extra,
        }

    def lb_endpoints(self, service: str, port: int) -> list[dict[str, Any]]:
        """The EDS ``lb_endpoints`` of ``service`` (``ns/name``) on service ``port``: every
        registry endpoint (not-ready ones UNHEALTHY), only those on the port's target port
        when the service has several ports."""
        svc = self._service(service)
        target_port = port
        several = False
        if svc is not None:
            several = len(svc.ports) > 1
            for sp in svc.ports:
                if sp.port == port:
                    target_port = sp.target_port
        eps = self.registry.endpoints_of(*service.split("/", 1))
        return [
            {
                "endpoint": {"address": _sockaddr(e.address, e.port)},
                "health_status": "HEALTHY" if e.ready else "UNHEALTHY",
            }
            for e in eps
            if not several or e.port == target_port
        ]

    def _cluster(self, service: str, port: int) -> tuple[ResourceEntry, ResourceEntry]:
        key = (service, port)
        found = self._clusters.get(key)
        if found is not None:
            return found
        name = outbound_cluster_name(service, port)
        ids = self.service_identities(service)
        if ids:
            sans = [{"san_type": "URI", "matcher": {"exact": self.view.spiffe_id(i)}} for i in ids]
        else:
            sans = [
                {
                    "san_type": "URI",
                    "matcher": {"prefix": f"spiffe://{self.view.trust_domain}/"},
                }
            ]
        settings = observe_cluster(
            self.traffic, cluster_settings(self.traffic.upstream.get(service))
        )
        cluster = _parse(
            {
                "connect_timeout": "1s",
                **settings,
                "name": name,
                "type": "EDS",
                "eds_cluster_config": {"eds_config": _ADS},
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": _UPSTREAM_TLS,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": self._sds_cert,
                            "combined_validation_context": {
                                "default_validation_context": {
                                    "match_typed_subject_alt_names": sans
                                },
                                "validation_context_sds_secret_config": _SDS_ROOT,
                            },
                        },
                    },
                },
            },
            cluster_pb2.Cluster(),
        )
        lb = self.lb_endpoints(service, port)
        cla: dict[str, Any] = {"cluster_name": name}
        if lb:
            cla["endpoints"] = [{"lb_endpoints": lb}]
        if settings:
            # A changed cluster warms until its endpoints arrive again; tagging the endpoints
            # with the settings makes them change with the cluster, so they are re-sent.
            cla["endpoints"] = [{"lb_endpoints": lb, "metadata": settings_tag(settings)}]
        made = (
            make_entry(cluster, type_url=CLUSTER),
            make_entry(_parse(cla, endpoint_pb2.ClusterLoadAssignment()), type_url=ENDPOINT),
        )
        self._clusters[key] = made
        return made


def _free_tcp_ports(
    node_id: str, tcp: Iterable[tuple[int, str]], taken: set[int]
) -> list[tuple[int, str]]:
    """The outbound TCP (port, cluster) pairs whose port is not ``taken`` nor by an earlier
    pair; the others are skipped with a warning (one listener or chain per port)."""
    kept: list[tuple[int, str]] = []
    taken = set(taken)
    for port, cluster in tcp:
        if port in taken:
            log.warning(
                "proxy %s: outbound TCP port %d of %s clashes with another listener or service"
                " port; skipped",
                node_id,
                port,
                cluster,
            )
            continue
        taken.add(port)
        kept.append((port, cluster))
    return kept


def _outbound_http_filter(stat_prefix: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": stat_prefix,
            "rds": {"route_config_name": OUTBOUND_ROUTE, "config_source": _ADS},
            "http_filters": [_ROUTER_FILTER],
        },
    }


def _matching_port(target: Service, sp: ServicePort) -> ServicePort:
    for p in target.ports:
        if p.port == sp.port:
            return p
    for p in target.ports:
        if p.name == sp.name:
            return p
    return target.ports[0]


def _domains(svc: Service, sp: ServicePort, *, own_ns: str, primary: bool) -> list[str]:
    names = [
        f"{svc.name}.{svc.namespace}",
        f"{svc.name}.{svc.namespace}.svc",
        f"{svc.name}.{svc.namespace}.svc.cluster.local",
    ]
    if svc.namespace == own_ns:
        names.insert(0, svc.name)
    out = [f"{n}:{sp.port}" for n in names]
    if primary:
        out = names + out
    return out


def _route_match(m: HTTPMatch) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if m.envoy_path_regex is not None:
        match["safe_regex"] = {"regex": m.envoy_path_regex}
    else:
        match["prefix"] = "/"
    headers: list[dict[str, Any]] = []
    if m.methods != ("*",):
        headers.append(_methods_matcher(m.methods))
    for name, rx in m.headers:
        headers.append({"name": name, "string_match": {"safe_regex": {"regex": rx}}})
    if headers:
        match["headers"] = headers
    return match
