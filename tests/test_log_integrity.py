"""Tamper evidence, for real on both backends: sealed appends verify; an edited, deleted,
reordered, inserted or forged record is found at its position (SQLite file edited in place;
Kafka topics copied record by record, with the change, to fresh topics of a real broker)."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from eventgen import service

from smc.audit import issue_writer, load_trust, verify_log
from smc.ca import LocalIssuer
from smc.events import (
    STREAMS,
    CertificateIssued,
    EventLog,
    KafkaLog,
    Position,
    Signer,
    SqliteLog,
    WriterTrust,
    make_event,
)
from smc.events._integrity import BATCH_HEADER
from smc.events._kafka_topics import DEFAULT_TOPICS, ensure_topics
from smc.testing.kafka import KafkaBroker

TD = "example.org"

#: A partition's records as (key, value, headers) where headers hold writer and seal.
Rows = list[tuple[bytes, bytes, bytes, bytes]]


class Row(tuple):  # type: ignore[type-arg]
    """A Kafka row as read (key, value, writer, seal), remembering the record's batch size
    header (seal version 3): a copy keeps it, an edited row (a new tuple) loses it."""

    batch: bytes = b""


@pytest.fixture(scope="module")
def writers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("writers")
    ca = LocalIssuer(directory=base / "ca", trust_domain=TD)
    out = {}
    for role, name in (("operator", "alice"), ("ca", "replica-0"), ("informer", "east")):
        out[role] = base / role
        issue_writer(ca, trust_domain=TD, role=role, name=name, directory=out[role])
    # a CA the mesh does not trust
    rogue = LocalIssuer(directory=base / "rogue-ca", trust_domain=TD)
    out["rogue"] = base / "rogue"
    issue_writer(rogue, trust_domain=TD, role="ca", name="replica-0", directory=out["rogue"])
    return out


def trust(writers: dict[str, Path]) -> WriterTrust:
    return load_trust(writers["operator"] / "trust.pem")


def same_aggregate(n: int, tag: str) -> list[Any]:
    """``n`` changes of one service: one aggregate, so one partition on every backend."""
    return [service(1, event_id=f"{tag}-{i}-{uuid.uuid4()}") for i in range(n)]


# -- reading and rewriting a log's records ---------------------------------------------------
def sqlite_rows(path: Path) -> dict[tuple[str, int], Rows]:
    db = sqlite3.connect(path)
    out: dict[tuple[str, int], Rows] = {}
    for stream, key, value, writer, seal in db.execute(
        "SELECT stream, key, value, writer, seal FROM events ORDER BY stream, seq"
    ):
        out.setdefault((stream, 0), []).append((key.encode(), value, writer, seal))
    db.close()
    return out


def sqlite_rewrite(path: Path, rows: dict[tuple[str, int], Rows]) -> None:
    """Replace the file's records by ``rows`` (offsets renumbered, as an attacker would)."""
    db = sqlite3.connect(path)
    old = {r[0]: r[1:] for r in db.execute("SELECT value, type, event_id, ts FROM events")}
    db.execute("DELETE FROM events")
    for (stream, _), recs in rows.items():
        for seq, (key, value, writer, seal) in enumerate(recs):
            etype, eid, ts = old.get(value, ("smc.registry.ServiceUpserted", uuid.uuid4().hex, 0))
            db.execute(
                "INSERT INTO events (stream, seq, key, type, event_id, ts, value, writer, seal) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stream, seq, key.decode(), etype, f"{eid}-{seq}", ts, value, writer, seal),
            )
    db.commit()
    db.close()


def new_topics(broker: KafkaBroker) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    defs = copy.deepcopy(DEFAULT_TOPICS)
    defs["topics"] = [
        {**t, "name": prefix + t["name"]} for t in defs["topics"] if t["name"] in STREAMS
    ]
    ensure_topics(bootstrap=broker.bootstrap, definitions=defs, replication_factor=1)
    return prefix


