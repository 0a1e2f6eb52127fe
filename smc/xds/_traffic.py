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

Resource names: clusters ``egress|<host or address>|<port>``, ``smc-tracing``; listeners
``egress|<port>``. Policy changes rebuild every proxy (the builder's rule for policy).
Concurrency: pure functions and an immutable evaluated policy; a :class:`TrafficPolicy` is
cached per :class:`~smc.projections.PolicyProjection` and generation, read on the thread that
applies events (the asyncio loop), like the rest of the builder.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import opentelemetry_pb2 as _otel_pb2  # noqa: F401
from envoy.config.trace.v3 import zipkin_pb2 as _zipkin_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2 as _file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2 as _stream_pb2  # noqa: F401
from envoy.extensions.filters.http.local_ratelimit.v3 import (  # noqa: F401
    local_rate_limit_pb2 as _http_lrl_pb2,
)
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as _http_rl_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import (  # noqa: F401
    tls_inspector_pb2 as _tls_inspector_pb2,
)
from envoy.extensions.filters.network.local_ratelimit.v3 import (  # noqa: F401
    local_rate_limit_pb2 as _net_lrl_pb2,
)
from envoy.extensions.filters.network.ratelimit.v3 import (  # noqa: F401
    rate_limit_pb2 as _net_rl_pb2,
)
from envoy.extensions.upstreams.http.v3 import (  # noqa: F401
    http_protocol_options_pb2 as _hpo_pb2,
)
from google.protobuf import json_format

from smc.projections import PolicyProjection, PolicyView
from smc.smi import (
    EgressPolicy,
    HTTPLocalRateLimit,
    IngressBackendPolicy,
    IngressBackendTarget,
    ManifestErrors,
    RetryPolicy,
    UpstreamTrafficSetting,
    parse_manifest,
)
from smc.smi._osm_model import UNIT_SECONDS
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._types import CLUSTER, LISTENER

__all__ = [
    "NO_EGRESS",
    "TRACING_CLUSTER",
    "EgressParts",
    "TrafficPolicy",
    "access_logs",
    "cluster_settings",
    "egress_cluster_name",
    "egress_denied_chain",
    "rls_cluster_name",
    "rls_clusters",
    "settings_tag",
    "traffic_policy",
]

log = logging.getLogger("smc.xds.traffic")

TRACING_CLUSTER = "smc-tracing"
_T = "type.googleapis.com/"
_HTTP_LRL = _T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_NET_LRL = _T + "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"
_HTTP_RL = _T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_NET_RL = _T + "envoy.extensions.filters.network.ratelimit.v3.RateLimit"
_FILE_LOG = _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
#: /dev/stdout and /dev/stderr are written by Envoy's stream loggers (no open(): a sidecar
#: running as its own UID may not open the container's stdout as a file).
_STREAM_LOGS = {
    "/dev/stdout": (
        "envoy.access_loggers.stdout",
        _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
    ),
    "/dev/stderr": (
        "envoy.access_loggers.stderr",
        _T + "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
    ),
}
_ZIPKIN = _T + "envoy.config.trace.v3.ZipkinConfig"
_OTEL = _T + "envoy.config.trace.v3.OpenTelemetryConfig"
_TLS_INSPECTOR = _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
_HTTP_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_NET_RBAC = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
HTTP_LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
#: Key of :func:`inbound_routes`' second result holding the virtual host's ``rate_limits``.
VHOST_RATE_LIMITS = "rate_limits"
TLS_INSPECTOR_FILTER = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {"@type": _TLS_INSPECTOR},
}
_ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}

#: The JSON access log's fields (Envoy command operators).
JSON_LOG_FORMAT: dict[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "peer_identity": "%DOWNSTREAM_PEER_URI_SAN%",
    "trace_id": "%REQ(X-B3-TRACEID)%",
}


