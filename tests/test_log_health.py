"""Health that tells the truth, with real parts: a full disk (a real size-limited tmpfs), a
SQLite file with random bytes written into it, and a real Kafka broker killed and restarted
under a running ``smc serve``."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smc.events import LogCorrupt, LogFull, Position, ServiceUpserted, make_event
from smc.events import ServicePort as EvPort
from smc.events._sqlite import SqliteLog
from smc.testing.kafka import KafkaBroker
from smc.testing.serve import ServeProcess, eventually


def _service(i: int, pad: int = 0) -> ServiceUpserted:
    return make_event(
        ServiceUpserted,
        source="test",
        actor="test",
        namespace="ns",
        name=f"s{i}",
        ports=(EvPort(name="http", port=80, target_port=8080, protocol="http"),),
        selector={"app": "x" * pad},
        backing="kubernetes",
    )


def _manifest(i: int) -> bytes:
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: s{i}, namespace: ns}}\n"
        "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: a}}\n"
    ).encode()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only): a disk that really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until about ``leave`` bytes are free."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_disk_full_append_says_so_and_recovers(small_disk: Path) -> None:
    log = SqliteLog(small_disk / "log.db")
    try:
        kept = log.append([_service(i) for i in range(20)])
        filler = _fill(small_disk, 16 * 1024)
        with pytest.raises(LogFull) as info:
            for i in range(20, 2000):
                log.append([_service(i, pad=2000)])
        message = str(info.value)
        assert "disk holding the log is full" in message and "nothing was appended" in message
        assert "cannot rollback" not in message
        # the probe that /readyz relies on fails while full, and works once space is back
        with pytest.raises(LogFull):
            log.probe(write=True)
        filler.unlink()
        log.probe(write=True)
        after = log.append([_service(5000)])
        end = log.end_position().to_json()
        assert end["smc.registry:0"] == after[0].offset + 1
        recs = log.read(start=Position(), max_records=100_000)
        assert [r.event_id for r in recs[:20]] == [a.event_id for a in kept]
    finally:
        log.close()


def test_disk_full_over_http_503_then_ready_again(small_disk: Path, tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path, xds_host=None, log_url=f"sqlite:///{small_disk / 'log.db'}")
    try:
        serve.wait_ready()
        status, body = serve.request("/v1/apply", method="POST", body=_manifest(0))
        assert status == 200, body
        filler = _fill(small_disk, 8 * 1024)
        big = b"---\n".join(_manifest(i) for i in range(1, 400))
        status, body = serve.request("/v1/apply", method="POST", body=big)
        assert status == 507, body
        reason = body["errors"][0]["reason"]
        assert "disk is full" in reason and "nothing was recorded" in reason
        status, ready = serve.request("/readyz")
        assert status == 503 and ready["status"] == "log unavailable", ready
        assert any("full" in p for p in ready["log"]["problems"]), ready
        filler.unlink()
        eventually(
            lambda: serve.request("/readyz")[0] == 200,
            what="/readyz 200 once the disk has room",
            diag=serve.tail,
        )
        status, body = serve.request("/v1/apply", method="POST", body=big)
        assert status == 200, body
        status, items = serve.request("/v1/services")
        assert len(items["items"]) == 400
    finally:
        assert serve.stop() == 0, serve.tail()


def _corrupt_middle(path: Path) -> None:
    """Random bytes over the middle data page of the events table, found with SQLite's dbstat.

    Not a fixed file offset: B-tree pages are allocated as the tables and indexes grow, and
    the event-id index (random ids) grows differently every run, so the page in the middle of
    the file is sometimes an index page only appends read; a runner would then read the whole
    log without meeting the corruption (the test waited in vain)."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = [
            row[0]
            for row in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' "
                "ORDER BY pageno"
            )
        ]
    finally:
        conn.close()
    assert len(leaves) > 10, leaves
    rnd = random.Random(7)
    with open(path, "r+b") as f:
        f.seek((leaves[len(leaves) // 2] - 1) * page_size)
        f.write(bytes(rnd.randrange(256) for _ in range(page_size)))


def test_corrupt_sqlite_stops_serve_naming_the_record(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    log = SqliteLog(db)
    for i in range(0, 3000, 100):
        log.append([_service(j, pad=50) for j in range(i, i + 100)])
    log.close()
    _corrupt_middle(db)
    serve = ServeProcess(tmp_path, xds_host=None, log_url=f"sqlite:///{db}")
    try:
        code = serve.proc.wait(timeout=60)
    finally:
        serve.stop()
    out = serve.tail()
    assert code == 1, out
    assert "error: the event log is corrupt at smc.registry[0]@" in out, out
    # one-shot commands name it too, and exit 1
    done = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", "get", "services"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "the event log is corrupt at smc.registry[0]@" in done.stderr, done.stderr


@pytest.mark.kafka
def test_kafka_broker_killed_and_restarted_readyz_follows(tmp_path: Path) -> None:
    broker = KafkaBroker(keep_data=True).start()
    serve: ServeProcess | None = None
    try:
        broker.create_topics()
        serve = ServeProcess(tmp_path, xds_host=None, log_url=f"kafka://{broker.bootstrap}")
        serve.wait_ready(timeout=90)
        status, body = serve.request("/v1/apply", method="POST", body=_manifest(1))
        assert status == 200, body
        broker.kill9()
        eventually(
            lambda: serve.request("/readyz")[0] == 503,
            what="/readyz 503 with the broker down",
            diag=serve.tail,
        )
        status, ready = serve.request("/readyz")
        assert ready["status"] == "log unavailable" and ready["log"]["problems"], ready
        status, body = serve.request("/v1/apply", method="POST", body=_manifest(2), timeout=60)
        assert status == 503, body
        broker.restart()
        eventually(
            lambda: serve.request("/readyz")[0] == 200,
            what="/readyz 200 once the broker is back",
            diag=serve.tail,
            wait=90,
        )
        status, body = serve.request("/v1/apply", method="POST", body=_manifest(3))
        assert status == 200, body
        out = serve.tail(None)
        rd = [line for line in out.splitlines() if "smc.events.kafka" in line]
        # one line per state change of a broker connection, not one per retry
        assert len(rd) <= 12, "\n".join(rd)
    finally:
        if serve is not None:
            serve.stop()
        broker.stop()


def test_unreachable_kafka_one_shot_prints_few_lines(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", "kafka://127.0.0.1:9", "get", "services"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Kafka at 127.0.0.1:9 unreachable"), done.stderr
    assert len(lines) <= 4, done.stderr


async def test_healthz_fails_naming_the_record_once_the_runner_meets_corruption(
    tmp_path: Path,
) -> None:
    """In-process: the API beside a runner whose log turns out corrupt answers /healthz 500
    with the record named (serve itself then exits 1, tested above). The probes need no
    credentials (kubelet has none), so plain HTTP suffices here."""
    import asyncio

    import aiohttp

    from smc.api import ApiContext, LiveMeshChanges, MeshChanges, create_app, start_http
    from smc.auth import Authenticator, GrantAuthorizer, Guard, LocalCredential
    from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
    from smc.testing.ports import free_port

    db = tmp_path / "log.db"
    log = SqliteLog(db)
    for i in range(0, 3000, 100):
        log.append([_service(j, pad=50) for j in range(i, i + 100)])
    log.close()
    _corrupt_middle(db)
    log = SqliteLog(db)
    registry, policy = RegistryProjection(), PolicyProjection()
    runner = ProjectionRunner(log=log, projections=[registry, policy])
    live = LiveMeshChanges(
        changes=MeshChanges(log=log, registry=registry, policy=policy), runner=runner
    )
    local = LocalCredential(tmp_path / "auth")
    local.ensure()
    guard = Guard(authenticator=Authenticator(local=local), authorizer=GrantAuthorizer(policy))
    app = create_app(
        ApiContext(live=live, runner=runner, registry=registry, policy=policy), guard=guard
    )
    port = free_port()
    site = await start_http(app, host="127.0.0.1", port=port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            with pytest.raises(LogCorrupt):
                await asyncio.wait_for(runner.run(stop=asyncio.Event()), 60)
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                body = await resp.json()
                assert resp.status == 500, body
                assert "corrupt at smc.registry[0]@" in body["reason"], body
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 503
    finally:
        await site.cleanup()
        log.close()
