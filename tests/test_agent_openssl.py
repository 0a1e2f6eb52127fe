"""The resident agent's key work through OpenSSL's links (smc.agent._openssl) and its reading of
certificates (smc.agent._certinfo), checked against the ``cryptography`` package: what the
agent makes is what a CA and Envoy accept, and what it is given that is not its own (another
key, an RSA key, garbage) is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from smc.agent import AgentError
from smc.agent._certinfo import cert_info, first_pem_der
from smc.agent._openssl import EcKey, csr_pem_of_der
from smc.ca import LocalIssuer


def _self_signed(key: ec.EllipticCurvePrivateKey, serial: int) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_key_csr_and_signature_are_what_cryptography_accepts() -> None:
    key = EcKey.generate()
    pem = key.private_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS #8, unencrypted
    theirs = serialization.load_pem_private_key(pem, None)
    assert isinstance(theirs, ec.EllipticCurvePrivateKey)
    assert theirs.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem_of_der(key.csr_der()).encode())
    assert csr.is_signature_valid and csr.subject == x509.Name([])
    assert csr.public_key() == theirs.public_key()
    message = b"smc-renew-v1\x00ns/p\x00" + key.csr_der()
    theirs.public_key().verify(key.sign(message), message, ec.ECDSA(hashes.SHA256()))
    again = EcKey.from_pem(pem)
    theirs.public_key().verify(again.sign(b"x"), b"x", ec.ECDSA(hashes.SHA256()))
    assert EcKey.generate().private_pem() != pem  # fresh randomness each time
    assert "PRIVATE" not in repr(key) and "BEGIN" not in repr(key)


def test_a_local_ca_signs_its_csr_and_the_leaf_carries_its_key(tmp_path: Path) -> None:
    ca = LocalIssuer(directory=tmp_path / "ca", trust_domain="t.local")
    key = EcKey.generate()
    signed = ca.sign_csr(
        csr_pem=csr_pem_of_der(key.csr_der()),
        identity="spiffe://t.local/ns/a/sa/b",
        lifetime=timedelta(hours=1),
    )
    assert key.matches_certificate(signed.cert_pem.encode())
    assert not EcKey.generate().matches_certificate(signed.cert_pem.encode())
    leaf = x509.load_pem_x509_certificate(signed.cert_pem.encode())
    info = cert_info(first_pem_der(signed.cert_pem + signed.chain_pem))
    value = leaf.serial_number
    assert info.serial == value.to_bytes((value.bit_length() + 7) // 8, "big").hex()
    assert info.serial == signed.serial
    assert info.not_after == leaf.not_valid_after_utc
    assert info.not_before == leaf.not_valid_before_utc


@pytest.mark.parametrize("serial", [1, 127, 128, 255, 2**64 + 7, 2**159 - 1])
def test_serial_and_validity_read_from_der(serial: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = _self_signed(key, serial)
    leaf = x509.load_pem_x509_certificate(pem)
    info = cert_info(first_pem_der(pem.decode()))
    assert int(info.serial, 16) == serial
    assert info.not_after == leaf.not_valid_after_utc


def test_what_is_not_a_p256_key_or_a_certificate_is_refused() -> None:
    with pytest.raises(AgentError, match="reading the private key"):
        EcKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(AgentError, match="not an EC P-256 key"):
        EcKey.from_pem(rsa_pem)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(AgentError, match="not an EC P-256 key"):
        EcKey.from_pem(p384)
    key = EcKey.generate()
    with pytest.raises(AgentError, match="reading the certificate"):
        key.matches_certificate(b"not a certificate")
    for bad in ("", "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----"):
        with pytest.raises(ValueError):
            cert_info(first_pem_der(bad))
    with pytest.raises(ValueError):
        cert_info(b"\x30\x03\x02\x01")  # truncated
    key.close()
    with pytest.raises(AgentError, match="closed"):
        key.sign(b"x")
