"""``KafkaLog``: the production event log on Apache Kafka (confluent-kafka).

Role: an :class:`~smc.events.EventLog` with one topic per stream (``smc.registry``,
``smc.policy``, ``smc.certs``), messages keyed by aggregate so one aggregate stays in one
partition, in order. The producer is idempotent with ``acks=all``: an append returns only once
the broker acknowledged every record. Kafka cannot refuse a duplicate event id on append, so
``dedupes_on_append`` is False and the projection runner drops duplicates by id.
Concurrency: appends are serialised by a lock (one producer); reads use one assigned consumer
per log object and must come from one thread at a time (the runner's).
"""

from __future__ import annotations

import logging
import operator
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import partial
from itertools import repeat
from typing import Any
from urllib.parse import urlencode

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from smc.events._codec import Codec, default_codec
from smc.events._errors import LogError, LogUnavailable
from smc.events._health import StateChangeFilter
from smc.events._integrity import BATCH_HEADER, Signer, batch_size
from smc.events._kafka_seal import _SealedAppends, delivery_report, flush
from smc.events._log import Appended, Position, Record
from smc.events._types import STREAMS, Event

__all__ = ["KafkaLog"]

_rdlog = logging.getLogger("smc.events.kafka")
#: librdkafka retries a lost broker several times a second and logs each attempt: one line per
#: state change is kept (see StateChangeFilter).
_RDFILTER = StateChangeFilter()
_rdlog.addFilter(_RDFILTER)


