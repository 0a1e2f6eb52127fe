"""Read every SMC event from Kafka and print it as JSON, with only the published schemas.

An integrator's consumer: confluent-kafka and fastavro, no SMC code. It reads the three event
topics from the beginning up to the end offsets taken at start (``--follow`` keeps reading),
decodes each record with the schema its fingerprint names, resolved into the current version
of the type, and prints one JSON object per record.

    python consume.py --bootstrap HOST:PORT [--prefix P] [--schemas DIR] [--history DIR]

Decoding (see docs/events.md): a value is ``C3 01`` + the 8-byte CRC-64-AVRO fingerprint of the
writer schema + the Avro binary body. ``schemas/`` holds the current version of every type
(``NAME.vN.avsc``) and the named types they share (``NAME.avsc``); ``schemas-history/`` holds
older versions. A record written with an older version is read with Avro schema resolution
into the current one (fields added later take their defaults).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

STREAMS = ("smc.registry", "smc.policy", "smc.certs")
MAGIC = b"\xc3\x01"
VERSIONED = re.compile(r"\.v\d+\.avsc$")
ROOT = Path(__file__).resolve().parents[2]


def load_schemas(current: Path, history: Path) -> tuple[dict[bytes, Any], dict[str, Any]]:
    """``(writer schema by fingerprint, current schema by full name)``."""
    shared: dict[str, Any] = {}
    for path in sorted(current.glob("*.avsc")):
        if not VERSIONED.search(path.name):  # a shared named type, e.g. smc.events.Envelope
            parse_schema(json.loads(path.read_text()), shared)
    by_fp: dict[bytes, Any] = {}
    latest: dict[str, Any] = {}
    for path in [*sorted(current.glob("*.v*.avsc")), *sorted(history.glob("*.avsc"))]:
        # References expanded: the fingerprint is that of the self-contained schema.
        schema = parse_schema(json.loads(path.read_text()), dict(shared), expand=True)
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        by_fp[fp] = schema
        if path.parent == current:
            latest[schema["name"]] = schema
    return by_fp, latest


def plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--prefix", default="", help="topic prefix (default: none)")
    ap.add_argument("--schemas", type=Path, default=ROOT / "schemas")
    ap.add_argument("--history", type=Path, default=ROOT / "schemas-history")
    ap.add_argument("--follow", action="store_true", help="keep reading new records")
    args = ap.parse_args()
    by_fp, latest = load_schemas(args.schemas, args.history)

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": "smc-example-consumer",  # required by the client; nothing is committed
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        meta = consumer.list_topics(timeout=30)
        tps = [
            TopicPartition(args.prefix + s, p, 0)  # offset 0: from the beginning
            for s in STREAMS
            for p in sorted(meta.topics[args.prefix + s].partitions)
        ]
        consumer.assign(tps)
        end = {
            (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=30)[1]
            for tp in tps
        }
        seen = {k: 0 for k in end}
        while args.follow or any(seen[k] < end[k] for k in end):
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise SystemExit(f"kafka error: {err}")
                value: bytes = msg.value()
                where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                if value[:2] != MAGIC or value[2:10] not in by_fp:
                    raise SystemExit(f"{where}: not an SMC record or unknown schema")
                writer = by_fp[value[2:10]]
                reader = latest[writer["name"]]
                record = schemaless_reader(io.BytesIO(value[10:]), writer, reader)
                headers = {k: v.decode() for k, v in msg.headers() or []}
                row = {
                    "topic": msg.topic()[len(args.prefix) :],
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "key": (msg.key() or b"").decode(),
                    "type": writer["name"],
                    "writer_fingerprint": value[2:10][::-1].hex(),
                    "header_type": headers.get("smc.type"),
                    "event_id": record["envelope"]["event_id"],
                    "actor": record["envelope"]["actor"],
                    "record": plain(record),
                }
                print(json.dumps(row, sort_keys=True), flush=True)
                seen[(msg.topic(), msg.partition())] = msg.offset() + 1
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
