"""LocalIssuer: real certificates from a real CA directory, verified with
cryptography's RFC 5280 verifier and with the openssl CLI."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from smc.ca import (
    CAStateError,
    CertificateVerificationError,
    InvalidIdentity,
    InvalidLifetime,
    IssuedCertificate,
    Issuer,
    KeyFilePermissionError,
    LocalIssuer,
    SpiffeId,
    normalize_serial,
    verify_certificate,
)

TD = "cluster.local"
ID = f"spiffe://{TD}/ns/shop/sa/cart"


@pytest.fixture
def issuer(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)


def _key_secrets(cert: IssuedCertificate) -> list[str]:
    """Strings that would betray the private key: PEM body lines and the scalar."""
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = [ln for ln in cert.private_key_pem.splitlines() if ln and not ln.startswith("-----")]
    scalar = key.private_numbers().private_value
    return [*body, format(scalar, "x"), str(scalar)]


def test_issuer_satisfies_protocol(issuer: LocalIssuer) -> None:
    assert isinstance(issuer, Issuer)
    assert issuer.name == "local"


def test_leaf_verifies_against_trust_bundle(issuer: LocalIssuer) -> None:
    cert = issuer.issue(identity=ID, lifetime=timedelta(hours=24))
    sid = verify_certificate(
        cert_pem=cert.cert_pem, trust_bundle=issuer.trust_bundle(), trust_domain=TD
    )
    assert sid.uri == ID
    # a different CA's bundle must not verify it
    with pytest.raises(CertificateVerificationError):
        other = LocalIssuer(directory=issuer.directory.parent / "other", trust_domain=TD)
        verify_certificate(cert_pem=cert.cert_pem, trust_bundle=other.trust_bundle())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_leaf_verifies_with_openssl_cli(issuer: LocalIssuer, tmp_path: Path) -> None:
    cert = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    (tmp_path / "bundle.pem").write_text("".join(issuer.trust_bundle()))
    (tmp_path / "leaf.pem").write_text(cert.cert_pem)
    for purpose in ("sslclient", "sslserver"):
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(tmp_path / "bundle.pem"),
                str(tmp_path / "leaf.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    # and the key in the certificate object is the leaf's key
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), password=None)
    assert key.public_key() == cert.certificate().public_key()


def test_leaf_extensions(issuer: LocalIssuer) -> None:
    leaf = issuer.issue(identity=ID, lifetime=timedelta(hours=1)).certificate()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert san.get_values_for_type(x509.DNSName) == []
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"


@pytest.mark.parametrize("lifetime", [timedelta(minutes=5), timedelta(hours=24), timedelta(days=7)])
def test_not_after_respects_lifetime(issuer: LocalIssuer, lifetime: timedelta) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = issuer.issue(identity=ID, lifetime=lifetime)
    after = datetime.now(UTC)
    assert before + lifetime <= cert.not_after <= after + lifetime
    assert cert.not_before <= before
    assert cert.certificate().not_valid_after_utc == cert.not_after


def test_bad_requests_get_clear_errors(issuer: LocalIssuer) -> None:
    with pytest.raises(InvalidIdentity, match="trust-domain"):
        issuer.issue(identity="spiffe://evil.example/ns/a/sa/b", lifetime=timedelta(hours=1))
    foreign = SpiffeId.of(trust_domain="evil.example", namespace="a", service_account="b")
    with pytest.raises(InvalidIdentity, match=r"not the issuer's trust domain 'cluster\.local'"):
        issuer.issue(identity=foreign, lifetime=timedelta(hours=1))
    with pytest.raises(InvalidIdentity, match="namespace"):
        issuer.issue(identity=f"spiffe://{TD}/ns/Bad_NS/sa/b", lifetime=timedelta(hours=1))
    with pytest.raises(InvalidLifetime, match="at least one second"):
        issuer.issue(identity=ID, lifetime=timedelta(0))
    with pytest.raises(InvalidLifetime, match="maximum"):
        issuer.issue(identity=ID, lifetime=timedelta(days=400))


def test_key_never_in_record_nor_repr(issuer: LocalIssuer) -> None:
    cert = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    rec = cert.record()
    assert set(rec.__slots__) == {"serial", "identity", "not_after", "issuer", "fingerprint"}
    assert (rec.serial, rec.identity, rec.issuer) == (cert.serial, ID, "local")
    assert rec.fingerprint == cert.certificate().fingerprint(hashes.SHA256()).hex()
    assert rec.not_after == cert.not_after
    texts = [repr(cert), str(cert), repr(rec), str(rec)]
    for secret in _key_secrets(cert):
        for text in texts:
            assert secret not in text
    assert "PRIVATE KEY" not in repr(cert)
    # equality ignores the key: same public facts compare equal
    same = IssuedCertificate(
        **{f: getattr(cert, f) for f in cert.__slots__ if f != "private_key_pem"},
        private_key_pem="other",
    )
    assert same == cert


def test_ca_key_file_is_0600_and_reloaded(tmp_path: Path) -> None:
    first = LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    key_file = tmp_path / "ca" / "roots" / f"{first.active_root_serial}.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    leaf = first.issue(identity=ID, lifetime=timedelta(hours=1))
    again = LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    assert again.active_root_serial == first.active_root_serial
    assert again.trust_bundle() == first.trust_bundle()
    verify_certificate(cert_pem=leaf.cert_pem, trust_bundle=again.trust_bundle())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_refuses_key_file_with_loose_permissions(tmp_path: Path, mode: int) -> None:
    first = LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    key_file = tmp_path / "ca" / "roots" / f"{first.active_root_serial}.key"
    os.chmod(key_file, mode)
    with pytest.raises(KeyFilePermissionError) as info:
        LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    assert str(key_file) in str(info.value) and f"{mode:04o}" in str(info.value)
    os.chmod(key_file, 0o400)  # stricter than 0600 is fine
    LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    (tmp_path / "ca" / "state.json").write_text("{not json")
    with pytest.raises(CAStateError, match=r"state\.json"):
        LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)


def test_root_rotation(issuer: LocalIssuer, tmp_path: Path) -> None:
    old_root = issuer.active_root_serial
    old_leaf = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    new_root = issuer.rotate_root()
    assert new_root != old_root and issuer.active_root_serial == new_root
    bundle = issuer.trust_bundle()
    assert len(bundle) == 2
    serials = {
        normalize_serial(format(x509.load_pem_x509_certificate(p.encode()).serial_number, "x"))
        for p in bundle
    }
    assert serials == {old_root, new_root}
    new_leaf = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    # new leaves are signed by the new root; old leaves still verify against the bundle
    assert new_leaf.chain_pem == bundle[1] and old_leaf.chain_pem == bundle[0]
    for leaf in (old_leaf, new_leaf):
        verify_certificate(cert_pem=leaf.cert_pem, trust_bundle=bundle)
    with pytest.raises(CAStateError, match="active root"):
        issuer.retire_root(new_root)
    # the rotation survives a restart
    reloaded = LocalIssuer(directory=issuer.directory, trust_domain=TD)
    assert reloaded.trusted_root_serials() == [old_root, new_root]
    issuer.retire_root(old_root)
    assert issuer.trust_bundle() == [bundle[1]]
    assert not (issuer.directory / "roots" / f"{old_root}.key").exists()
    verify_certificate(cert_pem=new_leaf.cert_pem, trust_bundle=issuer.trust_bundle())
    with pytest.raises(CertificateVerificationError):
        verify_certificate(cert_pem=old_leaf.cert_pem, trust_bundle=issuer.trust_bundle())
    with pytest.raises(CAStateError, match="not a trusted root"):
        issuer.retire_root(old_root)


def test_revocation_list_and_crl(issuer: LocalIssuer) -> None:
    a = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    b = issuer.issue(identity=ID, lifetime=timedelta(hours=1))
    issuer.revoke(serial=":".join(a.serial[i : i + 2] for i in range(0, len(a.serial), 2)).upper())
    issuer.revoke(serial=a.serial)  # idempotent
    assert issuer.revoked_serials() == frozenset({a.serial})
    crl = x509.load_pem_x509_crl(issuer.crl_pem().encode())
    root = x509.load_pem_x509_certificate(issuer.trust_bundle()[0].encode())
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(int(a.serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(b.serial, 16)) is None
    # persisted
    again = LocalIssuer(directory=issuer.directory, trust_domain=TD)
    assert again.revoked_serials() == frozenset({a.serial})


def test_concurrent_issue_gives_distinct_valid_certs(issuer: LocalIssuer) -> None:
    results: list[IssuedCertificate] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(25):
            c = issuer.issue(
                identity=f"spiffe://{TD}/ns/ns{n}/sa/sa{i}", lifetime=timedelta(hours=1)
            )
            with lock:
                results.append(c)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({c.serial for c in results}) == 100
    assert len({c.private_key_pem for c in results}) == 100
    bundle = issuer.trust_bundle()
    for c in results[::10]:
        assert verify_certificate(cert_pem=c.cert_pem, trust_bundle=bundle).uri == c.identity


def test_local_issuer_signs_csrs_for_the_proven_identity_only(issuer: LocalIssuer) -> None:
    """sign_csr: the leaf carries the CSR's key and exactly the proven SPIFFE id; CSRs asking for
    other names, with weak keys, broken signatures or garbage are refused naming the part."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from smc.ca import InvalidCSR, SpiffeId, check_csr

    sid = SpiffeId.of(trust_domain=TD, namespace="shop", service_account="web")

    def csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *uris: str) -> str:
        b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        if uris:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=True,
            )
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    key = ec.generate_private_key(ec.SECP256R1())
    for pem in (csr(key), csr(key, sid.uri)):
        signed = issuer.sign_csr(csr_pem=pem, identity=sid, lifetime=timedelta(hours=1))
        leaf = x509.load_pem_x509_certificate(signed.cert_pem.encode())
        assert leaf.public_key() == key.public_key()
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier(sid.uri)]
        assert verify_certificate(cert_pem=signed.cert_pem, trust_bundle=issuer.trust_bundle())
    serials = {
        issuer.sign_csr(csr_pem=csr(key), identity=sid, lifetime=timedelta(hours=1)).serial
        for _ in range(5)
    }
    assert len(serials) == 5  # each certificate its own serial
    cases = [
        (csr(key, f"spiffe://{TD}/ns/kube-system/sa/admin"), "subjectAltName"),
        (csr(key, sid.uri, f"spiffe://{TD}/ns/shop/sa/other"), "subjectAltName"),
        (csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "key"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n", "pem"),
        ("x" * 20000, "size"),
    ]
    for pem, part in cases:
        with pytest.raises(InvalidCSR) as err:
            issuer.sign_csr(csr_pem=pem, identity=sid, lifetime=timedelta(hours=1))
        assert err.value.part == part, err.value
    der = bytearray(
        x509.load_pem_x509_csr(csr(key).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # the signature no longer verifies: not made by the key's holder
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(InvalidCSR) as err:
        check_csr(forged, identity=sid)
    assert err.value.part == "signature"


def test_revoked_serials_leave_the_crl_an_hour_after_their_certificate_expired(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    """Per-proxy certificates come and go with pods: a revoked serial whose certificate expired
    (plus an hour of clock skew) is dropped from the revoked list and the CRLs, so they do not
    grow with every proxy that ever left; one without a known expiry stays; state persists."""
    now = datetime.now(UTC)
    issuer.revoke(serial="0a01", not_after=now - timedelta(hours=2))  # long expired
    issuer.revoke(serial="0a02", not_after=now - timedelta(minutes=10))  # within the grace
    issuer.revoke(serial="0a03", not_after=now + timedelta(hours=1))  # still valid
    issuer.revoke(serial="0a04")  # expiry unknown
    live = {"0a02", "0a03", "0a04"}
    assert issuer.revoked_serials() == live
    crl = x509.load_pem_x509_crl(issuer.crl_pem().encode())
    assert {format(r.serial_number, "04x") for r in crl} == live
    again = LocalIssuer(directory=issuer.directory, trust_domain=TD)
    assert again.revoked_serials() == live
