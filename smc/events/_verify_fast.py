"""The fast path of :class:`smc.events.ChainVerifier` for consumed Kafka messages.

Role: :class:`_FastPath`, the part of ``ChainVerifier`` (mixed into it) that takes whole
sealed batches straight from confluent-kafka messages (:meth:`feed_messages`): one hash pass
and one signature per batch, no Record per record. It releases a batch only when the
record-by-record path (``ChainVerifier.feed``) would release it with no finding, checked
before any state changes; everything else goes to that path unchanged, so both decide alike.
Split from :mod:`smc.events._verify`.
Concurrency: not thread-safe, like the verifier it is part of.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from itertools import compress, count, groupby, repeat
from typing import Any

from confluent_kafka import Message

from smc.events._codec import Codec
from smc.events._integrity import WRITER, IntegrityError, Seal, batch_head_v2
from smc.events._log import Record
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
    _carry: dict[tuple[str, int], tuple[list[Any], list[Any]]]
    seals: dict[tuple[str, int], dict[int, bytes]]
    owners: dict[str, str]

    # the verifier's own methods (smc.events._verify.ChainVerifier)
    feed: Callable[[Sequence[Record]], list[Record]]
    _writer: Callable[[Seal, Record | None], Writer | None]
    _expected_prev: Callable[[Seal, str, int], bytes]
    _advance: Callable[[Seal, str, int, bytes, int], None]
    _keep_seal: Callable[[str, int, int, bytes], None]
    _allowed_headers: Callable[[str], frozenset[bytes]]

    def feed_messages(self, msgs: Sequence[Any], *, cut: int = 0) -> tuple[list[Any], list[Record]]:
        """:meth:`feed` for consumed Kafka messages (topic names ``cut`` characters of
        prefix): returns the messages released, plus the Records released by :meth:`feed`
        where the fast path does not apply. The fast path takes, per partition run, whole
        batches closed by a version-2 seal whose records all carry its session and nothing
        else, with nothing held for the partition, and releases them only when the general
        path would release them without a finding (checked before any state changes);
        anything else goes through :meth:`feed` unchanged, so the outcome is the same."""
        fast: list[Any] = []
        slow: list[Record] = []
        if not msgs:
            return fast, slow
        hdrs = list(map(_M_HEADERS, msgs))
        i = 0
        for (topic, part), grp in groupby(
            zip(map(_M_TOPIC, msgs), map(_M_PARTITION, msgs), strict=True)
        ):
            j = i + len(list(grp))
            stream = topic[cut:]
            carried = self._carry.pop((stream, part), None)
            if carried is None:
                self._fast_run(list(msgs[i:j]), hdrs[i:j], stream, part, fast, slow)
            else:
                ms, hs = carried
                self._fast_run([*ms, *msgs[i:j]], hs + hdrs[i:j], stream, part, fast, slow)
            i = j
        return fast, slow

    def _flush_carry(self) -> None:
        """Hand the batch tails the fast path carried over to the general path's held
        records (where checkpoints and :meth:`finish` see them)."""
        carry, self._carry = self._carry, {}
        for (stream, _), (ms, hs) in carry.items():
            self.feed(_records(ms, hs, 0, len(ms), stream))  # no seal: they are held

    def _fast_run(
        self,
        msgs: list[Any],
        hdrs: list[Any],
        stream: str,
        part: int,
        fast: list[Any],
        slow: list[Record],
    ) -> None:
        """Consecutive messages of one partition: whole sealed batches by the fast path, the
        rest (from the first batch it does not take) by :meth:`feed`; a batch whose seal
        is still to come is carried over to the next read of the partition."""
        start, j = 0, len(msgs)
        # A sealed append's headers end with the writer session, then (last record of
        # the batch) the seal: positions of seals, and every record's writer entry.
        last: list[Any] = []
        if None not in hdrs and 0 not in map(len, hdrs):
            last = list(map(_LAST, hdrs))
            names = set(map(_NAME, last))
            if names - _TAIL_NAMES:
                last = []
        seals = [k for k in compress(count(), map(_SEAL_NAME.__eq__, map(_NAME, last)))]
        if last and self._holds(stream, part):
            # records held from a previous read: the general path closes them, up to this
            # run's first seal; the fast path takes over if nothing stays held then
            start = seals[0] + 1 if seals else j
            slow.extend(self.feed(_records(msgs, hdrs, 0, start, stream)))
            if self._holds(stream, part):
                last = seals = []
        done = bool(last)
        for k in seals:
            if k < start:
                continue
            done = False
            n = k + 1 - start
            if len(hdrs[k]) < 2:
                break
            try:
                seal = Seal.decode(last[k][1])
            except IntegrityError:
                break
            if seal.version < 2 or seal.mode != WRITER or seal.count != n:
                break
            mine = (_WRITER_NAME, seal.key_id + seal.session)
            if hdrs[k][-2] != mine or last[start:k].count(mine) != n - 1:
                break
            batch = msgs[start : k + 1]
            if not self._close_fast(stream, part, seal, batch, msgs[k].offset()):
                break
            fast.extend(batch)
            start = k + 1
            done = True
        if start < j:
            if done:  # the start of a batch whose seal comes with the next read
                self._carry[(stream, part)] = (msgs[start:], hdrs[start:])
            else:
                slow.extend(self.feed(_records(msgs, hdrs, start, j, stream)))

    def _holds(self, stream: str, part: int) -> bool:
        return any(k[0] == stream and k[1] == part for k in self.pending)

    def _close_fast(
        self, stream: str, part: int, seal: Seal, batch: Sequence[Any], at: int
    ) -> bool:
        """Release a batch when it verifies with no finding at all (else change nothing)."""
        keys = list(map(_M_KEY, batch))
        values = list(map(_M_VALUE, batch))
        if None in keys or None in values:
            return False
        head = batch_head_v2(seal.prev, keys, values)
        if head != seal.head:
            return False
        try:
            writer = self._writer(seal, None)
        except IntegrityError:
            return False
        if writer is None or writer.role in _CHECKED_ROLES or stream == POLICY:
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
        allowed = self._allowed_headers(writer.role)
        if not all(map(allowed.__contains__, map(_HEADER, values))):
            return False
        self._advance(seal, stream, part, head, at)
        self._keep_seal(stream, part, at, head)
        self.verified += len(batch)
        self.fast_released += len(batch)
        deque(map(self.owners.setdefault, map(bytes.decode, keys), repeat(writer.role)), maxlen=0)
        return True


_HEADER = operator.itemgetter(slice(0, 10))
_CHECKED_ROLES = frozenset({"informer", "api"})
_M_HEADERS: Any = Message.headers  # confluent-kafka's C methods, mapped over a batch
_M_TOPIC: Any = Message.topic
_M_PARTITION: Any = Message.partition
_M_KEY: Any = Message.key
_M_VALUE: Any = Message.value
_LAST = operator.itemgetter(-1)
_NAME = operator.itemgetter(0)
_WRITER_NAME = "smc.writer"
_SEAL_NAME = "smc.seal"
_TAIL_NAMES = frozenset({_WRITER_NAME, _SEAL_NAME})


def _records(msgs: Sequence[Any], hdrs: list[Any], i: int, j: int, stream: str) -> list[Record]:
    return [_message_record(m, stream, h) for m, h in zip(msgs[i:j], hdrs[i:j], strict=True)]


def _message_record(m: Any, stream: str, headers: Any) -> Record:
    h = dict(headers or [])
    key = m.key()
    return Record(
        stream, m.partition(), m.offset(), m.timestamp()[1], key.decode() if key else "",
        m.value() or b"", "", "", h.get("smc.writer") or b"", h.get("smc.seal") or b"",
    )  # fmt: skip
