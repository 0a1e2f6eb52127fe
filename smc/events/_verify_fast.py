"""The fast path of :class:`smc.events.ChainVerifier` for consumed Kafka messages.

Role: :class:`_FastPath`, the part of ``ChainVerifier`` (mixed into it) that takes whole
sealed batches straight from confluent-kafka messages (:meth:`feed_messages`): version-3
batches found by the size their first record announces, so only the first and last record
of a batch have their headers read; one hash pass and one signature per batch, no Record per
record. It releases a batch only when the record-by-record path (``ChainVerifier.feed``)
would release it with no finding, checked before any state changes; everything else goes to
that path unchanged, so both decide alike.
Split from :mod:`smc.events._verify`.
Concurrency: not thread-safe, like the verifier it is part of.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from itertools import groupby, repeat
from typing import Any

from confluent_kafka import Message

from smc.events._codec import Codec
from smc.events._integrity import (
    BATCH_HEADER,
    WRITER,
    IntegrityError,
    Seal,
    batch_head_v2,
    batch_size,
)
from smc.events._log import Position, Record
from smc.events._types import POLICY
from smc.events._verify_state import _RESYNC
from smc.events._writers import Writer, WriterTrust, ms_to_datetime


class _FastPath:
    """Whole sealed batches from Kafka messages (mixed into ``ChainVerifier``)."""

    trust: WriterTrust
    codec: Codec
    pending: dict[tuple[str, int, bytes], list[Record]]
    verified: int
    fast_released: int
    opened: dict[tuple[str, int], list[Record]]
    _owned: set[bytes]
    sealed_v3: set[tuple[str, int, bytes]]
    #: The keys, values (in the same order) and distinct record starts (magic, schema
    #: fingerprint and the event id's length byte: each value's first 11 bytes) of the
    #: messages the last :meth:`feed_messages` released by the fast path.
    fast_parts: tuple[list[bytes], list[bytes], set[bytes]]
    #: Where those messages sit, in the same order: stream (no prefix), partition, offset.
    #: The runner keeps these (and each value) for the records it may apply, not the
    #: messages: a message held past its read is freed later, cold, at several times the cost.
    fast_at: tuple[list[str], list[int], list[int]]
    _carry: dict[tuple[str, int], list[Any]]
    seals: dict[tuple[str, int], dict[int, bytes]]
    owners: dict[str, str]

    # the verifier's own methods (smc.events._verify.ChainVerifier)
    feed: Callable[[Sequence[Record]], list[Record]]
    _feed: Callable[[Sequence[Record]], list[Record]]
    _writer: Callable[[Seal, Record | None], Writer | None]
    _expected_prev: Callable[[Seal, str, int], bytes]
    _advance: Callable[[Seal, str, int, bytes, int], None]
    _keep_seal: Callable[[str, int, int, bytes], None]
    _allowed_headers: Callable[[str], frozenset[bytes]]

    def feed_messages(
        self,
        msgs: Sequence[Any],
        *,
        cut: int = 0,
        span: tuple[Position, Position] | None = None,
    ) -> tuple[list[Any], list[Record]]:
        """:meth:`feed` for consumed Kafka messages (topic names ``cut`` characters of
        prefix): returns the messages released, plus the Records released by :meth:`feed`
        where the fast path does not apply. ``span``: the positions before and after the read
        (``KafkaLog.scan_messages``), which let :func:`runs_by_position` find the partition
        runs from a few messages instead of every one. The fast path follows version-3 batches through
        each partition run: the first record's ``smc.batch`` header gives the batch's size,
        the seal is on its last record, and no other record's headers are read. It releases
        a batch only when :meth:`feed` would settle it the same way (the same clean close,
        see ``ChainVerifier._feed_hinted``) with no finding at all, checked before any state
        changes; anything else goes through :meth:`feed` unchanged, so the outcome is the
        same."""
        fast: list[Any] = []
        slow: list[Record] = []
        self.fast_parts = ([], [], set())
        self.fast_at = ([], [], [])
        if not msgs:
            return fast, slow
        runs = msgs if msgs.__class__ is list else list(msgs)
        found = None if span is None else runs_by_position(runs, span[0], span[1], cut)
        n = len(runs)
        for topic, part, i, j in partition_runs(runs) if found is None else found:
            stream = topic[cut:]
            carried = self._carry.pop((stream, part), None)
            if carried is None:  # a read of one run is passed as it is, not copied
                self._fast_run(runs if j - i == n else runs[i:j], stream, part, fast, slow)
            else:
                self._fast_run([*carried, *runs[i:j]], stream, part, fast, slow)
        return fast, slow

    def _flush_carry(self) -> None:
        """Hand the batch starts the fast path carried over to the general path (where
        checkpoints and :meth:`finish` see them)."""
        carry, self._carry = self._carry, {}
        for (stream, _), ms in carry.items():
            self.feed(_records(ms, stream))  # an unfinished batch: nothing is released

    def _fast_run(
        self, msgs: list[Any], stream: str, part: int, fast: list[Any], slow: list[Record]
    ) -> None:
        """Consecutive messages of one partition: whole version-3 batches by the fast path,
        the rest (from the first one it does not take) by :meth:`feed`; a batch whose end is
        still to come is carried over to the next read of the partition."""
        j, s = len(msgs), 0
        opened = self.opened.get((stream, part))
        if opened is not None:  # the general path reads a batch: it takes the rest of it
            s = min(j, opened[0].batch - len(opened))
            slow.extend(self._feed(_records(msgs[:s], stream)))
        while s < j:
            n = batch_size(dict(msgs[s].headers() or ()).get(BATCH_HEADER))
            if n <= 0:
                break
            e = s + n
            if e > j:
                if j - s <= _CARRY_MAX:  # the rest of the batch comes with the next read
                    self._carry[(stream, part)] = msgs[s:]
                    return
                break
            batch = msgs[s:e]
            if not self._close_fast(stream, part, batch):
                break
            fast.extend(batch)
            s = e
        if s < j:
            slow.extend(self._feed(_records(msgs[s:], stream)))

    def _close_fast(self, stream: str, part: int, batch: list[Any]) -> bool:
        """Release a version-3 batch (its first record announced ``len(batch)``) when it
        closes cleanly and verifies with no finding at all; else change nothing."""
        last = batch[-1]
        h = dict(last.headers() or ())
        raw = h.get(_SEAL_NAME)
        if not raw:
            return False
        try:
            seal = Seal.decode(raw)
        except IntegrityError:
            return False
        if seal.version < 3 or seal.mode != WRITER or seal.count != len(batch):
            return False
        if h.get(_WRITER_NAME) != seal.key_id + seal.session:
            return False
        keys = list(map(_M_KEY, batch))
        values = list(map(_M_VALUE, batch))
        try:
            head = batch_head_v2(seal.prev, keys, values)
        except TypeError:  # a record without key or value: the general path reads it
            return False
        if head != seal.head:
            return False
        try:
            writer = self._writer(seal, None)
        except IntegrityError:
            return False
        if writer is None or writer.role in _CHECKED_ROLES:
            return False
        if stream == POLICY and any(map(_IS_GRANT, keys)):  # grants are followed one by one
            return False
        if not seal.verify(writer.public_key, seal.signed_bytes(stream, part, head)):
            return False
        expected = self._expected_prev(seal, stream, part)
        if expected is _RESYNC or expected != seal.prev:
            return False
        if seal.link_offset >= 0:
            known = self.seals.get((stream, part), {}).get(seal.link_offset)
            first = batch[0].offset()
            if known is None or known != seal.link_head or seal.link_offset >= first:
                return False
        revoked = self.trust.revoked_at(writer.serial)
        if revoked is not None and ms_to_datetime(seal.signed_at_ms) >= revoked:
            return False
        # each record's header (magic + schema fingerprint) and the length byte of its event
        # id after it, in one pass (the runner's scan needs the lengths: ``fast_parts``)
        starts = set(map(_START, values))
        headers = set(map(_HEADER, starts))
        if not headers <= self._allowed_headers(writer.role):
            return False
        # the aggregates' first writers: only keys not seen before are decoded
        owned = self._owned
        fresh: set[bytes] = set() if owned.issuperset(keys) else set(keys) - owned
        try:
            names = [k.decode() for k in fresh]
        except UnicodeDecodeError:
            return False
        at = last.offset()
        self.sealed_v3.add((stream, part, seal.key_id))
        self._advance(seal, stream, part, head, at)
        self._keep_seal(stream, part, at, head)
        self.verified += len(batch)
        self.fast_released += len(batch)
        deque(map(self.owners.setdefault, names, repeat(writer.role)), maxlen=0)
        if fresh:
            owned |= fresh
        got_keys, got_values, got_starts = self.fast_parts
        got_keys += keys
        got_values += values
        got_starts |= starts
        n = len(batch)
        got_streams, got_parts, got_offsets = self.fast_at
        got_streams += repeat(stream, n)
        got_parts += repeat(part, n)
        first = batch[0].offset()
        # a partition's messages come in increasing offset order: n of them spanning n
        # offsets are consecutive (else, e.g. a transaction marker between, each is read)
        got_offsets += range(first, at + 1) if at - first == n - 1 else map(_M_OFFSET, batch)
        return True


_HEADER = operator.itemgetter(slice(0, 10))
_START = operator.itemgetter(slice(0, 11))  # the header and the event id's length byte
_CHECKED_ROLES = frozenset({"informer", "api"})
_M_TOPIC: Any = Message.topic  # confluent-kafka's C methods, mapped over a batch
_M_PARTITION: Any = Message.partition
_M_KEY: Any = Message.key
_M_OFFSET: Any = Message.offset
_M_VALUE: Any = Message.value
_IS_GRANT = operator.methodcaller("startswith", b"AccessGrant/")
_WRITER_NAME = "smc.writer"
_SEAL_NAME = "smc.seal"
#: At most this many messages of a partition wait for the end of a batch in the fast path.
_CARRY_MAX = 100_000


def partition_runs(msgs: list[Any]) -> list[tuple[str, int, int, int]]:
    """The runs of consecutive messages of one topic and partition: (topic, partition, start,
    end). A read is mostly one or two long runs: C-level passes (``list.count``, ``groupby``
    of ints) find them, rather than a comparison of (topic, partition) pairs per message."""
    n = len(msgs)
    if not n:
        return []
    ps: list[int] = list(map(_M_PARTITION, msgs))
    ts: list[str] = list(map(_M_TOPIC, msgs))
    p, t = ps[0], ts[0]
    if ps.count(p) == n and ts.count(t) == n:  # the common case: one run
        return [(t, p, 0, n)]
    out: list[tuple[str, int, int, int]] = []
    i = 0
    for p, grp in groupby(ps):
        j = i + len(list(grp))
        t = ts[i]
        if ts[i:j].count(t) == j - i:
            out.append((t, p, i, j))
        else:  # two topics' same partition number back to back: split by topic too
            k = i
            for (t2, _), g2 in groupby(zip(ts[i:j], ps[i:j], strict=True)):
                e = k + len(list(g2))
                out.append((t2, p, k, e))
                k = e
        i = j
    return out


def runs_by_position(
    msgs: list[Any], start: Position, after: Position, cut: int = 0
) -> list[tuple[str, int, int, int]] | None:
    """:func:`partition_runs` of a read from the positions before and after it, checked on
    two messages per run instead of all; None when they do not settle it (the caller then
    runs :func:`partition_runs`).

    A consumer hands a partition's messages over in offset order from where it stood, and its
    position afterwards is the offset after the last one: every message of a partition in
    the read lies in [start, after). When the partitions' advances add up to the read's
    length, no offset in any of those ranges is missing from the read, so each partition's
    messages are exactly its advance in number. A run is then taken as settled when, from
    where the last run ended, its first message is its partition's ``start`` offset and the
    message its advance further back on is the same partition's ``after - 1``: the
    partition's first and last message bound all of them, and that many fit between the two
    only if nothing else does. Topics lose ``cut`` characters of prefix in positions."""
    n = len(msgs)
    advances: dict[tuple[str, int], int] = {}
    total = 0
    for tp, off in after.items():
        d = off - start.get(tp)
        if d < 0:
            return None
        if d:
            advances[tp] = d
            total += d
    if total != n:
        return None
    out: list[tuple[str, int, int, int]] = []
    i = 0
    while i < n:
        m = msgs[i]
        topic, part = m.topic(), m.partition()
        tp = (topic[cut:], part)
        c = advances.pop(tp, 0)
        first = m.offset()
        if not c or first != start.get(tp):
            return None
        j = i + c  # at most n: the advances add up to n
        last = msgs[j - 1]
        if last.partition() != part or last.topic() != topic or last.offset() != first + c - 1:
            return None
        out.append((topic, part, i, j))
        i = j
    return out


def _records(msgs: Sequence[Any], stream: str) -> list[Record]:
    return [_message_record(m, stream) for m in msgs]


def _message_record(m: Any, stream: str) -> Record:
    h = dict(m.headers() or [])
    key = m.key()
    return Record(
        stream, m.partition(), m.offset(), m.timestamp()[1], key.decode() if key else "",
        m.value() or b"", "", "", h.get("smc.writer") or b"", h.get("smc.seal") or b"",
        batch_size(h.get(BATCH_HEADER)),
    )  # fmt: skip
