"""Local and global rate limits: UpstreamTrafficSetting on the sidecars of the limited service.

Role: the inbound HTTP filters (local token bucket, global ``ratelimit`` filter), the inbound
virtual host's routes (``httpRoutes``: per route timeout, bucket and descriptors) and
per-filter config, the TCP network filters (local bucket first, then the global service), and
the clusters of the global rate-limit services (``ratelimit|<host>|<port>``, HTTP/2). Imports
only :mod:`smc.xds._traffic_model`.
Concurrency: pure functions of an immutable :class:`~smc.xds._traffic_model.TrafficPolicy`;
called on the builder's thread (the asyncio loop).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import (  # noqa: F401
    local_rate_limit_pb2 as _http_lrl_pb2,
)
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as _http_rl_pb2  # noqa: F401
from envoy.extensions.filters.network.local_ratelimit.v3 import (  # noqa: F401
    local_rate_limit_pb2 as _net_lrl_pb2,
)
from envoy.extensions.filters.network.ratelimit.v3 import (  # noqa: F401
    rate_limit_pb2 as _net_rl_pb2,
)
from google.protobuf import json_format

from smc.smi import HTTPLocalRateLimit, UpstreamTrafficSetting
from smc.smi._osm_model import UNIT_SECONDS
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic_model import _HTTP_OPTIONS, _T, TrafficPolicy, _dur, _sockaddr
from smc.xds._types import CLUSTER

__all__ = [
    "HTTP_LOCAL_RATELIMIT",
    "VHOST_RATE_LIMITS",
    "inbound_http_filters",
    "inbound_routes",
    "inbound_tcp_filters",
    "rls_cluster_name",
    "rls_clusters",
]

_HTTP_LRL = _T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_NET_LRL = _T + "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"
_HTTP_RL = _T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_NET_RL = _T + "envoy.extensions.filters.network.ratelimit.v3.RateLimit"
HTTP_LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
#: Key of :func:`inbound_routes`' second result holding the virtual host's ``rate_limits``.
VHOST_RATE_LIMITS = "rate_limits"
_ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


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