class KafkaLog(_SealedAppends):
    """Event log on Kafka topics (``kafka://host:port[,host:port]``)."""

    dedupes_on_append = False

    def __init__(
        self,
        bootstrap: str,
        *,
        codec: Codec | None = None,
        signer: Signer | None = None,
        streams: Sequence[str] = STREAMS,
        timeout: float = 10.0,
        config: dict[str, Any] | None = None,
        topic_prefix: str = "",
        url_options: Mapping[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        #: The URL that opens this log again (security options by file, never a secret).
        query = {**({"prefix": topic_prefix} if topic_prefix else {}), **dict(url_options or {})}
        self.url = f"kafka://{bootstrap}" + (f"?{urlencode(query)}" if query else "")
        self.codec = codec or default_codec()
        #: Seals every append that names no signer of its own (see ``docs/log-integrity.md``).
        self.signer = signer
        self.streams = tuple(streams)
        self.timeout = timeout
        extra = dict(config or {})
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "batch.size": 1_000_000,
                "compression.type": "lz4",
                "message.timeout.ms": int(timeout * 1000),
                "error_cb": self._on_error,
                "logger": _rdlog,
                **extra,
            }
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"smc-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 100,
                "fetch.queue.backoff.ms": 10,
                "error_cb": self._on_error,
                "logger": _rdlog,
                **{k: v for k, v in extra.items() if k.startswith(("security.", "sasl.", "ssl."))},
            }
        )
        self._lock = threading.Lock()
        self._consumer_config = {
            "bootstrap.servers": bootstrap,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 50,
            "error_cb": self._on_error,
            "logger": _rdlog,
            **{k: v for k, v in extra.items() if k.startswith(("security.", "sasl.", "ssl."))},
        }
        #: Reads a partition's last seal before a sealed append (under ``_lock``).
        self._tail: Consumer | None = None
        #: The last seal this log appended per partition: (offset, head), for links.
        self._last_seals: dict[tuple[str, int], tuple[int, bytes]] = {}
        self._admin: AdminClient | None = None
        self._partitions: dict[str, list[int]] | None = None
        self._assigned: Position | None = None
        self._tps: list[TopicPartition] = []
        self._errors: list[str] = []
        self._probe_failed = False

    def _on_error(self, err: KafkaError) -> None:
        self._errors.append(str(err))
        del self._errors[:-20]

    def partitions(self) -> dict[str, list[int]]:
        """Partition ids per stream, from the cluster's metadata (cached)."""
        if self._partitions is None:
            try:
                md = self._producer.list_topics(timeout=self.timeout)
            except KafkaException as exc:
                raise LogUnavailable(f"Kafka at {self.bootstrap} unreachable: {exc}") from exc
            out: dict[str, list[int]] = {}
            for stream in self.streams:
                t = md.topics.get(self.prefix + stream)
                if t is None or t.error is not None:
                    raise LogError(
                        f"topic {self.prefix + stream!r} missing on {self.bootstrap}: create it with "
                        "deploy/kafka/create_topics.py"
                    )
                out[stream] = sorted(t.partitions)
            self._partitions = out
        return self._partitions

    def probe(self, *, write: bool = False, timeout: float = 2.0) -> None:
        """Raise :class:`LogUnavailable` unless a broker answers a metadata request for the
        log's topics within ``timeout`` seconds (``write`` changes nothing: a broker that
        answers takes appends). Thread-safe (uses the producer's handle)."""
        try:
            md = self._producer.list_topics(self.prefix + self.streams[0], timeout=timeout)
            if not md.brokers:
                raise LogUnavailable(f"Kafka at {self.bootstrap}: no broker in the metadata")
        except KafkaException as exc:
            self._probe_failed = True
            raise LogUnavailable(f"Kafka at {self.bootstrap} unreachable: {exc}") from exc
        if self._probe_failed:
            self._probe_failed = False
            _RDFILTER.reset()

    def append(self, events: Sequence[Event], *, signer: Signer | None = None) -> list[Appended]:
        """Produce ``events`` and wait for every acknowledgement. With a signer (``signer``
        or the log's), every record names the signer's session in an ``smc.writer`` header
        and the last record of each partition's batch carries the ``smc.seal`` header
        (``WRITER`` mode: the batch extends the session's own chain in that partition)."""
        signer = signer or self.signer
        if not events:
            return []
        if signer is not None:
            return self._append_sealed(events, signer)
        results: list[Appended | None] = [None] * len(events)
        failures: list[str] = []

        with self._lock:
            for i, ev in enumerate(events):
                value = self.codec.encode(ev)
                while True:
                    try:
                        self._producer.produce(
                            self.prefix + type(ev).STREAM,
                            key=ev.envelope.aggregate.encode(),
                            value=value,
                            headers=[
                                ("smc.event_id", ev.envelope.event_id.encode()),
                                ("smc.type", type(ev).TYPE.encode()),
                            ],
                            on_delivery=delivery_report(results, failures, self.prefix, i, ev),
                        )
                        break
                    except BufferError:
                        self._producer.poll(0.05)
                    except KafkaException as exc:
                        raise self._refused(exc) from exc
            try:
                remaining = flush(self._producer, self.timeout)
            except KafkaException as exc:
                raise self._refused(exc) from exc
        if remaining:
            raise LogUnavailable(
                f"Kafka at {self.bootstrap}: {remaining} records not acknowledged within "
                f"{self.timeout}s ({'; '.join(self._errors[-3:]) or 'no broker answer'})"
            )
        if failures:
            raise LogUnavailable(f"Kafka refused records: {'; '.join(failures[:5])}")
        return [r for r in results if r is not None]

    def partition_of(self, stream: str, key: bytes) -> int:
        """The partition a key goes to: librdkafka's default (``consistent_random``) rule,
        CRC-32 of the key modulo the partition count, so sealed and unsealed appends place
        an aggregate alike."""
        parts = self.partitions()[stream]
        return parts[zlib.crc32(key) % len(parts)]

    def _produce(
        self, topic: str, partition: int, key: bytes, value: bytes, headers: list[Any], cb: Any
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, partition=partition, headers=headers,
                    on_delivery=cb,
                )  # fmt: skip
                return
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise self._refused(exc) from exc

    def _refused(self, exc: KafkaException) -> LogError:
        """A producer that cannot take records (fatal: e.g. the broker's authorizer denied
        this principal the write or idempotent-write ACL): one error naming the cause."""
        seen = "; ".join(self._errors[-3:])
        return LogError(
            f"Kafka at {self.bootstrap} refused the append: {exc.args[0] if exc.args else exc}"
            + (f" ({seen})" if seen else "")
        )

    def _assign(self, start: Position) -> None:
        tps = [
            TopicPartition(self.prefix + stream, p, start.get((stream, p)))
            for stream, parts in self.partitions().items()
            for p in parts
        ]
        self._consumer.assign(tps)
        self._tps = tps
        self._assigned = start

    def _consume(self, start: Position, max_records: int, timeout: float) -> list[Any]:
        """Up to ``max_records`` messages from ``start``, returned as soon as any is there:
        what the consumer already holds, else the first to arrive within ``timeout`` plus
        whatever came with it. End-of-partition events dropped, any other error event raised.
        One C-level error check over the batch.

        ``consume(num_messages=n, timeout=t)`` alone waits until ``n`` messages arrived or
        ``t`` passed, so a tail read of a few records would sit out the whole timeout; asking
        for one message first returns the moment the broker delivers (no CPU is used while
        waiting: the call blocks in librdkafka)."""
        if self._assigned != start:
            self._assign(start)
        consume = self._consumer.consume
        msgs: list[Any] = consume(num_messages=max_records, timeout=0)
        if not msgs and timeout > 0:
            msgs = consume(num_messages=1, timeout=timeout)
            if msgs and max_records > 1:
                msgs += consume(num_messages=max_records - 1, timeout=0)
        if any(map(_message_error, msgs)):  # rare: error events (end of partition or worse)
            msgs = [m for m in msgs if m.error() is None or _raise_unless_eof(m, m.error())]
        return msgs

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        cut = len(self.prefix)
        new = Record._make
        out: list[Record] = []
        for m in self._consume(start, max_records, timeout):
            key = m.key()
            writer = seal = b""
            batch = 0
            headers = m.headers()
            if headers:
                for hk, hv in headers:
                    if hk == "smc.writer":
                        writer = hv or b""
                    elif hk == "smc.seal":
                        seal = hv or b""
                    elif hk == BATCH_HEADER:
                        batch = batch_size(hv)
            out.append(
                new(
                    (
                        m.topic()[cut:],
                        m.partition(),
                        m.offset(),
                        m.timestamp()[1],
                        key.decode() if key else "",
                        m.value() or b"",
                        "",
                        "",
                        writer,
                        seal,
                        batch,
                    )
                )
            )
        self._assigned = start.advanced(out)
        return out

    def scan(
        self,
        *,
        start: Position,
        max_records: int = 10_000,
        timeout: float = 0.0,
        end: Position | None = None,
    ) -> tuple[list[tuple[str, int, int, bytes, bytes]], Position]:
        """Like :meth:`read` but lean, for replay: (topic, partition, offset, key, value)
        tuples (the topic includes any prefix) before ``end``, plus the position after them;
        no timestamps, no Record objects. See :meth:`scan_messages` for the leanest form."""
        msgs, after = self.scan_messages(
            start=start, max_records=max_records, timeout=timeout, end=end
        )
        return [
            (m.topic(), m.partition(), m.offset(), m.key(), m.value() or b"") for m in msgs
        ], after

    def scan_messages(
        self,
        *,
        start: Position,
        max_records: int = 10_000,
        timeout: float = 0.0,
        end: Position | None = None,
    ) -> tuple[list[Any], Position]:
        """The leanest read, for replay: the consumed confluent-kafka messages themselves
        (``topic()`` includes any prefix; ``value()`` may be None for a record without a value)
        before ``end``, in order within each partition, plus the position after them.

        Nothing is done per message beyond one error check: the position comes from the
        consumer's own per-partition position (the offset after the last message it handed
        over), so a batch costs a few calls per partition, not per message.
        """
        msgs = self._consume(start, max_records, timeout)
        if not msgs:
            return msgs, start
        cut = len(self.prefix)
        pos = dict(start.items())
        overshoot = False
        for tp in self._consumer.position(self._tps):
            off = tp.offset
            if off >= 0:  # negative: nothing handed over since the assignment
                key = (tp.topic[cut:], tp.partition)
                pos[key] = off
                if end is not None and off > end.get(key):
                    overshoot = True
        if not overshoot:
            after = Position(pos)
            self._assigned = after
            return msgs, after
        # Records past ``end`` were consumed (rare: the log grew since ``end`` was taken).
        # Drop them and forget the assignment: the consumer is ahead, the next read seeks.
        assert end is not None
        msgs = [m for m in msgs if m.offset() < end.get((m.topic()[cut:], m.partition()))]
        pos = dict(start.items())
        for m in msgs:
            pos[(m.topic()[cut:], m.partition())] = m.offset() + 1
        self._assigned = None
        return msgs, Position(pos)

    def read_sealed(
        self,
        *,
        start: Position,
        max_records: int = 10_000,
        timeout: float = 0.0,
        end: Position | None = None,
    ) -> tuple[list[Record], Position]:
        """Records before ``end`` with their writer and seal headers (what verification
        needs), plus the position after them: :meth:`scan_messages`'s lean read turned into
        :class:`Record` values by C-level passes over the batch (the key stays bytes)."""
        msgs, after = self.scan_messages(
            start=start, max_records=max_records, timeout=timeout, end=end
        )
        if not msgs:
            return [], after
        m_: Any = Message  # its C methods, mapped over the batch: no Python frame each
        hdrs: list[Any] = list(map(m_.headers, msgs))
        keys: list[Any] = list(map(m_.key, msgs))
        values: list[Any] = list(map(m_.value, msgs))
        if None in hdrs or None in keys or None in values:  # not ours: the general path
            return [
                _message_record(m, self.prefix, h or []) for m, h in zip(msgs, hdrs, strict=True)
            ], after
        dicts: list[Any] = list(map(dict, hdrs))
        topics: Iterable[str] = map(m_.topic, msgs)
        if self.prefix:
            topics = map(operator.itemgetter(slice(len(self.prefix), None)), topics)
        recs: list[Record] = list(
            map(
                _new_record,
                zip(
                    topics,
                    map(m_.partition, msgs),
                    map(m_.offset, msgs),
                    map(_TS, map(m_.timestamp, msgs)),
                    map(bytes.decode, keys),
                    values,
                    repeat(""),
                    repeat(""),
                    map(_WRITER, dicts),
                    map(_SEAL, dicts),
                    map(batch_size, map(_BATCH, dicts)),
                ),
            )
        )
        return recs, after

    def end_position(self) -> Position:
        out = {}
        deadline = time.monotonic() + self.timeout
        for stream, parts in self.partitions().items():
            for p in parts:
                high = self._high_watermark(self._consumer, self.prefix + stream, p, deadline)
                if high > 0:
                    out[(stream, p)] = high
        return Position(out)

    def _high_watermark(
        self, consumer: Consumer, topic: str, partition: int, deadline: float | None = None
    ) -> int:
        """A partition's high watermark from the broker; a leader moving (or just elected
        for a new topic) is retried until ``deadline`` (default: the log's timeout)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while True:
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=self.timeout, cached=False
                )
                return int(high)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                retriable = isinstance(err, KafkaError) and (
                    err.retriable() or err.code() in _LEADER_MOVING
                )
                if not retriable or time.monotonic() > deadline:
                    raise LogUnavailable(f"Kafka at {self.bootstrap} unreachable: {exc}") from exc
                time.sleep(0.1)

    def cached_end_position(self) -> Position:
        """The high watermarks the consumer learnt from its last fetches: no request to the
        broker, so metrics can read it beside the runner's reads without delaying them."""
        out = {}
        for stream, parts in (self._partitions or {}).items():
            for p in parts:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.prefix + stream, p), cached=True
                )
                if high > 0:
                    out[(stream, p)] = high
        return Position(out)

    def position_at(self, when: datetime) -> Position:
        ms = int(when.timestamp() * 1000)
        tps = [
            TopicPartition(self.prefix + s, p, ms)
            for s, parts in self.partitions().items()
            for p in parts
        ]
        try:
            found = self._consumer.offsets_for_times(tps, timeout=self.timeout)
        except KafkaException as exc:
            raise LogUnavailable(f"Kafka at {self.bootstrap} unreachable: {exc}") from exc
        end = self.end_position()
        out = {}
        for tp in found:
            stream = tp.topic[len(self.prefix) :]
            out[(stream, tp.partition)] = (
                tp.offset if tp.offset >= 0 else end.get((stream, tp.partition))
            )
        return Position(out)

    def close(self) -> None:
        try:
            flush(self._producer, min(self.timeout, 5.0))
        except KafkaException as exc:  # a fatal producer (e.g. refused by the authorizer)
            _rdlog.warning("Kafka at %s: producer closed with an error: %s", self.bootstrap, exc)
        finally:
            self._consumer.close()
            if self._tail is not None:
                self._tail.close()


_message_error = Message.error
_TS = operator.itemgetter(1)
#: Record from an 11-tuple without a Python frame (the namedtuple's __new__ is Python code).
_new_record: Any = partial(tuple.__new__, Record)
_WRITER = operator.methodcaller("get", "smc.writer", b"")
_SEAL = operator.methodcaller("get", "smc.seal", b"")
_BATCH = operator.methodcaller("get", BATCH_HEADER)


def _message_record(m: Any, prefix: str, headers: Any) -> Record:
    h = dict(headers)
    key = m.key()
    return Record(
        m.topic()[len(prefix) :], m.partition(), m.offset(), m.timestamp()[1],
        key.decode() if key else "",
        m.value() or b"", "", "", h.get("smc.writer") or b"", h.get("smc.seal") or b"",
        batch_size(h.get(BATCH_HEADER)),
    )  # fmt: skip


_LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


def _raise_unless_eof(m: Any, err: KafkaError) -> bool:
    """A consumed error event: end-of-partition is harmless (returns False, to drop it);
    anything else fails the read."""
    if err.code() != KafkaError._PARTITION_EOF:
        raise LogUnavailable(f"Kafka read failed at {m.topic()}[{m.partition()}]: {err}")
    return False
