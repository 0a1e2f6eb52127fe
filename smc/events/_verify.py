"""Verifying the log: chains, seals, writers and entitlements, record by record.

Role: :class:`ChainVerifier` is fed every record of the log in partition order (as the logs
return them, with their writer header and seal) and releases only the records of batches
whose seal verifies: the chain extends the previous head, the signature is the writer's,
the writer certificate chains to the trust roots at signing time and was not revoked then,
and the writer's role is entitled to each record's event type. Everything else is a
:class:`Finding` naming the record's position; ``smc audit verify`` prints them and the
projection runner skips those records (the same records on every replica: the decision
depends only on the log and the trust roots). A batch whose seal has not been read yet is
held. State (heads, writers, held records, counts) is plain data for checkpoints.
Concurrency: not thread-safe; one verifier per reader.
"""

from __future__ import annotations

import hashlib
import operator
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress, count, groupby, repeat
from typing import Any

from smc.events._codec import MAGIC, Codec, default_codec
from smc.events._grantcheck import (
    GrantSpec,
)
from smc.events._integrity import (
    PARTITION,
    WRITER,
    IntegrityError,
    Seal,
    batch_head,
    batch_head_v2,
    genesis,
)
from smc.events._log import Record
from smc.events._types import (
    POLICY,
)
from smc.events._verify_fast import _CHECKED_ROLES, _HEADER, _FastPath
from smc.events._verify_policy import _PolicyChecks, _s
from smc.events._verify_state import _RESYNC, _VerifierState
from smc.events._writers import (
    SEAL_V3_SINCE,
    Writer,
    WriterTrust,
    entitled,
    ms_to_datetime,
)

__all__ = ["ChainVerifier", "Finding"]

#: Finding kinds.
BAD_SEAL = "bad-seal"
BAD_SIGNATURE = "bad-signature"
CHAIN_BREAK = "chain-break"
MISSING = "missing-records"
UNSIGNED = "unsigned"
UNKNOWN_WRITER = "unknown-writer"
REVOKED = "revoked-writer"
NOT_ENTITLED = "not-entitled"
NOT_AUTHORIZED = "not-authorized"
UNKNOWN_TYPE = "unknown-type"
TRUNCATED = "truncated"

#: Recent seals kept per partition to check the links of later batches (and in checkpoints).
_SEALS_KEPT = 4096
_GRANT_PREFIX = "AccessGrant/"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found on the log, at a record's position."""

    stream: str
    partition: int
    offset: int
    kind: str
    detail: str

    @property
    def where(self) -> str:
        return f"{self.stream}[{self.partition}]@{self.offset}"

    def to_json(self) -> dict[str, Any]:
        return {"position": self.where, "kind": self.kind, "detail": self.detail}


