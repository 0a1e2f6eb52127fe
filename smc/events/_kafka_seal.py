"""Sealed appends of :class:`smc.events.KafkaLog`: per-partition seals and their links.

Role: :class:`_SealedAppends`, the part of ``KafkaLog`` (mixed into it) that appends a batch
sealed by a :class:`~smc.events.Signer` (``docs/log-integrity.md``): records grouped by
partition, each group sealed (seal version 3: its first record names the group's size) in
the signer session's chain (``WRITER`` mode) and linked to the partition's last seal as the
broker has it (one ListOffsets request per append, then a
read back of the partition's tail when another writer appended last). Split from
:mod:`smc.events._kafka`.
Concurrency: appends hold the log's lock (one producer), as unsealed ones do.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin import OffsetSpec as _OffsetSpec  # type: ignore[attr-defined]

from smc.events._codec import Codec
from smc.events._errors import LogError, LogUnavailable
from smc.events._integrity import BATCH_HEADER, WRITER, IntegrityError, Seal, Signer
from smc.events._log import Appended
from smc.events._types import POLICY, Event

#: Longest single ``Producer.flush`` call. confluent-kafka (2.16) splits a longer flush into
#: 200 ms chunks and starts the next chunk even after a callback raised, among them the
#: fatal error of a producer the broker's authorizer refused: the next chunk's callbacks run
#: with that exception pending and the flush ends in SystemError instead of KafkaException.
#: Shorter calls are one librdkafka flush each, which stops at the first raise.
FLUSH_CHUNK = 0.15


def flush(producer: Producer, timeout: float) -> int:
    """``producer.flush(timeout)`` in calls short enough to raise a fatal producer error as
    :class:`KafkaException` (see :data:`FLUSH_CHUNK`). Returns the records still queued."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        remaining: int = producer.flush(max(0.0, min(FLUSH_CHUNK, left)))
        if not remaining or left <= FLUSH_CHUNK:
            return remaining


