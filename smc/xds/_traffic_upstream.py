"""Retries, timeouts and circuit breaking: OSM Retry and UpstreamTrafficSetting on the client side.

Role: the outbound routes' ``retry_policy`` of a Retry (source identity, destination service)
and the cluster fields of an UpstreamTrafficSetting (circuit breakers, connect timeout,
requests per connection, outlier detection), plus the endpoint tag that makes a changed
cluster arrive with its endpoints. Imports only :mod:`smc.xds._traffic_model`.
Concurrency: pure functions of an immutable :class:`~smc.xds._traffic_model.TrafficPolicy`;
called on the builder's thread (the asyncio loop).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from smc.smi import RetryPolicy, UpstreamTrafficSetting
from smc.xds._traffic_model import _HTTP_OPTIONS, TrafficPolicy, _dur

__all__ = ["apply_retries", "cluster_settings", "retry_policy", "settings_tag"]


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