class ChainVerifier(_FastPath, _PolicyChecks, _VerifierState):
    """Streams records through the integrity checks; see the module docstring."""

    def __init__(
        self,
        *,
        trust: WriterTrust,
        codec: Codec | None = None,
        on_finding: Callable[[Finding], None] | None = None,
    ) -> None:
        self.trust = trust
        self.codec = codec or default_codec()
        self.on_finding = on_finding
        self.heads: dict[tuple[str, int], bytes] = {}
        self.wheads: dict[tuple[str, int, bytes], bytes] = {}
        #: Offset of the seal that produced each head (checkpoints prove heads with it).
        self.head_at: dict[tuple[str, int, bytes], int] = {}
        self.pending: dict[tuple[str, int, bytes], list[Record]] = {}
        #: (stream, partition, writer key id) that sealed a verified version-3 batch: a
        #: later seal of an older version by that key there is refused (a downgrade).
        self.sealed_v3: set[tuple[str, int, bytes]] = set()
        #: Per partition: the records of a version-3 batch read so far (``_feed_hinted``).
        self.opened: dict[tuple[str, int], list[Record]] = {}
        self.fast_parts: tuple[list[bytes], list[bytes], set[bytes]] = ([], [], set())
        self.fast_at: tuple[list[str], list[int], list[int]] = ([], [], [])
        #: Aggregate keys (bytes) surely in ``owners`` (a cache of the fast path's).
        self._owned: set[bytes] = set()
        self.writers: dict[bytes, Writer] = {}
        self._certs: dict[bytes, tuple[bytes, ...]] = {}
        self._allowed: dict[str, frozenset[bytes]] = {}  # role -> record headers it may write
        self.verified = 0
        self.rejected = 0
        #: Records :meth:`feed_messages` released by its fast path (the others: :meth:`feed`).
        self.fast_released = 0
        #: Per partition: the start of a batch the fast path read before its seal.
        self._carry: dict[tuple[str, int], list[Any]] = {}
        #: Links to seals older than the ones kept (not checked; see ``docs/log-integrity.md``).
        self.links_unchecked = 0
        #: Per partition: offset -> head of the seals verified (the most recent ones).
        self.seals: dict[tuple[str, int], dict[int, bytes]] = {}
        #: Per partition: links below this offset point before the seals kept.
        self.seal_floor: dict[tuple[str, int], int] = {}
        #: Aggregate key -> who first wrote it: ``cluster:NAME`` (an informer) or a role.
        self.owners: dict[str, str] = {}
        #: Per policy partition: AccessGrant name -> its spec, as of the records read.
        self.grants: dict[tuple[str, int], dict[str, GrantSpec | None]] = {}
        self.findings: list[Finding] = []
        #: The writer of each record the last :meth:`feed` returned (same order).
        self.released_by: list[Writer] = []

    # -- findings ---------------------------------------------------------------------------
    def _find(self, rec: Record, kind: str, detail: str) -> None:
        f = Finding(rec.stream, rec.partition, rec.offset, kind, detail)
        self.findings.append(f)
        del self.findings[:-1000]
        self.rejected += 1
        if self.on_finding is not None:
            self.on_finding(f)

    # -- feeding ----------------------------------------------------------------------------
    def feed(self, records: Sequence[Record]) -> list[Record]:
        """Check records (in partition order); returns those now verified, in release order."""
        if self._carry:
            self._flush_carry()
        return self._feed(records)

    def _feed(self, records: Sequence[Record]) -> list[Record]:
        """:meth:`feed` leaving the fast path's carried batch starts where they are (its
        records are of other partitions)."""
        out: list[Record] = []
        self.released_by = []
        if self.opened or any(map(_BATCH_OF, records)):
            self._feed_hinted(records, out)
        else:
            self._feed_plain(records, out)
        return out

    def _feed_hinted(self, records: Sequence[Record], out: list[Record]) -> None:
        """Version 3 (Kafka): a record naming its batch's size (``smc.batch``) opens a batch
        of that many records of its partition. When the last of them closes it cleanly (a
        version-3 seal of that many records, on a record naming the seal's session, whose
        head the records hash to), the batch is settled as one, whatever the other records'
        headers say; otherwise its records go through the record-by-record rules of
        :meth:`_feed_plain`, as every record outside such a batch does."""
        opened = self.opened
        plain: list[Record] = []
        for r in records:
            tp = (r.stream, r.partition)
            got = opened.get(tp)
            if got is None:
                if r.batch <= 0:
                    plain.append(r)
                    continue
                got = opened[tp] = []
            got.append(r)
            if len(got) < got[0].batch:
                continue
            del opened[tp]
            closed = _hinted(got)
            if closed is None:
                plain.extend(got)
                continue
            if plain:
                self._feed_plain(plain, out)
                plain = []
            seal, head = closed
            self._settle(got[-1], seal, [], got, head, out)
        if plain:
            self._feed_plain(plain, out)

    def _feed_plain(self, records: Sequence[Record], out: list[Record]) -> None:
        """Records grouped by their writer header, batches closed by the seals."""
        pending = self.pending
        # Runs of records of one (stream, partition, writer), then the seals within each run:
        # C-level passes; the Python work is per run and per seal, not per record.
        for key, group in groupby(records, _RUN_KEY):
            run = list(group)
            start = 0
            for i in compress(count(), map(_SEAL_OF, run)):
                if i > start:
                    held = pending.get(key)
                    if held is None:
                        pending[key] = run[start:i]
                    else:
                        held.extend(run[start:i])
                self._close(run[i], out)
                start = i + 1
            if start < len(run):
                held = pending.get(key)
                if held is None:
                    pending[key] = run[start:]
                else:
                    held.extend(run[start:])

    def _allowed_headers(self, role: str) -> frozenset[bytes]:
        allowed = self._allowed.get(role)
        if allowed is None:
            allowed = self._allowed[role] = frozenset(
                MAGIC + fp
                for fp, info in self.codec.by_fingerprint.items()
                if entitled(role, info.name)
            )
        return allowed

    def finish(self) -> None:
        """Report every held record as unsigned (the end of a verification range). The
        records of a version-3 batch whose announced size was not reached go through the
        record-by-record rules first."""
        self._flush_carry()
        opened, self.opened = self.opened, {}
        for got in opened.values():
            self._feed_plain(got, [])
        for batch in self.pending.values():
            for r in batch:
                self._find(r, UNSIGNED, "no seal covers this record")
        self.pending.clear()

    def _writer(self, seal: Seal, rec: Record | None) -> Writer | None:
        w = self.writers.get(seal.key_id)
        certs = seal.certs or self._certs.get(seal.key_id)
        if certs is None:
            return None
        if w is None or (seal.certs and seal.certs != self._certs.get(seal.key_id)):
            w = self.trust.writer(certs, at=ms_to_datetime(seal.signed_at_ms))
            if w.key_id != seal.key_id:
                raise IntegrityError("seal key id does not match its certificate")
            self.writers[seal.key_id] = w
            self._certs[seal.key_id] = certs
        at = ms_to_datetime(seal.signed_at_ms)
        if not (w.not_before <= at <= w.not_after):
            raise IntegrityError(f"writer {w.label} certificate not valid at {at.isoformat()}")
        return w

    def _close(self, r: Record, out: list[Record]) -> None:
        stream, part = r.stream, r.partition
        try:
            seal = Seal.decode(r.seal)
        except IntegrityError as exc:
            self._reject_batch(
                self.pending.pop((stream, part, r.writer), []), r, BAD_SEAL, str(exc)
            )
            return
        if seal.version < 3 and (stream, part, seal.key_id) in self.sealed_v3:
            self._reject_batch(
                self.pending.pop((stream, part, r.writer), []), r, BAD_SEAL,
                f"a version-{seal.version} seal after version-3 seals of writer key "
                f"{seal.key_id.hex()} in this partition (a downgrade)",
            )  # fmt: skip
            return
        if seal.mode == WRITER:
            sid = seal.key_id + seal.session
            if r.writer != sid:
                self._reject_batch(
                    self.pending.pop((stream, part, r.writer), []), r, BAD_SEAL,
                    "seal names another writer session than its record",
                )  # fmt: skip
                return
            held = self.pending.pop((stream, part, sid), [])
        else:
            held = self.pending.pop((stream, part, r.writer), [])
        batch = [*held, r]
        if len(batch) < seal.count:
            self._reject_batch(
                batch[:-1], r, MISSING,
                f"seal covers {seal.count} records, only {len(batch)} precede it "
                "(records deleted)",
            )  # fmt: skip
            self._advance_unknown(seal, stream, part, r.offset)
            return
        # More records than the seal covers: the first ones are unsigned, if the sealed
        # ones verify; otherwise the batch itself was tampered with (checked below).
        extra = batch[: len(batch) - seal.count]
        batch = batch[len(batch) - seal.count :]
        if seal.version == 1:
            head = batch_head(seal.prev, _digests(batch))
        else:
            head = batch_head_v2(
                seal.prev, list(map(_b, map(_KEY, batch))), list(map(_VALUE, batch))
            )
        self._settle(r, seal, extra, batch, head, out)

    def _settle(
        self,
        r: Record,
        seal: Seal,
        extra: list[Record],
        batch: list[Record],
        head: bytes,
        out: list[Record],
    ) -> None:
        """Decide a batch closed by the seal on ``r`` (its last record) whose records hash to
        ``head``: its writer, signature, chain, link, revocation and entitlements; ``extra``
        are earlier records of its writer no seal covers."""
        stream, part = r.stream, r.partition
        try:
            writer = self._writer(seal, r)
        except IntegrityError as exc:
            self._reject_batch(extra + batch[:-1], r, UNKNOWN_WRITER, str(exc))
            self._advance(seal, stream, part, head, r.offset)
            return
        if writer is None:
            self._reject_batch(
                extra + batch[:-1], r, UNKNOWN_WRITER,
                f"writer key {seal.key_id.hex()} not introduced on this partition",
            )  # fmt: skip
            self._advance(seal, stream, part, head, r.offset)
            return
        if (seal.version >= 2 and seal.head != head) or not seal.verify(
            writer.public_key, seal.signed_bytes(stream, part, head)
        ):
            self._reject_batch(
                extra + batch[:-1], r, BAD_SIGNATURE,
                f"batch of {seal.count} records sealed by {writer.label} does not match its "
                "signature (a record was edited, reordered, inserted or deleted)",
            )  # fmt: skip
            self._advance_unknown(seal, stream, part, r.offset)
            return
        for x in extra:
            self._find(x, UNSIGNED, "no seal covers this record")
        if seal.version >= 3:
            self.sealed_v3.add((stream, part, seal.key_id))
        expected = self._expected_prev(seal, stream, part)
        if expected is not _RESYNC and expected != seal.prev:
            first = batch[0]
            self._find(
                first, CHAIN_BREAK,
                f"batch sealed by {writer.label} does not extend the chain before it "
                "(records before it were deleted, reordered or inserted)",
            )  # fmt: skip
        self._check_link(seal, batch[0], writer)
        self._advance(seal, stream, part, head, r.offset)
        self._keep_seal(stream, part, r.offset, head)
        revoked = self.trust.revoked_at(writer.serial)
        if revoked is not None and ms_to_datetime(seal.signed_at_ms) >= revoked:
            self._reject_batch(
                batch[:-1], r, REVOKED, f"writer {writer.label} was revoked at {revoked}"
            )
            return
        if seal.version < 3 and writer.not_before >= SEAL_V3_SINCE:
            self._reject_batch(
                batch[:-1], r, BAD_SEAL,
                f"a version-{seal.version} seal by {writer.label}, whose certificate was "
                f"issued ({writer.not_before.isoformat()}) after version-3 seals existed "
                f"({SEAL_V3_SINCE.isoformat()}): a downgrade",
            )  # fmt: skip
            return
        allowed = self._allowed_headers(writer.role)
        keys = list(map(_KEY, batch))
        checked = writer.role in _CHECKED_ROLES or (stream == POLICY and any(map(_is_grant, keys)))
        if not checked and all(map(allowed.__contains__, map(_HEADER, map(_VALUE, batch)))):
            self.verified += len(batch)
            out.extend(batch)
            self.released_by.extend(repeat(writer, len(batch)))
            deque(map(self.owners.setdefault, keys, repeat(writer.role)), maxlen=0)
            return
        by_fp = self.codec.by_fingerprint
        owner = f"cluster:{writer.name}" if writer.role == "informer" else writer.role
        vouched = {actor: (basis, groups) for actor, basis, groups in seal.principals}
        for x in batch:
            info = by_fp.get(x.value[2:10])
            if info is None:
                self._find(x, UNKNOWN_TYPE, "unknown writer schema fingerprint")
                continue
            if not entitled(writer.role, info.name):
                self._find(
                    x, NOT_ENTITLED, f"{writer.label} may not append {info.name.rsplit('.', 1)[-1]}"
                )
                continue
            key = _s(x.key)
            had = self.owners.get(key)
            ns_key = _namespace_claim(key) if writer.role == "informer" else None
            if writer.role == "informer":
                ns_had = self.owners.get(ns_key) if ns_key is not None else None
                if (had is not None and had != owner) or (ns_had not in (None, owner)):
                    what = key if had is not None and had != owner else f"namespace {ns_key}"
                    self._find(
                        x, NOT_ENTITLED,
                        f"{writer.label} (cluster {writer.name}) may not change {key}: "
                        f"{what} belongs to {had if what == key else ns_had}",
                    )  # fmt: skip
                    continue
            if writer.role == "api" and stream == POLICY:
                why = self._unauthorized(x, part, vouched, seal.version)
                if why:
                    self._find(x, NOT_AUTHORIZED, why)
                    continue
            if stream == POLICY and key.startswith(_GRANT_PREFIX):
                self._track_grant(x, part)
            if had is None:
                self.owners[key] = owner
            if ns_key is not None:
                self.owners.setdefault(ns_key, owner)
            self.verified += 1
            out.append(x)
            self.released_by.append(writer)

    def _keep_seal(self, stream: str, part: int, offset: int, head: bytes) -> None:
        kept = self.seals.setdefault((stream, part), {})
        kept[offset] = head
        if len(kept) > _SEALS_KEPT:
            for old in list(kept)[: len(kept) - _SEALS_KEPT]:
                del kept[old]
                self.seal_floor[(stream, part)] = old + 1

    def _check_link(self, seal: Seal, first: Record, writer: Writer) -> None:
        """A version-2 seal commits to the partition's last seal its writer saw: that seal
        must be on the log before this batch, with that head (whoever wrote it)."""
        if seal.version < 2 or seal.link_offset < 0:
            return
        at = seal.link_offset
        known = self.seals.get((first.stream, first.partition), {}).get(at)
        if known is None and at < self.seal_floor.get((first.stream, first.partition), 0):
            self.links_unchecked += 1
            return
        if at >= first.offset or known != seal.link_head:
            self._find(
                first, CHAIN_BREAK,
                f"batch sealed by {writer.label} follows the seal at @{at} of this partition, "
                "which is not there before it (batches reordered, or records before it "
                "deleted or inserted)",
            )  # fmt: skip

    def _expected_prev(self, seal: Seal, stream: str, part: int) -> bytes:
        if seal.mode == PARTITION:
            return self.heads.get((stream, part)) or genesis(stream, part)
        sid = seal.key_id + seal.session
        got = self.wheads.get((stream, part, sid))
        return genesis(stream, part, sid) if got is None else got

    def _advance(self, seal: Seal, stream: str, part: int, head: bytes, at: int) -> None:
        if seal.mode == PARTITION:
            self.heads[(stream, part)] = head
            self.head_at[(stream, part, b"")] = at
        else:
            sid = seal.key_id + seal.session
            self.wheads[(stream, part, sid)] = head
            self.head_at[(stream, part, sid)] = at

    def _advance_unknown(self, seal: Seal, stream: str, part: int, at: int) -> None:
        self._advance(seal, stream, part, _RESYNC, at)

    def _reject_batch(self, held: list[Record], closing: Record, kind: str, detail: str) -> None:
        first = held[0] if held else closing
        if held:
            detail += f"; batch skipped: @{first.offset}..@{closing.offset}"
        self._find(first, kind, detail)
        self.rejected += len(held)  # the whole batch is skipped; one finding names it


