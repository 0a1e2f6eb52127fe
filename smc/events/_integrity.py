"""Tamper evidence of the log: record digests, batch heads, seals and the writer's signer.

Role: the write side of the scheme in ``docs/log-integrity.md``. A record's digest is
``sha256(key || 0x00 || value)``; an append batch, per partition, has a head
``sha256(prev || d1 || ... || dn)`` chained to the head before it, and its last record
carries a *seal*: who signed (the writer key id), the chain it extends, how many records it
covers, when, the ECDSA P-256 signature over all of that and the head, and, the first time
a writer session seals in a partition, the writer's certificate chain (so a consumer holding
only the log and the trust root verifies it). The Avro record bytes are untouched: the seal
travels next to them (a SQLite column, a Kafka header).

Two chain modes, chosen by the backend: ``PARTITION`` (the writer holds the partition's
write lock and extends the partition's last head, so every batch commits to the one before
it, whoever wrote it: SQLite) and ``WRITER`` (the writer extends its own previous head in
that partition, from a per-session genesis: Kafka, where concurrent producers cannot know
each other's heads; every record names its writer session in a header).
Concurrency: :class:`Signer` is thread-safe (its session state sits behind a lock);
everything else is pure.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.events._errors import EventError

__all__ = [
    "PARTITION",
    "WRITER",
    "IntegrityError",
    "Seal",
    "Signer",
    "batch_head",
    "genesis",
    "key_id",
    "record_digest",
]

PARTITION = 0
WRITER = 1

_DOMAIN = b"smc.seal.v1\x00"
_FIXED = struct.Struct(">BB16s8sI32sQ")  # version, mode, key id, session, n, prev, signed_at
_VERSION = 1
_ECDSA = ec.ECDSA(hashes.SHA256())


class IntegrityError(EventError):
    """A seal cannot be built or parsed, or writer credentials are unusable."""


def record_digest(key: bytes, value: bytes) -> bytes:
    """What a record commits to: its key and its encoded value."""
    return hashlib.sha256(key + b"\x00" + value).digest()


def batch_head(prev: bytes, digests: Iterable[bytes]) -> bytes:
    """The chain head after a batch: ``sha256(prev || d1 || ... || dn)``."""
    return hashlib.sha256(prev + b"".join(digests)).digest()


def genesis(stream: str, partition: int, session: bytes = b"") -> bytes:
    """The head before a partition's (``PARTITION`` mode) or a writer session's first batch."""
    return hashlib.sha256(
        b"smc.genesis\x00" + stream.encode() + struct.pack(">I", partition) + session
    ).digest()


def key_id(cert_der: bytes) -> bytes:
    """A writer's key id: the first 16 bytes of the sha256 of its certificate (DER)."""
    return hashlib.sha256(cert_der).digest()[:16]


@dataclass(frozen=True, slots=True)
class Seal:
    """The signature closing one batch of one writer in one partition."""

    mode: int
    key_id: bytes
    session: bytes
    count: int
    prev: bytes
    signed_at_ms: int
    signature: bytes
    certs: tuple[bytes, ...] = ()

    def signed_bytes(self, stream: str, partition: int, head: bytes) -> bytes:
        """The message the signature covers."""
        fixed = _FIXED.pack(
            _VERSION, self.mode, self.key_id, self.session, self.count, self.prev,
            self.signed_at_ms,
        )  # fmt: skip
        return _DOMAIN + stream.encode() + b"\x00" + struct.pack(">I", partition) + fixed + head

    def encode(self) -> bytes:
        fixed = _FIXED.pack(
            _VERSION, self.mode, self.key_id, self.session, self.count, self.prev,
            self.signed_at_ms,
        )  # fmt: skip
        parts = [fixed, struct.pack(">H", len(self.signature)), self.signature]
        parts.append(struct.pack(">B", len(self.certs)))
        for der in self.certs:
            parts.append(struct.pack(">H", len(der)))
            parts.append(der)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Seal:
        try:
            version, mode, kid, session, n, prev, at = _FIXED.unpack_from(data, 0)
            if version != _VERSION:
                raise IntegrityError(f"seal version {version} not supported")
            if mode not in (PARTITION, WRITER):
                raise IntegrityError(f"seal chain mode {mode} unknown")
            i = _FIXED.size
            (slen,) = struct.unpack_from(">H", data, i)
            sig = data[i + 2 : i + 2 + slen]
            i += 2 + slen
            (ncerts,) = struct.unpack_from(">B", data, i)
            i += 1
            certs = []
            for _ in range(ncerts):
                (clen,) = struct.unpack_from(">H", data, i)
                certs.append(data[i + 2 : i + 2 + clen])
                i += 2 + clen
            if i != len(data) or len(sig) != slen or any(not c for c in certs):
                raise IntegrityError("seal has trailing or missing bytes")
        except struct.error as exc:
            raise IntegrityError(f"seal is truncated: {exc}") from exc
        return cls(mode, kid, session, n, prev, at, sig, tuple(certs))

    def verify(self, public_key: ec.EllipticCurvePublicKey, message: bytes) -> bool:
        try:
            public_key.verify(self.signature, message, _ECDSA)
        except InvalidSignature:
            return False
        return True


