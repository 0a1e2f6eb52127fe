"""The snapshot builder: mesh projections -> the Envoy resources of one sidecar proxy.

Role: turns the registry and policy projections (through :class:`~smc.projections.PolicyView`)
and a :class:`~smc.xds.CertSource` into one consistent :class:`~smc.xds.Snapshot` per proxy
node (see :mod:`smc.xds._identity` for the node-id scheme), plus the set of *dependency keys*
the build read, so the controller rebuilds only the proxies a change can affect.

Two sidecar models, chosen per workload by its label ``smc.dev/interception``:

- explicit (no label, or ``none``; VMs and hosts without iptables): a workload's registry
  ``address`` is where its sidecar listens; several sidecars share one host on distinct
  loopback addresses. Listeners as described below.
- transparent (``iptables``; set by the sidecar injector on every pod it injects, whose init
  container redirects inbound TCP to 15006 and outbound TCP to 15001): one listener
  ``inbound`` on ``0.0.0.0:15006`` and one ``outbound`` on ``0.0.0.0:15001``, both with the
  ``original_dst`` listener filter, so filter chains match on the connection's original
  destination port. ``inbound`` holds one filter chain ``inbound|<port>`` per inbound port
  (the same mTLS, RBAC and filters as the explicit listener of that port) and a default chain
  passing any other port through in plaintext to its original destination (cluster
  ``passthrough``, ORIGINAL_DST: ports no mesh service names, such as health probes, keep
  working). ``outbound`` holds one HTTP chain per HTTP port of the reachable services (RDS
  ``outbound``, routed by Host as below), one TCP chain per TCP service port (first service
  wins a shared port, with a warning), and a default chain passing every other destination
  through (traffic leaving the mesh). Calls to a mesh service the identity may not reach are
  passed through too and fail at the destination, whose inbound requires mTLS.

- Inbound: for every distinct target port of the services the workload backs, a listener
  ``inbound|<port>`` on ``<address>:<port>`` (``0.0.0.0`` when the address is empty), mTLS
  required (SDS secrets ``default`` and ``ROOTCA``). HTTP ports: an HTTP connection manager
  with an RBAC filter (deny by default) and RDS route config ``inbound|<port>`` whose
  per-route RBAC allows exactly the SMI sources (authenticated principal = the source's SPIFFE
  id) on their HTTPRouteGroup matches (path regex, methods, headers): policy changes are route
  updates, effective on open connections at once;
  TCP ports: a network RBAC filter then a TCP proxy. Permissive mode: no RBAC (mTLS still
  required). The local application is ``127.0.0.1:<target port>`` (cluster ``inbound|<port>``),
  unless the workload has the label ``smc.dev/app-port: "<port>"``, then ``127.0.0.1:<that
  port>`` for every inbound port (one application per workload).
- Outbound: one HTTP listener ``outbound`` on ``<address>:15001`` with RDS route config
  ``outbound``: a virtual host per (service, port) the identity may call, domains ``name.ns``,
  ``name.ns.svc``, ``name.ns.svc.cluster.local`` (plus bare ``name`` for services of the
  proxy's own namespace), each also with ``:port``; the bare forms go to the service's first
  port. Routes go to EDS clusters ``outbound|<ns>/<svc>|<port>`` (mTLS, the peer's URI SAN
  must be the SPIFFE id of an identity serving the service). A TrafficSplit becomes weighted
  clusters over the backends; its A/B matches become routes tried before the default split.
  Permissive mode: every service is reachable. A TCP service port gets an outbound listener
  ``outbound-tcp|<port>`` on ``<address>:<service port>`` proxying to its cluster (a port
  already taken on that proxy is skipped, with a warning).
- EDS: one ClusterLoadAssignment per outbound cluster from ``registry.endpoints_of`` (Kubernetes
  endpoints and VM workloads alike); endpoints whose port is not the service port's target port
  are left out when the service has several ports; not-ready endpoints are UNHEALTHY.
- SDS: ``default`` (this identity's certificate and key only) and ``ROOTCA`` (every root of
  the trust bundle). Without a certificate for the identity, no snapshot is built.

Dependency keys (strings): ``wl:<ns>/<name>`` (the proxy's own workload), ``svcns:<ns>``
(which services in its namespace it backs), ``svc:<ns>/<name>`` (a service read: ports,
endpoints, identities, split), ``dst:<ns>/<sa>`` (which services a reachable identity serves),
``svc-all`` (the set of services, permissive mode), ``id:<ns>/<sa>`` (its certificate).
Policy changes affect every proxy.

Concurrency: a :class:`BuildPass` reads the projections and must run on the thread that applies
events to them (the asyncio loop); it is meant for one batch of rebuilds and then dropped.
Built entries are immutable and interned, so proxies of one identity share them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as _http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import (  # noqa: F401
    original_dst_pb2 as _odst_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as _hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as _net_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2 as _tcp_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2 as _tls_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

from smc.events import ServicePort
from smc.projections import PolicyView, Service, Workload
from smc.smi import Grant, HTTPMatch
from smc.xds._certs import CertSource
from smc.xds._identity import InvalidNodeId, find_workload, parse_node_id
from smc.xds._snapshot import ResourceEntry, Snapshot, make_entry
from smc.xds._traffic import (
    NO_EGRESS,
    TLS_INSPECTOR_FILTER,
    VHOST_RATE_LIMITS,
    EgressParts,
    apply_retries,
    cluster_settings,
    egress_denied_chain,
    egress_parts,
    explicit_egress_listeners,
    inbound_http_filters,
    inbound_routes,
    inbound_tcp_filters,
    ingress_chains,
    ingress_of,
    ingress_rbac_policies,
    observe_hcm,
    observe_tcp,
    rls_clusters,
    settings_tag,
    tracing_cluster,
    traffic_policy,
    transparent_egress_chains,
)
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

__all__ = [
    "AGENT_SDS_CLUSTER",
    "APP_PORT_LABEL",
    "INBOUND_LISTENER",
    "INBOUND_PORT",
    "INTERCEPTION_LABEL",
    "OUTBOUND_LISTENER",
    "OUTBOUND_PORT",
    "OUTBOUND_ROUTE",
    "PASSTHROUGH_CLUSTER",
    "ROOT_SECRET",
    "WORKLOAD_SECRET",
    "BuildPass",
    "ProxyBuild",
    "inbound_name",
    "outbound_cluster_name",
]

log = logging.getLogger("smc.xds.builder")

#: Label naming the local port of a workload's application (one port per workload).
APP_PORT_LABEL = "smc.dev/app-port"
OUTBOUND_PORT = 15001
#: Port of the transparent inbound listener (where iptables sends a pod's inbound TCP).
INBOUND_PORT = 15006
INBOUND_LISTENER = "inbound"
#: Workload label choosing the sidecar model: ``iptables`` (transparent) or ``none``.
INTERCEPTION_LABEL = "smc.dev/interception"
#: ORIGINAL_DST cluster of the transparent listeners' pass-through chains.
PASSTHROUGH_CLUSTER = "passthrough"
OUTBOUND_LISTENER = "outbound"
OUTBOUND_ROUTE = "outbound"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_HTTP_RBAC_PER_ROUTE = _T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
_NET_RBAC = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_ORIGINAL_DST = _T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
_ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {"@type": _ORIGINAL_DST},
}
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
_SDS_CERT = [{"name": WORKLOAD_SECRET, "sds_config": _ADS}]
#: Static cluster (unix socket) of the SMC agent beside the proxy, which serves ``default``.
AGENT_SDS_CLUSTER = "smc-agent"
_AGENT_SDS: dict[str, Any] = {
    "resource_api_version": "V3",
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": AGENT_SDS_CLUSTER}}],
    },
}
_SDS_CERT_AGENT = [{"name": WORKLOAD_SECRET, "sds_config": _AGENT_SDS}]
_SDS_ROOT = {"name": ROOT_SECRET, "sds_config": _ADS}
_ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
_RETRY = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2}


def outbound_cluster_name(service: str, port: int) -> str:
    """``outbound|<ns>/<svc>|<port>``: the EDS cluster of one service port."""
    return f"outbound|{service}|{port}"


def inbound_name(port: int) -> str:
    """``inbound|<port>``: the inbound listener and local-application cluster of a port."""
    return f"inbound|{port}"


def _parse(data: dict[str, Any], message: Message) -> Message:
    return json_format.ParseDict(data, message)


def _sockaddr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyBuild:
    """The outcome of building one node: its snapshot (None with a ``reason`` when it cannot
    have one yet), the workload and identity it speaks for, and the dependency keys read."""

    node_id: str
    snapshot: Snapshot | None
    deps: frozenset[str]
    identity: str | None = None
    workload: Workload | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Outbound:
    """Identity-level outbound part: route config, clusters and endpoints, with its deps."""

    entries: tuple[ResourceEntry, ...]
    deps: frozenset[str]
    tcp: tuple[tuple[int, str], ...] = ()  # (service port, cluster) of outbound TCP listeners
    http_ports: tuple[int, ...] = ()  # HTTP service ports (the transparent listener's chains)
    egress: EgressParts = NO_EGRESS  # what its Egress policies allow (smc.xds._traffic)


class BuildPass:
    """Builds proxy snapshots against one state of the projections, memoising the parts
    shared between proxies (per identity and per service). Make a new pass per batch."""

    def __init__(
        self,
        *,
        view: PolicyView,
        certs: CertSource,
        outbound_port: int = OUTBOUND_PORT,
        inbound_port: int = INBOUND_PORT,
    ) -> None:
        self.view = view
        self.registry = view.registry
        self.certs = certs
        #: OSM policies and observability settings (see :mod:`smc.xds._traffic`).
        self.traffic = traffic_policy(view)
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self._passthrough: ResourceEntry | None = None
        self._svc_ids: dict[str, tuple[str, ...]] = {}
        self._svc_workloads: dict[str, tuple[Workload, ...]] = {}
        self._clusters: dict[tuple[str, int], tuple[ResourceEntry, ResourceEntry]] = {}
        self._outbound: dict[str, _Outbound] = {}
        self._secret: dict[str, ResourceEntry | None] = {}
        self._root: ResourceEntry | None = None
        self._services: tuple[str, ...] | None = None
        # A cert source with ``agent_sds`` True: the SMC agent beside each proxy serves its
        # key and certificate (``default``) over a local SDS cluster; the control plane
        # serves only ``ROOTCA`` (roots and CRLs) and never a key.
        self._agent = bool(getattr(certs, "agent_sds", False))
        self._sds_cert = _SDS_CERT_AGENT if self._agent else _SDS_CERT

    # ------------------------------------------------------------------ memoised queries

    def services(self) -> tuple[str, ...]:
        """Every service ``ns/name``, sorted."""
        if self._services is None:
            self._services = tuple(sorted(f"{ns}/{n}" for ns, n in self.registry.services))
        return self._services

    def service_workloads(self, service: str) -> tuple[Workload, ...]:
        found = self._svc_workloads.get(service)
        if found is None:
            found = self._svc_workloads[service] = self.view.workloads_of_service(service)
        return found

    def service_identities(self, service: str) -> tuple[str, ...]:
        """Identities (``ns/sa``) serving ``service``."""
        found = self._svc_ids.get(service)
        if found is None:
            found = self._svc_ids[service] = tuple(
                sorted({w.identity for w in self.service_workloads(service)})
            )
        return found

    def services_backed_by(self, workload: Workload) -> tuple[str, ...]:
        """Services (``ns/name``) ``workload`` backs."""
        prefix = workload.namespace + "/"
        return tuple(
            s
            for s in self.services()
            if s.startswith(prefix) and workload in self.service_workloads(s)
        )

    def _service(self, key: str) -> Service | None:
        ns, _, name = key.partition("/")
        return self.registry.services.get((ns, name))

    # ------------------------------------------------------------------ the build

    def build(self, node_id: str) -> ProxyBuild:
        """Build the snapshot of ``node_id`` (``ns/workload``); never raises for bad input:
        an unusable node id gives a build without snapshot and a reason."""
        try:
            ref = parse_node_id(node_id)
        except InvalidNodeId as exc:
            return ProxyBuild(node_id=node_id, snapshot=None, deps=frozenset(), reason=str(exc))
        if ref.proxyless:  # gRPC's own xDS client (same package, loaded on first use)
            from smc.xds._grpc import build_proxyless

            return build_proxyless(self, node_id, ref)
        deps: set[str] = {f"wl:{ref.key}"}
        workload = find_workload(ref, self.registry.workloads)
        if workload is None:
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                reason=f"no workload {ref.key!r} in the registry",
            )
        identity = workload.identity
        deps.add(f"id:{identity}")
        secret = None if self._agent else self._workload_secret(identity)
        if self._agent and not self.certs.trust_bundle():
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                identity=identity,
                workload=workload,
                reason="no mesh trust bundle yet",
            )
        if secret is None and not self._agent:
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                identity=identity,
                workload=workload,
                reason=f"no certificate for identity {identity!r} yet",
            )
        entries: list[ResourceEntry] = [self._root_secret()]
        if secret is not None:
            entries.insert(0, secret)
        deps.add(f"svcns:{workload.namespace}")
        transparent = _transparent(workload)
        entries.extend(self._inbound(workload, deps, transparent=transparent))
        outbound = self._outbound_of(identity)
        deps.update(outbound.deps)
        entries.extend(outbound.entries)
        if transparent:
            entries.append(self._passthrough_cluster())
            entries.append(self._transparent_outbound(node_id, outbound))
        else:
            entries.append(self._outbound_listener(workload))
            taken = {self.outbound_port} | {
                int(n.rsplit("|", 1)[1])
                for n in (e.name for e in entries)
                if n.startswith("inbound|")
            }
            for port, cluster in _free_tcp_ports(node_id, outbound.tcp, taken):
                entries.append(self._outbound_tcp_listener(workload, port, cluster))
                taken.add(port)
            entries.extend(
                explicit_egress_listeners(
                    self.traffic,
                    outbound.egress,
                    address=workload.address or "127.0.0.1",
                    taken=taken,
                    node=node_id,
                )
            )
        entries.extend(rls_clusters(self.traffic, self.services_backed_by(workload)))
        tracer = tracing_cluster(self.traffic)
        if tracer is not None:
            entries.append(tracer)
        snapshot = Snapshot.from_entries(entries)
        return ProxyBuild(
            node_id=node_id,
            snapshot=snapshot,
            deps=frozenset(deps),
            identity=identity,
            workload=workload,
        )

    # ------------------------------------------------------------------ secrets

    def _workload_secret(self, identity: str) -> ResourceEntry | None:
        if identity in self._secret:
            return self._secret[identity]
        material = self.certs.get(identity)
        entry = None
        if material is not None:
            cert_pem, chain_pem, key_pem = material[0], material[1], material[2]
            chain = cert_pem if cert_pem.endswith("\n") else cert_pem + "\n"
            chain += chain_pem
            entry = make_entry(
                _parse(
                    {
                        "name": WORKLOAD_SECRET,
                        "tls_certificate": {
                            "certificate_chain": {"inline_string": chain},
                            "private_key": {"inline_string": key_pem},
                        },
                    },
                    secret_pb2.Secret(),
                ),
                type_url=SECRET,
            )
        self._secret[identity] = entry
        return entry

    def _root_secret(self) -> ResourceEntry:
        if self._root is None:
            roots = [r if r.endswith("\n") else r + "\n" for r in self.certs.trust_bundle()]
            self._root = make_entry(
                _parse(
                    {
                        "name": ROOT_SECRET,
                        "validation_context": {"trusted_ca": {"inline_string": "".join(roots)}},
                    },
                    secret_pb2.Secret(),
                ),
                type_url=SECRET,
            )
        return self._root

    # ------------------------------------------------------------------ inbound

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
                    )
                )
            else:
                out.append(_listener(name, _sockaddr(address, port), [chain]))
        if transparent:
            out.append(
                _listener(
                    INBOUND_LISTENER,
                    _sockaddr("0.0.0.0", self.inbound_port),
                    chains,
                    default=_passthrough_chain("inbound_passthrough"),
                    listener_filters=[TLS_INSPECTOR_FILTER] if inspect else None,
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

    # ------------------------------------------------------------------ outbound

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
        egress = egress_parts(self.traffic, identity)
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
            weighted.append((outbound_cluster_name(key, port.port), b.weight))
        if not weighted:
            clusters.add((root.key, sp.port))
            return {"cluster": outbound_cluster_name(root.key, sp.port), "retry_policy": _RETRY}
        if len(weighted) == 1:
            return {"cluster": weighted[0][0], "retry_policy": _RETRY}
        return {
            "weighted_clusters": {
                "clusters": [{"name": n, "weight": w} for n, w in weighted],
            },
            "retry_policy": _RETRY,
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
        settings = cluster_settings(self.traffic.upstream.get(service))
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


# ---------------------------------------------------------------------- helpers


def _transparent(workload: Workload) -> bool:
    mode = dict(workload.labels).get(INTERCEPTION_LABEL, "none")
    if mode not in ("iptables", "none"):
        log.warning(
            "workload %s/%s: label %s=%r is neither 'iptables' nor 'none'; explicit listeners",
            workload.namespace,
            workload.name,
            INTERCEPTION_LABEL,
            mode,
        )
    return mode == "iptables"


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


def _listener(
    name: str,
    address: dict[str, Any],
    chains: list[dict[str, Any]],
    *,
    default: dict[str, Any] | None = None,
    listener_filters: list[dict[str, Any]] | None = None,
) -> ResourceEntry:
    """A listener entry; with a ``default`` chain (transparent listeners) it also gets the
    ``original_dst`` listener filter, so chains match the original destination port;
    ``listener_filters`` come after it (e.g. the TLS inspector)."""
    spec: dict[str, Any] = {
        "name": name,
        "address": address,
        "enable_reuse_port": False,
        "filter_chains": chains,
    }
    filters = list(listener_filters or ())
    if default is not None:
        spec["default_filter_chain"] = default
        filters.insert(0, _ORIGINAL_DST_FILTER)
    if filters:
        spec["listener_filters"] = filters
    # Listeners are per proxy and mostly unchanged between builds: converting the JSON form to
    # protobuf is most of their cost (access-log formats, tracing), so an identical JSON form
    # reuses its entry (a bounded memo; entries are immutable; builds run on one thread).
    key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    found = _LISTENER_MEMO.get(key)
    if found is not None:
        _LISTENER_MEMO.move_to_end(key)
        return found
    made = make_entry(_parse(spec, listener_pb2.Listener()), type_url=LISTENER)
    _LISTENER_MEMO[key] = made
    if len(_LISTENER_MEMO) > _LISTENER_MEMO_MAX:
        _LISTENER_MEMO.popitem(last=False)
    return made


_LISTENER_MEMO: OrderedDict[str, ResourceEntry] = OrderedDict()
_LISTENER_MEMO_MAX = 20_000


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster},
    }


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


def _passthrough_chain(stat_prefix: str) -> dict[str, Any]:
    return {"name": "passthrough", "filters": [_tcp_proxy(stat_prefix, PASSTHROUGH_CLUSTER)]}


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


def _methods_matcher(methods: Sequence[str]) -> dict[str, Any]:
    return {
        "name": ":method",
        "string_match": {"safe_regex": {"regex": "|".join(sorted(methods))}},
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
