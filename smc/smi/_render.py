"""Canonical manifests and aggregate keys for model objects.

Role: ``to_manifest`` writes a model object back as a manifest of the newest API version that
can express it (TrafficTarget with a destination port uses access v1alpha2, the last version
with ``destination.port``); ``resource_key`` gives the stable ``Kind/namespace/name`` key used as
the event aggregate key. ``parse_manifest(to_manifest(r)) == r`` for every valid ``r``.
Concurrency: pure functions; safe everywhere.
"""

from __future__ import annotations

import json

from smc.smi._model import (
    HTTPMatch,
    HTTPRouteGroup,
    MeshConfig,
    MeshService,
    Resource,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    VirtualMachineGroup,
)
from smc.smi._osm_model import (
    OSM_POLICY,
    EgressPolicy,
    IngressBackendPolicy,
    RetryPolicy,
    UpstreamTrafficSetting,
)

__all__ = ["resource_key", "to_manifest"]


def resource_key(resource: Resource) -> str:
    """``Kind/namespace/name``, e.g. ``TrafficTarget/default/api-access``."""
    return f"{resource.KIND}/{resource.namespace}/{resource.name}"


def _meta(resource: Resource) -> dict[str, object]:
    return {"name": resource.name, "namespace": resource.namespace}


def to_manifest(resource: Resource) -> dict[str, object]:
    """The canonical manifest (a plain JSON-able dict) of ``resource``."""
    if isinstance(resource, TrafficTarget):
        dest: dict[str, object] = {
            "kind": "ServiceAccount",
            "name": resource.destination.name,
            "namespace": resource.destination.namespace,
        }
        version = "v1alpha3"
        if resource.port is not None:
            dest["port"] = resource.port
            version = "v1alpha2"
        rules: list[dict[str, object]] = []
        for rule in resource.rules:
            entry: dict[str, object] = {"kind": rule.kind, "name": rule.name}
            if rule.matches:
                entry["matches"] = list(rule.matches)
            rules.append(entry)
        return {
            "apiVersion": f"access.smi-spec.io/{version}",
            "kind": "TrafficTarget",
            "metadata": _meta(resource),
            "spec": {
                "destination": dest,
                "rules": rules,
                "sources": [
                    {"kind": "ServiceAccount", "name": s.name, "namespace": s.namespace}
                    for s in resource.sources
                ],
            },
        }
    if isinstance(resource, HTTPRouteGroup):
        return {
            "apiVersion": "specs.smi-spec.io/v1alpha4",
            "kind": "HTTPRouteGroup",
            "metadata": _meta(resource),
            "spec": {"matches": [_http_match(m) for m in resource.matches]},
        }
    if isinstance(resource, TCPRoute | UDPRoute):
        matches: dict[str, object] = {"ports": list(resource.ports)}
        if resource.match_name is not None:
            matches["name"] = resource.match_name
        return {
            "apiVersion": "specs.smi-spec.io/v1alpha4",
            "kind": resource.KIND,
            "metadata": _meta(resource),
            "spec": {"matches": matches},
        }
    if isinstance(resource, TrafficSplit):
        spec: dict[str, object] = {
            "service": resource.service,
            "backends": [{"service": b.service, "weight": b.weight} for b in resource.backends],
        }
        if resource.matches:
            spec["matches"] = [
                {"kind": m.kind, "name": m.name, "apiGroup": "specs.smi-spec.io"}
                for m in resource.matches
            ]
        return {
            "apiVersion": "split.smi-spec.io/v1alpha4",
            "kind": "TrafficSplit",
            "metadata": _meta(resource),
            "spec": spec,
        }
    if isinstance(resource, MeshService):
        return {
            "apiVersion": "smc.dev/v1alpha1",
            "kind": "MeshService",
            "metadata": _meta(resource),
            "spec": {
                "backing": resource.backing,
                "ports": [
                    {
                        "name": p.name,
                        "port": p.port,
                        "protocol": p.protocol,
                        "targetPort": p.target_port,
                    }
                    for p in resource.ports
                ],
                "selector": dict(resource.selector),
            },
        }
    if isinstance(resource, VirtualMachine):
        meta = _meta(resource)
        if resource.labels:
            meta["labels"] = dict(resource.labels)
        return {
            "apiVersion": "smc.dev/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": meta,
            "spec": {
                "address": resource.address,
                "serviceAccount": resource.service_account,
                "ports": [
                    {"name": p.name, "port": p.port, "protocol": p.protocol} for p in resource.ports
                ],
                "services": list(resource.services),
            },
        }
    if isinstance(resource, MeshConfig):
        return {
            "apiVersion": "smc.dev/v1alpha1",
            "kind": "MeshConfig",
            "metadata": _meta(resource),
            "spec": {
                "permissiveTrafficMode": resource.permissive_traffic_mode,
                "trustDomain": resource.trust_domain,
                "certificateLifetime": _format_duration(resource.certificate_lifetime_seconds),
                **({} if resource.enable_egress else {"enableEgress": False}),
                **(
                    {"observability": json.loads(resource.observability)}
                    if resource.observability
                    else {}
                ),
            },
        }
    if isinstance(
        resource, EgressPolicy | IngressBackendPolicy | RetryPolicy | UpstreamTrafficSetting
    ):
        return {
            "apiVersion": OSM_POLICY,
            "kind": resource.KIND,
            "metadata": _meta(resource),
            "spec": resource.spec(),
        }
    if isinstance(resource, VirtualMachineGroup):
        from smc.smi._vmgroup import vm_group_manifest

        return vm_group_manifest(resource)
    raise TypeError(f"not an SMI resource: {type(resource).__name__}")


def _http_match(m: HTTPMatch) -> dict[str, object]:
    out: dict[str, object] = {"name": m.name, "methods": list(m.methods)}
    if m.path_regex is not None:
        out["pathRegex"] = m.path_regex
    if m.headers:
        out["headers"] = dict(m.headers)
    return out


def _format_duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
    return "".join(parts) or "0s"
