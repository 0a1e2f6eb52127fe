"""Certificate signing requests from proxies: parse and check one before any issuer signs it.

Role: the control plane never sees a workload key; an SMC agent beside each proxy makes the
key and sends a CSR. :func:`check_csr` accepts a PEM CSR only when its self-signature verifies
(the sender holds the key), its key is EC P-256/P-384 (or RSA >= 2048 bits), and its
subject alternative names are empty or exactly the one SPIFFE URI the caller proved; the
signed leaf always carries exactly that URI (the issuer sets it, never copying the CSR's
names). :class:`SignedCertificate` is what an issuer returns for a CSR: the public
certificate and chain only. :class:`CsrSigner` is the protocol issuers implement for it.
Concurrency: pure functions and immutable values; issuers' ``sign_csr`` is blocking and
thread-safe (call it through ``asyncio.to_thread``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from smc.ca._errors import InvalidCSR
from smc.ca._identity import SpiffeId
from smc.ca._model import CertificateRecord, serial_from_int

__all__ = ["CsrSigner", "SignedCertificate", "check_csr", "signed_from"]

_MAX_CSR = 16 * 1024
_CURVES = ("secp256r1", "secp384r1")


def check_csr(csr_pem: str | bytes, *, identity: SpiffeId) -> x509.CertificateSigningRequest:
    """Parse ``csr_pem`` and check it may be signed for ``identity``; raises
    :class:`InvalidCSR` naming the faulty part."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if len(data) > _MAX_CSR:
        raise InvalidCSR(part="size", reason=f"longer than {_MAX_CSR} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise InvalidCSR(part="pem", reason=f"not a PEM certificate request ({exc})") from exc
    if not csr.is_signature_valid:
        raise InvalidCSR(part="signature", reason="does not verify with the CSR's own key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise InvalidCSR(part="key", reason=f"curve {key.curve.name} (use P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidCSR(part="key", reason=f"RSA key of {key.key_size} bits (< 2048)")
    else:
        raise InvalidCSR(part="key", reason=f"{type(key).__name__} keys are not accepted")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return csr
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if names and (len(names) != 1 or uris != [identity.uri]):
        raise InvalidCSR(
            part="subjectAltName",
            reason=f"asks for {[str(n.value) for n in names]}; only {identity.uri!r} is proven",
        )
    return csr


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedCertificate:
    """A certificate signed for a CSR: public material only (the key stays with the proxy)."""

    identity: str
    serial: str
    not_before: datetime
    not_after: datetime
    fingerprint: str
    issuer: str
    cert_pem: str
    chain_pem: str

    def record(self) -> CertificateRecord:
        """The public facts the log carries."""
        return CertificateRecord(
            serial=self.serial,
            identity=self.identity,
            not_after=self.not_after,
            issuer=self.issuer,
            fingerprint=self.fingerprint,
        )


def signed_from(
    cert: x509.Certificate, *, identity: str, issuer: str, chain_pem: str
) -> SignedCertificate:
    """Assemble a :class:`SignedCertificate` from a signed leaf."""
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return SignedCertificate(
        identity=identity,
        serial=serial_from_int(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        issuer=issuer,
        cert_pem=pem,
        chain_pem=chain_pem,
    )


@runtime_checkable
class CsrSigner(Protocol):
    """An issuer that signs a proxy's CSR for an identity already proven by the caller."""

    @property
    def name(self) -> str: ...

    def sign_csr(
        self, *, csr_pem: str, identity: str | SpiffeId, lifetime: timedelta
    ) -> SignedCertificate:
        """Check ``csr_pem`` (:func:`check_csr`) and sign a leaf for ``identity``."""
        ...
