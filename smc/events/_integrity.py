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

import dataclasses
import hashlib
import os
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.events._errors import EventError

__all__ = [
    "BATCH_HEADER",
    "PARTITION",
    "WRITER",
    "IntegrityError",
    "Seal",
    "Signer",
    "batch_head",
    "batch_head_v2",
    "batch_size",
    "genesis",
    "key_id",
    "record_digest",
]

PARTITION = 0
WRITER = 1

_DOMAIN = b"smc.seal.v1\x00"
_DOMAIN_V2 = b"smc.seal.v2\x00"
#: Version 3: the fields of version 2. On Kafka the first record of a batch names its size
#: (:data:`BATCH_HEADER`), so a reader finds seals without reading every record's headers; the
#: principals include the real caller of every impersonated actor, whose right to
#: impersonate readers re-check (see ``docs/log-integrity.md``). A distinct domain: a seal
#: cannot be passed off as another version.
_DOMAIN_V3 = b"smc.seal.v3\x00"
_DOMAINS = {2: _DOMAIN_V2, 3: _DOMAIN_V3}
#: Kafka header on the first record of a version-3 batch: the batch's size (big-endian u32).
BATCH_HEADER = "smc.batch"
_FIXED = struct.Struct(">BB16s8sI32sQ")  # version, mode, key id, session, n, prev, signed_at
#: Version 2 adds the batch head, the link (offset and head of the partition's last seal the
#: writer saw before appending, -1 for none) and, after the certificates, the principals.
_FIXED_V2 = struct.Struct(">BB16s8sI32sQq32s32s")
_VERSION = 3
_NO_LINK = bytes(32)
#: A principal a seal vouches for: (actor, basis, groups).
Principal = tuple[str, str, tuple[str, ...]]
_ECDSA = ec.ECDSA(hashes.SHA256())


class IntegrityError(EventError):
    """A seal cannot be built or parsed, or writer credentials are unusable."""


def record_digest(key: bytes, value: bytes) -> bytes:
    """What a record commits to: its key and its encoded value."""
    return hashlib.sha256(key + b"\x00" + value).digest()


def batch_head(prev: bytes, digests: Iterable[bytes]) -> bytes:
    """The chain head after a batch: ``sha256(prev || d1 || ... || dn)``."""
    return hashlib.sha256(prev + b"".join(digests)).digest()