_RUN_KEY = operator.itemgetter(0, 1, 8)  # stream, partition, writer
_BATCH_OF = operator.itemgetter(10)
_SEAL_OF = operator.itemgetter(9)
_KEY = operator.itemgetter(4)
_VALUE = operator.itemgetter(5)
_NUL = b"\x00"


def _digests(batch: list[Record]) -> list[bytes]:
    """Every record's digest (``record_digest``), as C-level passes over the batch."""
    keys = map(_b, map(_KEY, batch))
    data = map(operator.add, map(operator.add, keys, repeat(_NUL)), map(_VALUE, batch))
    return list(map(_sha256_digest, map(hashlib.sha256, data)))


_sha256_digest = operator.methodcaller("digest")


def _hinted(batch: list[Record]) -> tuple[Seal, bytes] | None:
    """The seal and head of a version-3 batch (read as its first record announced) that
    closes cleanly: its last record carries a version-3 seal of exactly these records, names
    the seal's session, and the records hash to the seal's head. None otherwise."""
    last = batch[-1]
    if not last.seal:
        return None
    try:
        seal = Seal.decode(last.seal)
    except IntegrityError:
        return None
    if seal.version < 3 or seal.mode != WRITER or seal.count != len(batch):
        return None
    if last.writer != seal.key_id + seal.session:
        return None
    head = batch_head_v2(seal.prev, list(map(_b, map(_KEY, batch))), list(map(_VALUE, batch)))
    return (seal, head) if head == seal.head else None


def _namespace_claim(key: str) -> str | None:
    """The namespace an aggregate key names, as an ownership key (``ns:NAME``): the first
    informer to write in a namespace claims it for its cluster."""
    parts = key.split("/")
    if parts[0] == "workload" and len(parts) >= 4:
        return f"ns:{parts[2]}"
    if len(parts) >= 3:
        return f"ns:{parts[1]}"
    return None


def _is_grant(key: Any) -> bool:
    return _s(key).startswith(_GRANT_PREFIX)


def _b(key: Any) -> bytes:
    if key.__class__ is str:
        return key.encode()  # type: ignore[no-any-return]
    return b"" if key is None else key  # type: ignore[no-any-return]
