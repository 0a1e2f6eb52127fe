"""Inbound side of the snapshot builder: the listeners a proxy accepts mesh traffic on.

Role: per target port an mTLS listener (explicit) or filter chain of ``inbound`` (transparent),
with RBAC from the SMI policy (HTTP per route, TCP per port), the inbound route configs and the
local-application clusters. See :mod:`smc.xds._builder` for the full model. Concurrency: part
of one :class:`~smc.xds.BuildPass` (the loop thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from smc.projections import Workload
from smc.smi import Grant, HTTPMatch
from smc.xds._builder_common import (
    _ADS,
    _DOWNSTREAM_TLS,
    _HCM,
    _HTTP_RBAC,
    _HTTP_RBAC_PER_ROUTE,
    _NET_RBAC,
    _ROUTER_FILTER,
    _SDS_ROOT,
    APP_PORT_LABEL,
    INBOUND_LISTENER,
    _listener,
    _methods_matcher,
    _parse,
    _PassBase,
    _passthrough_chain,
    _sockaddr,
    _tcp_proxy,
    inbound_name,
    log,
)
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic import (
    TLS_INSPECTOR_FILTER,
    VHOST_RATE_LIMITS,
    inbound_http_filters,
    inbound_routes,
    inbound_tcp_filters,
    ingress_chains,
    ingress_of,
    ingress_rbac_policies,
    observe_hcm,
    observe_tcp,
)
from smc.xds._types import CLUSTER, ROUTE

__all__ = ["InboundParts"]


class InboundParts(_PassBase):
    """Inbound listeners, their filter chains, routes and RBAC (a base of :class:`BuildPass`)."""

    def _inbound(
        self, workload: Workload, deps: set[str], *, transparent: bool
    ) -> list[ResourceEntry]:
        ports: dict[int, str] = {}  # target port -> protocol (http wins over tcp)
        port_services: dict[int, list[str]] = {}  # target port -> services (traffic policy)
        for svc_key in self.services_backed_by(workload):
            deps.add(f"svc:{svc_key}")
            svc = self._service(svc_key)
            if svc is None:
                continue
            for sp in svc.ports:
                port_services.setdefault(sp.target_port, []).append(svc_key)
                proto = "tcp" if sp.protocol in ("tcp", "udp") else "http"
                if sp.protocol == "udp":
                    continue
                if ports.get(sp.target_port) != "http":
                    ports[sp.target_port] = proto
        labels = dict(workload.labels)
        app_port: int | None = None
        raw = labels.get(APP_PORT_LABEL)
        if raw is not None:
            if raw.isdigit() and 0 < int(raw) < 65536:
                app_port = int(raw)
            else:
                log.warning(
                    "workload %s/%s: label %s=%r is not a port; using the target ports",
                    workload.namespace,
                    workload.name,
                    APP_PORT_LABEL,
                    raw,
                )
        address = workload.address or "0.0.0.0"
        grants = () if self.view.permissive else self.view.allowed_sources(workload.identity)
        out: list[ResourceEntry] = []
        chains: list[dict[str, Any]] = []
        inspect = False  # the transparent listener needs the TLS inspector (ingress chains)
        for port in sorted(ports):
            name = inbound_name(port)
            out.append(
                make_entry(
                    _parse(
                        {
                            "name": name,
                            "type": "STATIC",
                            "connect_timeout": "1s",
                            "load_assignment": {
                                "cluster_name": name,
                                "endpoints": [
                                    {
                                        "lb_endpoints": [
                                            {
                                                "endpoint": {
                                                    "address": _sockaddr(
                                                        "127.0.0.1", app_port or port
                                                    )
                                                }
                                            }
                                        ]
                                    }
                                ],
                            },
                        },
                        cluster_pb2.Cluster(),
                    ),
                    type_url=CLUSTER,
                )
            )
            flt = None
            svcs = port_services.get(port, [])
            node = f"{workload.namespace}/{workload.name}"
            ingress = ingress_of(self.traffic, svcs, port)
            if ports[port] == "http":
                flt = observe_hcm(
                    self.traffic,
                    self._inbound_http_filter(port, services=svcs),
                    node=node,
                    direction="inbound",
                )
                out.append(self._inbound_route(port, grants, services=svcs, ingress=ingress))
            chain = self._inbound_chain(port, grants, http_filter=flt, services=svcs, node=node)
            extra = (
                ingress_chains(
                    self.traffic,
                    ingress,
                    self._endpoint_triples(),
                    port=port,
                    cluster=name,
                    node=node,
                    sds_cert=self._sds_cert,
                )
                if ingress and ports[port] == "http"
                else []
            )
            match: dict[str, Any] = {"transport_protocol": "tls"} if extra else {}
            if transparent:
                match["destination_port"] = port
                chains.append({"name": name, "filter_chain_match": match} | chain)
                for x in extra:
                    x["filter_chain_match"]["destination_port"] = port
                    chains.append(x)
                    inspect = True
            elif extra:
                out.append(
                    _listener(
                        name,
                        _sockaddr(address, port),
                        [{"filter_chain_match": match} | chain, *extra],
                        listener_filters=[TLS_INSPECTOR_FILTER],
                        direction="INBOUND",
                    )
                )
            else:
                out.append(_listener(name, _sockaddr(address, port), [chain], direction="INBOUND"))
        if transparent:
            out.append(
                _listener(
                    INBOUND_LISTENER,
                    _sockaddr("0.0.0.0", self.inbound_port),
                    chains,
                    default=_passthrough_chain("inbound_passthrough"),
                    listener_filters=[TLS_INSPECTOR_FILTER] if inspect else None,
                    direction="INBOUND",
                )
            )
        return out

    def _principal(self, identity: str) -> dict[str, Any]:
        return {"authenticated": {"principal_name": {"exact": self.view.spiffe_id(identity)}}}

    def _http_policies(self, port: int, grants: Sequence[Grant]) -> dict[str, Any]:
        policies: dict[str, Any] = {}
        for g in grants:
            if g.port is not None and g.port != port:
                continue
            covers_tcp = g.tcp_ports is not None and (not g.tcp_ports or port in g.tcp_ports)
            if g.http:
                if g.tcp_ports is not None and not covers_tcp:
                    continue
                perms = [_http_permission(m) for m in g.http]
            elif covers_tcp:
                perms = [{"any": True}]
            else:
                continue
            name = f"{g.target}|{g.source}"
            n = 2
            while name in policies:
                name = f"{g.target}|{g.source}|{n}"
                n += 1
            policies[name] = {"permissions": perms, "principals": [self._principal(g.source)]}
        return policies

    def _tcp_policies(self, port: int, grants: Sequence[Grant]) -> dict[str, Any]:
        policies: dict[str, Any] = {}
        for g in grants:
            if g.port is not None and g.port != port:
                continue
            if g.tcp_ports is None or (g.tcp_ports and port not in g.tcp_ports):
                continue
            name = f"{g.target}|{g.source}"
            policies.setdefault(name, {"permissions": [{"any": True}], "principals": []})
            policies[name]["principals"].append(self._principal(g.source))
        return policies

    def _endpoint_triples(self) -> list[tuple[str, str, str]]:
        """(namespace, service, address) of every endpoint (IngressBackend Service sources)."""
        out = []
        for ns, name in self.registry.services:
            for e in self.registry.endpoints_of(ns, name):
                out.append((ns, name, e.address))
        return out

    def _inbound_http_filter(self, port: int, *, services: Sequence[str] = ()) -> dict[str, Any]:
        """The HTTP connection manager of an inbound port. Its RBAC filter denies everything
        by default; the allowed sources live in the RDS route config (per-route RBAC), so a
        policy change updates routes, which apply to open connections at once (a listener
        change would leave open connections on the old, draining filter chain)."""
        name = inbound_name(port)
        return {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": _HCM,
                "stat_prefix": f"inbound_{port}",
                "forward_client_cert_details": "SANITIZE_SET",
                "set_current_client_cert_details": {"uri": True},
                "rds": {"route_config_name": name, "config_source": _ADS},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.rbac",
                        "typed_config": {"@type": _HTTP_RBAC, "rules": {"action": "ALLOW"}},
                    },
                    *inbound_http_filters(self.traffic, services),
                    _ROUTER_FILTER,
                ],
            },
        }

    def _inbound_route(
        self,
        port: int,
        grants: Sequence[Grant],
        *,
        services: Sequence[str] = (),
        ingress: Sequence[Any] = (),
    ) -> ResourceEntry:
        name = inbound_name(port)
        per_route: dict[str, Any] = {"@type": _HTTP_RBAC_PER_ROUTE}
        if not self.view.permissive:
            policies = self._http_policies(port, grants)
            if ingress:
                policies.update(ingress_rbac_policies(ingress, self._endpoint_triples()))
            per_route["rbac"] = {"rules": {"action": "ALLOW", "policies": policies}}
        routes, vhost_filters = inbound_routes(
            self.traffic,
            services,
            {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "30s"}},
        )
        vhost_limits = vhost_filters.pop(VHOST_RATE_LIMITS, None)
        return make_entry(
            _parse(
                {
                    "name": name,
                    "virtual_hosts": [
                        {
                            "name": name,
                            "domains": ["*"],
                            "routes": routes,
                            "typed_per_filter_config": {
                                "envoy.filters.http.rbac": per_route,
                                **vhost_filters,
                            },
                            **({"rate_limits": vhost_limits} if vhost_limits else {}),
                        }
                    ],
                },
                route_pb2.RouteConfiguration(),
            ),
            type_url=ROUTE,
        )

    def _inbound_chain(
        self,
        port: int,
        grants: Sequence[Grant],
        *,
        http_filter: dict[str, Any] | None,
        services: Sequence[str] = (),
        node: str = "",
    ) -> dict[str, Any]:
        """The filter chain of one inbound port: mTLS required, then HTTP (RBAC per route)
        or TCP (network RBAC, TCP proxy) to the local application."""
        name = inbound_name(port)
        # Connection limits (rate limits per connection) apply to TCP ports; HTTP ports are
        # limited per request (their connections are pooled by the clients).
        filters = [] if http_filter else inbound_tcp_filters(self.traffic, services, port)
        if http_filter is not None:
            filters.append(http_filter)
        else:
            if not self.view.permissive:
                filters.append(
                    {
                        "name": "envoy.filters.network.rbac",
                        "typed_config": {
                            "@type": _NET_RBAC,
                            "stat_prefix": f"inbound_tcp_{port}",
                            "rules": {
                                "action": "ALLOW",
                                "policies": self._tcp_policies(port, grants),
                            },
                        },
                    }
                )
            filters.append(
                observe_tcp(
                    self.traffic,
                    _tcp_proxy(f"inbound_tcp_{port}", name),
                    node=node,
                    direction="inbound",
                )
            )
        return {
            "filters": filters,
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _DOWNSTREAM_TLS,
                    "require_client_certificate": True,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": self._sds_cert,
                        "validation_context_sds_secret_config": _SDS_ROOT,
                    },
                },
            },
        }


def _http_permission(m: HTTPMatch) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    if m.envoy_path_regex is not None:
        rules.append({"url_path": {"path": {"safe_regex": {"regex": m.envoy_path_regex}}}})
    if m.methods != ("*",):
        rules.append({"header": _methods_matcher(m.methods)})
    for name, rx in m.headers:
        rules.append({"header": {"name": name, "string_match": {"safe_regex": {"regex": rx}}}})
    if not rules:
        return {"any": True}
    if len(rules) == 1:
        return rules[0]
    return {"and_rules": {"rules": rules}}