def batch_head_v2(prev: bytes, keys: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    """The chain head after a batch (seal version 2): ``sha256(prev || n || the key lengths
    || the value lengths || the keys || the values)``, lengths as big-endian u32 arrays. As
    exact as hashing each record (the lengths delimit every key and value) and computed in
    one pass over the batch: no object per record."""
    klens = array("I", map(len, keys))
    vlens = array("I", map(len, values))
    if sys.byteorder == "little":
        klens.byteswap()
        vlens.byteswap()
    h = hashlib.sha256(prev)
    h.update(struct.pack(">I", len(keys)))
    h.update(klens)
    h.update(vlens)
    h.update(b"".join(keys))
    h.update(b"".join(values))
    return h.digest()


def batch_size(raw: object) -> int:
    """The size a :data:`BATCH_HEADER` value names (0 unless exactly 4 bytes)."""
    if raw.__class__ is bytes and len(raw) == 4:  # type: ignore[arg-type]
        return int.from_bytes(raw, "big")  # type: ignore[arg-type]
    return 0


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
    """The signature closing one batch of one writer in one partition.

    Version 1 seals (older logs) sign ``prev`` and the head of the per-record digests;
    version 2 seals also carry their ``head`` (of :func:`batch_head_v2`), a ``link`` to the
    partition's last seal the writer saw (``link_offset`` -1: none) and the ``principals``
    the writer vouches for (``(actor, basis, groups)``: who the API authenticated for the
    records of the batch whose envelope names that actor, and how it authorized them:
    ``grants`` (AccessGrants on the log) or ``kubernetes`` (SubjectAccessReview))."""

    mode: int
    key_id: bytes
    session: bytes
    count: int
    prev: bytes
    signed_at_ms: int
    signature: bytes
    certs: tuple[bytes, ...] = ()
    version: int = _VERSION
    head: bytes = _NO_LINK
    link_offset: int = -1
    link_head: bytes = _NO_LINK
    principals: tuple[Principal, ...] = ()

    def _fixed(self) -> bytes:
        if self.version == 1:
            return _FIXED.pack(
                1, self.mode, self.key_id, self.session, self.count, self.prev,
                self.signed_at_ms,
            )  # fmt: skip
        return _FIXED_V2.pack(
            self.version, self.mode, self.key_id, self.session, self.count, self.prev,
            self.signed_at_ms, self.link_offset, self.link_head, self.head,
        )  # fmt: skip

    def signed_bytes(self, stream: str, partition: int, head: bytes) -> bytes:
        """The message the signature covers (``head``: the head the verifier computed)."""
        where = stream.encode() + b"\x00" + struct.pack(">I", partition)
        if self.version == 1:
            return _DOMAIN + where + self._fixed() + head
        fixed = _FIXED_V2.pack(
            self.version, self.mode, self.key_id, self.session, self.count, self.prev,
            self.signed_at_ms, self.link_offset, self.link_head, head,
        )  # fmt: skip
        return _DOMAINS[self.version] + where + fixed + _principals_blob(self.principals)

    def encode(self) -> bytes:
        parts = [self._fixed(), struct.pack(">H", len(self.signature)), self.signature]
        parts.append(struct.pack(">B", len(self.certs)))
        for der in self.certs:
            parts.append(struct.pack(">H", len(der)))
            parts.append(der)
        if self.version >= 2:
            parts.append(_principals_blob(self.principals))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Seal:
        try:
            version = data[0] if data else 0
            if version == 1:
                _, mode, kid, session, n, prev, at = _FIXED.unpack_from(data, 0)
                link_offset, link_head, head = -1, _NO_LINK, _NO_LINK
                i = _FIXED.size
            elif version in (2, 3):
                (_, mode, kid, session, n, prev, at, link_offset, link_head,
                 head) = _FIXED_V2.unpack_from(data, 0)  # fmt: skip
                i = _FIXED_V2.size
            else:
                raise IntegrityError(f"seal version {version} not supported")
            if mode not in (PARTITION, WRITER):
                raise IntegrityError(f"seal chain mode {mode} unknown")
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
            principals: list[Principal] = []
            if version >= 2:
                (np_,) = struct.unpack_from(">H", data, i)
                i += 2
                for _ in range(np_):
                    actor, i = _text_at(data, i)
                    basis, i = _text_at(data, i)
                    (ng,) = struct.unpack_from(">B", data, i)
                    i += 1
                    groups = []
                    for _ in range(ng):
                        g, i = _text_at(data, i)
                        groups.append(g)
                    principals.append((actor, basis, tuple(groups)))
            if i != len(data) or len(sig) != slen or any(not c for c in certs):
                raise IntegrityError("seal has trailing or missing bytes")
        except (struct.error, UnicodeDecodeError) as exc:
            raise IntegrityError(f"seal is truncated: {exc}") from exc
        return cls(
            mode, kid, session, n, prev, at, sig, tuple(certs), version, head, link_offset,
            link_head, tuple(principals),
        )  # fmt: skip

    def verify(self, public_key: ec.EllipticCurvePublicKey, message: bytes) -> bool:
        try:
            public_key.verify(self.signature, message, _ECDSA)
        except InvalidSignature:
            return False
        return True


def _text(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise IntegrityError("a principal name in a seal is longer than 65,535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _text_at(data: bytes, i: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", data, i)
    raw = data[i + 2 : i + 2 + n]
    if len(raw) != n:
        raise IntegrityError("seal principal is truncated")
    return raw.decode(), i + 2 + n


def _principals_blob(principals: Sequence[Principal]) -> bytes:
    parts = [struct.pack(">H", len(principals))]
    for actor, basis, groups in principals:
        parts.append(_text(actor))
        parts.append(_text(basis))
        parts.append(struct.pack(">B", min(len(groups), 255)))
        parts.extend(_text(g) for g in list(groups)[:255])
    return b"".join(parts)


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
        #: Principals vouched for (actor -> (basis, groups)): see :meth:`vouch`.
        self._vouched: dict[str, tuple[str, tuple[str, ...]]] = {}

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

    def vouch(self, actor: str, groups: Sequence[str], *, basis: str = "grants") -> None:
        """Record that this writer authenticated ``actor`` (an envelope's actor: a principal
        name, or ``REAL as TARGET``) with ``groups`` (the target's, when impersonated): the
        seal of a batch holding records of that actor names it with its groups, so readers
        check that principal's AccessGrants (``docs/log-integrity.md``); ``basis`` says how
        the writer authorized it (``grants`` or ``kubernetes``). Kept for the most recent
        10,000 actors."""
        with self._lock:
            self._vouched.pop(actor, None)
            self._vouched[actor] = (basis, tuple(groups))
            if len(self._vouched) > 10_000:
                del self._vouched[next(iter(self._vouched))]

    def principals_for(self, actors: Iterable[str]) -> tuple[Principal, ...]:
        """The vouched principals among ``actors`` (sorted, for a seal), and for an actor
        ``REAL as TARGET`` also ``REAL`` (the caller whose right to impersonate readers
        re-check)."""
        wanted = set(actors)
        wanted |= {a.partition(" as ")[0] for a in wanted if " as " in a}
        with self._lock:
            got = {a: self._vouched[a] for a in wanted if a in self._vouched}
        return tuple((a, basis, groups) for a, (basis, groups) in sorted(got.items()))

    def seal(
        self,
        *,
        stream: str,
        partition: int,
        mode: int,
        prev: bytes,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        link: tuple[int, bytes] | None = None,
        principals: Sequence[Principal] = (),
        signed_at_ms: int | None = None,
        version: int = _VERSION,
    ) -> tuple[Seal, bytes]:
        """Seal a batch (records' keys and values) extending ``prev``, linked to the
        partition's last seal seen (``link``: offset, head); returns the seal and new head.
        ``version`` 3: a Kafka batch whose first record names its size (:data:`BATCH_HEADER`)."""
        if version not in _DOMAINS:
            raise IntegrityError(f"cannot seal with version {version}")
        head = batch_head_v2(prev, keys, values)
        with self._lock:
            first = (stream, partition) not in self._introduced
        link_offset, link_head = link if link is not None else (-1, _NO_LINK)
        seal = Seal(
            mode,
            self.key_id,
            self.session if mode == WRITER else bytes(8),
            len(keys),
            prev,
            int(time.time() * 1000) if signed_at_ms is None else signed_at_ms,
            b"",
            self.certs if first else (),
            version,
            head,
            link_offset,
            link_head,
            tuple(principals),
        )
        sig = self._key.sign(seal.signed_bytes(stream, partition, head), _ECDSA)
        return dataclasses.replace(seal, signature=sig), head

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