def _dur(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def egress_cluster_name(target: str, port: int) -> str:
    """``egress|<host or address>|<port>``."""
    return f"egress|{target}|{port}"


@dataclass(frozen=True, slots=True)
class Observability:
    access_log: dict[str, Any] | None
    tracing: dict[str, Any] | None


@dataclass(slots=True)
class TrafficPolicy:
    """The evaluated OSM policies and observability settings of one policy generation."""

    retries: dict[tuple[str, str], RetryPolicy] = field(default_factory=dict)
    upstream: dict[str, UpstreamTrafficSetting] = field(default_factory=dict)
    egress: tuple[EgressPolicy, ...] = ()
    ingress: dict[str, list[tuple[IngressBackendPolicy, IngressBackendTarget]]] = field(
        default_factory=dict
    )
    enable_egress: bool = True
    observability: Observability = Observability(
        access_log={"enabled": True, "format": "json", "path": "/dev/stdout"}, tracing=None
    )

    def retry(self, source: str, service: str) -> RetryPolicy | None:
        return self.retries.get((source, service))

    def egress_of(self, identity: str) -> list[EgressPolicy]:
        return [e for e in self.egress if any(s.identity == identity for s in e.sources)]


_CACHE: weakref.WeakKeyDictionary[PolicyProjection, tuple[int, TrafficPolicy]] = (
    weakref.WeakKeyDictionary()
)


def traffic_policy(view: PolicyView) -> TrafficPolicy:
    """The :class:`TrafficPolicy` of the view's current policy generation (cached)."""
    policy = view.policy
    found = _CACHE.get(policy)
    if found is not None and found[0] == policy.generation:
        return found[1]
    tp = _evaluate(policy)
    _CACHE[policy] = (policy.generation, tp)
    return tp


def _evaluate(policy: PolicyProjection) -> TrafficPolicy:
    tp = TrafficPolicy()
    egress: list[EgressPolicy] = []
    for key in sorted(policy.resources):
        stored = policy.resources[key]
        if stored.kind not in ("Egress", "IngressBackend", "Retry", "UpstreamTrafficSetting"):
            continue
        try:
            r = parse_manifest(stored.manifest(), document="/".join(key))
        except (ManifestErrors, ValueError):
            continue
        if isinstance(r, RetryPolicy):
            for dest in r.destinations:
                tp.retries.setdefault((r.source.identity, dest), r)
        elif isinstance(r, UpstreamTrafficSetting):
            if r.service in tp.upstream:
                log.warning(
                    "UpstreamTrafficSetting %s/%s: %s already has settings from %s; ignored",
                    r.namespace,
                    r.name,
                    r.service,
                    tp.upstream[r.service].name,
                )
                continue
            tp.upstream[r.service] = r
        elif isinstance(r, EgressPolicy):
            egress.append(r)
        elif isinstance(r, IngressBackendPolicy):
            for b in r.backends:
                tp.ingress.setdefault(f"{r.namespace}/{b.name}", []).append((r, b))
    tp.egress = tuple(egress)
    settings = dict(policy.mesh.settings)
    tp.enable_egress = settings.get("enableEgress", "true") != "false"
    raw = settings.get("observability")
    if raw:
        try:
            obs = json.loads(raw)
        except ValueError:
            obs = {}
        access = obs.get("accessLog", tp.observability.access_log)
        tracing = obs.get("tracing")
        tp.observability = Observability(
            access_log=access if access and access.get("enabled", True) else None,
            tracing=tracing if tracing and tracing.get("enabled", True) else None,
        )
    return tp


# ---------------------------------------------------------------------- routes and clusters


def retry_policy(r: RetryPolicy) -> dict[str, Any]:
    """The Envoy route ``retry_policy`` of an OSM Retry."""
    out: dict[str, Any] = {"retry_on": r.retry_on}
    if r.num_retries is not None:
        out["num_retries"] = r.num_retries
    if r.per_try_timeout_ms is not None:
        out["per_try_timeout"] = _dur(r.per_try_timeout_ms)
    if r.backoff_base_ms is not None:
        out["retry_back_off"] = {"base_interval": _dur(r.backoff_base_ms)}
    return out


def apply_retries(
    tp: TrafficPolicy, source: str, service: str, routes: list[dict[str, Any]]
) -> None:
    """Replace the retry policy of ``routes`` (outbound, to ``service``) by ``source``'s Retry."""
    r = tp.retry(source, service)
    if r is None:
        return
    policy = retry_policy(r)
    for route in routes:
        action = route.get("route")
        if isinstance(action, dict):
            route["route"] = {**action, "retry_policy": policy}


def cluster_settings(uts: UpstreamTrafficSetting | None) -> dict[str, Any]:
    """Cluster fields of an UpstreamTrafficSetting: circuit breakers, connect timeout, requests
    per connection, outlier detection (empty without one)."""
    if uts is None:
        return {}
    # The setting's digest in the cluster's metadata: a changed setting changes the cluster,
    # so clients open new connections, which meet the upstream's new listener filters (rate
    # limits); connections opened before would keep the old filter chain while it drains.
    digest = hashlib.sha256(uts.spec_json.encode()).hexdigest()[:16]
    out: dict[str, Any] = {
        "metadata": {"filter_metadata": {"smc": {"traffic_setting": f"{uts.name}@{digest}"}}}
    }
    thresholds: dict[str, Any] = {}
    for attr, key in (
        ("max_connections", "max_connections"),
        ("max_pending_requests", "max_pending_requests"),
        ("max_requests", "max_requests"),
        ("max_retries", "max_retries"),
    ):
        value = getattr(uts, attr)
        if value is not None:
            thresholds[key] = value
    if thresholds:
        out["circuit_breakers"] = {"thresholds": [thresholds]}
    if uts.connect_timeout_ms is not None:
        out["connect_timeout"] = _dur(uts.connect_timeout_ms)
    if uts.max_requests_per_connection is not None:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "common_http_protocol_options": {
                    "max_requests_per_connection": uts.max_requests_per_connection
                },
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
    if uts.outlier is not None:
        od = uts.outlier
        out["outlier_detection"] = {
            "consecutive_5xx": od.consecutive_5xx,
            "interval": _dur(od.interval_ms),
            "base_ejection_time": _dur(od.base_ejection_ms),
            "max_ejection_percent": od.max_ejection_percent,
            "enforcing_consecutive_5xx": 100,
        }
    return out


def settings_tag(settings: dict[str, Any]) -> dict[str, Any]:
    """Endpoint metadata naming a digest of a cluster's traffic settings: a cluster update
    must come with an endpoint update (Envoy warms an updated cluster until its endpoints
    arrive, and the ADS server never re-sends unchanged endpoints)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"filter_metadata": {"smc": {"traffic_settings": digest}}}


def _http_bucket(limit: HTTPLocalRateLimit, stat_prefix: str) -> dict[str, Any]:
    seconds = UNIT_SECONDS[limit.unit]
    out: dict[str, Any] = {
        "@type": _HTTP_LRL,
        "stat_prefix": stat_prefix,
        "token_bucket": {
            "max_tokens": limit.requests + limit.burst,
            "tokens_per_fill": limit.requests,
            "fill_interval": f"{seconds}s",
        },
        "filter_enabled": {**_ALWAYS, "runtime_key": "smc.local_rate_limit.enabled"},
        "filter_enforced": {**_ALWAYS, "runtime_key": "smc.local_rate_limit.enforced"},
        "status": {"code": limit.status},
    }
    if limit.headers:
        out["response_headers_to_add"] = [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in limit.headers
        ]
    return out


def _backing_settings(tp: TrafficPolicy, services: Iterable[str]) -> UpstreamTrafficSetting | None:
    for s in services:
        found = tp.upstream.get(s)
        if found is not None:
            return found
    return None


def inbound_http_filters(tp: TrafficPolicy, services: Sequence[str]) -> list[dict[str, Any]]:
    """HTTP filters to put before the router of an inbound port of a workload backing
    ``services``: the local rate limit filter when one of them has HTTP limits."""
    uts = _backing_settings(tp, services)
    if uts is None:
        return []
    out: list[dict[str, Any]] = []
    if uts.local_http is not None or any(r.local for r in uts.routes):
        out.append(
            {
                "name": HTTP_LOCAL_RATELIMIT,
                "typed_config": {
                    "@type": _HTTP_LRL,
                    "stat_prefix": "inbound_http_local_rate_limit",
                },
            }
        )
    glob = _global_spec(uts, "http")
    if glob is not None:
        rls = glob["rateLimitService"]
        out.append(
            {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": _HTTP_RL,
                    "domain": glob["domain"],
                    "timeout": _proto_duration(glob["timeout"]),
                    "failure_mode_deny": not glob["failOpen"],
                    "enable_x_ratelimit_headers": (
                        "DRAFT_VERSION_03" if glob["enableXRateLimitHeaders"] else "OFF"
                    ),
                    "rate_limited_status": {"code": glob["responseStatusCode"]},
                    "rate_limit_service": _rls_service(rls["host"], rls["port"]),
                },
            }
        )
    return out


def _global_spec(uts: UpstreamTrafficSetting, kind: str) -> dict[str, Any] | None:
    if not uts.has_global:
        return None
    found: dict[str, Any] | None = uts.spec().get("rateLimit", {}).get("global", {}).get(kind)
    return found


def rls_cluster_name(host: str, port: int) -> str:
    """``ratelimit|<host>|<port>``: the cluster of a global rate-limit service."""
    return f"ratelimit|{host}|{port}"


def _rls_service(host: str, port: int) -> dict[str, Any]:
    return {
        "grpc_service": {"envoy_grpc": {"cluster_name": rls_cluster_name(host, port)}},
        "transport_api_version": "V3",
    }


def _proto_duration(go: str) -> str:
    """A normalised Go duration (``20ms``, ``1.5s``, ``2s``) as a protobuf JSON duration."""
    if go.endswith("ms"):
        return _dur(int(go[:-2]))
    return f"{float(go[:-1]):.3f}s"


def _actions(descriptor: dict[str, Any]) -> dict[str, Any]:
    """One OSM HTTP descriptor as an Envoy route ``rate_limits`` entry."""
    actions: list[dict[str, Any]] = []
    for e in descriptor.get("entries", []):
        if "genericKey" in e:
            g = e["genericKey"]
            actions.append(
                {"generic_key": {"descriptor_key": g["key"], "descriptor_value": g["value"]}}
            )
        elif "remoteAddress" in e:
            actions.append({"remote_address": {}})
        elif "requestHeader" in e:
            h = e["requestHeader"]
            actions.append(
                {"request_headers": {"header_name": h["name"], "descriptor_key": h["key"]}}
            )
        elif "headerValueMatch" in e:
            m = e["headerValueMatch"]
            actions.append(
                {
                    "header_value_match": {
                        "descriptor_key": m["key"],
                        "descriptor_value": m["value"],
                        "expect_match": m["expectMatch"],
                        "headers": [_header_matcher(h) for h in m["headers"]],
                    }
                }
            )
    return {"actions": actions}


def _header_matcher(h: dict[str, Any]) -> dict[str, Any]:
    name = h["name"]
    if "present" in h:
        return {"name": name, "present_match": bool(h["present"])}
    if "regex" in h:
        return {"name": name, "string_match": {"safe_regex": {"regex": h["regex"]}}}
    for key in ("exact", "prefix", "suffix", "contains"):
        if key in h:
            return {"name": name, "string_match": {key: h[key]}}
    return {"name": name, "present_match": True}


def rls_clusters(tp: TrafficPolicy, services: Iterable[str]) -> list[ResourceEntry]:
    """Clusters of the global rate-limit services the backed ``services`` use (HTTP/2)."""
    out: dict[str, ResourceEntry] = {}
    for s in services:
        uts = tp.upstream.get(s)
        if uts is None:
            continue
        for kind in ("http", "tcp"):
            glob = _global_spec(uts, kind)
            if glob is None:
                continue
            host, port = glob["rateLimitService"]["host"], glob["rateLimitService"]["port"]
            name = rls_cluster_name(host, port)
            if name not in out:
                out[name] = _grpc_cluster(name, host, port)
    return [out[k] for k in sorted(out)]


def _grpc_cluster(name: str, host: str, port: int) -> ResourceEntry:
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    spec: dict[str, Any] = {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sockaddr(host, port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if kind == "STRICT_DNS":
        spec["dns_lookup_family"] = "V4_PREFERRED"
    return make_entry(json_format.ParseDict(spec, cluster_pb2.Cluster()), type_url=CLUSTER)


def inbound_routes(
    tp: TrafficPolicy, services: Sequence[str], default_route: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The routes of an inbound virtual host (the ``httpRoutes`` of the backed service's
    UpstreamTrafficSetting before ``default_route``) and per-filter config for the host."""
    uts = _backing_settings(tp, services)
    if uts is None:
        return [default_route], {}
    routes: list[dict[str, Any]] = []
    glob = _global_spec(uts, "http")
    plain_routes = uts.spec().get("httpRoutes", [])
    for i, rs in enumerate(uts.routes):
        action = dict(default_route["route"])
        if rs.timeout_ms is not None:
            action["timeout"] = _dur(rs.timeout_ms)
        if rs.has_global and glob is not None:
            descriptors = plain_routes[i]["rateLimit"]["global"]["descriptors"]
            action["rate_limits"] = [_actions(d) for d in descriptors]
        route: dict[str, Any] = {
            "match": {"safe_regex": {"regex": f"(?:{rs.path}).*"}},
            "route": action,
        }
        if rs.local is not None:
            route["typed_per_filter_config"] = {
                HTTP_LOCAL_RATELIMIT: _http_bucket(rs.local, f"inbound_route_{i}")
            }
        routes.append(route)
    routes.append(default_route)
    vhost: dict[str, Any] = {}
    if uts.local_http is not None:
        vhost[HTTP_LOCAL_RATELIMIT] = _http_bucket(uts.local_http, "inbound_vhost")
    if glob is not None and glob["descriptors"]:
        vhost[VHOST_RATE_LIMITS] = [_actions(d) for d in glob["descriptors"]]
    return routes, vhost


def inbound_tcp_filters(
    tp: TrafficPolicy, services: Sequence[str], port: int
) -> list[dict[str, Any]]:
    """Network filters at the head of an inbound chain: the TCP local rate limit."""
    uts = _backing_settings(tp, services)
    if uts is None:
        return []
    out: list[dict[str, Any]] = []
    glob = _global_spec(uts, "tcp")
    if glob is not None:
        rls = glob["rateLimitService"]
        out.append(
            {
                "name": "envoy.filters.network.ratelimit",
                "typed_config": {
                    "@type": _NET_RL,
                    "stat_prefix": f"inbound_tcp_rate_limit_{port}",
                    "domain": glob["domain"],
                    "descriptors": glob["descriptors"],
                    "timeout": _proto_duration(glob["timeout"]),
                    "failure_mode_deny": not glob["failOpen"],
                    "rate_limit_service": _rls_service(rls["host"], rls["port"]),
                },
            }
        )
    if uts.local_tcp is None:
        return out
    lim = uts.local_tcp
    local = {
        "name": "envoy.filters.network.local_ratelimit",
        "typed_config": {
            "@type": _NET_LRL,
            "stat_prefix": f"inbound_tcp_local_rate_limit_{port}",
            "token_bucket": {
                "max_tokens": lim.connections + lim.burst,
                "tokens_per_fill": lim.connections,
                "fill_interval": f"{UNIT_SECONDS[lim.unit]}s",
            },
        },
    }
    return [local, *out]  # the local bucket first: no service call for a refused connection


# ---------------------------------------------------------------------- observability


def access_logs(tp: TrafficPolicy, *, node: str, direction: str) -> list[dict[str, Any]]:
    """The ``access_log`` list of an HTTP connection manager or TCP proxy."""
    cfg = tp.observability.access_log
    if cfg is None:
        return []
    if cfg.get("format") == "text":
        text = cfg.get("textFormat")
        fmt: dict[str, Any] = {"text_format_source": {"inline_string": text}} if text else {}
    else:
        fields = {**JSON_LOG_FORMAT, "node": node, "direction": direction}
        fmt = {"json_format": fields}
    path = cfg.get("path") or "/dev/stdout"
    stream = _STREAM_LOGS.get(path)
    typed: dict[str, Any]
    if stream is not None:
        name, typed = stream[0], {"@type": stream[1]}
    else:
        name, typed = "envoy.access_loggers.file", {"@type": _FILE_LOG, "path": path}
    if fmt:
        typed["log_format"] = fmt
    return [{"name": name, "typed_config": typed}]


def observe_hcm(
    tp: TrafficPolicy, hcm: dict[str, Any], *, node: str, direction: str
) -> dict[str, Any]:
    """``hcm`` (an http_connection_manager network filter) with access logs and tracing."""
    typed = dict(hcm["typed_config"])
    logs = access_logs(tp, node=node, direction=direction)
    if logs:
        typed["access_log"] = logs
    tracing = tp.observability.tracing
    if tracing is not None:
        if tracing.get("provider") == "opentelemetry":
            provider = {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": _OTEL,
                    "grpc_service": {"envoy_grpc": {"cluster_name": TRACING_CLUSTER}},
                    "service_name": node,
                },
            }
        else:
            provider = {
                "name": "envoy.tracers.zipkin",
                "typed_config": {
                    "@type": _ZIPKIN,
                    "collector_cluster": TRACING_CLUSTER,
                    "collector_endpoint": tracing.get("endpoint", "/api/v2/spans"),
                    "collector_endpoint_version": "HTTP_JSON",
                    "shared_span_context": False,
                },
            }
        typed["tracing"] = {
            "random_sampling": {"value": float(tracing.get("sampling", 100.0))},
            "provider": provider,
        }
    return {**hcm, "typed_config": typed}