def kafka_rows(log: KafkaLog) -> dict[tuple[str, int], Rows]:
    end = log.end_position()
    consumer = Consumer(
        {
            "bootstrap.servers": log.bootstrap,
            "group.id": f"copy-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    out: dict[tuple[str, int], Rows] = {}
    try:
        for (stream, p), high in end.items():
            consumer.assign([TopicPartition(log.prefix + stream, p, 0)])
            recs: Rows = []
            while len(recs) < high:
                for m in consumer.consume(500, timeout=5):
                    assert m.error() is None, m.error()
                    h = dict(m.headers() or [])
                    row = Row(
                        (m.key(), m.value(), h.get("smc.writer", b""), h.get("smc.seal", b""))
                    )
                    row.batch = h.get(BATCH_HEADER, b"")
                    recs.append(row)
            out[(stream, p)] = recs
    finally:
        consumer.close()
    return out


def kafka_copy(broker: KafkaBroker, rows: dict[tuple[str, int], Rows]) -> KafkaLog:
    """Fresh topics holding ``rows`` in the same partitions (what a rewritten topic holds)."""
    prefix = new_topics(broker)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for (stream, p), recs in rows.items():
        for row in recs:
            key, value, writer, seal = row
            headers = [("smc.writer", writer)] if writer else []
            hint = getattr(row, "batch", b"")  # a row copied as read keeps its batch size
            if hint:
                headers.append((BATCH_HEADER, hint))
            if seal:
                headers.append(("smc.seal", seal))
            producer.produce(prefix + stream, key=key, value=value, partition=p, headers=headers)
    assert producer.flush(30) == 0
    return KafkaLog(broker.bootstrap, topic_prefix=prefix)


class Backend:
    """Makes a sealed log, reads its rows and rewrites them, on SQLite or Kafka."""

    def __init__(self, kind: str, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.tmp = tmp
        self.request = request
        self.logs: list[EventLog] = []

    def log(self, signer: Signer | None = None) -> EventLog:
        if self.kind == "sqlite":
            log: EventLog = SqliteLog(self.tmp / "log.db", signer=signer)
        else:
            broker: KafkaBroker = self.request.getfixturevalue("kafka_broker")
            if not self.logs:
                self.prefix = new_topics(broker)
            log = KafkaLog(broker.bootstrap, topic_prefix=self.prefix, signer=signer)
        self.logs.append(log)
        return log

    def tampered(self, change: Callable[[Rows], Rows]) -> EventLog:
        """A log holding the records of the one partition written, changed by ``change``."""
        src = self.logs[0]
        if self.kind == "sqlite":
            assert isinstance(src, SqliteLog)
            rows = sqlite_rows(src.path)
        else:
            assert isinstance(src, KafkaLog)
            rows = kafka_rows(src)
        (tp,) = [tp for tp, recs in rows.items() if recs]
        rows[tp] = change(list(rows[tp]))
        if self.kind == "sqlite":
            assert isinstance(src, SqliteLog)
            sqlite_rewrite(src.path, rows)
            return self.log()
        log = kafka_copy(self.request.getfixturevalue("kafka_broker"), rows)
        self.logs.append(log)
        return log

    def close(self) -> None:
        for log in self.logs:
            log.close()


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    b = Backend(request.param, tmp_path, request)
    yield b
    b.close()


def three_batches(backend: Backend, writers: dict[str, Path]) -> EventLog:
    log = backend.log(Signer.from_dir(writers["operator"]))
    for tag in ("a", "b", "c"):
        log.append(same_aggregate(4, tag))  # offsets 0-3, 4-7, 8-11 of one partition
    return log


def edit(rows: Rows) -> Rows:
    key, value, w, s = rows[5]
    rows[5] = (key, value.replace(b"svc1", b"svc9"), w, s)
    return rows


def delete_one(rows: Rows) -> Rows:
    del rows[5]
    return rows


def delete_batch(rows: Rows) -> Rows:
    del rows[4:8]
    return rows


def reorder(rows: Rows) -> Rows:
    rows[5], rows[6] = rows[6], rows[5]
    return rows


def swap_batches(rows: Rows) -> Rows:
    return rows[:4] + rows[8:12] + rows[4:8]


def insert_unsigned(rows: Rows) -> Rows:
    key, value, _, _ = rows[1]
    rows.insert(4, (key, value, b"", b""))
    return rows


def insert_into_batch(rows: Rows) -> Rows:
    key, value, w, _ = rows[1]
    rows.insert(5, (key, value, w, b""))  # posing as the batch's writer
    return rows


CASES = {
    "edited": (edit, "bad-signature", 4),
    "deleted record": (delete_one, "missing-records", 4),
    "deleted batch": (delete_batch, "chain-break", 4),
    "reordered records": (reorder, "bad-signature", 4),
    "reordered batches": (swap_batches, "chain-break", 4),
    "inserted record": (insert_unsigned, "unsigned", 4),
    "inserted into a batch": (insert_into_batch, "bad-signature", 4),
}


def test_sealed_appends_verify(backend: Backend, writers: dict[str, Path]) -> None:
    log = three_batches(backend, writers)
    report = verify_log(log, trust(writers))
    assert report.ok, report.findings
    assert report.records == report.verified == 12
    (w,) = report.writers.values()
    assert w["identity"] == f"spiffe://{TD}/ns/smc-writers/sa/operator.alice"


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_found_at_its_position(
    backend: Backend, writers: dict[str, Path], case: str
) -> None:
    change, kind, offset = CASES[case]
    three_batches(backend, writers)
    report = verify_log(backend.tampered(change), trust(writers))
    assert not report.ok
    first = report.findings[0]
    assert (first.kind, first.offset) == (kind, offset), report.findings
    # the batches before the change still verify
    assert report.verified >= 4


def test_forged_writers_are_refused(backend: Backend, writers: dict[str, Path]) -> None:
    log = backend.log()
    log.append(same_aggregate(2, "ok"), signer=Signer.from_dir(writers["operator"]))
    # a writer certified by a CA the mesh does not trust
    log.append(same_aggregate(2, "rogue"), signer=Signer.from_dir(writers["rogue"]))
    # a trusted writer appending what its role may not: only the CA writes certificates
    cert = make_event(
        CertificateIssued, source="x", actor="mallory", identity=f"spiffe://{TD}/ns/a/sa/b",
        serial="01", not_before=_now(), not_after=_now() + timedelta(days=1), issuer="local",
        fingerprint="00" * 32,
    )  # fmt: skip
    log.append([cert], signer=Signer.from_dir(writers["informer"]))
    # and unsigned appends
    log.append(same_aggregate(1, "unsigned"))
    report = verify_log(log, trust(writers))
    kinds = sorted(f.kind for f in report.findings)
    assert kinds == ["not-entitled", "unknown-writer", "unsigned"], report.findings
    assert report.verified == 2


def test_rotated_writer_keys_keep_older_records_valid(
    backend: Backend, writers: dict[str, Path], tmp_path: Path
) -> None:
    ca = LocalIssuer(directory=writers["operator"].parent / "ca", trust_domain=TD)
    log = backend.log()
    log.append(same_aggregate(2, "k1"), signer=Signer.from_dir(writers["operator"]))
    issue_writer(ca, trust_domain=TD, role="operator", name="alice", directory=tmp_path / "k2")
    log.append(same_aggregate(2, "k2"), signer=Signer.from_dir(tmp_path / "k2"))
    report = verify_log(log, trust(writers))
    assert report.ok and report.verified == 4 and len(report.writers) == 2
    # revoking the first key from now on keeps what it sealed before valid
    old = Signer.from_dir(writers["operator"])
    serial = _serial(writers["operator"])
    revoked = tmp_path / "revoked.json"
    revoked.write_text(json.dumps({format(serial, "x"): _now().isoformat()}))
    time.sleep(0.01)  # seals carry milliseconds: sign clearly after the revocation
    log.append(same_aggregate(1, "after"), signer=old)
    report = verify_log(log, load_trust(writers["operator"] / "trust.pem", revoked=revoked))
    assert [f.kind for f in report.findings] == ["revoked-writer"]
    assert report.verified == 4


def test_cli_verify_names_the_first_bad_position(writers: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "log.db"

    def smc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", *args],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "SMC_WRITER": str(writers["operator"])},
        )  # fmt: skip

    manifest = tmp_path / "svc.yaml"
    manifest.write_text(
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: web, namespace: "
        "shop}\nspec:\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]\n"
        "  backing: kubernetes\n  selector: {app: web}\n"
    )
    assert smc("apply", "-f", str(manifest)).returncode == 0
    ok = smc("audit", "verify", "--trust", str(writers["operator"] / "trust.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "operator.alice" in ok.stdout
    conn = sqlite3.connect(db)
    (v,) = conn.execute("SELECT value FROM events WHERE seq = 0").fetchone()
    conn.execute("UPDATE events SET value = ? WHERE seq = 0", (v.replace(b"web", b"wex"),))
    conn.commit()
    conn.close()
    bad = smc("audit", "verify", "--trust", str(writers["operator"] / "trust.pem"))
    assert bad.returncode == 1
    assert "first bad position: smc.registry[0]@0" in bad.stdout


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _serial(d: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificates((d / "writer.crt").read_bytes())[0].serial_number


@pytest.mark.kafka
def test_kafka_read_sealed_equals_read(kafka_broker: KafkaBroker, writers: dict[str, Path]) -> None:
    """The verified rebuild's batch read gives the records ``read`` gives, seals included."""
    prefix = new_topics(kafka_broker)
    log = KafkaLog(kafka_broker.bootstrap, topic_prefix=prefix)
    try:
        log.append([service(i) for i in range(30)], signer=Signer.from_dir(writers["operator"]))
        log.append([service(99)])  # one unsealed
        end = log.end_position()
        plain, pos = [], Position()
        while not pos.covers(end):
            got = log.read(start=pos, max_records=7, timeout=1)
            plain.extend(got)
            pos = pos.advanced(got)
        other = KafkaLog(kafka_broker.bootstrap, topic_prefix=prefix)
        sealed, pos = [], Position()
        while not pos.covers(end):
            got, pos = other.read_sealed(start=pos, max_records=7, timeout=1, end=end)
            sealed.extend(got)
        other.close()
        key = lambda r: (r.stream, r.partition, r.offset)  # noqa: E731
        assert sorted(sealed, key=key) == sorted(plain, key=key)
        assert sum(1 for r in sealed if r.seal) >= 2 and any(not r.writer for r in sealed)
    finally:
        log.close()
