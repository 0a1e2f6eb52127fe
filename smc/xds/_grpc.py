"""Proxyless gRPC: the xDS resources of grpcio clients and servers that are mesh members.

Role: gRPC's own xDS client (``xds:///name`` channels, ``xds=True`` servers) speaks ADS to SMC
without an Envoy beside it. It sets ``node.user_agent_name`` to ``gRPC ...``; the ADS server
keys such a stream as ``grpc:<node id>`` (:func:`proxyless_node_key`) and
:func:`build_proxyless` builds its snapshot instead of the Envoy sidecar one. The node id is
still ``<namespace>/<workload>`` of a registry workload, whose service account is the
identity. What gRPC asks and gets (gRFC A27 client, A28 routing, A29 xDS security, A36 xDS
servers, A41 RBAC):

- Client: LDS asks for the target's name (``xds:///greeter.demo`` asks ``greeter.demo``).
  For every HTTP/gRPC port of every service the identity may call, API listeners are named
  like the Envoy virtual host domains: ``name`` (same namespace), ``name.ns``,
  ``name.ns.svc``, ``name.ns.svc.cluster.local``, each also with ``:port`` (the bare names
  mean the service's first HTTP port). Each names, over RDS, the route configuration
  ``grpc|<ns/svc>|<port>``: A/B routes of the service's TrafficSplit ``matches``, then the
  weighted split (or the service itself). Clusters ``grpc|<ns/svc>|<port>`` are EDS with
  round robin and mTLS: the certificate and roots come from the bootstrap's certificate
  provider instance ``smc`` (gRPC's ``file_watcher`` plugin on files holding the mesh
  certificate), the server's SPIFFE ids are the accepted SANs. A name the identity may not
  call, or that no service has, is not in LDS: the ADS server answers a named LDS request at
  once even when nothing it names exists (gRPC's "does not exist"), so the call fails fast
  with UNAVAILABLE instead of after gRPC's 15 s timer.
- Server: LDS asks ``grpc/server?xds.resource.listening_address=<ip>:<port>`` (the bootstrap
  template :data:`SERVER_LISTENER_TEMPLATE`) for each port it serves. For every target port of
  the services the workload backs there is such a listener on the workload's address: mTLS
  required (the ``smc`` provider), then the HTTP RBAC filter holding the SMI grants for the
  identity (SPIFFE principals; HTTPRouteGroup path regexes match the RPC path
  ``/package.Service/Method``, header regexes match metadata; deny by default, none in
  permissive mode) and a route with ``non_forwarding_action``. A denied RPC ends with
  PERMISSION_DENIED.

:func:`grpc_bootstrap` writes the bootstrap such a process needs (``GRPC_XDS_BOOTSTRAP``).
Concurrency: pure functions over a :class:`~smc.xds._builder.BuildPass` (loop thread).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from smc.events import ServicePort
from smc.projections import Service, Workload
from smc.smi import HTTPMatch
from smc.xds._builder import BuildPass, ProxyBuild, _domains, _parse, _sockaddr
from smc.xds._identity import NodeRef, find_workload
from smc.xds._snapshot import ResourceEntry, Snapshot, make_entry
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = [
    "CERT_PROVIDER",
    "GRPC_PREFIX",
    "SERVER_LISTENER_TEMPLATE",
    "build_proxyless",
    "grpc_bootstrap",
    "proxyless_node_key",
    "server_listener_name",
]

#: Snapshot-key prefix of a proxyless gRPC node (``grpc:<ns>/<workload>``).
GRPC_PREFIX = "grpc:"
#: Certificate provider instance the resources name; the bootstrap defines it.
CERT_PROVIDER = "smc"
#: ``server_listener_resource_name_template`` of the bootstrap (gRFC A36).
SERVER_LISTENER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
_ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
_PROVIDER = {"instance_name": CERT_PROVIDER}


def proxyless_node_key(node: Any) -> str:
    """The snapshot key of an ADS stream's ``node``: ``grpc:<id>`` for gRPC's xDS client
    (``user_agent_name`` starting with ``gRPC``), the node id itself otherwise."""
    node_id: str = node.id
    agent: str = node.user_agent_name
    if agent.lower().startswith("grpc") and not node_id.startswith(GRPC_PREFIX):
        return GRPC_PREFIX + node_id
    return node_id


def server_listener_name(address: str, port: int) -> str:
    """The LDS name gRPC's xDS server asks for when it listens on ``address:port``."""
    host = f"[{address}]" if ":" in address else address
    return SERVER_LISTENER_TEMPLATE.replace("%s", f"{host}:{port}")