def observe_tcp(
    tp: TrafficPolicy, flt: dict[str, Any], *, node: str, direction: str
) -> dict[str, Any]:
    """``flt`` (a tcp_proxy network filter) with access logs."""
    logs = access_logs(tp, node=node, direction=direction)
    if not logs:
        return flt
    return {**flt, "typed_config": {**flt["typed_config"], "access_log": logs}}


def tracing_cluster(tp: TrafficPolicy) -> ResourceEntry | None:
    """Cluster ``smc-tracing`` (the collector) when tracing is on."""
    tracing = tp.observability.tracing
    if tracing is None:
        return None
    address = str(tracing["address"])
    try:
        ipaddress.ip_address(address)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    spec: dict[str, Any] = {
        "name": TRACING_CLUSTER,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": TRACING_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _sockaddr(address, int(tracing["port"]))}}
                    ]
                }
            ],
        },
    }
    if kind == "STRICT_DNS":
        spec["dns_lookup_family"] = "V4_PREFERRED"
    if tracing.get("provider") == "opentelemetry":
        spec["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return make_entry(json_format.ParseDict(spec, cluster_pb2.Cluster()), type_url=CLUSTER)


def _sockaddr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# ---------------------------------------------------------------------- egress


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


def egress_parts(tp: TrafficPolicy, identity: str) -> EgressParts:
    policies = tp.egress_of(identity)
    if not policies:
        return NO_EGRESS
    http: dict[tuple[str, int], None] = {}
    tls: dict[int, set[str]] = {}
    tcp: dict[int, set[str]] = {}
    for e in policies:
        for p in e.ports:
            if p.protocol == "http":
                for h in e.hosts:
                    http[(h, p.number)] = None
            elif p.protocol == "https":
                tls.setdefault(p.number, set()).update(e.hosts)
            else:
                tcp.setdefault(p.number, set()).update(e.ip_addresses)
    vhosts: list[dict[str, Any]] = []
    clusters: dict[str, ResourceEntry] = {}
    for host, port in sorted(http):
        name = egress_cluster_name(host, port)
        clusters[name] = _dns_cluster(name, host, port)
        domains = [f"{host}:{port}"] + ([host] if port == 80 else [])
        vhosts.append(
            {
                "name": name,
                "domains": domains,
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}],
            }
        )
    for port, hosts in tls.items():
        for host in sorted(hosts):
            if not host.startswith("*."):
                name = egress_cluster_name(host, port)
                clusters[name] = _dns_cluster(name, host, port)
    for port, cidrs in tcp.items():
        for cidr in sorted(cidrs):
            net = ipaddress.ip_network(cidr)
            if net.num_addresses == 1:
                name = egress_cluster_name(str(net.network_address), port)
                clusters[name] = _static_cluster(name, str(net.network_address), port)
    return EgressParts(
        vhosts=tuple(vhosts),
        clusters=tuple(clusters[k] for k in sorted(clusters)),
        http_ports=tuple(sorted({p for _, p in http})),
        tls=tuple((p, tuple(sorted(h))) for p, h in sorted(tls.items())),
        tcp=tuple((p, tuple(sorted(c))) for p, c in sorted(tcp.items())),
    )


