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
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from smc.events._codec import Codec, default_codec
from smc.events._errors import LogError, LogUnavailable
from smc.events._log import Appended, Position, Record
from smc.events._types import STREAMS, Event

__all__ = ["KafkaLog"]

_rdlog = logging.getLogger("smc.events.kafka")


class KafkaLog:
    """Event log on Kafka topics (``kafka://host:port[,host:port]``)."""

    dedupes_on_append = False

    def __init__(
        self,
        bootstrap: str,
        *,
        codec: Codec | None = None,
        streams: Sequence[str] = STREAMS,
        timeout: float = 10.0,
        config: dict[str, Any] | None = None,
        topic_prefix: str = "",
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.url = f"kafka://{bootstrap}" + (f"?prefix={topic_prefix}" if topic_prefix else "")
        self.codec = codec or default_codec()
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
        self._partitions: dict[str, list[int]] | None = None
        self._assigned: Position | None = None
        self._errors: list[str] = []

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

    def append(self, events: Sequence[Event]) -> list[Appended]:
        if not events:
            return []
        results: list[Appended | None] = [None] * len(events)
        failures: list[str] = []

        def report(i: int, ev: Event) -> Any:
            def cb(err: KafkaError | None, msg: Any) -> None:
                if err is not None:
                    failures.append(f"{ev.envelope.event_id}: {err}")
                else:
                    results[i] = Appended(
                        event_id=ev.envelope.event_id,
                        stream=(msg.topic() or "")[len(self.prefix) :],
                        partition=msg.partition(),
                        offset=msg.offset(),
                        duplicate=False,
                    )

            return cb

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
                            on_delivery=report(i, ev),
                        )
                        break
                    except BufferError:
                        self._producer.poll(0.05)
            remaining = self._producer.flush(self.timeout)
        if remaining:
            raise LogUnavailable(
                f"Kafka at {self.bootstrap}: {remaining} records not acknowledged within "
                f"{self.timeout}s ({'; '.join(self._errors[-3:]) or 'no broker answer'})"
            )
        if failures:
            raise LogUnavailable(f"Kafka refused records: {'; '.join(failures[:5])}")
        return [r for r in results if r is not None]

    def _assign(self, start: Position) -> None:
        tps = [
            TopicPartition(self.prefix + stream, p, start.get((stream, p)))
            for stream, parts in self.partitions().items()
            for p in parts
        ]
        self._consumer.assign(tps)
        self._assigned = start

    def _consume(self, start: Position, max_records: int, timeout: float) -> list[Any]:
        if self._assigned != start:
            self._assign(start)
        msgs: list[Any] = self._consumer.consume(
            num_messages=max_records, timeout=max(timeout, 0.001)
        )
        for m in msgs:
            err = m.error()
            if err is not None:
                _raise_unless_eof(m, err)
        return msgs

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        cut = len(self.prefix)
        new = Record._make
        out: list[Record] = []
        for m in self._consume(start, max_records, timeout):
            if m.error() is not None:
                continue
            key = m.key()
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
        one pass over the messages, no timestamps, no Record objects."""
        if self._assigned != start:
            self._assign(start)
        msgs = self._consumer.consume(num_messages=max_records, timeout=max(timeout, 0.001))
        out: list[tuple[str, int, int, bytes, bytes]] = []
        append = out.append
        for m in msgs:
            value = m.value()
            if value is None:  # an error event (or a record without a value): look closer
                err = m.error()
                if err is not None:
                    _raise_unless_eof(m, err)
                    continue
                value = b""
            append((m.topic(), m.partition(), m.offset(), m.key(), value))  # type: ignore[arg-type]
        if out:
            cut = len(self.prefix)
            ends = {(r[0], r[1]): r[2] + 1 for r in out}
            if end is not None and any(o > end.get((t[cut:], p)) for (t, p), o in ends.items()):
                out = [r for r in out if r[2] < end.get((r[0][cut:], r[1]))]
                ends = {(r[0], r[1]): r[2] + 1 for r in out}
                filtered = True
            else:
                filtered = False
            pos = dict(start.items())
            pos.update({(t[cut:], p): o for (t, p), o in ends.items()})
            after = Position(pos)
            # When records past ``end`` were dropped the consumer is ahead of ``after``:
            # forget the assignment so the next read seeks again.
            self._assigned = None if filtered else after
            return out, after
        return out, start

    def end_position(self) -> Position:
        out = {}
        try:
            for stream, parts in self.partitions().items():
                for p in parts:
                    _, high = self._consumer.get_watermark_offsets(
                        TopicPartition(self.prefix + stream, p), timeout=self.timeout, cached=False
                    )
                    if high > 0:
                        out[(stream, p)] = high
        except KafkaException as exc:
            raise LogUnavailable(f"Kafka at {self.bootstrap} unreachable: {exc}") from exc
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
            self._producer.flush(min(self.timeout, 5.0))
        finally:
            self._consumer.close()


def _raise_unless_eof(m: Any, err: KafkaError) -> None:
    """A consumed error event: end-of-partition is harmless; anything else fails the read."""
    if err.code() != KafkaError._PARTITION_EOF:
        raise LogUnavailable(f"Kafka read failed at {m.topic()}[{m.partition()}]: {err}")
