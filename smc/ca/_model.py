"""The issuer contract: :class:`Issuer`, :class:`IssuedCertificate` and its public
:class:`CertificateRecord`, plus the helpers every issuer shares (workload key and
CSR generation, serial normalisation, lifetime checks).

Role: the workload's private key is generated here, by the control plane, and travels
only inside :class:`IssuedCertificate` (a field hidden from ``repr`` and equality);
:meth:`IssuedCertificate.record` is the only form meant for the event log.
Concurrency: values are immutable; functions are pure and thread-safe. Issuers are
synchronous (blocking) objects: call them from asyncio with ``asyncio.to_thread``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.ca._errors import InvalidLifetime, InvalidSerial
from smc.ca._identity import SpiffeId

__all__ = [
    "CertificateRecord",
    "IssuedCertificate",
    "Issuer",
    "build_csr",
    "check_lifetime",
    "generate_workload_key",
    "normalize_serial",
    "serial_from_int",
    "serial_to_colon_hex",
]

_HEX = re.compile(r"[0-9a-f]+")


def serial_from_int(value: int) -> str:
    """Canonical serial text: lowercase hex of the minimal big-endian bytes (even length)."""
    if value < 0:
        raise InvalidSerial(str(value), reason="negative serial numbers are not allowed")
    length = max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(length, "big").hex()


def normalize_serial(serial: str) -> str:
    """Accept ``"0a:1b:..."``, ``"0A1B..."`` or ``"a1b"`` and return the canonical form
    (see :func:`serial_from_int`). Raises :class:`InvalidSerial`."""
    if not isinstance(serial, str):
        raise InvalidSerial(repr(serial), reason="serial must be a string")
    text = serial.strip().lower().replace(":", "").replace("-", "")
    if not text:
        raise InvalidSerial(serial, reason="is empty")
    if not _HEX.fullmatch(text):
        raise InvalidSerial(serial, reason="not hexadecimal (expected e.g. '5e:92:f1' or '5e92f1')")
    if len(text) > 80:
        raise InvalidSerial(serial, reason="longer than 40 bytes")
    return serial_from_int(int(text, 16))


def serial_to_colon_hex(serial: str) -> str:
    """Canonical serial as Vault/OpenBao prints it: ``"5e:92:f1"``."""
    canon = normalize_serial(serial)
    return ":".join(canon[i : i + 2] for i in range(0, len(canon), 2))


def check_lifetime(lifetime: timedelta, *, maximum: timedelta | None = None) -> timedelta:
    """Return ``lifetime`` if it is a positive duration of at least one second and at
    most ``maximum``; raise :class:`InvalidLifetime` otherwise."""
    if not isinstance(lifetime, timedelta):
        raise InvalidLifetime(lifetime, reason="must be a datetime.timedelta")
    if lifetime < timedelta(seconds=1):
        raise InvalidLifetime(lifetime, reason="must be at least one second")
    if maximum is not None and lifetime > maximum:
        raise InvalidLifetime(lifetime, reason=f"exceeds the issuer's maximum of {maximum}")
    return lifetime


def generate_workload_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key for a workload, generated in this process."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(
    *, key: ec.EllipticCurvePrivateKey, identity: SpiffeId
) -> x509.CertificateSigningRequest:
    """A CSR with an empty subject and the SPIFFE URI as its only SAN, signed by ``key``."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """PKCS#8 PEM text of ``key`` (unencrypted: it lives only in memory and in SDS)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


@dataclass(frozen=True, kw_only=True, slots=True)
class CertificateRecord:
    """The public facts of an issued certificate: what the event log may carry.
    It holds no key material by construction."""

    serial: str
    identity: str
    not_after: datetime
    issuer: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True, slots=True)
class IssuedCertificate:
    """A workload certificate with its key.

    ``private_key_pem`` is excluded from ``repr``, equality and hashing; never log or
    persist this object: use :meth:`record` for the event log.
    """

    identity: str
    serial: str
    not_before: datetime
    not_after: datetime
    fingerprint: str
    issuer: str
    cert_pem: str
    chain_pem: str
    private_key_pem: str = field(repr=False, compare=False, hash=False)

    def record(self) -> CertificateRecord:
        """Only the public facts (serial, identity, not-after, issuer, fingerprint)."""
        return CertificateRecord(
            serial=self.serial,
            identity=self.identity,
            not_after=self.not_after,
            issuer=self.issuer,
            fingerprint=self.fingerprint,
        )

    @property
    def lifetime(self) -> timedelta:
        """``not_after - not_before``."""
        return self.not_after - self.not_before

    def certificate(self) -> x509.Certificate:
        """The leaf parsed with ``cryptography``."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode("ascii"))


def issued_from(
    cert: x509.Certificate,
    *,
    identity: str,
    issuer: str,
    cert_pem: str,
    chain_pem: str,
    private_key_pem: str,
) -> IssuedCertificate:
    """Assemble an :class:`IssuedCertificate` from a signed leaf."""
    return IssuedCertificate(
        identity=identity,
        serial=serial_from_int(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        issuer=issuer,
        cert_pem=cert_pem,
        chain_pem=chain_pem,
        private_key_pem=private_key_pem,
    )


@runtime_checkable
class Issuer(Protocol):
    """What the control plane needs from a certificate authority.

    The control plane generates the workload key (EC P-256); the issuer signs. All
    methods block; from asyncio call them through ``asyncio.to_thread``. Errors are
    :class:`smc.ca.CAError` subclasses: :class:`smc.ca.IssuerUnavailable` (retry later,
    keep serving the current certificates) or :class:`smc.ca.IssuerRejected` (don't).
    """

    @property
    def name(self) -> str:
        """Stable issuer name, recorded with every certificate."""
        ...

    def issue(self, *, identity: str | SpiffeId, lifetime: timedelta) -> IssuedCertificate:
        """Generate a key for ``identity`` and return a certificate valid for ``lifetime``."""
        ...

    def revoke(self, *, serial: str) -> None:
        """Revoke the certificate with this serial (idempotent)."""
        ...

    def revoked_serials(self) -> frozenset[str]:
        """Canonical serials revoked by this issuer (see :func:`normalize_serial`)."""
        ...

    def trust_bundle(self) -> list[str]:
        """PEM roots a peer must trust to verify every certificate still in use."""
        ...
