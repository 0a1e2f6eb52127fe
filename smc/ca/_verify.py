"""Verify a workload certificate against a trust bundle and return its SPIFFE identity.

Role: used by the control plane to check a peer's client certificate (the identity an
Envoy's node id claims) and by tests; built on ``cryptography.x509.verification``
(RFC 5280 path building, client-certificate profile: EKU clientAuth, validity at
``now``, signatures up to a trust anchor).
Concurrency: pure function; safe everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from smc.ca._errors import CertificateVerificationError, InvalidIdentity
from smc.ca._identity import SpiffeId, parse_spiffe_id

__all__ = ["verify_certificate"]


def _load_all(pem: str, *, what: str) -> list[x509.Certificate]:
    if not pem.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(pem.encode("ascii"))
    except ValueError as exc:
        raise CertificateVerificationError(f"{what} is not valid PEM: {exc}") from exc


def verify_certificate(
    *,
    cert_pem: str,
    trust_bundle: list[str],
    intermediates_pem: str = "",
    now: datetime | None = None,
    trust_domain: str | None = None,
) -> SpiffeId:
    """Check ``cert_pem`` chains (through ``intermediates_pem``) to a root of
    ``trust_bundle`` and is valid at ``now`` as a client certificate; return the single
    SPIFFE identity in its URI SAN. Raises :class:`CertificateVerificationError`."""
    leaves = _load_all(cert_pem, what="certificate")
    if len(leaves) != 1:
        raise CertificateVerificationError(
            f"expected exactly one certificate in cert_pem, found {len(leaves)}"
        )
    roots = [c for pem in trust_bundle for c in _load_all(pem, what="trust bundle entry")]
    if not roots:
        raise CertificateVerificationError("trust bundle is empty")
    intermediates = [
        c
        for c in _load_all(intermediates_pem, what="intermediates")
        if c.subject != c.issuer  # self-signed roots come from the bundle only
    ]
    verifier = (
        PolicyBuilder().store(Store(roots)).time(now or datetime.now(UTC)).build_client_verifier()
    )
    try:
        verified = verifier.verify(leaves[0], intermediates)
    except VerificationError as exc:
        raise CertificateVerificationError(f"certificate does not verify: {exc}") from exc
    uris = [
        s.value for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)
    ]
    if len(uris) != 1:
        raise CertificateVerificationError(
            f"certificate must carry exactly one URI SAN, found {len(uris)}: {uris}"
        )
    try:
        return parse_spiffe_id(uris[0], trust_domain=trust_domain)
    except InvalidIdentity as exc:
        raise CertificateVerificationError(f"URI SAN is not a valid identity: {exc}") from exc