def _dns_cluster(name: str, host: str, port: int) -> ResourceEntry:
    spec = {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sockaddr(host, port)}}]}],
        },
    }
    return make_entry(json_format.ParseDict(spec, cluster_pb2.Cluster()), type_url=CLUSTER)


def _static_cluster(name: str, address: str, port: int) -> ResourceEntry:
    spec = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
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


# ---------------------------------------------------------------------- ingress


def ingress_of(
    tp: TrafficPolicy, services: Sequence[str], port: int
) -> list[tuple[IngressBackendPolicy, IngressBackendTarget]]:
    """The IngressBackends naming one of ``services`` on ``port`` (the target port)."""
    out = []
    for s in services:
        for pol, backend in tp.ingress.get(s, ()):
            if backend.port == port:
                out.append((pol, backend))
    return out


def _cidr_principal(cidr: str) -> dict[str, Any]:
    net = ipaddress.ip_network(cidr)
    return {
        "direct_remote_ip": {
            "address_prefix": str(net.network_address),
            "prefix_len": net.prefixlen,
        }
    }


def ingress_ranges(
    pol: IngressBackendPolicy, endpoints: Iterable[tuple[str, str, str]]
) -> list[str]:
    """CIDRs an ingress may come from: IPRange sources and the addresses of Service sources
    (``endpoints``: (namespace, service, address) triples)."""
    out: list[str] = []
    eps = list(endpoints)
    for s in pol.sources:
        if s.kind == "IPRange":
            out.append(s.name)
        elif s.kind == "Service":
            for ns, name, addr in eps:
                if ns == s.namespace and name == s.name:
                    out.append(str(ipaddress.ip_network(addr)))
    return sorted(set(out))


