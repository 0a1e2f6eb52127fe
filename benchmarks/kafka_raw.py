"""Raw confluent-kafka produce and consume rates on a real broker: the baseline for KafkaLog.

Role: benchmark (never part of the test run). Produces N small (~200 byte) keyed records to a
fresh 6-partition topic with an idempotent producer (acks=all) for each producer variant
(compression none / lz4), consumes them back with a plain confluent-kafka consumer in batches,
prints msgs/s (the consume rate is the best of two passes) and writes ``benchmarks/results/kafka_raw.json``. Without ``--bootstrap`` it
starts its own broker with ``smc.testing.kafka.KafkaBroker``. :func:`raw_consume_rate` is the
reusable measurement (KafkaLog's replay must stay within 2x of it).
Concurrency: one thread drives each client; librdkafka runs its own I/O threads.

    python benchmarks/kafka_raw.py [--events 1000000] [--bootstrap 127.0.0.1:9092]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import confluent_kafka  # noqa: E402
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402

from smc.events._kafka_topics import ensure_topics  # noqa: E402

#: Consumer settings of the raw baseline. librdkafka stops fetching for fetch.queue.backoff.ms
#: (1000 ms by default) whenever its prefetch queue is full, which caps a fast reader at about
#: 150k records/s here; 10 ms lets it run at the rate the application drains the queue.
RAW_CONSUMER_TUNING: dict[str, Any] = {"fetch.queue.backoff.ms": 10}

RESULTS = REPO / "benchmarks" / "results" / "kafka_raw.json"
PARTITIONS = 6
MESSAGE_BYTES = 200


@dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    compression: str
    linger_ms: int
    batch_size: int


@dataclass(frozen=True, kw_only=True, slots=True)
class VariantResult:
    compression: str
    linger_ms: int
    batch_size: int
    topic: str
    produce_seconds: float
    produce_msgs_per_s: float
    consume_seconds: float
    consume_msgs_per_s: float
    consume_default_config_msgs_per_s: float


VARIANTS = (
    Variant(compression="none", linger_ms=10, batch_size=1_000_000),
    Variant(compression="lz4", linger_ms=10, batch_size=1_000_000),
)


def _payloads(count: int = 4093) -> list[bytes]:
    """Distinct ~189-byte bodies: a structured, event-like head and a random tail."""
    out = []
    for j in range(count):
        head = f"ns=team-{j % 17:02d}|svc=svc-{j:05d}|port={8000 + j % 100}|zone=z{j % 3}|".encode()
        tail = os.urandom(96).hex().encode()
        out.append((head + tail)[: MESSAGE_BYTES - 11])
    return out


def create_topic(*, bootstrap: str, partitions: int = PARTITIONS) -> str:
    """A fresh topic (unique name) with ``partitions`` partitions, replication factor 1."""
    name = f"bench.raw.{uuid.uuid4().hex[:10]}"
    ensure_topics(
        bootstrap=bootstrap,
        definitions={"topics": [{"name": name, "partitions": partitions, "config": {}}]},
    )
    return name


def produce(*, bootstrap: str, topic: str, n: int, variant: Variant) -> float:
    """Produce ``n`` ~200-byte keyed records; return the seconds until every one is acked."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": variant.compression,
            "linger.ms": variant.linger_ms,
            "batch.size": variant.batch_size,
            "batch.num.messages": 100_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    bodies = _payloads()
    nbodies = len(bodies)
    keys = [b"agg-%05d" % k for k in range(10_000)]
    errors: list[str] = []
    acked = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is not None:
            errors.append(str(err))
        else:
            acked += 1

    produce_ = producer.produce
    began = time.perf_counter()
    for i in range(n):
        value = b"%010d|" % i + bodies[i % nbodies]
        while True:
            try:
                produce_(topic, value, keys[i % 10_000], on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.005)
        if i & 0x3FF == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    elapsed = time.perf_counter() - began
    if remaining or errors or acked != n:
        raise RuntimeError(
            f"produce to {topic}: {acked}/{n} acked, {remaining} unsent, errors: {errors[:3]}"
        )
    return elapsed


