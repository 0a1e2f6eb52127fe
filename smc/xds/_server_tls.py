"""mTLS of the ADS server: its TLS material and the client-certificate identity rule.

Role: :class:`ServerTLS` (checked PEMs, rotatable gRPC credentials), reading the SPIFFE identity
of a stream's verified client certificate, and :func:`workload_authorizer` (a certificate may
speak for the node ids of workloads running as its service account). Concurrency: pure
functions; the authorizer is called on the server's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smc.ca import InvalidIdentity, SpiffeId, parse_spiffe_id
from smc.projections import Workload
from smc.xds._errors import XdsError
from smc.xds._identity import InvalidNodeId, find_workload, parse_node_id
from smc.xds._server_records import Authorize, RefusalReason

__all__ = ["ServerTLS", "workload_authorizer"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTLS:
    """TLS material of the ADS server: its certificate chain and key (PEM), the CA bundle
    client certificates must chain to, and optionally the trust domain their SPIFFE ids must
    be in. Build it with :meth:`of` to get the PEMs checked with clear errors."""

    cert_pem: str
    key_pem: str
    client_ca_pems: tuple[str, ...]
    trust_domain: str | None = None

    @classmethod
    def of(
        cls,
        *,
        cert_pem: str,
        key_pem: str,
        client_ca_pems: Iterable[str],
        trust_domain: str | None = None,
    ) -> ServerTLS:
        """Check the PEMs parse (raises :class:`XdsError` naming the field) and build."""
        cas = tuple(client_ca_pems)
        leaf = _check_pem_certs(cert_pem, field="cert_pem")
        if "PRIVATE KEY-----" not in key_pem:
            raise XdsError("ServerTLS.key_pem: no PEM private key found")
        try:
            key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise XdsError(f"ServerTLS.key_pem: not a usable private key: {exc}") from exc
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise XdsError("ServerTLS.key_pem: does not match the certificate of cert_pem")
        if not cas:
            raise XdsError("ServerTLS.client_ca_pems: empty (client certificates cannot verify)")
        for i, pem in enumerate(cas):
            _check_pem_certs(pem, field=f"client_ca_pems[{i}]")
        return cls(
            cert_pem=cert_pem, key_pem=key_pem, client_ca_pems=cas, trust_domain=trust_domain
        )

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        """The material as a configuration for dynamic (rotatable) gRPC server credentials."""
        roots = "".join(p if p.endswith("\n") else p + "\n" for p in self.client_ca_pems)
        pairs = [(self.key_pem.encode("ascii"), self.cert_pem.encode("ascii"))]
        return grpc.ssl_server_certificate_configuration(
            pairs, root_certificates=roots.encode("ascii")
        )


def _check_pem_certs(pem: str, *, field: str) -> x509.Certificate:
    """The first certificate of ``pem``; raises :class:`XdsError` naming ``field``."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise XdsError(f"ServerTLS.{field}: not PEM certificates: {exc}") from exc
    if not certs:
        raise XdsError(f"ServerTLS.{field}: no certificate found")
    return certs[0]


def _peer_identity(
    context: grpc.aio.ServicerContext, *, trust_domain: str | None
) -> SpiffeId | tuple[RefusalReason, str]:
    """The SPIFFE identity of the (TLS-verified) client certificate of ``context``'s peer: its
    one ``spiffe://`` URI SAN, in ``trust_domain`` when given; else ``(reason, message)``."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return (
            "no_client_certificate",
            "no client certificate: the ADS port requires mTLS with a mesh certificate",
        )
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "bad_identity", "client certificate has no subjectAltName (expected a SPIFFE URI)"
    except ValueError as exc:
        return "bad_identity", f"client certificate does not parse: {exc}"
    spiffe = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    if len(spiffe) != 1:
        return "bad_identity", (
            f"client certificate must carry exactly one spiffe:// URI SAN, found {len(spiffe)}"
            + (f": {spiffe}" if spiffe else "")
        )
    try:
        return parse_spiffe_id(spiffe[0], trust_domain=trust_domain)
    except InvalidIdentity as exc:
        return "bad_identity", f"client certificate identity is not valid: {exc}"


def workload_authorizer(
    *,
    workloads: Callable[[], Mapping[tuple[str, str, str], Workload] | Iterable[Workload]],
) -> Authorize:
    """An :data:`Authorize` hook over the registry: a certificate for ``ns/sa`` may speak for
    node id ``<ns>/<workload>`` (or ``<kind>/<ns>/<workload>``) when that workload exists and
    runs as service account ``sa`` in ``ns``. ``workloads`` returns the registry's current
    workloads (a mapping keyed ``(kind, ns, name)`` or any iterable); it is called per check."""

    def authorize(node_id: str, peer: SpiffeId) -> bool:
        try:
            ref = parse_node_id(node_id)
        except InvalidNodeId:
            return False
        workload = find_workload(ref, workloads())
        return (
            workload is not None
            and workload.namespace == peer.namespace
            and workload.service_account == peer.service_account
        )

    return authorize