def ingress_rbac_policies(
    ingress: Sequence[tuple[IngressBackendPolicy, IngressBackendTarget]],
    endpoints: Iterable[tuple[str, str, str]],
) -> dict[str, Any]:
    """RBAC policies allowing https IngressBackends' principals (from their ranges, if any)
    on the mTLS chain."""
    eps = list(endpoints)
    out: dict[str, Any] = {}
    for pol, backend in ingress:
        if backend.protocol != "https":
            continue
        names = [s.name for s in pol.sources if s.kind == "AuthenticatedPrincipal"]
        if not names:
            continue
        ids: dict[str, Any] = {
            "or_ids": {"ids": [{"authenticated": {"principal_name": {"exact": n}}} for n in names]}
        }
        ranges = ingress_ranges(pol, eps)
        if ranges:
            ids = {
                "and_ids": {"ids": [ids, {"or_ids": {"ids": [_cidr_principal(c) for c in ranges]}}]}
            }
        out[f"ingress|{pol.namespace}/{pol.name}"] = {
            "permissions": [{"any": True}],
            "principals": [ids],
        }
    return out


def ingress_chains(
    tp: TrafficPolicy,
    ingress: Sequence[tuple[IngressBackendPolicy, IngressBackendTarget]],
    endpoints: Iterable[tuple[str, str, str]],
    *,
    port: int,
    cluster: str,
    node: str,
) -> list[dict[str, Any]]:
    """The ingress chains of a port besides its mTLS chain: plaintext for ``http`` backends
    and, for ``https`` backends with ``tls.skipClientCertValidation``, TLS without a client
    certificate from the listed address ranges (and SNI hosts); both with RBAC by address."""
    eps = list(endpoints)
    out: list[dict[str, Any]] = []
    plain = ingress_http_chain(tp, ingress, eps, port=port, cluster=cluster, node=node)
    if plain is not None:
        out.append(plain)
    ranges: list[str] = []
    sni: set[str] = set()
    for pol, backend in ingress:
        if backend.protocol == "https" and backend.skip_client_cert_validation:
            ranges.extend(ingress_ranges(pol, eps))
            sni.update(backend.sni_hosts)
    if not ranges:
        return out
    chain = _ingress_hcm_chain(
        tp, sorted(set(ranges)), port=port, cluster=cluster, node=node, name=f"ingress-tls|{port}"
    )
    match: dict[str, Any] = {
        "transport_protocol": "tls",
        "source_prefix_ranges": [
            {
                "address_prefix": str(ipaddress.ip_network(c).network_address),
                "prefix_len": ipaddress.ip_network(c).prefixlen,
            }
            for c in sorted(set(ranges))
        ],
    }
    if sni:
        match["server_names"] = sorted(sni)
    chain["filter_chain_match"] = match
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": False,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [
                    {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
                ]
            },
        },
    }
    out.append(chain)
    return out


