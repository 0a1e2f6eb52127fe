"""IngressBackend: which clients outside the mesh reach a backend service port, and how.

Role: ``https`` backends: RBAC policies allowing the listed AuthenticatedPrincipals (URI or
DNS SAN of a mesh-CA client certificate) on the mTLS chain, optionally only from the listed
address ranges, and a TLS chain without client certificates for
``tls.skipClientCertValidation``; ``http`` backends: a plaintext chain (chosen by the TLS
inspector) whose RBAC allows only the listed IP ranges and the endpoints of the listed
Services. Imports :mod:`smc.xds._traffic_model` and :mod:`smc.xds._traffic_observe` (access
logs and tracing on its connection managers).
Concurrency: pure functions of an immutable :class:`~smc.xds._traffic_model.TrafficPolicy`;
called on the builder's thread (the asyncio loop).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from smc.smi import IngressBackendPolicy, IngressBackendTarget
from smc.xds._traffic_model import _T, TrafficPolicy
from smc.xds._traffic_observe import observe_hcm

__all__ = [
    "ingress_chains",
    "ingress_http_chain",
    "ingress_of",
    "ingress_ranges",
    "ingress_rbac_policies",
]

_HTTP_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


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
    sds_cert: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The ingress chains of a port besides its mTLS chain: plaintext for ``http`` backends
    and, for ``https`` backends with ``tls.skipClientCertValidation``, TLS without a client
    certificate from the listed address ranges (and SNI hosts); both with RBAC by address.
    ``sds_cert``: where the proxy's certificate comes from (the builder's: ADS, or the SMC
    agent's file beside the proxy); default ``default`` over ADS."""
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
                "tls_certificate_sds_secret_configs": sds_cert
                or [{"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}]
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