def grpc_bootstrap(
    *,
    node_id: str,
    ads_address: str,
    cert_file: str,
    key_file: str,
    ca_file: str,
    refresh: str = "1s",
    ads_tls: bool = True,
) -> dict[str, Any]:
    """The xDS bootstrap (``GRPC_XDS_BOOTSTRAP``) of a gRPC process speaking for workload
    ``node_id``: ADS at ``ads_address`` (``host:port``) over mTLS with the workload's own
    certificate (gRFC A65 ``tls`` channel credentials; ``ads_tls=False``: plaintext), the
    ``smc`` certificate provider watching the same PEM files (the workload's mesh certificate
    with its chain, its key, the trust bundle), and the server listener name template."""
    files = {
        "certificate_file": cert_file,
        "private_key_file": key_file,
        "ca_certificate_file": ca_file,
        "refresh_interval": refresh,
    }
    creds: dict[str, Any] = {"type": "tls", "config": files} if ads_tls else {"type": "insecure"}
    return {
        "xds_servers": [
            {
                "server_uri": ads_address,
                "channel_creds": [creds],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": node_id, "locality": {}},
        "certificate_providers": {
            CERT_PROVIDER: {
                "plugin_name": "file_watcher",
                "config": files,
            }
        },
        "server_listener_resource_name_template": SERVER_LISTENER_TEMPLATE,
    }


def build_proxyless(bp: BuildPass, node_id: str, ref: NodeRef) -> ProxyBuild:
    """The snapshot of proxyless gRPC node ``node_id`` (``grpc:<ns>/<workload>``)."""
    deps: set[str] = {f"wl:{ref.key}"}
    workload = find_workload(ref, bp.registry.workloads)
    if workload is None:
        return ProxyBuild(
            node_id=node_id,
            snapshot=None,
            deps=frozenset(deps),
            reason=f"no workload {ref.key!r} in the registry",
        )
    identity = workload.identity
    deps.update((f"id:{identity}", f"svcns:{workload.namespace}"))
    entries = _server_listeners(bp, workload, deps)
    entries.extend(_client_resources(bp, identity, deps))
    return ProxyBuild(
        node_id=node_id,
        snapshot=Snapshot.from_entries(entries),
        deps=frozenset(deps),
        identity=identity,
        workload=workload,
    )


# ---------------------------------------------------------------------- server side


def _server_listeners(bp: BuildPass, workload: Workload, deps: set[str]) -> list[ResourceEntry]:
    ports: set[int] = set()
    for svc_key in bp.services_backed_by(workload):
        deps.add(f"svc:{svc_key}")
        svc = bp._service(svc_key)
        if svc is None:
            continue
        ports.update(sp.target_port for sp in svc.ports if sp.protocol in ("http", "grpc"))
    grants = bp.view.allowed_sources(workload.identity)
    address = workload.address or "0.0.0.0"
    out = []
    for port in sorted(ports):
        rbac: dict[str, Any] = {"@type": _RBAC}
        if not bp.view.permissive:
            rbac["rules"] = {"action": "ALLOW", "policies": bp._http_policies(port, grants)}
        name = server_listener_name(address, port)
        hcm = {
            "@type": _HCM,
            "stat_prefix": f"grpc_inbound_{port}",
            "route_config": {
                "name": f"grpc-inbound|{port}",
                "virtual_hosts": [
                    {
                        "name": f"grpc-inbound|{port}",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "non_forwarding_action": {}}],
                    }
                ],
            },
            "http_filters": [
                {"name": "envoy.filters.http.rbac", "typed_config": rbac},
                _ROUTER_FILTER,
            ],
        }
        spec = {
            "name": name,
            "address": _sockaddr(address, port),
            "filter_chains": [
                {
                    "name": f"grpc-inbound|{port}",
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": hcm,
                        }
                    ],
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": _DOWNSTREAM_TLS,
                            "require_client_certificate": True,
                            "common_tls_context": {
                                "tls_certificate_provider_instance": _PROVIDER,
                                "validation_context": {
                                    "ca_certificate_provider_instance": _PROVIDER
                                },
                            },
                        },
                    },
                }
            ],
        }
        out.append(make_entry(_parse(spec, listener_pb2.Listener()), type_url=LISTENER))
    return out


# ---------------------------------------------------------------------- client side


def _route_name(service: str, port: int) -> str:
    return f"grpc|{service}|{port}"


