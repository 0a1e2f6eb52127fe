"""`smc log tail`, `smc log replay`, `smc audit` and `smc serve` against a real SQLite log."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from eventgen import service

from smc.events import KafkaLog, MeshConfigChanged, ServiceRemoved, SqliteLog, make_event


def smc(*args: str, log: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{log}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"smc {args} failed: {proc.stderr}")
    return proc


def seed(path: Path) -> datetime:
    log = SqliteLog(path)
    log.append([service(i, actor="alice") for i in range(5)])
    time.sleep(0.05)
    mark = datetime.now(UTC)
    time.sleep(0.05)
    log.append(
        [
            make_event(ServiceRemoved, source="cli", actor="bob", namespace="ns", name="svc1"),
            make_event(
                MeshConfigChanged,
                source="cli",
                actor="carol",
                permissive=True,
                trust_domain="example.org",
                cert_lifetime_seconds=3600,
            ),
        ]
    )
    log.close()
    return mark


def test_tail_prints_events(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    seed(db)
    out = smc("log", "tail", "--from-start", "--json", log=db).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["actor"] for r in rows] == ["alice"] * 5 + ["bob", "carol"]
    assert rows[5]["type"] == "smc.registry.ServiceRemoved"
    assert rows[5]["payload"] == {"namespace": "ns", "name": "svc1"}
    last = smc("log", "tail", "-n", "1", log=db).stdout
    assert "MeshConfigChanged" in last and "ServiceUpserted" not in last


@pytest.mark.kafka
def test_tail_on_kafka_prints_every_record(kafka_log: KafkaLog) -> None:
    """On a real broker (several partitions per topic), ``--from-start`` prints every record
    and ``-n N`` the last N: a Kafka consumer's first poll returns nothing, which must not end
    the read."""
    events = [service(i, actor="alice") for i in range(40)]
    kafka_log.append(events)
    time.sleep(0.01)  # record timestamps are milliseconds: the last one is strictly later
    last_event = make_event(ServiceRemoved, source="cli", actor="bob", namespace="ns", name="x")
    kafka_log.append([last_event])
    events.append(last_event)
    base = [sys.executable, "-m", "smc.cli", "--log", kafka_log.url, "log", "tail"]
    out = subprocess.run(
        [*base, "--from-start", "--json"], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert sorted(r["event_id"] for r in rows) == sorted(e.envelope.event_id for e in events)
    last = subprocess.run(
        [*base, "-n", "1", "--json"], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert [json.loads(line)["actor"] for line in last] == ["bob"]


def test_tail_follow_sees_new_events(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    seed(db)
    proc = subprocess.Popen(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", "log", "tail", "-f",
         "--json", "-n", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")) if proc.stdout else None,
        daemon=True,
    )
    reader.start()
    try:
        # The tail starts at the end of the log once it is up: append until it shows one.
        deadline = time.monotonic() + 60
        i = 0
        while not lines and time.monotonic() < deadline:
            SqliteLog(db).append([service(100 + i, actor="dave")])
            i += 1
            time.sleep(1.0)
        assert lines, "tail -f printed nothing"
        assert json.loads(lines[0])["actor"] == "dave"
    finally:
        # SIGTERM, not SIGINT: a shell without job control starts children with SIGINT ignored.
        proc.terminate()
        proc.wait(30)


def test_replay_until_and_digests(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    mark = seed(db)
    full = json.loads(smc("log", "replay", "--json", log=db).stdout)
    assert full["events"] == 7
    assert "4 services" in full["sizes"]["registry"]
    early = json.loads(smc("log", "replay", "--json", "--until", mark.isoformat(), log=db).stdout)
    assert early["events"] == 5
    assert "5 services" in early["sizes"]["registry"]
    by_offset = json.loads(smc("log", "replay", "--json", "--until", "3", log=db).stdout)
    assert by_offset["events"] == 4  # registry offsets 0..2 and the policy record at 0
    human = smc("log", "replay", log=db).stdout
    assert full["digests"]["registry"] in human


def test_audit_between_two_times(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    mark = seed(db)
    data = json.loads(smc("audit", "--from", mark.isoformat(), "--json", log=db).stdout)
    assert [e["actor"] for e in data["events"]] == ["bob", "carol"]
    assert data["diff"]["registry"]["services"]["removed"] == ["ns/svc1"]
    assert data["diff"]["policy"]["mesh"]["changed"] == [
        "cert_lifetime_seconds", "permissive", "trust_domain"
    ]
    only = json.loads(smc("audit", "--actor", "alice", "--json", log=db).stdout)
    assert len(only["events"]) == 5
    table = smc("audit", "--to", mark.isoformat(), log=db).stdout
    assert "5 changes" in table and "+ ns/svc0" in table


def test_corrupt_record_fails_with_its_position(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    seed(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE events SET value = substr(value, 1, 20) WHERE stream = 'smc.registry' AND seq = 3")
    con.commit()
    con.close()
    proc = smc("log", "replay", "--full", log=db, check=False)
    assert proc.returncode == 1
    assert "smc.registry[0]@3" in proc.stderr and "Traceback" not in proc.stderr
    proc = smc("log", "tail", "--from-start", log=db, check=False)
    assert proc.returncode == 1 and "smc.registry[0]@3" in proc.stderr


def test_bad_log_url_and_unreachable_kafka(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", "nope://x", "log", "replay"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "unknown scheme" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", "kafka://127.0.0.1:1", "log", "replay"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_catches_up_and_checkpoints(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    seed(db)
    cp = tmp_path / "cp.json"
    args = [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", "serve", "--http", "off",
            "--xds", "off", "--checkpoint", str(cp)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline() if proc.stderr else ""
        deadline = time.monotonic() + 60
        while "caught up" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
        assert "caught up: 7 events" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    saved = json.loads(cp.read_text())
    assert saved["applied"] == 7
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline() if proc.stderr else ""
        assert "restored checkpoint" in first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