def delivery_report(
    results: list[Appended | None], failures: list[str], prefix: str, i: int, ev: Event
) -> Callable[[KafkaError | None, Any], None]:
    """The producer's delivery callback of ``ev``, the ``i``-th event of an append: its
    :class:`Appended` goes to ``results[i]``, a failure (naming the event) to ``failures``."""

    def cb(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            failures.append(f"{ev.envelope.event_id}: {err}")
        else:
            results[i] = Appended(
                event_id=ev.envelope.event_id,
                stream=(msg.topic() or "")[len(prefix) :],
                partition=msg.partition(),
                offset=msg.offset(),
                duplicate=False,
            )

    return cb


class _SealedAppends:
    """Sealed appends (mixed into ``KafkaLog``)."""

    bootstrap: str
    prefix: str
    codec: Codec
    timeout: float
    _lock: threading.Lock
    _producer: Producer
    _consumer_config: dict[str, Any]
    _tail: Consumer | None
    _last_seals: dict[tuple[str, int], tuple[int, bytes]]
    _admin: AdminClient | None
    _errors: list[str]
    # the log's own methods (smc.events._kafka.KafkaLog)
    partitions: Callable[[], dict[str, list[int]]]
    partition_of: Callable[[str, bytes], int]
    _produce: Callable[[str, int, bytes, bytes, list[Any], Any], None]
    _refused: Callable[[KafkaException], LogError]
    _high_watermark: Callable[..., int]

    def _append_sealed(self, events: Sequence[Event], signer: Signer) -> list[Appended]:
        encode = self.codec.encode
        sid = signer.session_id
        groups: dict[tuple[str, int], list[tuple[int, Event, bytes, bytes]]] = {}
        for i, ev in enumerate(events):
            stream = type(ev).STREAM
            key = ev.envelope.aggregate.encode()
            # Policy (and the AccessGrants that authorize it) in one partition: one order in
            # which every reader checks a principal's grants alike (docs/log-integrity.md).
            p = self.partitions()[stream][0] if stream == POLICY else self.partition_of(stream, key)
            groups.setdefault((stream, p), []).append((i, ev, key, encode(ev)))
        results: list[Appended | None] = [None] * len(events)
        failures: list[str] = []

        def report(i: int, ev: Event) -> Callable[[KafkaError | None, Any], None]:
            return delivery_report(results, failures, self.prefix, i, ev)

        heads: list[tuple[str, int, bytes, int]] = []
        principals = signer.principals_for(ev.envelope.actor for ev in events)
        with self._lock:
            highs = self._high_watermarks(list(groups))
            for (stream, p), batch in groups.items():
                prev = signer.writer_prev(stream, p)
                seal, head = signer.seal(
                    stream=stream, partition=p, mode=WRITER, prev=prev,
                    keys=[key for _, _, key, _ in batch],
                    values=[value for _, _, _, value in batch],
                    link=self._last_seal(stream, p, highs[(stream, p)]),
                    principals=principals, version=3,
                )  # fmt: skip
                last = len(batch) - 1
                heads.append((stream, p, head, batch[last][0]))
                for j, (i, ev, key, value) in enumerate(batch):
                    headers = [
                        ("smc.event_id", ev.envelope.event_id.encode()),
                        ("smc.type", type(ev).TYPE.encode()),
                        ("smc.writer", sid),
                    ]
                    if j == 0:  # the batch's size: readers find its seal without headers
                        headers.append((BATCH_HEADER, _U32.pack(len(batch))))
                    if j == last:
                        headers.append(("smc.seal", seal.encode()))
                    self._produce(self.prefix + stream, p, key, value, headers, report(i, ev))
            try:
                remaining = flush(self._producer, self.timeout)
            except KafkaException as exc:
                signer.new_session()
                raise self._refused(exc) from exc
        if remaining or failures:
            # Part of a batch may be on the log without its seal: a new session keeps the
            # chains of the next appends apart from it (the unsealed records are reported
            # and never applied; a retry appends them again, sealed).
            signer.new_session()
        if remaining:
            raise LogUnavailable(
                f"Kafka at {self.bootstrap}: {remaining} records not acknowledged within "
                f"{self.timeout}s ({'; '.join(self._errors[-3:]) or 'no broker answer'})"
            )
        if failures:
            raise LogUnavailable(f"Kafka refused records: {'; '.join(failures[:5])}")
        for stream, p, head, i in heads:
            signer.committed(stream, p, head=head, mode=WRITER)
            got = results[i]
            if got is not None:
                self._last_seals[(stream, p)] = (got.offset, head)
        return [r for r in results if r is not None]

    def _high_watermarks(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The partitions' high watermarks, in one request to the broker (ListOffsets);
        partition by partition (with retries) when that request fails."""
        if self._admin is None:
            self._admin = AdminClient(
                {k: v for k, v in self._consumer_config.items() if k not in _CONSUMER_ONLY}
            )
        latest = _OffsetSpec.latest()  # type: ignore[no-untyped-call]
        asked = {TopicPartition(self.prefix + s, p): latest for s, p in tps}
        try:
            futures = self._admin.list_offsets(asked, request_timeout=self.timeout)
            got = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
            return {(s, p): int(got[(self.prefix + s, p)]) for s, p in tps}
        except (KafkaException, KeyError, ValueError):
            if self._tail is None:
                self._tail = Consumer(
                    {**self._consumer_config, "group.id": f"smc-tail-{uuid.uuid4()}"}
                )
            return {(s, p): self._high_watermark(self._tail, self.prefix + s, p) for s, p in tps}

    def _last_seal(self, stream: str, partition: int, high: int) -> tuple[int, bytes] | None:
        """The partition's last seal as the broker has it now (offset, head), for the link
        of the next batch: the last one this log appended when nothing came after it, else
        the last seal among the partition's last 64 records (version 2 seals carry their
        head). None when there is no such seal. Called under ``_lock``."""
        topic = self.prefix + stream
        mine = self._last_seals.get((stream, partition))
        if high <= 0:
            return None
        if mine is not None and mine[0] == high - 1:
            return mine
        if self._tail is None:
            self._tail = Consumer({**self._consumer_config, "group.id": f"smc-tail-{uuid.uuid4()}"})
        start = max(0, high - 64, mine[0] + 1 if mine is not None and mine[0] < high else 0)
        self._tail.assign([TopicPartition(topic, partition, start)])
        found = mine if mine is not None and mine[0] < high else None
        deadline = time.monotonic() + self.timeout
        offset = start
        while offset < high and time.monotonic() < deadline:
            got = self._tail.consume(num_messages=high - offset, timeout=0.5)
            if not got or all(m.error() is not None for m in got):
                # nothing more to read now (or not allowed to read: a write-only principal)
                break
            msg: Any
            for msg in got:
                if msg.error() is not None:
                    continue
                at: int = msg.offset()
                offset = max(offset, at + 1)
                raw = dict(msg.headers() or []).get("smc.seal")
                if isinstance(raw, bytes) and raw:
                    try:
                        seal = Seal.decode(raw)
                    except IntegrityError:
                        continue  # not a seal we can link to (the verifier reports it)
                    if seal.version >= 2:
                        found = (at, seal.head)
        return found


#: Consumer settings an admin client does not take.
_CONSUMER_ONLY = frozenset(
    {"enable.auto.commit", "isolation.level", "enable.partition.eof", "fetch.wait.max.ms"}
)
_U32 = struct.Struct(">I")