def _client_resources(bp: BuildPass, identity: str, deps: set[str]) -> list[ResourceEntry]:
    services, reach_deps = bp.reachable_services(identity)
    deps.update(reach_deps)
    own_ns = identity.partition("/")[0]
    out: list[ResourceEntry] = []
    clusters: set[tuple[str, int]] = set()
    listeners: dict[str, str] = {}  # listener name -> route config name (first wins)
    for svc_key in services:
        deps.add(f"svc:{svc_key}")
        svc = bp._service(svc_key)
        if svc is None:
            continue
        plan = bp.view.split_for(svc_key)
        http = [p for p in svc.ports if p.protocol in ("http", "grpc")]
        for index, sp in enumerate(http):
            rname = _route_name(svc_key, sp.port)
            routes: list[dict[str, Any]] = []
            if plan is not None:
                for ab in plan.ab_routes:
                    action = _action(bp, svc, sp, ab.backends, deps, clusters)
                    routes.extend({"match": _match(m), "route": action} for m in ab.matches)
                default = _action(bp, svc, sp, plan.backends, deps, clusters)
            else:
                default = _action(bp, svc, sp, (), deps, clusters)
            routes.append({"match": {"prefix": "/"}, "route": default})
            out.append(
                make_entry(
                    _parse(
                        {
                            "name": rname,
                            "virtual_hosts": [{"name": rname, "domains": ["*"], "routes": routes}],
                        },
                        route_pb2.RouteConfiguration(),
                    ),
                    type_url=ROUTE,
                )
            )
            for lname in _domains(svc, sp, own_ns=own_ns, primary=index == 0):
                listeners.setdefault(lname, rname)
    for lname, rname in sorted(listeners.items()):
        out.append(_api_listener(lname, rname))
    for key in sorted(clusters):
        out.extend(_cluster(bp, *key))
    return out


def _api_listener(name: str, route: str) -> ResourceEntry:
    spec = {
        "name": name,
        "api_listener": {
            "api_listener": {
                "@type": _HCM,
                "stat_prefix": name,
                "rds": {"route_config_name": route, "config_source": _ADS},
                "http_filters": [_ROUTER_FILTER],
            }
        },
    }
    return make_entry(_parse(spec, listener_pb2.Listener()), type_url=LISTENER)


def _match(m: HTTPMatch) -> dict[str, Any]:
    """A route match for gRPC: the RPC path and metadata (every RPC is a POST, so the
    HTTPRouteGroup's methods do not narrow it)."""
    match: dict[str, Any] = {}
    if m.envoy_path_regex is not None:
        match["safe_regex"] = {"regex": m.envoy_path_regex}
    else:
        match["prefix"] = "/"
    if m.headers:
        match["headers"] = [
            {"name": name, "string_match": {"safe_regex": {"regex": rx}}} for name, rx in m.headers
        ]
    return match


def _action(
    bp: BuildPass,
    root: Service,
    sp: ServicePort,
    backends: Iterable[Any],
    deps: set[str],
    clusters: set[tuple[str, int]],
) -> dict[str, Any]:
    return bp.route_action(root, sp, backends, deps, clusters, cluster_name=_route_name, extra={})


def _cluster(bp: BuildPass, service: str, port: int) -> Sequence[ResourceEntry]:
    name = _route_name(service, port)
    ids = bp.service_identities(service)
    if ids:
        sans = [{"exact": bp.view.spiffe_id(i)} for i in ids]
    else:
        sans = [{"prefix": f"spiffe://{bp.view.trust_domain}/"}]
    cluster = _parse(
        {
            "name": name,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": _ADS},
            "lb_policy": "ROUND_ROBIN",
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _UPSTREAM_TLS,
                    "common_tls_context": {
                        "tls_certificate_provider_instance": _PROVIDER,
                        "validation_context": {
                            "ca_certificate_provider_instance": _PROVIDER,
                            "match_subject_alt_names": sans,
                        },
                    },
                },
            },
        },
        cluster_pb2.Cluster(),
    )
    lb = bp.lb_endpoints(service, port)
    cla: dict[str, Any] = {"cluster_name": name}
    if lb:
        # gRPC ignores a locality without a weight
        cla["endpoints"] = [{"locality": {}, "load_balancing_weight": 1, "lb_endpoints": lb}]
    return (
        make_entry(cluster, type_url=CLUSTER),
        make_entry(_parse(cla, endpoint_pb2.ClusterLoadAssignment()), type_url=ENDPOINT),
    )
