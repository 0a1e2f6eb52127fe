"""Evaluated OSM traffic policy: the model every ``smc.xds._traffic_*`` module reads.

Role: :func:`traffic_policy` evaluates the stored Egress, IngressBackend, Retry and
UpstreamTrafficSetting resources and the MeshConfig's ``enableEgress`` / ``observability`` once
per policy generation into a :class:`TrafficPolicy`; also the small helpers (durations, socket
addresses, type URL prefix) the fragment modules share. The bottom layer: imports no other
``_traffic_*`` module.
Concurrency: an immutable evaluated policy cached per
:class:`~smc.projections.PolicyProjection` and generation in a weak dictionary, read and filled
on the thread that applies events (the asyncio loop), like the rest of the builder.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from envoy.extensions.upstreams.http.v3 import (  # noqa: F401
    http_protocol_options_pb2 as _hpo_pb2,
)

from smc.projections import PolicyProjection, PolicyView
from smc.smi import (
    EgressPolicy,
    HTTPRouteGroup,
    IngressBackendPolicy,
    IngressBackendTarget,
    ManifestErrors,
    RetryPolicy,
    UpstreamTrafficSetting,
    parse_manifest,
)

__all__ = ["Observability", "TrafficPolicy", "traffic_policy"]

log = logging.getLogger("smc.xds.traffic")

_T = "type.googleapis.com/"
_HTTP_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _dur(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def _sockaddr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


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
    #: HTTPRouteGroups an Egress names in its ``matches``, by (namespace, name).
    route_groups: dict[tuple[str, str], HTTPRouteGroup] = field(default_factory=dict)
    #: Every UpstreamTrafficSetting by (namespace, name) (an Egress's ``matches`` name them).
    settings: dict[tuple[str, str], UpstreamTrafficSetting] = field(default_factory=dict)
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
            tp.settings[(r.namespace, r.name)] = r
            if not r.service:  # an external host: only for the Egress policies naming it
                continue
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
    for e in egress:
        for ref in e.matches:
            held = policy.resources.get(("HTTPRouteGroup", e.namespace, ref.name))
            if ref.kind != "HTTPRouteGroup" or held is None:
                continue
            try:
                group = parse_manifest(held.manifest(), document=f"{e.namespace}/{ref.name}")
            except (ManifestErrors, ValueError):
                continue
            if isinstance(group, HTTPRouteGroup):
                tp.route_groups[(e.namespace, ref.name)] = group
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