class Signer:
    """A writer's key and certificate chain, sealing the batches it appends.

    ``cert_pem`` is the writer certificate (issued by the mesh CA for the identity
    ``spiffe://<trust-domain>/ns/smc-writers/sa/<role>.<name>``) followed by any
    intermediates. Each Signer is one *session*: a random id naming the ``WRITER``-mode
    chains it starts, and the partitions in which it already published its certificates.
    """

    def __init__(self, *, key: ec.EllipticCurvePrivateKey, cert_pem: str) -> None:
        certs = x509.load_pem_x509_certificates(cert_pem.encode("ascii"))
        if not certs:
            raise IntegrityError("writer certificate PEM holds no certificate")
        pub = certs[0].public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != (
            key.public_key().public_numbers()
        ):
            raise IntegrityError("writer key does not match its certificate")
        self._key = key
        self.certs = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        self.key_id = key_id(self.certs[0])
        self.identity = _uri_of(certs[0])
        self.session = os.urandom(8)
        self._lock = threading.Lock()
        self._heads: dict[tuple[str, int], bytes] = {}  # WRITER mode: this session's heads
        self._introduced: set[tuple[str, int]] = set()

    @classmethod
    def from_files(
        cls, key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str]
    ) -> Signer:
        """Load a writer key (PEM, must not be readable by group/others) and its certificate."""
        kp = Path(key_path)
        try:
            mode = os.stat(kp).st_mode & 0o777
            if mode & 0o077:
                raise IntegrityError(f"writer key {kp} is readable by others (mode {mode:o})")
            key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
            cert_pem = Path(cert_path).read_text()
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"cannot load writer credentials {kp}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IntegrityError(f"writer key {kp} is not an EC key")
        return cls(key=key, cert_pem=cert_pem)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> Signer:
        """``writer.key`` and ``writer.crt`` from a directory (what ``smc writer issue`` writes)."""
        d = Path(directory)
        return cls.from_files(d / "writer.key", d / "writer.crt")

    def __repr__(self) -> str:
        return f"Signer({self.identity}, key id {self.key_id.hex()}, key=<hidden>)"

    @property
    def session_id(self) -> bytes:
        """What ``WRITER``-mode records carry in their writer header: key id + session."""
        return self.key_id + self.session

    def new_session(self) -> None:
        """Start new ``WRITER``-mode chains (after an append whose outcome is unknown)."""
        with self._lock:
            self.session = os.urandom(8)
            self._heads.clear()
            self._introduced.clear()

    def writer_prev(self, stream: str, partition: int) -> bytes:
        """This session's head in a partition (``WRITER`` mode)."""
        with self._lock:
            return self._heads.get((stream, partition)) or genesis(
                stream, partition, self.session_id
            )

    def seal(
        self,
        *,
        stream: str,
        partition: int,
        mode: int,
        prev: bytes,
        digests: list[bytes],
        signed_at_ms: int | None = None,
    ) -> tuple[Seal, bytes]:
        """Seal a batch of record digests extending ``prev``; returns the seal and new head."""
        head = batch_head(prev, digests)
        with self._lock:
            first = (stream, partition) not in self._introduced
        seal = Seal(
            mode,
            self.key_id,
            self.session if mode == WRITER else bytes(8),
            len(digests),
            prev,
            int(time.time() * 1000) if signed_at_ms is None else signed_at_ms,
            b"",
            self.certs if first else (),
        )
        sig = self._key.sign(seal.signed_bytes(stream, partition, head), _ECDSA)
        return Seal(
            seal.mode, seal.key_id, seal.session, seal.count, seal.prev, seal.signed_at_ms,
            sig, seal.certs,
        ), head  # fmt: skip

    def committed(self, stream: str, partition: int, *, head: bytes, mode: int) -> None:
        """Record that a sealed batch is durable: the certificates are published there, and
        (``WRITER`` mode) the session's chain in that partition moved to ``head``."""
        with self._lock:
            self._introduced.add((stream, partition))
            if mode == WRITER:
                self._heads[(stream, partition)] = head


def _uri_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""
