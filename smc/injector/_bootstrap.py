"""Envoy bootstrap documents for SMC sidecars: node id, admin, and ADS to the control plane.

Role: pure builders shared by the pod injector and the VM bootstrap writer. A bootstrap names the
proxy (``node.id`` = ``<namespace>/<workload>``, the node-id scheme of :mod:`smc.xds`), puts the
admin interface on loopback, takes listeners and clusters over one ADS stream (gRPC, state of
the world, or delta) and defines the one static cluster ``smc_xds`` that reaches the control
plane: STATIC for an IP address, STRICT_DNS for a name, HTTP/2, and, unless told otherwise, TLS
with the proxy's bootstrap certificate and key and the mesh trust bundle (mTLS to the control
plane). Where the certificate, key and roots come from is a :class:`TlsSources`: files (VMs),
environment variables (pods whose credentials are inline in the spec), or a watched directory
(:meth:`TlsSources.watched`: pods whose credentials are a mounted Secret): there Envoy reads
them through file-based SDS (:func:`watched_tls_files` makes the two files) and watches the
directory, so a renewed Secret, which the kubelet swaps in atomically, is taken up without a
restart and a later reconnect to the control plane presents the new certificate.
Concurrency: pure functions and immutable values; safe everywhere.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smc.agent._files import agent_sds_config
from smc.injector._errors import InjectorError
from smc.xds._stats import mesh_stats_config

__all__ = [
    "ADS_CLUSTER",
    "CA_SDS_FILE",
    "CERT_SDS_FILE",
    "AdsAddress",
    "TlsSources",
    "envoy_bootstrap",
    "parse_ads_address",
    "watched_tls_files",
]

ADS_CLUSTER = "smc_xds"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: Files of a watched bootstrap directory: file-based SDS of the certificate and of the roots.
CERT_SDS_FILE = "cert-sds.json"
CA_SDS_FILE = "ca-sds.json"
_CERT_SECRET = "smc-bootstrap-cert"
_CA_SECRET = "smc-bootstrap-ca"
_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$")


@dataclass(frozen=True, kw_only=True, slots=True)
class AdsAddress:
    """Where the control plane's ADS server listens."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_ads_address(text: str, *, field: str = "ads") -> AdsAddress:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> :class:`AdsAddress`; raises
    :class:`InjectorError` naming ``field`` when it is not one."""
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InjectorError(f"{field} {text!r} is not HOST:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _HOST.match(host):
            raise InjectorError(
                f"{field} {text!r}: {host!r} is neither an IP address nor a DNS name"
            ) from None
    return AdsAddress(host=host, port=int(port))


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsSources:
    """Envoy ``DataSource`` objects of the bootstrap certificate, its key and the trust bundle."""

    certificate: dict[str, str]
    private_key: dict[str, str]
    trusted_ca: dict[str, str]
    #: With :meth:`watched`: the directory holding :data:`CERT_SDS_FILE` and :data:`CA_SDS_FILE`.
    directory: str | None = None
    #: With :meth:`agent`: the certificate and key come from the SMC agent's file (``default``).
    from_agent: bool = False

    @classmethod
    def agent(cls, *, ca: dict[str, str]) -> TlsSources:
        """The proxy's own certificate and key from the SMC agent beside it (its file in
        Envoy's working directory); the control plane verified with ``ca`` (a DataSource)."""
        return cls(certificate={}, private_key={}, trusted_ca=dict(ca), from_agent=True)

    @classmethod
    def watched(cls, directory: Path | str) -> TlsSources:
        """Through file-based SDS from ``directory``, reloaded when it changes."""
        return cls(certificate={}, private_key={}, trusted_ca={}, directory=str(directory))

    @classmethod
    def files(cls, *, cert: Path | str, key: Path | str, ca: Path | str) -> TlsSources:
        return cls(
            certificate={"filename": str(cert)},
            private_key={"filename": str(key)},
            trusted_ca={"filename": str(ca)},
        )

    @classmethod
    def environment(cls, *, cert: str, key: str, ca: str) -> TlsSources:
        """Read from the proxy's environment variables of these names (Envoy expands them)."""
        return cls(
            certificate={"environment_variable": cert},
            private_key={"environment_variable": key},
            trusted_ca={"environment_variable": ca},
        )


