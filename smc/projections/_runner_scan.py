"""Compacted catch-up of the projection runner: register records by aggregate, skip the
ones a later state-replacing event supersedes, apply the survivors in log order.

Role: helpers over raw records and Kafka messages, and :class:`_CompactScan`, the part of
:class:`smc.projections.ProjectionRunner` that scans batches (header and duplicate checks in
C-level passes) and applies what survives. Split from :mod:`smc.projections._runner`.
Concurrency: runs on the caller's thread, like ``ProjectionRunner.catch_up``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from xxhash import xxh64_intdigest

from smc.events import (
    MAGIC,
    Codec,
    Event,
    Position,
    Record,
)
from smc.projections._base import Projection
from smc.projections._errors import ProjectionError

#: A raw record for replay: (stream, partition, offset, key, value).
_Raw = tuple[str, int, int, Any, bytes]


def _where(r: _Raw) -> str:
    return f"{r[0]}[{r[1]}]@{r[2]}"


def _add_tail(pending: dict[object, Any], key: object, record: Any) -> None:
    """Register a record of a type that does not replace its aggregate: after what is
    pending for ``key`` (one replacing record, or a list), in log order."""
    cur = pending.get(key)
    if cur is None:
        pending[key] = [record]
    elif cur.__class__ is list:
        cur.append(record)
    else:
        pending[key] = [cur, record]


def _skip_done(scanned: Position, target: Position, log_end: Position) -> Position:
    """Where to read from: partitions already at their target start at the log's end, so
    a reader that returns records in one order across partitions (SQLite's append order)
    does not keep handing back records of a partition the target stops early."""
    tps = {tp for tp, _ in log_end.items()} | {tp for tp, _ in scanned.items()}
    return Position(
        {
            tp: log_end.get(tp) if scanned.get(tp) >= target.get(tp) else scanned.get(tp)
            for tp in tps
        }
    )


def _keep_done(after: Position, scanned: Position, target: Position) -> Position:
    """``after`` with the partitions :func:`_skip_done` moved back where they were."""
    return Position(
        {
            tp: scanned.get(tp) if scanned.get(tp) >= target.get(tp) else off
            for tp, off in after.items()
        }
    )


def _survivors(pending: dict[object, Any]) -> list[Any]:
    """The records held in a compaction's ``pending`` map (see ``ProjectionRunner._scan``)."""
    out: list[Any] = []
    add = out.append
    more = out.extend
    for v in pending.values():
        if v.__class__ is list:
            more(v)
        else:
            add(v)
    return out


_HEADER = operator.itemgetter(slice(0, 10))  # magic + schema fingerprint
_REC_KEY = operator.itemgetter(4)  # a Record's key and value
_REC_VALUE = operator.itemgetter(5)
_ID_LENGTH = operator.itemgetter(10)  # the event id's zigzag length byte
_START = operator.itemgetter(slice(0, 11))  # the header and the event id's length byte
_id_slices: dict[int, Callable[[bytes], bytes]] = {}


def _id_slice(n: int) -> Callable[[bytes], bytes]:
    """A C-level getter of an ``n``-byte event id after the header and its length byte."""
    got = _id_slices.get(n)
    if got is None:
        got = _id_slices[n] = operator.itemgetter(slice(11, 11 + n))
    return got


#: Per zigzag length byte (short ids, below 0x80): the slice of the event id after it.
_ID_SLICES = [slice(11, 11 + (b >> 1)) for b in range(0x80)]


def _event_ids(values: list[bytes], lengths: set[int]) -> Iterable[bytes] | None:
    """The event ids of records whose id length bytes are ``lengths`` (short ids only, else
    None): one C-level slice per record, whether the ids have one length or several."""
    if max(lengths) >= 0x80:  # a long id: varint length, the per-record loop reads it
        return None
    if len(lengths) == 1:
        return map(_id_slice(next(iter(lengths)) >> 1), values)
    getitem: Any = operator.getitem
    return map(getitem, values, map(_ID_SLICES.__getitem__, map(_ID_LENGTH, values)))


def _message_raw(m: Any) -> _Raw:
    """A Kafka message (see ``KafkaLog.scan_messages``) as a raw record."""
    return (m.topic(), m.partition(), m.offset(), m.key(), m.value() or b"")


def _all_new(seen: dict[int, None], ids: Iterable[int], n: int) -> bool:
    """Add ``n`` id hashes to ``seen`` when they are all new (none seen, no two alike) and
    return True; else leave ``seen`` as it was and return False. One insertion per id, made
    straight into ``seen`` (no dict of the batch first): the new ones are the last ``seen``
    holds, so they are taken back (LIFO) when any was not new."""
    before = len(seen)
    seen.update(zip(ids, repeat(None)))
    added = len(seen) - before
    if added == n:
        return True
    for _ in range(added):
        seen.popitem()
    return False


#: A compacted catch-up applies what it holds once it holds more records than this.
_PENDING_MAX = 100_000


def _id_hash(event_id: str) -> int:
    return _id_hash_bytes(event_id.encode())


def _id_hash_bytes(event_id: bytes) -> int:
    # 64-bit xxHash: stable across processes (checkpoints keep these), ~10x cheaper than
    # blake2b; for 10 million ids the chance of any collision is about 3e-6.
    return xxh64_intdigest(event_id)


class _CompactScan:
    """Scanning and applying for a compacted catch-up (mixed into ``ProjectionRunner``)."""

    codec: Codec
    applied: int
    duplicates: int
    superseded: int
    listeners: list[Callable[[list[Event]], None]]
    _dedupe: bool
    _seen: dict[int, None]
    _by_stream: dict[str, list[Projection]]

    def _header_kinds(self, replacing: frozenset[str]) -> dict[bytes, bool]:
        """Every known record header (magic + writer fingerprint) -> whether its type
        supersedes its aggregate's earlier events: one slice and one lookup check a header."""
        return {
            MAGIC + fp: info.name in replacing for fp, info in self.codec.by_fingerprint.items()
        }

    def _scan(
        self,
        raw: Sequence[Any],
        pending: dict[object, Any],
        kinds: dict[bytes, bool],
        *,
        records: bool = False,
    ) -> tuple[int, int]:
        """Register records for a compacted apply: check headers, drop duplicates by id.

        ``pending`` maps an aggregate key to the records of it still to apply: the record of
        a state-replacing event alone, or a list (events after it, or no replacing one yet).
        Returns the records registered and how many of them did not replace the aggregate's
        pending records (an upper bound of how much ``pending`` grew beyond one per key)."""
        envelope_id = self.codec.envelope_id
        seen = self._seen
        dedupe = self._dedupe
        xxh = xxh64_intdigest
        duplicates = tails = 0
        # raw tuples hold (.., key, value) at 3 and 4; Records (verified catch-up) at 4 and 5
        ki, vi = (4, 5) if records else (3, 4)
        for r in raw:
            v = r[vi]
            rep = kinds.get(v[:10])
            if rep is None:
                self.codec.header(v, where=_where(r))  # raises the precise DecodeError
                continue  # pragma: no cover - header() always raises here
            if dedupe:
                b = v[10]
                # the event id follows the header (checked by the codec); short ids inline
                h = xxh(v[11 : 11 + (b >> 1)]) if b < 0x80 else xxh(envelope_id(v))
                if h in seen:
                    duplicates += 1
                    continue
                seen[h] = None
            # Aggregate keys carry their kind as a prefix, so they are unique across streams.
            if rep:
                pending[r[ki]] = r
            else:
                _add_tail(pending, r[ki], r)
                tails += 1
        added = len(raw) - duplicates
        self.applied += added
        self.duplicates += duplicates
        return added, tails

    def _scan_messages(
        self,
        msgs: list[Any],
        pending: dict[object, Any],
        kinds: dict[bytes, bool],
    ) -> tuple[int, int]:
        """:meth:`_scan` for Kafka messages (see ``KafkaLog.scan_messages``): reads each
        message's value and key only; where it sits is asked of the few that survive. The loop
        is :meth:`_scan`'s for message objects; the rare non-replacing records share
        :func:`_add_tail` (a call per replacing record would cost the hot path)."""
        if not self._dedupe:
            return self._scan([_message_raw(m) for m in msgs], pending, kinds)
        if self._scan_batch(msgs, pending, kinds):
            n = len(msgs)
            self.applied += n
            return n, 0
        envelope_id = self.codec.envelope_id
        seen = self._seen
        xxh = xxh64_intdigest
        duplicates = tails = 0
        m = None
        try:
            for m in msgs:
                v = m.value()
                rep = kinds[v[:10]]  # KeyError: not a known header; TypeError: no value
                b = v[10]
                # the event id follows the header (checked by the codec); short ids inline
                h = xxh(v[11 : 11 + (b >> 1)]) if b < 0x80 else xxh(envelope_id(v))
                if h in seen:
                    duplicates += 1
                    continue
                seen[h] = None
                # Aggregate keys carry their kind as a prefix: unique across streams.
                if rep:
                    pending[m.key()] = m
                else:
                    _add_tail(pending, m.key(), m)
                    tails += 1
        except (KeyError, TypeError):
            if m is not None:  # raises the precise DecodeError when the header is the cause
                self.codec.header(m.value() or b"", where=_where(_message_raw(m)))
            raise
        added = len(msgs) - duplicates
        self.applied += added
        self.duplicates += duplicates
        return added, tails

    def _scan_batch(
        self,
        msgs: list[Any],
        pending: dict[object, Any],
        kinds: dict[bytes, bool],
        *,
        records: bool = False,
    ) -> bool:
        """The common case of :meth:`_scan_messages` as C-level passes over the batch (about
        12% less CPU than the per-record loop): every record of a replacing type, every event
        id short (its length in one byte; uuid-shaped ids are), no duplicate in the batch nor
        with what was seen. Registers the batch and returns True exactly then; otherwise
        changes nothing and returns False (the per-record loop runs, and raises the precise
        error for a bad record). Both paths leave the same state (tests compare them)."""
        if not msgs:
            return False
        cls = msgs[0].__class__  # the messages' C methods, mapped: no Python frame each
        value_of, key_of = (_REC_VALUE, _REC_KEY) if records else (cls.value, cls.key)
        values = list(map(value_of, msgs))
        try:
            starts = set(map(_START, values))
        except TypeError:  # a record without value
            return False
        return self._scan_parts(msgs, (list(map(key_of, msgs)), values, starts), pending, kinds)

    def _scan_parts(
        self,
        msgs: list[Any],
        parts: tuple[list[bytes], list[bytes], set[bytes]],
        pending: dict[object, Any],
        kinds: dict[bytes, bool],
        *,
        at: tuple[list[str], list[int], list[int]] | None = None,
    ) -> bool:
        """:meth:`_scan_batch` for messages whose keys, values and distinct record starts
        (header and event id length byte) the verifier already read
        (``ChainVerifier.fast_parts``): the same checks, the same outcome, without reading
        the messages again. With ``at`` (``ChainVerifier.fast_at``: each message's stream,
        partition and offset), ``pending`` keeps raw records (stream, partition, offset, no
        key, value) instead of the messages, which are then freed with their read."""
        keys, values, starts = parts
        n = len(msgs)
        if not n or len(keys) != n or len(values) != n:
            return False
        if at is not None and not len(at[0]) == len(at[1]) == len(at[2]) == n:
            return False
        try:
            if not all(map(kinds.__getitem__, map(_HEADER, starts))):
                return False
            lengths = set(map(_ID_LENGTH, starts))
        except (KeyError, TypeError, IndexError):
            return False
        ids = _event_ids(values, lengths)
        if ids is None or not _all_new(self._seen, map(xxh64_intdigest, ids), n):
            return False
        if at is None:
            pending.update(zip(keys, msgs, strict=True))
        else:
            raw = zip(at[0], at[1], at[2], repeat(None, n), values, strict=True)
            pending.update(zip(keys, raw, strict=True))
        return True

    def _flush(
        self,
        pending: dict[object, Any],
        registered: int,
        *,
        messages: bool = False,
        cut: int | None = None,
    ) -> None:
        """Apply the records left in ``pending`` (``registered`` were put there), in log
        order; the others were superseded. With ``cut`` (a verified Kafka catch-up), they
        may be messages and Records alike: topics lose ``cut`` characters of prefix so
        that both sort in one log order."""
        survivors = _survivors(pending)
        self.superseded += registered - len(survivors)
        if not survivors:
            return
        if cut is not None:  # Records, messages, and raw records (see _scan_parts(at=))
            survivors = [
                r
                if r.__class__ is tuple
                else (r[0], r[1], r[2], r[4], r[5])
                if r.__class__ is Record
                else (r.topic()[cut:], r.partition(), r.offset(), r.key(), r.value() or b"")
                for r in survivors
            ]
        elif messages:
            survivors = [_message_raw(m) for m in survivors]
        elif survivors[0].__class__ is Record:
            survivors = [(r[0], r[1], r[2], r[4], r[5]) for r in survivors]
        survivors.sort(key=lambda r: (r[0], r[1], r[2]))
        self._apply_checked(survivors)

    def _apply_checked(self, raw: list[_Raw]) -> None:
        """Apply records already registered in the de-duplication set."""
        decode = self.codec.decode
        events: list[Event] = []
        for r in raw:
            where = _where(r)
            event = decode(r[4], where=where)
            self._apply_event(event, where)
            events.append(event)
        for cb in self.listeners:
            cb(events)

    def _apply_event(self, event: Event, where: str) -> None:
        """Apply one event to every projection of its stream, naming ``where`` on failure.

        The stream comes from the event's type (scans may name prefixed Kafka topics)."""
        for p in self._by_stream.get(type(event).STREAM, ()):
            try:
                p.apply(event)
            except Exception as exc:
                raise ProjectionError(projection=p.name, where=where, reason=repr(exc)) from exc
