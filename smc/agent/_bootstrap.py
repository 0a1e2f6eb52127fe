"""The pieces of an Envoy bootstrap that point at the SMC agent beside it.

Role: :func:`agent_cluster` is the static cluster (HTTP/2 over the agent's unix socket) that
SDS config sources name; :func:`agent_sds_config` such a config source;
:func:`ads_tls_transport_socket` the UpstreamTlsContext of the ADS cluster: the proxy's
certificate and key come from the agent (``default``), the control plane's certificate is
verified with the mesh CA bundle (a file or inline PEM) and, optionally, a SAN. A bootstrap
built from these holds no key and no credential.
Concurrency: pure functions.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = [
    "AGENT_CLUSTER",
    "ads_tls_transport_socket",
    "agent_cluster",
    "agent_sds_config",
]

AGENT_CLUSTER = "smc-agent"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def agent_cluster(socket_path: str) -> dict[str, Any]:
    """The static cluster of the agent's SDS server on ``socket_path``."""
    return {
        "name": AGENT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": AGENT_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}
            ],
        },
    }


def agent_sds_config() -> dict[str, Any]:
    """An SDS config source: gRPC to :data:`AGENT_CLUSTER`."""
    return {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": AGENT_CLUSTER}}],
        },
    }


def _san_type(san: str) -> str:
    if "://" in san:
        return "URI"
    try:
        ipaddress.ip_address(san)
    except ValueError:
        return "DNS"
    return "IP_ADDRESS"


def ads_tls_transport_socket(
    *,
    ca_path: str | None = None,
    ca_pem: str | None = None,
    server_san: str | None = None,
    sni: str | None = None,
) -> dict[str, Any]:
    """mTLS of the ADS cluster with the agent's certificate (give ``ca_path`` or ``ca_pem``)."""
    if (ca_path is None) == (ca_pem is None):
        raise ValueError("give exactly one of ca_path and ca_pem")
    trusted = {"filename": ca_path} if ca_path is not None else {"inline_string": ca_pem}
    validation: dict[str, Any] = {"trusted_ca": trusted}
    if server_san:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": _san_type(server_san), "matcher": {"exact": server_san}}
        ]
    context: dict[str, Any] = {
        "@type": _UPSTREAM_TLS,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [
                {"name": "default", "sds_config": agent_sds_config()}
            ],
            "validation_context": validation,
        },
    }
    if sni:
        context["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
