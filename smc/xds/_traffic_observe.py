"""Access logs, tracing and stats naming: MeshConfig ``observability`` on every proxy.

Role: access logs on every HTTP connection manager and TCP proxy (JSON by default, or text;
to the configured file, ``/dev/stdout`` by default, via Envoy's stream loggers for
stdout/stderr), tracing (Zipkin over HTTP JSON or OpenTelemetry over gRPC) and the collector
cluster ``smc-tracing``. Imports only :mod:`smc.xds._traffic_model`; the egress and ingress
modules wrap their filters with it.
Concurrency: pure functions of an immutable :class:`~smc.xds._traffic_model.TrafficPolicy`;
called on the builder's thread (the asyncio loop).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import opentelemetry_pb2 as _otel_pb2  # noqa: F401
from envoy.config.trace.v3 import zipkin_pb2 as _zipkin_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2 as _file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2 as _stream_pb2  # noqa: F401
from google.protobuf import json_format

from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic_model import _HTTP_OPTIONS, _T, Observability, TrafficPolicy, _sockaddr
from smc.xds._types import CLUSTER

__all__ = [
    "JSON_LOG_FORMAT",
    "TRACING_CLUSTER",
    "access_logs",
    "observe_cluster",
    "observe_hcm",
    "observe_tcp",
    "tracing_cluster",
]

TRACING_CLUSTER = "smc-tracing"
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


_DEFAULT_OBSERVABILITY = TrafficPolicy().observability


def observe_cluster(tp: TrafficPolicy, settings: dict[str, Any]) -> dict[str, Any]:
    """A mesh cluster's ``settings`` with a digest of the observability settings in its
    metadata (unchanged while they are the defaults).

    Access logs and tracing live in the upstream sidecars' listener filters, and Envoy keeps an
    open connection on the filter chain it was accepted by until it drains: a client's pooled
    connection would keep meeting the old HTTP connection manager (e.g. the previous tracer,
    whose spans then go nowhere). A changed digest changes every client cluster, which closes
    their pooled connections; the next requests open new ones on the new chains."""
    obs = tp.observability
    if obs == _DEFAULT_OBSERVABILITY:
        return settings
    digest = _observability_digest(obs)
    meta = settings.get("metadata", {}).get("filter_metadata", {}).get("smc", {})
    return {
        **settings,
        "metadata": {"filter_metadata": {"smc": {**meta, "observability": digest}}},
    }


def _observability_digest(obs: Observability) -> str:
    text = json.dumps([obs.access_log, obs.tracing], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
