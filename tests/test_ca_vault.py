"""VaultIssuer against a real OpenBao dev server started by this module."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.ca import (
    Backoff,
    CAStateError,
    CertificateVerificationError,
    InvalidIdentity,
    IssuedCertificate,
    Issuer,
    IssuerRejected,
    IssuerUnavailable,
    VaultIssuer,
    normalize_serial,
    retrying,
    serial_to_colon_hex,
    verify_certificate,
)
from smc.testing.ports import free_port
from smc.testing.vault import OpenBaoServer, PkiSetup, setup_pki, setup_transit

pytestmark = pytest.mark.vault

TD = "mesh.test"
ID = f"spiffe://{TD}/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:
        yield server


@pytest.fixture(scope="module")
def pki(bao: OpenBaoServer) -> PkiSetup:
    return setup_pki(bao.client(), mount="pki", trust_domain=TD)


@pytest.fixture(scope="module")
def issuer(bao: OpenBaoServer, pki: PkiSetup) -> Iterator[VaultIssuer]:
    iss = VaultIssuer(url=bao.url, token=bao.token, mount=pki.mount, role=pki.role, trust_domain=TD)
    yield iss
    iss.close()


def _secrets_of(cert: IssuedCertificate) -> list[str]:
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = [ln for ln in cert.private_key_pem.splitlines() if ln and not ln.startswith("-----")]
    return [*body, format(key.private_numbers().private_value, "x")]


def test_harness_exposes_url_and_token(bao: OpenBaoServer) -> None:
    assert bao.url.startswith("http://127.0.0.1:") and bao.running
    assert bao.client().sys.read_health_status(method="GET")["sealed"] is False
    assert bao.token not in repr(bao)


def test_vault_leaf_verifies_against_bundle(issuer: VaultIssuer, pki: PkiSetup) -> None:
    assert isinstance(issuer, Issuer)
    bundle = issuer.trust_bundle()
    assert len(bundle) == 1
    assert x509.load_pem_x509_certificate(bundle[0].encode()) == x509.load_pem_x509_certificate(
        pki.root_pem.encode()
    )
    cert = issuer.issue(identity=ID, lifetime=timedelta(hours=24))
    assert (
        verify_certificate(cert_pem=cert.cert_pem, trust_bundle=bundle, trust_domain=TD).uri == ID
    )
    leaf = cert.certificate()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert san.get_values_for_type(x509.DNSName) == []
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), password=None)
    assert key.public_key() == leaf.public_key()
    assert cert.issuer == "vault"


@pytest.mark.parametrize(
    "lifetime", [timedelta(minutes=10), timedelta(hours=24), timedelta(days=3)]
)
def test_vault_not_after_respects_lifetime(issuer: VaultIssuer, lifetime: timedelta) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = issuer.issue(identity=ID, lifetime=lifetime)
    after = datetime.now(UTC)
    assert before + lifetime - timedelta(seconds=1) <= cert.not_after <= after + lifetime
    assert cert.not_before <= before


def test_vault_key_never_in_record_repr_nor_vault_storage(
    issuer: VaultIssuer, bao: OpenBaoServer, pki: PkiSetup
) -> None:
    cert = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    rec = cert.record()
    texts = [repr(cert), repr(rec), str(rec), repr(issuer)]
    # what Vault kept about this certificate
    stored = bao.client().adapter.get(f"/v1/{pki.mount}/cert/{serial_to_colon_hex(cert.serial)}")
    assert "BEGIN CERTIFICATE" in str(stored)
    texts.append(str(stored))
    for secret in _secrets_of(cert):
        for text in texts:
            assert secret not in text
    assert bao.token not in repr(issuer)


def test_intermediate_ca_chain_verifies(bao: OpenBaoServer) -> None:
    setup = setup_pki(bao.client(), mount="pki-int", trust_domain=TD, intermediate=True)
    iss = VaultIssuer(
        url=bao.url, token=bao.token, mount=setup.mount, role=setup.role, trust_domain=TD
    )
    bundle = iss.trust_bundle()
    assert len(bundle) == 1
    assert x509.load_pem_x509_certificate(bundle[0].encode()) == x509.load_pem_x509_certificate(
        setup.root_pem.encode()
    )
    cert = iss.issue(identity=ID, lifetime=timedelta(hours=1))
    sid = verify_certificate(
        cert_pem=cert.cert_pem, trust_bundle=bundle, intermediates_pem=cert.chain_pem
    )
    assert sid.uri == ID
    with pytest.raises(CertificateVerificationError):  # not without the intermediate
        verify_certificate(cert_pem=cert.cert_pem, trust_bundle=bundle)


def test_identity_outside_role_is_rejected(bao: OpenBaoServer, pki: PkiSetup) -> None:
    other = VaultIssuer(
        url=bao.url, token=bao.token, mount=pki.mount, role=pki.role, trust_domain="other.test"
    )
    with pytest.raises(IssuerRejected, match="issue") as info:
        other.issue(identity="spiffe://other.test/ns/a/sa/b", lifetime=timedelta(hours=1))
    assert "uri" in str(info.value).lower()
    with pytest.raises(InvalidIdentity, match="trust-domain"):
        other.issue(identity=ID, lifetime=timedelta(hours=1))


def test_unknown_role_and_permission_denied_are_rejected(bao: OpenBaoServer, pki: PkiSetup) -> None:
    wrong_role = VaultIssuer(
        url=bao.url, token=bao.token, mount=pki.mount, role="nope", trust_domain=TD
    )
    with pytest.raises(IssuerRejected, match="unknown role"):
        wrong_role.issue(identity=ID, lifetime=timedelta(hours=1))
    weak = bao.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    denied = VaultIssuer(url=bao.url, token=weak, mount=pki.mount, role=pki.role, trust_domain=TD)
    with pytest.raises(IssuerRejected, match="permission denied") as info:
        denied.issue(identity=ID, lifetime=timedelta(hours=1))
    assert weak not in str(info.value)


def test_vault_down_is_unavailable_and_retry_is_bounded() -> None:
    port = free_port()  # nothing listens there
    down = VaultIssuer(
        url=f"http://127.0.0.1:{port}",
        token="t0ken-never-shown",
        role="r",
        trust_domain=TD,
        timeout=1.0,
    )
    with pytest.raises(IssuerUnavailable, match="cannot connect") as info:
        down.issue(identity=ID, lifetime=timedelta(hours=1))
    assert "t0ken-never-shown" not in str(info.value)
    retries: list[tuple[int, float]] = []
    wrapped = retrying(
        down,
        backoff=Backoff(
            attempts=4, initial=0.05, multiplier=2.0, maximum=1.0, jitter=0.5, deadline=5.0
        ),
        on_retry=lambda n, d, e: retries.append((n, d)),
        seed=7,
    )
    start = time.monotonic()
    with pytest.raises(IssuerUnavailable, match="gave up after 4 attempt"):
        wrapped.issue(identity=ID, lifetime=timedelta(hours=1))
    elapsed = time.monotonic() - start
    assert [n for n, _ in retries] == [1, 2, 3]
    for n, d in retries:
        assert 0.05 * 2 ** (n - 1) * 0.5 <= d <= 0.05 * 2 ** (n - 1)
    assert sum(d for _, d in retries) <= elapsed < 3.0
    # the deadline bounds the total time even with many attempts allowed
    deadline = retrying(down, backoff=Backoff(attempts=100, initial=0.2, maximum=0.2, deadline=0.5))
    start = time.monotonic()
    with pytest.raises(IssuerUnavailable, match="gave up"):
        deadline.trust_bundle()
    assert time.monotonic() - start < 2.0


def test_sealed_vault_is_unavailable_then_retry_recovers(
    bao: OpenBaoServer, issuer: VaultIssuer
) -> None:
    held = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    bundle = issuer.trust_bundle()
    sleeps: list[float] = []

    def sleep(d: float) -> None:
        sleeps.append(d)
        if len(sleeps) == 2:
            bao.unseal()  # Vault comes back during the second wait
        time.sleep(d)

    bao.seal()
    try:
        with pytest.raises(IssuerUnavailable, match="sealed"):
            issuer.issue(identity=ID, lifetime=timedelta(hours=1))
        # meanwhile the certificate already held still verifies (serving continues)
        assert verify_certificate(cert_pem=held.cert_pem, trust_bundle=bundle).uri == ID
        wrapped = retrying(
            issuer, backoff=Backoff(attempts=6, initial=0.05, deadline=20), sleep=sleep
        )
        cert = wrapped.issue(identity=ID, lifetime=timedelta(hours=1))
    finally:
        if bao.client().sys.read_health_status(method="GET").get("sealed", True):
            bao.unseal()
    assert len(sleeps) == 2
    assert verify_certificate(cert_pem=cert.cert_pem, trust_bundle=bundle).uri == ID


def test_revocation_shows_in_vault(issuer: VaultIssuer, bao: OpenBaoServer, pki: PkiSetup) -> None:
    keep = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    gone = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    issuer.revoke(serial=gone.serial)
    issuer.revoke(serial=gone.serial)  # idempotent
    revoked = issuer.revoked_serials()
    assert gone.serial in revoked and keep.serial not in revoked
    # the raw listing, as Vault serves it
    raw = bao.client().adapter.list(f"/v1/{pki.mount}/certs/revoked")["data"]["keys"]
    assert normalize_serial(gone.serial) in {normalize_serial(k) for k in raw}
    crl = x509.load_pem_x509_crl(issuer.crl_pem().encode())
    root = x509.load_pem_x509_certificate(pki.root_pem.encode())
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(int(gone.serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(keep.serial, 16)) is None
    with pytest.raises(IssuerRejected, match="not found"):
        issuer.revoke(serial="0badc0ffee")


def test_vault_root_rotation(bao: OpenBaoServer) -> None:
    setup = setup_pki(bao.client(), mount="pki-rot", trust_domain=TD)
    iss = VaultIssuer(
        url=bao.url, token=bao.token, mount=setup.mount, role=setup.role, trust_domain=TD
    )
    old_leaf = iss.issue(identity=ID, lifetime=timedelta(hours=1))
    old_root = normalize_serial(
        format(x509.load_pem_x509_certificate(setup.root_pem.encode()).serial_number, "x")
    )
    new_root = iss.rotate_root()
    bundle = iss.trust_bundle()
    assert len(bundle) == 2
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in bundle]
    assert {normalize_serial(format(r.serial_number, "x")) for r in roots} == {old_root, new_root}
    new_leaf = iss.issue(identity=ID, lifetime=timedelta(hours=1))
    assert (
        new_leaf.certificate().issuer == roots[0].subject
        or new_leaf.certificate().issuer == roots[1].subject
    )
    new_issuer = next(
        r for r in roots if normalize_serial(format(r.serial_number, "x")) == new_root
    )
    new_leaf.certificate().verify_directly_issued_by(new_issuer)
    for leaf in (old_leaf, new_leaf):
        verify_certificate(cert_pem=leaf.cert_pem, trust_bundle=bundle)
    with pytest.raises(CAStateError, match="default issuer"):
        iss.retire_root(new_root)
    iss.retire_root(old_root)
    after = iss.trust_bundle()
    assert len(after) == 1
    verify_certificate(cert_pem=new_leaf.cert_pem, trust_bundle=after)
    with pytest.raises(CertificateVerificationError):
        verify_certificate(cert_pem=old_leaf.cert_pem, trust_bundle=after)


def test_concurrent_vault_issue(issuer: VaultIssuer) -> None:
    out: list[IssuedCertificate] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(10):
            c = issuer.issue(identity=f"spiffe://{TD}/ns/n{n}/sa/s{i}", lifetime=timedelta(hours=1))
            with lock:
                out.append(c)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({c.serial for c in out}) == 40
    bundle = issuer.trust_bundle()
    assert all(
        verify_certificate(cert_pem=c.cert_pem, trust_bundle=bundle).uri == c.identity for c in out
    )


def test_transit_helper(bao: OpenBaoServer) -> None:
    name = setup_transit(bao.client(), mount="transit", key_name="smc-ca")
    key = bao.client().secrets.transit.read_key(name=name, mount_point="transit")
    assert key["data"]["type"] == "ecdsa-p256" and key["data"]["exportable"] is False


def test_requests_transport_behaves_the_same(bao: OpenBaoServer, pki: PkiSetup) -> None:
    iss = VaultIssuer(
        url=bao.url,
        token=bao.token,
        mount=pki.mount,
        role=pki.role,
        trust_domain=TD,
        transport="requests",
    )
    cert = iss.issue(identity=ID, lifetime=timedelta(hours=1))
    assert verify_certificate(cert_pem=cert.cert_pem, trust_bundle=iss.trust_bundle()).uri == ID
    wrong = VaultIssuer(
        url=bao.url,
        token=bao.token,
        mount=pki.mount,
        role="nope",
        trust_domain=TD,
        transport="requests",
    )
    with pytest.raises(IssuerRejected, match="unknown role"):
        wrong.issue(identity=ID, lifetime=timedelta(hours=1))
    down = VaultIssuer(
        url=f"http://127.0.0.1:{free_port()}",
        token="x",
        role="r",
        trust_domain=TD,
        transport="requests",
        timeout=1.0,
    )
    with pytest.raises(IssuerUnavailable, match="cannot connect"):
        down.trust_bundle()
    with pytest.raises(CAStateError, match="unsupported Vault URL"):
        VaultIssuer(url="ftp://127.0.0.1:1", token="x", role="r", trust_domain=TD)
    with pytest.raises(CAStateError, match="transport"):
        VaultIssuer(url=bao.url, token="x", role="r", trust_domain=TD, transport="carrier-pigeon")  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["http.client", "requests"])
def test_tls_vault(transport: str) -> None:
    with OpenBaoServer(tls=True) as server:
        assert server.url.startswith("https://") and server.ca_cert_path
        setup = setup_pki(server.client(), mount="pki", trust_domain=TD)
        iss = VaultIssuer(
            url=server.url,
            token=server.token,
            role=setup.role,
            trust_domain=TD,
            verify=server.ca_cert_path,
            transport=transport,  # type: ignore[arg-type]
        )
        cert = iss.issue(identity=ID, lifetime=timedelta(hours=1))
        assert verify_certificate(cert_pem=cert.cert_pem, trust_bundle=iss.trust_bundle()).uri == ID
        untrusting = VaultIssuer(
            url=server.url,
            token=server.token,
            role=setup.role,
            trust_domain=TD,
            transport=transport,  # type: ignore[arg-type]
        )
        with pytest.raises(IssuerUnavailable, match="TLS handshake"):
            untrusting.issue(identity=ID, lifetime=timedelta(hours=1))


def test_pooled_connection_survives_server_restart() -> None:
    port = free_port()
    with OpenBaoServer(port=port, token="restart-token") as first:
        iss = VaultIssuer(url=first.url, token=first.token, role="r", trust_domain=TD, pool_size=2)
        assert iss.revoked_serials() == frozenset()  # no PKI yet: empty, connection now pooled
    with pytest.raises(IssuerUnavailable):
        iss.revoked_serials()  # server gone
    with OpenBaoServer(port=port, token="restart-token") as second:
        setup_pki(second.client(), mount="pki", trust_domain=TD, role="r")
        cert = iss.issue(identity=ID, lifetime=timedelta(hours=1))
        assert cert.identity == ID


def _csr_pem(key: ec.EllipticCurvePrivateKey, *sans: str) -> str:
    from cryptography.hazmat.primitives import hashes

    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_vault_signs_a_proxys_csr_for_the_proven_identity_only(
    issuer: VaultIssuer, bao: OpenBaoServer, pki: PkiSetup
) -> None:
    """pki/sign over the agent's CSR: the leaf carries the CSR's key (made by the proxy, never
    seen by Vault nor SMC) and exactly the identity the caller proved."""
    from smc.ca import InvalidCSR

    key = ec.generate_private_key(ec.SECP256R1())
    signed = issuer.sign_csr(csr_pem=_csr_pem(key), identity=ID, lifetime=timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(signed.cert_pem.encode())
    assert leaf.public_key() == key.public_key()
    bundle = issuer.trust_bundle()
    assert verify_certificate(cert_pem=signed.cert_pem, trust_bundle=bundle).uri == ID
    assert signed.issuer == "vault" and not hasattr(signed, "private_key_pem")
    # a CSR asking for another identity than the proven one is refused before Vault is asked
    other = f"spiffe://{TD}/ns/kube-system/sa/admin"
    with pytest.raises(InvalidCSR, match="subjectAltName"):
        issuer.sign_csr(csr_pem=_csr_pem(key, other), identity=ID, lifetime=timedelta(hours=1))
    # a CSR whose self-signature does not verify (not made by the key's holder) is refused
    pem = _csr_pem(key)
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    broken = bytearray(der)
    broken[-5] ^= 0x01
    bad = x509.load_der_x509_csr(bytes(broken)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(InvalidCSR):
        issuer.sign_csr(csr_pem=bad, identity=ID, lifetime=timedelta(hours=1))
    # the key pair stays with the proxy: Vault's storage holds no private key of it
    private = format(key.private_numbers().private_value, "x")
    dump = repr(bao.client().secrets.pki.list_certificates(mount_point=pki.mount))
    assert private not in dump


def test_health_waits_while_the_ca_file_is_still_being_written(tmp_path: Path) -> None:
    """``bao server -dev-tls`` creates its CA file before it fills it: a health check that
    finds it empty is "not up yet" (the harness keeps waiting), not an ssl.SSLError that
    ends the start (seen once in a full run)."""
    server = OpenBaoServer(tls=True, port=free_port())
    server._dir = tempfile.TemporaryDirectory(dir=tmp_path)
    try:
        ca = server.ca_cert_path
        assert ca is not None
        Path(ca).write_bytes(b"")
        assert server._health() is None
        Path(ca).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        assert server._health() is None
    finally:
        server._dir.cleanup()