def ingress_http_chain(
    tp: TrafficPolicy,
    ingress: Sequence[tuple[IngressBackendPolicy, IngressBackendTarget]],
    endpoints: Iterable[tuple[str, str, str]],
    *,
    port: int,
    cluster: str,
    node: str,
) -> dict[str, Any] | None:
    """The plaintext chain of an ``http`` IngressBackend port: RBAC by source address."""
    eps = list(endpoints)
    ranges: list[str] = []
    for pol, backend in ingress:
        if backend.protocol == "http":
            ranges.extend(ingress_ranges(pol, eps))
    if not any(b.protocol == "http" for _, b in ingress):
        return None
    chain = _ingress_hcm_chain(
        tp, sorted(set(ranges)), port=port, cluster=cluster, node=node, name=f"ingress|{port}"
    )
    chain["filter_chain_match"] = {"transport_protocol": "raw_buffer"}
    return chain


def _ingress_hcm_chain(
    tp: TrafficPolicy, ranges: list[str], *, port: int, cluster: str, node: str, name: str
) -> dict[str, Any]:
    """A chain whose HTTP connection manager lets only ``ranges`` reach the app."""
    policies: dict[str, Any] = {}
    if ranges:
        policies["ingress"] = {
            "permissions": [{"any": True}],
            "principals": [_cidr_principal(c) for c in sorted(set(ranges))],
        }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": f"ingress_{port}",
            "route_config": {
                "name": f"ingress|{port}",
                "virtual_hosts": [
                    {
                        "name": f"ingress|{port}",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": cluster, "timeout": "30s"},
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.rbac",
                    "typed_config": {
                        "@type": _HTTP_RBAC,
                        "rules": {"action": "ALLOW", "policies": policies},
                    },
                },
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
        },
    }
    return {"name": name, "filters": [observe_hcm(tp, hcm, node=node, direction="ingress")]}
