"""Traffic policy and observability for the snapshot builder: OSM's policy kinds -> Envoy config.

Role: :func:`traffic_policy` evaluates the stored Egress, IngressBackend, Retry and
UpstreamTrafficSetting resources and the MeshConfig's ``enableEgress`` / ``observability`` once
per policy generation into a :class:`TrafficPolicy`; the functions below turn it into the
fragments :mod:`smc.xds._builder` splices into what it builds (it calls them from a few hooks):

- Retry (source identity, destination service): the outbound routes' ``retry_policy``
  (``retryOn``, ``numRetries``, ``perTryTimeout``, back-off base interval), replacing the
  default (connect failures and resets, 2 retries).
- UpstreamTrafficSetting (a service): on every client's cluster of that service, connection
  limits as circuit breakers (``maxConnections``, ``maxPendingRequests``, ``maxRequests``,
  ``maxRetries``; past them Envoy answers 503), ``connectTimeout``, ``maxRequestsPerConnection``
  and outlier detection (SMC extension: ``consecutive5xxErrors``, ``interval``,
  ``baseEjectionTime``, ``maxEjectionPercent``); on the sidecars of the service, local rate
  limits (HTTP: a token bucket per virtual host, 429 or the configured status and headers;
  per ``httpRoutes`` path its own bucket; TCP: a network token bucket per connection) and per
  route timeouts (``httpRoutes[].timeout``, SMC extension; past it the sidecar answers 504).
- Egress (source identities): HTTP by Host (virtual hosts on the outbound route
  configuration, clusters resolving the host by DNS), HTTPS by SNI and TCP by IP range
  (explicit sidecars: listeners ``egress|<port>`` on the workload address; transparent
  sidecars: chains on the ``outbound`` listener matching the destination port and the SNI or
  IP range, to the original destination). With ``enableEgress: false`` the transparent
  ``outbound`` listener has no pass-through chain: only what an Egress allows leaves the mesh.
- IngressBackend (a backend service port): ``https``: the listed AuthenticatedPrincipals (the
  URI or DNS SAN of a mesh-CA client certificate) are allowed on the mTLS chain, optionally
  only from the listed address ranges; ``http``: a plaintext chain (chosen by the TLS
  inspector) whose RBAC allows only the listed IP ranges and the endpoints of the listed
  Services.
- Observability: access logs on every HTTP connection manager and TCP proxy (JSON by default,
  or text; to the configured file, ``/dev/stdout`` by default) and tracing (Zipkin over HTTP
  JSON or OpenTelemetry over gRPC, to cluster ``smc-tracing``, with the configured sampling).

Layout (by concern, each its own private module; this one is the entry the builder imports):
:mod:`~smc.xds._traffic_model` (the evaluated policy, the bottom layer),
:mod:`~smc.xds._traffic_upstream` (retries, timeouts, circuit breaking, outlier detection),
:mod:`~smc.xds._traffic_limits` (local and global rate limits),
:mod:`~smc.xds._traffic_observe` (access logs, tracing),
:mod:`~smc.xds._traffic_egress` and :mod:`~smc.xds._traffic_ingress` (both above observe).

Resource names: clusters ``egress|<host or address>|<port>``, ``smc-tracing``; listeners
``egress|<port>``. Policy changes rebuild every proxy (the builder's rule for policy).
Concurrency: pure functions and an immutable evaluated policy; a :class:`TrafficPolicy` is
cached per :class:`~smc.projections.PolicyProjection` and generation, read on the thread that
applies events (the asyncio loop), like the rest of the builder.
"""

from __future__ import annotations

from smc.xds._traffic_egress import (
    NO_EGRESS,
    TLS_INSPECTOR_FILTER,
    EgressParts,
    egress_cluster_name,
    egress_denied_chain,
    egress_parts,
    explicit_egress_listeners,
    transparent_egress_chains,
)
from smc.xds._traffic_ingress import (
    ingress_chains,
    ingress_http_chain,
    ingress_of,
    ingress_ranges,
    ingress_rbac_policies,
)
from smc.xds._traffic_limits import (
    HTTP_LOCAL_RATELIMIT,
    VHOST_RATE_LIMITS,
    inbound_http_filters,
    inbound_routes,
    inbound_tcp_filters,
    rls_cluster_name,
    rls_clusters,
)
from smc.xds._traffic_model import (
    Observability,
    TrafficPolicy,
    traffic_policy,
)
from smc.xds._traffic_observe import (
    JSON_LOG_FORMAT,
    TRACING_CLUSTER,
    access_logs,
    observe_cluster,
    observe_hcm,
    observe_tcp,
    tracing_cluster,
)
from smc.xds._traffic_upstream import (
    apply_retries,
    cluster_settings,
    retry_policy,
    settings_tag,
)

__all__ = [
    "HTTP_LOCAL_RATELIMIT",
    "JSON_LOG_FORMAT",
    "NO_EGRESS",
    "TLS_INSPECTOR_FILTER",
    "TRACING_CLUSTER",
    "VHOST_RATE_LIMITS",
    "EgressParts",
    "Observability",
    "TrafficPolicy",
    "access_logs",
    "apply_retries",
    "cluster_settings",
    "egress_cluster_name",
    "egress_denied_chain",
    "egress_parts",
    "explicit_egress_listeners",
    "inbound_http_filters",
    "inbound_routes",
    "inbound_tcp_filters",
    "ingress_chains",
    "ingress_http_chain",
    "ingress_of",
    "ingress_ranges",
    "ingress_rbac_policies",
    "observe_cluster",
    "observe_hcm",
    "observe_tcp",
    "retry_policy",
    "rls_cluster_name",
    "rls_clusters",
    "settings_tag",
    "tracing_cluster",
    "traffic_policy",
    "transparent_egress_chains",
]
