"""The pieces of an Envoy bootstrap that point at the SMC agent beside it.

Role: :func:`agent_sds_config` is the SDS config source of the proxy's ``default`` secret: the
file the agent writes (``smc-sds/default.json``, relative to Envoy's working directory, the
proxy dir; see :mod:`smc.agent._files`); :func:`ads_tls_transport_socket` the
UpstreamTlsContext of the ADS cluster: the proxy's certificate and key come from that file,
the control plane's certificate is verified with the mesh CA bundle (a file or inline PEM)
and, optionally, a SAN. A bootstrap built from these holds no key and no credential; Envoy
must start in the proxy dir once the agent has written its first certificate.
Concurrency: pure functions.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from smc.agent._files import agent_sds_config

__all__ = [
    "ads_tls_transport_socket",
    "agent_sds_config",
]

_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


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
