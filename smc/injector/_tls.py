"""Serving certificates for the webhook (DNS and IP SANs) signed by SMC's local CA.

Role: :class:`smc.ca.LocalIssuer` signs workload leaves whose only SAN is a SPIFFE URI; an HTTPS
server the apiserver calls needs DNS names (``<service>.<namespace>.svc``) and IP addresses in
its certificate instead. :func:`issue_serving_certificate` signs such a leaf with the issuer's
active root (read from the issuer's directory, ``roots/<serial>.key``, refused when its mode is
looser than 0600) so the same trust bundle (``LocalIssuer.trust_bundle()``, the webhook's
``caBundle``) verifies it. :func:`server_ssl_context` loads one into an ``ssl.SSLContext``.
Concurrency: pure apart from reading the root key file; safe from any thread.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smc.ca import IssuedCertificate, LocalIssuer, generate_workload_key, load_key_file
from smc.injector._errors import InjectorError

__all__ = [
    "issue_serving_certificate",
    "load_serving_certificate",
    "renewal_due",
    "server_ssl_context",
]


def renewal_due(not_after: datetime, *, lifetime: timedelta, now: datetime) -> bool:
    """Whether a certificate valid until ``not_after`` has less than a third of ``lifetime``
    left at ``now``: when the injector and ``smc serve`` renew what they issued."""
    return not_after - now < lifetime / 3


def issue_serving_certificate(
    issuer: LocalIssuer,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    lifetime: timedelta = timedelta(days=30),
) -> IssuedCertificate:
    """A TLS server certificate for ``dns_names`` and ``ip_addresses`` signed by the active
    root of ``issuer`` (EC P-256 key; EKU serverAuth; ``identity`` is the first name)."""
    if not dns_names and not ip_addresses:
        raise InjectorError("a serving certificate needs at least one DNS name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    for text in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError as exc:
            raise InjectorError(f"ip address {text!r} is not an IP address") from exc
    serial = issuer.active_root_serial
    roots = issuer.directory / "roots"
    root_key = load_key_file(roots / f"{serial}.key")
    root_pem = (roots / f"{serial}.pem").read_bytes()
    root = x509.load_pem_x509_certificate(root_pem)
    now = datetime.now(UTC).replace(microsecond=0)
    not_after = now + lifetime
    if not_after > root.not_valid_after_utc:
        raise InjectorError(f"a {lifetime} serving certificate would outlive root {serial}")
    key = generate_workload_key()
    name = (list(dns_names) or list(ip_addresses))[0]
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=30))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return IssuedCertificate(
        identity=name,
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        issuer=issuer.name,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        chain_pem=root_pem.decode("ascii"),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
    )


def server_ssl_context(cert: IssuedCertificate) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``cert`` (see :func:`load_serving_certificate`)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_serving_certificate(ctx, cert)
    return ctx


def load_serving_certificate(ctx: ssl.SSLContext, cert: IssuedCertificate) -> None:
    """Make ``ctx`` present ``cert`` from its next handshake on (a renewal needs no new
    context nor restart). The key touches disk only in a 0600 temporary file that is removed
    at once: ``ssl`` loads keys from files only."""
    fd, path = tempfile.mkstemp(prefix="smc-webhook-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (cert.cert_pem + cert.private_key_pem).encode("ascii"))
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
