"""TLS of the control-plane API: its CA and serving certificate, and client certificates.

Role: :class:`ApiTLS` keeps a small CA of the API in a server's folder (``api-ca.crt``,
``api-ca.key`` 0600, EC P-256, ten years) and a serving certificate it signs for the
listening host, 127.0.0.1 and localhost (re-issued when a third of its 90 days is left or the
names changed); or serves the given ``--api-cert/--api-key`` files. :func:`server_context` is
the server's :class:`ssl.SSLContext`: TLS >= 1.2, client certificates optional and, when
presented, verified against the trusted client CAs (the ``--admin-ca`` bundle, the mesh
trust bundle added once it is known): an expired certificate or one from another CA fails the
handshake. :func:`principal_of_certificate` names a verified client certificate: its SPIFFE
id (URI SAN) or else its subject (RFC 4514), with the subject's organizations as groups.
Concurrency: ``ensure`` runs once at start; the SSL context may gain trusted roots while
serving (:meth:`ClientRoots.add`), which applies to new handshakes.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smc.auth._errors import CredentialError
from smc.auth._files import make_private_dir, write_private
from smc.auth._principal import AUTHENTICATED_GROUP, Principal

__all__ = [
    "ApiTLS",
    "ClientRoots",
    "ServingMaterial",
    "principal_of_certificate",
    "serial_of_certificate",
    "server_context",
]

_SERVING_LIFETIME = timedelta(days=90)
_CA_LIFETIME = timedelta(days=3650)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServingMaterial:
    cert_file: Path
    key_file: Path
    ca_pem: str  # what clients trust to verify the server


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _names(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for h in dict.fromkeys(h.strip("[]") for h in hosts):
        if h in ("", "0.0.0.0", "::"):
            continue
        try:
            ipaddress.ip_address(h)
            ips.append(h)
        except ValueError:
            dns.append(h)
    return dns, ips


class ApiTLS:
    """The API's CA and serving certificate in ``folder`` (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        hosts: Sequence[str],
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise CredentialError("give both --api-cert and --api-key")
        self.folder = folder
        self.hosts = tuple(hosts)
        self.cert_file = cert_file
        self.key_file = key_file
        self.ca_file = ca_file

    def ensure(self, *, now: datetime | None = None) -> ServingMaterial:
        """The serving certificate and key files, and the PEM clients should trust."""
        if self.cert_file is not None and self.key_file is not None:
            try:
                ca_pem = Path(self.ca_file or self.cert_file).read_text("ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialError(f"--api-cert: cannot read: {exc}") from exc
            return ServingMaterial(
                cert_file=Path(self.cert_file), key_file=Path(self.key_file), ca_pem=ca_pem
            )
        now = now or datetime.now(UTC)
        make_private_dir(self.folder)
        ca_cert, ca_key = self._ca(now)
        dns, ips = _names((*self.hosts, "127.0.0.1", "localhost"))
        crt, key = self.folder / "tls.crt", self.folder / "tls.key"
        if not self._serving_current(crt, key, ca_cert, dns, ips, now):
            self._issue_serving(crt, key, ca_cert, ca_key, dns, ips, now)
        return ServingMaterial(
            cert_file=crt,
            key_file=key,
            ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        )

    def _ca(self, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        crt, key = self.folder / "api-ca.crt", self.folder / "api-ca.key"
        if crt.is_file() and key.is_file():
            try:
                cert = x509.load_pem_x509_certificate(crt.read_bytes())
                pk = serialization.load_pem_private_key(key.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise CredentialError(f"{self.folder}: cannot read the API CA: {exc}") from exc
            if isinstance(pk, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > now:
                return cert, pk
        pk = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SMC control-plane API CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pk.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pk.public_key()), False)
            .sign(pk, hashes.SHA256())
        )
        write_private(key, _key_pem(pk))
        write_private(crt, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)
        return cert, pk

    @staticmethod
    def _serving_current(
        crt: Path,
        key: Path,
        ca: x509.Certificate,
        dns: list[str],
        ips: list[str],
        now: datetime,
    ) -> bool:
        if not crt.is_file() or not key.is_file():
            return False
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return False
        have_dns = set(san.get_values_for_type(x509.DNSName))
        have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
        left = cert.not_valid_after_utc - now
        return (
            cert.issuer == ca.subject
            and have_dns == set(dns)
            and have_ips == set(ips)
            and left > _SERVING_LIFETIME / 3
        )

    @staticmethod
    def _issue_serving(
        crt: Path,
        key: Path,
        ca: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        dns: list[str],
        ips: list[str],
        now: datetime,
    ) -> None:
        pk = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ips)[0])]))
            .issuer_name(ca.subject)
            .public_key(pk.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _SERVING_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(key, _key_pem(pk))
        write_private(crt, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)


class ClientRoots:
    """The CAs whose client certificates the API accepts; roots can be added while serving."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self._loaded: set[str] = set()

    def add(self, pems: Iterable[str]) -> int:
        """Trust every certificate in ``pems`` (PEM bundles); returns how many were new."""
        added = 0
        for pem in pems:
            for cert in _split_pem(pem):
                if cert in self._loaded:
                    continue
                try:
                    self.ctx.load_verify_locations(cadata=cert)
                except ssl.SSLError as exc:
                    raise CredentialError(f"not a CA certificate: {exc}") from exc
                self._loaded.add(cert)
                added += 1
        return added


def _split_pem(bundle: str) -> list[str]:
    out = []
    end = "-----END CERTIFICATE-----"
    for part in bundle.split(end)[:-1]:
        start = part.find("-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(part[start:] + end + "\n")
    return out


def server_context(
    material: ServingMaterial, *, client_cas: Iterable[str] = ()
) -> tuple[ssl.SSLContext, ClientRoots]:
    """The API server's SSL context and its client-root set (see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(material.cert_file), str(material.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"API serving certificate {material.cert_file}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    roots = ClientRoots(ctx)
    roots.add(client_cas)
    return ctx, roots


def serial_of_certificate(cert: x509.Certificate) -> str:
    """The serial as SMC's certificate events record it."""
    from smc.ca._model import serial_from_int

    return serial_from_int(cert.serial_number)


@functools.lru_cache(maxsize=4096)
def principal_of_certificate(der: bytes) -> tuple[Principal, x509.Certificate]:
    """The principal of a verified client certificate (see the module docstring); cached by
    the certificate's bytes (a keep-alive client presents the same one on every request)."""
    cert = x509.load_der_x509_certificate(der)
    name = ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        name = next((u for u in uris if u.startswith("spiffe://")), "")
    except x509.ExtensionNotFound:
        pass
    groups: list[str] = []
    if not name:
        name = cert.subject.rfc4514_string()
        groups = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        ]
    if not name:
        from smc.auth._errors import Unauthenticated

        raise Unauthenticated("the client certificate has neither a SPIFFE id nor a subject")
    return (
        Principal(name=name, method="client-certificate", groups=(*groups, AUTHENTICATED_GROUP)),
        cert,
    )
