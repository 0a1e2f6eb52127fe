"""Projections enforce the log's integrity: records from unknown writers, with broken seals
or of types their writer may not append never change state; they are skipped, counted and
reported with their position, alike on every replica, from zero or from a checkpoint
(which records the chain heads it covers and is refused when the log does not prove them)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from eventgen import service

from smc.audit import issue_writer, load_trust
from smc.ca import LocalIssuer
from smc.events import (
    CertificateIssued,
    ChainVerifier,
    EventLog,
    MeshConfigChanged,
    Signer,
    SqliteLog,
    make_event,
)
from smc.projections import (
    CheckpointError,
    CheckpointStore,
    ProjectionRunner,
    all_projections,
)

TD = "example.org"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("creds")
    ca = LocalIssuer(directory=base / "ca", trust_domain=TD)
    out = {}
    for role in ("operator", "ca", "informer"):
        out[role] = base / role
        issue_writer(ca, trust_domain=TD, role=role, name="one", directory=out[role])
    rogue = LocalIssuer(directory=base / "rogue-ca", trust_domain=TD)
    out["rogue"] = base / "rogue"
    issue_writer(rogue, trust_domain=TD, role="operator", name="one", directory=out["rogue"])
    return out


def verifier(creds: dict[str, Path]) -> ChainVerifier:
    return ChainVerifier(trust=load_trust(creds["operator"] / "trust.pem"))


def cert_event() -> Any:
    now = datetime.now(UTC)
    return make_event(
        CertificateIssued, source="x", actor="mallory", identity=f"spiffe://{TD}/ns/a/sa/b",
        serial="01", not_before=now, not_after=now + timedelta(days=1), issuer="local",
        fingerprint="00" * 32,
    )  # fmt: skip


def permissive() -> Any:
    return make_event(
        MeshConfigChanged, source="k8s", actor="mallory", permissive=True,
        trust_domain=TD, cert_lifetime_seconds=3600,
    )  # fmt: skip


def mixed_log(log: EventLog, creds: dict[str, Path]) -> list[Any]:
    """Appends legit and illegitimate events; returns the legit ones."""
    op = Signer.from_dir(creds["operator"])
    legit = [service(i, event_id=str(uuid.uuid4())) for i in range(6)]
    log.append(legit[:3], signer=op)
    log.append([service(50), service(51)], signer=Signer.from_dir(creds["rogue"]))
    log.append([cert_event()], signer=Signer.from_dir(creds["informer"]))  # not the CA
    log.append([permissive()], signer=Signer.from_dir(creds["informer"]))  # policy: no
    log.append([service(60)])  # unsigned
    log.append(legit[3:], signer=op)
    return legit


def rebuild(log: EventLog, creds: dict[str, Path] | None, **kw: Any) -> ProjectionRunner:
    r = ProjectionRunner(
        log=log, projections=all_projections(), verifier=verifier(creds) if creds else None
    )
    r.catch_up(**kw)
    return r


def test_refused_records_never_change_state(
    any_log: EventLog, creds: dict[str, Path], tmp_path: Path
) -> None:
    legit = mixed_log(any_log, creds)
    clean = SqliteLog(tmp_path / "clean.db")
    clean.append(legit)
    expected = rebuild(clean, None).digests()
    compact = rebuild(any_log, creds)
    full = rebuild(any_log, creds, compact=False)
    assert compact.digests() == full.digests() == expected
    assert full.verifier is not None and compact.verifier is not None
    for r in (compact, full):
        assert r.verifier is not None
        # The unsigned record: reported once a later batch of its partition proves no seal
        # covers it (partition chains), else held, never applied, until the range ends.
        r.verifier.finish()
        assert r.skipped == 5
    kinds = sorted(f.kind for f in full.verifier.findings)
    assert kinds == ["not-entitled", "not-entitled", "unknown-writer", "unsigned"]
    # the same records are refused whatever the interleaving of partitions
    assert sorted(f.where for f in full.verifier.findings) == sorted(
        f.where for f in compact.verifier.findings
    )
    # without verification the forged records would have been applied
    assert rebuild(any_log, None).digests() != expected


def test_edited_record_is_skipped_with_its_batch(creds: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    log = SqliteLog(db, signer=Signer.from_dir(creds["operator"]))
    log.append([service(1)])
    log.append([service(2), service(3)])
    conn = sqlite3.connect(db)
    (v,) = conn.execute("SELECT value FROM events WHERE seq = 1").fetchone()
    conn.execute("UPDATE events SET value = ? WHERE seq = 1", (v.replace(b"svc2", b"svc9"),))
    conn.commit()
    r = rebuild(log, creds)
    reg = r.projections[0]
    assert sorted(reg.services) == [("ns", "svc1")]  # type: ignore[attr-defined]
    assert r.verifier is not None
    assert [(f.where, f.kind) for f in r.verifier.findings] == [
        ("smc.registry[0]@1", "bad-signature")
    ]


def test_checkpoint_records_heads_and_refuses_stale_or_edited(
    creds: dict[str, Path], tmp_path: Path
) -> None:
    log = SqliteLog(tmp_path / "log.db", signer=Signer.from_dir(creds["operator"]))
    log.append([service(i) for i in range(3)])
    log.append([service(i) for i in range(3, 5)])
    r = rebuild(log, creds)
    store = CheckpointStore(tmp_path / "cp.json")
    store.save(r.checkpoint())
    data = json.loads(store.path.read_text())
    assert data["integrity"]["heads"]["smc.registry:0"].endswith("@4")
    log.append([service(9)])
    # a good checkpoint restores and the tail verifies on
    r2 = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier(creds))
    r2.restore(store.load())  # type: ignore[arg-type]
    r2.catch_up()
    assert r2.digests() == rebuild(log, creds).digests()
    # an edited head is refused
    _head, _, at = data["integrity"]["heads"]["smc.registry:0"].partition("@")
    bad = json.loads(json.dumps(data))
    bad["integrity"]["heads"]["smc.registry:0"] = ("0" * 64) + "@" + at
    r3 = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier(creds))
    with pytest.raises(CheckpointError, match="not the one sealed"):
        r3.restore(type(store.load()).from_json(bad))  # type: ignore[union-attr]
    # a checkpoint claiming a later position than the state it holds is refused
    late = json.loads(json.dumps(data))
    late["position"] = {"smc.registry:0": 6}
    with pytest.raises(CheckpointError, match="does not cover"):
        r3.restore(type(store.load()).from_json(late))  # type: ignore[union-attr]
    # a checkpoint of another log (same writer, other records) is refused
    other = SqliteLog(tmp_path / "other.db", signer=Signer.from_dir(creds["operator"]))
    other.append([service(i) for i in range(5)])
    r4 = ProjectionRunner(log=other, projections=all_projections(), verifier=verifier(creds))
    with pytest.raises(CheckpointError):
        r4.restore(store.load())  # type: ignore[arg-type]


def test_replay_cli_reports_skipped_records(creds: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    mixed_log(SqliteLog(db), creds)
    out = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", "log", "replay", "--json",
         "--trust", str(creds["operator"] / "trust.pem")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["events"] == 6 and data["skipped"] == 5
    assert [f["kind"] for f in data["findings"]] == [
        "unknown-writer",
        "not-entitled",
        "not-entitled",
        "unsigned",
    ]


@pytest.mark.kafka
def test_kafka_checkpoint_heads_are_proved(kafka_log: Any, creds: dict[str, Path]) -> None:
    """On Kafka (writer-session chains) too: a checkpoint's heads are proved against the seals
    on the broker, and an edited head is refused."""
    op = Signer.from_dir(creds["operator"])
    kafka_log.append([service(i) for i in range(12)], signer=op)
    r = rebuild(kafka_log, creds)
    cp = r.checkpoint()
    assert cp.integrity is not None and cp.integrity["wheads"]
    kafka_log.append([service(i) for i in range(12, 20)], signer=op)
    r2 = ProjectionRunner(log=kafka_log, projections=all_projections(), verifier=verifier(creds))
    r2.restore(cp)
    r2.catch_up()
    assert r2.digests() == rebuild(kafka_log, creds).digests()
    bad = json.loads(json.dumps(cp.to_json()))
    key = next(iter(bad["integrity"]["wheads"]))
    _, _, at = bad["integrity"]["wheads"][key].partition("@")
    bad["integrity"]["wheads"][key] = "11" * 32 + "@" + at
    r3 = ProjectionRunner(log=kafka_log, projections=all_projections(), verifier=verifier(creds))
    with pytest.raises(CheckpointError, match="not the one sealed"):
        r3.restore(type(cp).from_json(bad))
