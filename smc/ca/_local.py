"""A local certificate authority on ``cryptography``: :class:`LocalIssuer`.

Role: signs workload certificates with a CA key kept in a directory on disk (key files
mode 0600, EC P-256 by default), creates its self-signed root when absent, rotates
roots (old and new roots are both in the trust bundle until the old one is retired)
and keeps the revoked serials (and can render a CRL per trusted root).

On-disk layout of ``directory`` (created with mode 0700)::

    roots/<serial>.key   PKCS#8 PEM of a root key, mode 0600 (refused if looser)
    roots/<serial>.pem   the root certificate
    state.json           {"active": serial, "trusted": [...], "retired": [...],
                          "revoked": {serial: revoked-at ISO time},
                          "revoked_until": {serial: the certificate's not-after}}

Concurrency: thread-safe. ``issue`` only reads an immutable snapshot of the active
signer, so many threads may issue at once; rotation, retirement and revocation take a
lock and rewrite ``state.json`` atomically (write to a temporary file, then rename).
One directory must be used by one process at a time.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smc.ca._csr import SignedCertificate, check_csr, signed_from
from smc.ca._errors import CAStateError, KeyFilePermissionError
from smc.ca._identity import SpiffeId, issuer_identity, validate_trust_domain
from smc.ca._model import (
    IssuedCertificate,
    check_lifetime,
    generate_workload_key,
    issued_from,
    key_to_pem,
    normalize_serial,
    serial_from_int,
)

__all__ = ["LocalIssuer", "load_key_file"]

KeyAlgorithm = Literal["ec-p256", "ec-p384"]
_Hash = hashes.SHA256 | hashes.SHA384
_CURVES: dict[str, tuple[ec.EllipticCurve, _Hash]] = {
    "ec-p256": (ec.SECP256R1(), hashes.SHA256()),
    "ec-p384": (ec.SECP384R1(), hashes.SHA384()),
}
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])
#: How long after its expiry a revoked certificate's serial stays in the CRLs.
_EXPIRED_GRACE = timedelta(hours=1)


def load_key_file(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC key, refusing a file readable or writable by group
    or others (:class:`KeyFilePermissionError`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise CAStateError(f"CA key file {path} is missing") from exc
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFilePermissionError(str(path), mode=mode)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAStateError(f"CA key file {path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAStateError(f"CA key file {path} holds a {type(key).__name__}, not an EC key")
    return key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class _Signer:
    """Immutable snapshot of the active root used by ``issue``."""

    serial: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_pem: str
    aki: x509.AuthorityKeyIdentifier
    hash: _Hash
    base: x509.CertificateBuilder


class LocalIssuer:
    """A certificate authority whose root key lives in ``directory``.

    ``issue`` generates an EC P-256 workload key and signs a leaf directly with the
    active root (the issuer is in-process, so no CSR round trip is needed): URI SAN =
    the SPIFFE id, key usage digitalSignature + keyEncipherment, EKU serverAuth +
    clientAuth, ``not_after = now + lifetime`` (``not_before`` backdated by
    ``backdate`` for clock skew).
    """

    def __init__(
        self,
        *,
        directory: Path | str,
        trust_domain: str,
        name: str = "local",
        key_algorithm: KeyAlgorithm = "ec-p256",
        root_lifetime: timedelta = timedelta(days=3650),
        max_lifetime: timedelta = timedelta(days=365),
        backdate: timedelta = timedelta(seconds=30),
    ) -> None:
        if key_algorithm not in _CURVES:
            raise CAStateError(
                f"key_algorithm {key_algorithm!r} not supported; use one of {sorted(_CURVES)}"
            )
        self._trust_domain = validate_trust_domain(trust_domain)
        self._name = name
        self._algorithm: KeyAlgorithm = key_algorithm
        self._root_lifetime = root_lifetime
        self._max_lifetime = max_lifetime
        self._backdate = backdate
        self._dir = Path(directory)
        self._roots_dir = self._dir / "roots"
        self._state_path = self._dir / "state.json"
        self._lock = threading.Lock()
        self._trusted: list[str] = []
        self._retired: list[str] = []
        self._revoked: dict[str, str] = {}
        self._revoked_until: dict[str, str] = {}  # serial -> not_after, when known
        self._certs: dict[str, x509.Certificate] = {}
        self._pems: dict[str, str] = {}
        self._signer: _Signer
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._roots_dir.mkdir(mode=0o700, exist_ok=True)
        if self._state_path.exists():
            self._load()
        else:
            serial = self._create_root()
            self._trusted = [serial]
            self._signer = self._make_signer(serial)
            self._save()

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Issuer name recorded with every certificate."""
        return self._name

    @property
    def trust_domain(self) -> str:
        """The only trust domain this issuer signs identities for."""
        return self._trust_domain

    @property
    def active_root_serial(self) -> str:
        """Serial of the root that signs new leaves."""
        return self._signer.serial

    @property
    def directory(self) -> Path:
        """The CA directory."""
        return self._dir

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        try:
            state = json.loads(self._state_path.read_text())
            active = str(state["active"])
            trusted = [str(s) for s in state["trusted"]]
            retired = [str(s) for s in state.get("retired", [])]
            revoked = {str(k): str(v) for k, v in dict(state.get("revoked", {})).items()}
            until = {str(k): str(v) for k, v in dict(state.get("revoked_until", {})).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CAStateError(f"CA state file {self._state_path} is unreadable: {exc}") from exc
        if active not in trusted:
            raise CAStateError(
                f"CA state file {self._state_path}: active root {active} is not in 'trusted'"
            )
        for serial in trusted:
            self._load_root_cert(serial)
        self._trusted, self._retired, self._revoked = trusted, retired, revoked
        self._revoked_until = until
        self._signer = self._make_signer(active)

    def _load_root_cert(self, serial: str) -> x509.Certificate:
        path = self._roots_dir / f"{serial}.pem"
        try:
            data = path.read_bytes()
            cert = x509.load_pem_x509_certificate(data)
        except (OSError, ValueError) as exc:
            raise CAStateError(f"root certificate {path} is unreadable: {exc}") from exc
        self._certs[serial] = cert
        self._pems[serial] = data.decode("ascii")
        return cert

    def _save(self) -> None:
        state = {
            "active": self._signer.serial,
            "trusted": self._trusted,
            "retired": self._retired,
            "revoked": self._revoked,
            "revoked_until": self._revoked_until,
            "trust_domain": self._trust_domain,
        }
        _write_atomic(self._state_path, json.dumps(state, indent=1, sort_keys=True).encode())

    def _create_root(self) -> str:
        curve, digest = _CURVES[self._algorithm]
        key = ec.generate_private_key(curve)
        now = datetime.now(UTC).replace(microsecond=0)
        generation = len(self._trusted) + len(self._retired) + 1
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SMC"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"SMC root CA {self._trust_domain} #{generation}"
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + self._root_lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self._trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, digest)
        )
        serial = serial_from_int(cert.serial_number)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self._roots_dir / f"{serial}.key", key_pem)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_atomic(self._roots_dir / f"{serial}.pem", cert_pem)
        self._certs[serial] = cert
        self._pems[serial] = cert_pem.decode("ascii")
        return serial

    def _make_signer(self, serial: str) -> _Signer:
        key = load_key_file(self._roots_dir / f"{serial}.key")
        cert = self._certs[serial]
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CAStateError(
                f"root key {serial}.key does not match root certificate {serial}.pem"
            )
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        _, digest = _CURVES["ec-p384" if key.curve.name == "secp384r1" else "ec-p256"]
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        # The parts every leaf shares, built once (builders are immutable values).
        base = (
            x509.CertificateBuilder()
            .subject_name(_EMPTY_NAME)
            .issuer_name(cert.subject)
            .add_extension(_LEAF_BASIC, critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(aki, critical=False)
        )
        return _Signer(
            serial=serial,
            key=key,
            cert=cert,
            cert_pem=self._pems[serial],
            aki=aki,
            hash=digest,
            base=base,
        )

    # ------------------------------------------------------------------ Issuer
    def _identity(self, identity: str | SpiffeId) -> SpiffeId:
        return issuer_identity(identity, trust_domain=self._trust_domain)

    def _leaf(
        self, public_key: CertificatePublicKeyTypes, sid: SpiffeId, lifetime: timedelta
    ) -> tuple[x509.Certificate, _Signer]:
        check_lifetime(lifetime, maximum=self._max_lifetime)
        signer = self._signer
        now = datetime.now(UTC).replace(microsecond=0)
        not_after = now + lifetime
        if not_after > signer.cert.not_valid_after_utc:
            raise CAStateError(
                f"a {lifetime} certificate would outlive root {signer.serial}"
                f" (expires {signer.cert.not_valid_after_utc.isoformat()}); rotate the root"
            )
        cert = (
            signer.base.public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self._backdate)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
                critical=True,
            )
            .sign(signer.key, signer.hash)
        )
        return cert, signer

    def issue(self, *, identity: str | SpiffeId, lifetime: timedelta) -> IssuedCertificate:
        """Generate an EC P-256 key and a leaf for ``identity`` valid for ``lifetime``."""
        check_lifetime(lifetime, maximum=self._max_lifetime)
        sid = self._identity(identity)
        key = generate_workload_key()
        cert, signer = self._leaf(key.public_key(), sid, lifetime)
        return issued_from(
            cert,
            identity=sid.uri,
            issuer=self._name,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            chain_pem=signer.cert_pem,
            private_key_pem=key_to_pem(key),
        )

    def sign_csr(
        self, *, csr_pem: str, identity: str | SpiffeId, lifetime: timedelta
    ) -> SignedCertificate:
        """Sign a leaf for ``identity`` (already proven by the caller) over the CSR's key; the
        leaf's only SAN is the identity, whatever the CSR asked for (see :func:`check_csr`)."""
        sid = self._identity(identity)
        csr = check_csr(csr_pem, identity=sid)
        cert, signer = self._leaf(csr.public_key(), sid, lifetime)
        return signed_from(cert, identity=sid.uri, issuer=self._name, chain_pem=signer.cert_pem)

    def revoke(self, *, serial: str, not_after: datetime | None = None) -> None:
        """Add ``serial`` to the revoked list (idempotent; persisted in ``state.json``). With the
        certificate's ``not_after``, the serial leaves the revoked list (and the CRLs) an hour
        after it expired: peers refuse an expired certificate anyway, so CRLs do not grow with
        every proxy that ever left."""
        canon = normalize_serial(serial)
        with self._lock:
            if canon in self._revoked and (not_after is None or canon in self._revoked_until):
                return
            self._revoked.setdefault(canon, datetime.now(UTC).replace(microsecond=0).isoformat())
            if not_after is not None:
                self._revoked_until[canon] = not_after.astimezone(UTC).isoformat()
            self._save()

    def _live_revoked(self) -> dict[str, str]:
        """Revoked serials whose certificate may still be valid (an hour of clock skew)."""
        horizon = datetime.now(UTC) - _EXPIRED_GRACE
        return {
            s: at
            for s, at in self._revoked.items()
            if s not in self._revoked_until
            or datetime.fromisoformat(self._revoked_until[s]) > horizon
        }

    def revoked_serials(self) -> frozenset[str]:
        """Canonical serials revoked whose certificate may still be valid."""
        with self._lock:
            return frozenset(self._live_revoked())

    def trust_bundle(self) -> list[str]:
        """PEM of every trusted root: the active one and those not yet retired."""
        with self._lock:
            return [self._pems[s] for s in self._trusted]

    # ------------------------------------------------------------------ rotation
    def rotate_root(self) -> str:
        """Create a new root and make it sign new leaves; the previous roots stay in the
        trust bundle until :meth:`retire_root`. Returns the new root's serial."""
        with self._lock:
            serial = self._create_root()
            self._trusted.append(serial)
            self._signer = self._make_signer(serial)
            self._save()
            return serial

    def retire_root(self, serial: str) -> None:
        """Drop a previous root from the trust bundle and delete its key file.

        Leaves it signed stop verifying: retire only once they have all been renewed.
        Refuses the active root (:class:`CAStateError`).
        """
        canon = normalize_serial(serial)
        with self._lock:
            if canon == self._signer.serial:
                raise CAStateError(f"root {canon} is the active root; rotate_root() first")
            if canon not in self._trusted:
                raise CAStateError(
                    f"root {canon} is not a trusted root of this issuer"
                    f" (trusted: {', '.join(self._trusted)})"
                )
            self._trusted.remove(canon)
            self._retired.append(canon)
            self._save()
            key_path = self._roots_dir / f"{canon}.key"
            if key_path.exists():
                key_path.unlink()

    def trusted_root_serials(self) -> list[str]:
        """Serials of the roots in the trust bundle, oldest first."""
        with self._lock:
            return list(self._trusted)

    def crl_pem(
        self, *, root_serial: str | None = None, next_update: timedelta = timedelta(days=1)
    ) -> str:
        """A CRL listing every revoked serial, signed by ``root_serial`` (default: the
        active root; any trusted root whose key is still held)."""
        with self._lock:
            canon = self._signer.serial if root_serial is None else normalize_serial(root_serial)
            if canon not in self._trusted:
                raise CAStateError(f"root {canon} is not a trusted root of this issuer")
            signer = self._signer if canon == self._signer.serial else self._make_signer(canon)
            revoked = self._live_revoked()
        now = datetime.now(UTC).replace(microsecond=0)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(signer.cert.subject)
            .last_update(now)
            .next_update(now + next_update)
            .add_extension(signer.aki, critical=False)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(datetime.fromisoformat(when))
                .build()
            )
        crl = builder.sign(signer.key, signer.hash)
        return crl.public_bytes(serialization.Encoding.PEM).decode("ascii")