def raw_consume_rate(
    bootstrap: str,
    topic: str | Sequence[str],
    n: int,
    *,
    timeout: float = 300.0,
    tuned: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> float:
    """Read the first ``n`` records of ``topic`` (or of several topics; all partitions, from
    the beginning) with a plain confluent-kafka consumer in batches; return records per second.

    Each record's value is touched (its length summed) so the work is comparable to a reader
    that hands values on. The clock starts before partitions are assigned. ``tuned`` applies
    :data:`RAW_CONSUMER_TUNING`; ``extra_config`` overrides any consumer setting.
    """
    topics = [topic] if isinstance(topic, str) else list(topic)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            **(RAW_CONSUMER_TUNING if tuned else {}),
            **(extra_config or {}),
        }
    )
    try:
        md = consumer.list_topics(timeout=10)
        tps = []
        for t in topics:
            if t not in md.topics or md.topics[t].error is not None:
                raise RuntimeError(f"topic {t!r} not found on {bootstrap}")
            tps += [TopicPartition(t, p, 0) for p in sorted(md.topics[t].partitions)]
        began = time.perf_counter()
        consumer.assign(tps)
        got = 0
        size = 0
        deadline = time.monotonic() + timeout
        consume = consumer.consume
        while got < n:
            batch = consume(num_messages=10_000, timeout=1.0)
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consume {topics}: {err}")
                size += len(msg.value() or b"")
            got += len(batch)
            if time.monotonic() > deadline:
                raise RuntimeError(f"consume {topics}: only {got}/{n} records in {timeout}s")
        elapsed = time.perf_counter() - began
    finally:
        consumer.close()
    if size == 0:
        raise RuntimeError(f"consume {topics}: records were empty")
    return got / elapsed


def warm_up(*, bootstrap: str) -> None:
    """Untimed round trip: the broker's producer-id manager and JIT get ready first."""
    topic = create_topic(bootstrap=bootstrap)
    produce(bootstrap=bootstrap, topic=topic, n=20_000, variant=VARIANTS[0])
    raw_consume_rate(bootstrap, topic, 20_000)


def run(
    *, bootstrap: str, events: int, variants: tuple[Variant, ...] = VARIANTS
) -> list[VariantResult]:
    warm_up(bootstrap=bootstrap)
    results = []
    for variant in variants:
        topic = create_topic(bootstrap=bootstrap)
        produce_s = produce(bootstrap=bootstrap, topic=topic, n=events, variant=variant)
        # best of two passes: the machine is shared, the faster pass is the less disturbed one
        rate = max(raw_consume_rate(bootstrap, topic, events) for _ in range(2))
        default_rate = raw_consume_rate(bootstrap, topic, events, tuned=False)
        results.append(
            VariantResult(
                compression=variant.compression,
                linger_ms=variant.linger_ms,
                batch_size=variant.batch_size,
                topic=topic,
                produce_seconds=round(produce_s, 3),
                produce_msgs_per_s=round(events / produce_s),
                consume_seconds=round(events / rate, 3),
                consume_msgs_per_s=round(rate),
                consume_default_config_msgs_per_s=round(default_rate),
            )
        )
        print(
            f"compression={variant.compression:<4} linger.ms={variant.linger_ms} "
            f"batch.size={variant.batch_size}: produce {events / produce_s:>10,.0f} msg/s "
            f"({produce_s:.2f}s), raw consume {rate:>10,.0f} msg/s ({events / rate:.2f}s) "
            f"[{default_rate:,.0f} msg/s with librdkafka's default fetch.queue.backoff.ms]",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000, help="records per variant")
    parser.add_argument("--bootstrap", help="use this cluster instead of starting a broker")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be >= 1")

    from smc.testing.kafka import KAFKA_VERSION, KafkaBroker

    broker: KafkaBroker | None = None
    startup: float | None = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = KafkaBroker(heap="1g")
        broker.start()
        startup = broker.last_startup_seconds
        bootstrap = broker.bootstrap
        print(f"started Kafka {KAFKA_VERSION} at {bootstrap} in {startup:.2f}s", flush=True)
    try:
        results = run(bootstrap=bootstrap, events=args.events)
    finally:
        if broker is not None:
            broker.stop()
    best = max(results, key=lambda r: r.consume_msgs_per_s)
    report = {
        "benchmark": "kafka_raw",
        "events": args.events,
        "message_bytes": MESSAGE_BYTES,
        "partitions": PARTITIONS,
        "producer": {"acks": "all", "enable.idempotence": True},
        "consumer": {
            "isolation.level": "read_committed",
            "consume.num_messages": 10_000,
            **RAW_CONSUMER_TUNING,
        },
        "kafka_version": KAFKA_VERSION if broker is not None else None,
        "own_broker": broker is not None,
        "broker_startup_seconds": None if startup is None else round(startup, 3),
        "variants": [asdict(r) for r in results],
        "baseline_consume_msgs_per_s": best.consume_msgs_per_s,
        "baseline_variant": best.compression,
        "confluent_kafka": importlib.metadata.version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"baseline raw consume rate: {best.consume_msgs_per_s:,} msg/s "
        f"(compression={best.compression}); wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