def watched_tls_files(*, cert_pem: str, key_pem: str, ca_pem: str) -> dict[str, str]:
    """The contents of a :meth:`TlsSources.watched` directory (file name -> text)."""
    cert = {
        "resources": [
            {
                "@type": _SECRET,
                "name": _CERT_SECRET,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": cert_pem},
                    "private_key": {"inline_string": key_pem},
                },
            }
        ]
    }
    ca = {
        "resources": [
            {
                "@type": _SECRET,
                "name": _CA_SECRET,
                "validation_context": {"trusted_ca": {"inline_string": ca_pem}},
            }
        ]
    }
    return {
        CERT_SDS_FILE: json.dumps(cert, sort_keys=True),
        CA_SDS_FILE: json.dumps(ca, sort_keys=True),
    }


def _file_sds(name: str, directory: str, file: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": f"{directory.rstrip('/')}/{file}",
                "watched_directory": {"path": directory},
            },
            "resource_api_version": "V3",
        },
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_bootstrap(
    *,
    node_id: str,
    cluster: str,
    ads: AdsAddress,
    tls: TlsSources | None,
    admin_port: int = 15000,
    admin_address: str = "127.0.0.1",
    delta: bool = False,
    server_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The bootstrap of one SMC proxy (a plain dict, ready for JSON or YAML).

    With :meth:`TlsSources.agent` the proxy's certificate and key come from the file the SMC
    agent beside it writes (``smc-sds/default.json`` relative to Envoy's working directory,
    :func:`smc.agent.agent_sds_config`), which the listeners' ``default`` secret comes from
    too; Envoy must start in that directory once the agent has written it.

    ``tls`` None means plaintext HTTP/2 to the ADS server. With TLS, the control plane's
    certificate must chain to the trust bundle; ``server_name`` (default: ``ads.host`` when it
    is a DNS name) is sent as SNI and, when given, must also be a DNS SAN of that certificate.
    """
    config_source = {"ads": {}, "resource_api_version": "V3"}
    xds_cluster: dict[str, Any] = {
        "name": ADS_CLUSTER,
        "type": "STATIC" if ads.is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": ADS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(ads.host, ads.port)}}]}
            ],
        },
    }
    if tls is not None:
        sans = [{"san_type": "DNS", "matcher": {"exact": server_name}}] if server_name else None
        common: dict[str, Any]
        if tls.from_agent:
            validation_ctx: dict[str, Any] = {"trusted_ca": dict(tls.trusted_ca)}
            if sans:
                validation_ctx["match_typed_subject_alt_names"] = sans
            common = {
                "tls_certificate_sds_secret_configs": [
                    {"name": "default", "sds_config": agent_sds_config()}
                ],
                "validation_context": validation_ctx,
            }
        elif tls.directory is not None:
            common = {
                "tls_certificate_sds_secret_configs": [
                    _file_sds(_CERT_SECRET, tls.directory, CERT_SDS_FILE)
                ],
                "combined_validation_context": {
                    "default_validation_context": (
                        {"match_typed_subject_alt_names": sans} if sans else {}
                    ),
                    "validation_context_sds_secret_config": _file_sds(
                        _CA_SECRET, tls.directory, CA_SDS_FILE
                    ),
                },
            }
        else:
            validation: dict[str, Any] = {"trusted_ca": dict(tls.trusted_ca)}
            if sans:
                validation["match_typed_subject_alt_names"] = sans
            common = {
                "tls_certificates": [
                    {
                        "certificate_chain": dict(tls.certificate),
                        "private_key": dict(tls.private_key),
                    }
                ],
                "validation_context": validation,
            }
        common["alpn_protocols"] = ["h2"]
        context: dict[str, Any] = {"@type": _UPSTREAM_TLS, "common_tls_context": common}
        sni = server_name or (None if ads.is_ip else ads.host)
        if sni:
            context["sni"] = sni
        xds_cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": context,
        }
    node: dict[str, Any] = {"id": node_id, "cluster": cluster}
    if metadata:
        node["metadata"] = dict(metadata)
    return {
        "node": node,
        "stats_config": mesh_stats_config(node_id),
        "admin": {"address": _address(admin_address, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": ADS_CLUSTER}}],
            },
            "lds_config": dict(config_source),
            "cds_config": dict(config_source),
        },
        "static_resources": {"clusters": [xds_cluster]},
    }
