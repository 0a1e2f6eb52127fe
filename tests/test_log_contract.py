"""One contract every EventLog backend passes (SQLite file and a real Kafka broker)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from eventgen import any_event, service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smc.events import (
    Event,
    EventLog,
    MeshConfigChanged,
    Position,
    Record,
    default_codec,
    deterministic_id,
    make_event,
)
from smc.projections import ProjectionRunner, all_projections


def read_all(log: EventLog, start: Position | None = None) -> list[Record]:
    pos = start or Position()
    end = log.end_position()
    out: list[Record] = []
    deadline = time.monotonic() + 30
    while not pos.covers(end) and time.monotonic() < deadline:
        recs = log.read(start=pos, max_records=500, timeout=0.5)
        out.extend(recs)
        pos = pos.advanced(recs)
    return out


def test_append_then_read_in_order(any_log: EventLog) -> None:
    events = [service(i % 5, actor=f"user{i}") for i in range(40)]
    acks = any_log.append(events)
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    assert not any(a.duplicate for a in acks)
    recs = read_all(any_log)
    assert len(recs) == 40
    codec = default_codec()
    decoded = [codec.decode(r.value) for r in recs]
    assert sorted(e.event_id for e in decoded) == sorted(e.event_id for e in events)
    # one aggregate's events keep their append order, offsets are contiguous per partition
    by_agg: dict[str, list[str]] = defaultdict(list)
    for e in decoded:
        by_agg[e.aggregate].append(e.event_id)
    for agg, ids in by_agg.items():
        assert ids == [e.event_id for e in events if e.aggregate == agg]
    by_part: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in recs:
        by_part[(r.stream, r.partition)].append(r.offset)
        assert r.key == codec.decode(r.value).aggregate
    for offs in by_part.values():
        assert offs == list(range(offs[0], offs[0] + len(offs)))
    assert any_log.end_position() == Position().advanced(recs)


def test_streams_are_separate(any_log: EventLog) -> None:
    any_log.append([service(1)])
    any_log.append(
        [
            make_event(
                MeshConfigChanged,
                source="cli",
                actor="ops",
                permissive=True,
                trust_domain="example.org",
                cert_lifetime_seconds=3600,
            )
        ]
    )
    streams = {r.stream for r in read_all(any_log)}
    assert streams == {"smc.registry", "smc.policy"}


def test_read_from_a_position(any_log: EventLog) -> None:
    any_log.append([service(i) for i in range(10)])
    first = read_all(any_log)
    mid = Position().advanced(first[:4])
    rest = read_all(any_log, mid)
    got = {(r.stream, r.partition, r.offset) for r in rest}
    expected = {
        (r.stream, r.partition, r.offset)
        for r in first
        if r.offset >= mid.get((r.stream, r.partition))
    }
    assert got == expected


def test_duplicate_appends_are_applied_once(any_log: EventLog) -> None:
    eid = deterministic_id("api", "request-1", "svc1")
    ev = service(1, event_id=eid)
    any_log.append([ev])
    again = any_log.append([ev, service(2)])
    if any_log.dedupes_on_append:
        assert again[0].duplicate
    any_log.append([ev])
    runner = ProjectionRunner(log=any_log, projections=all_projections())
    runner.catch_up()
    assert runner.applied == 2
    reg = runner.projections[0]
    assert sorted(reg.services) == [("ns", "svc1"), ("ns", "svc2")]  # type: ignore[attr-defined]


def test_position_at_time(any_log: EventLog) -> None:
    any_log.append([service(i) for i in range(3)])
    time.sleep(0.05)
    mark = datetime.now(UTC)
    time.sleep(0.05)
    late = [service(i, actor="late") for i in range(3, 6)]
    any_log.append(late)
    recs = read_all(any_log, any_log.position_at(mark))
    assert sorted(default_codec().decode(r.value).event_id for r in recs) == sorted(
        e.event_id for e in late
    )


def test_tail_wakes_on_append(log_factory: Callable[[], EventLog]) -> None:
    reader = log_factory()
    writer = log_factory()
    writer.append([service(0)])
    pos = Position().advanced(read_all(reader))
    got: list[Record] = []

    def tail() -> None:
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got.extend(reader.read(start=pos, max_records=10, timeout=1.0))

    t = threading.Thread(target=tail)
    t.start()
    time.sleep(0.3)
    writer.append([service(1)])
    t.join(25)
    assert [default_codec().decode(r.value).name for r in got] == ["svc1"]  # type: ignore[attr-defined]


def test_tail_read_returns_as_soon_as_a_record_arrives(
    log_factory: Callable[[], EventLog],
) -> None:
    """A read with a long timeout and a large batch returns when the first record arrives,
    not when the batch is full or the timeout ran out (no fixed read window on the tail)."""
    reader = log_factory()
    writer = log_factory()
    writer.append([service(0)])
    pos = Position().advanced(read_all(reader))
    got: list[Record] = []
    returned: list[float] = []
    reading = threading.Event()

    def tail() -> None:
        reading.set()
        got.extend(reader.read(start=pos, max_records=5000, timeout=15.0))
        returned.append(time.monotonic())

    t = threading.Thread(target=tail)
    t.start()
    assert reading.wait(10)
    time.sleep(0.2)  # let the reader block in its read
    writer.append([service(1)])
    appended = time.monotonic()
    t.join(20)
    assert [default_codec().decode(r.value).name for r in got] == ["svc1"]  # type: ignore[attr-defined]
    assert returned[0] - appended < 3.0, f"read returned {returned[0] - appended:.2f}s after append"


def test_log_survives_reopen(log_factory: Callable[[], EventLog]) -> None:
    first = log_factory()
    first.append([service(i) for i in range(5)])
    first.close()
    second = log_factory()
    assert len(read_all(second)) == 5


def test_unreachable_log_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smc.events import LogError, LogUnavailable, open_log
    from smc.events._kafka import KafkaLog

    with pytest.raises(LogError, match="unknown scheme"):
        open_log("mysql://x")
    log = KafkaLog("127.0.0.1:1", timeout=1.0)
    with pytest.raises(LogUnavailable, match=r"127\.0\.0\.1:1"):
        log.end_position()
    with pytest.raises(LogUnavailable):
        log.append([service(1)])
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(LogUnavailable):
        open_log(f"sqlite:///{d}")


@settings(
    max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(any_event, min_size=150, max_size=150))
def test_compacted_rebuild_equals_full_fold(any_log: EventLog, events: list[Event]) -> None:
    """Skipping superseded records gives the digest of applying every record, on each backend."""
    import random

    rnd = random.Random(7)
    events += [rnd.choice(events) for _ in range(20)]  # retried appends (same event ids)
    for i in range(0, len(events), 17):
        any_log.append(events[i : i + 17])
    full = ProjectionRunner(log=any_log, projections=all_projections())
    full.catch_up(compact=False)
    compacted = ProjectionRunner(log=any_log, projections=all_projections())
    compacted.catch_up(compact=True)
    assert compacted.digests() == full.digests()
    assert compacted.applied == full.applied
    assert compacted.position == full.position == any_log.end_position()
    # and tailing on from there keeps them equal
    more = [service(i, actor="tail") for i in range(5)]
    any_log.append(more)
    full.catch_up()
    compacted.catch_up()
    assert compacted.digests() == full.digests()


def test_rebuild_refuses_an_unknown_schema_on_the_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from smc.events import SqliteLog, UnknownSchema

    log = SqliteLog(tmp_path / "log.db")
    log.append([service(i) for i in range(5)])
    db = sqlite3.connect(tmp_path / "log.db")
    db.execute("UPDATE events SET value = X'C301FFFFFFFFFFFFFFFF00' WHERE seq = 2")
    db.commit()
    for compact in (True, False):
        r = ProjectionRunner(log=log, projections=all_projections())
        with pytest.raises(UnknownSchema, match=r"smc.registry\[0\]@2"):
            r.catch_up(compact=compact)


@pytest.mark.kafka
def test_kafka_batch_scan_and_per_record_scan_leave_the_same_state(
    kafka_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's whole-batch pass over Kafka messages (taken when a batch is all
    state-replacing records with short ids, of one length or several, and no duplicate) and
    its per-record loop (every other batch) end in the same state; batches with a duplicate
    inside, a duplicate of an earlier batch, or a long id (its length a two-byte varint)
    fall back to the loop."""
    import uuid

    def svc(i: int, name: int, *, eid: str | None = None) -> Event:
        return service(name, actor=f"a{i}", event_id=eid or str(uuid.UUID(int=i)))

    events = [svc(i, i % 7) for i in range(40)]  # clean, uuid-shaped ids
    events += [events[3], svc(41, 2)]  # a duplicate of an earlier record
    events += [svc(42, 1), svc(43, 5, eid="short-id")]  # ids of two lengths
    events += [svc(46, 6, eid="long-" + "x" * 70)]  # an id of 75 bytes: a long id
    dup = svc(44, 4)
    events += [dup, dup]  # a duplicate inside one batch
    events += [svc(i, i % 5) for i in range(45, 70)]
    for i in range(0, len(events), 9):
        kafka_log.append(events[i : i + 9])

    taken = []
    real = ProjectionRunner._scan_batch

    def counting(self: ProjectionRunner, *args: object) -> bool:
        done = real(self, *args)  # type: ignore[arg-type]
        taken.append(done)
        return done

    def runner(*, batch_pass: bool) -> ProjectionRunner:
        if batch_pass:
            monkeypatch.setattr(ProjectionRunner, "_scan_batch", counting)
        else:
            monkeypatch.setattr(ProjectionRunner, "_scan_batch", lambda *a: False)
        r = ProjectionRunner(log=kafka_log, projections=all_projections(), batch=5)
        r.catch_up()
        return r

    loop, batched = runner(batch_pass=False), runner(batch_pass=True)
    full = ProjectionRunner(log=kafka_log, projections=all_projections())
    full.catch_up(compact=False)
    assert True in taken and False in taken  # both paths ran
    for r in (batched, full):
        assert r.digests() == loop.digests()
        assert (r.applied, r.duplicates, r.position) == (
            loop.applied,
            loop.duplicates,
            loop.position,
        )
    assert batched._seen == loop._seen
    assert loop.duplicates == 2


def test_sqlite_read_racing_a_multi_stream_append_skips_no_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A SQLite read looks up where each stream continues, then reads from the lowest row.
    An append committing between those lookups (a registry + policy change in one
    transaction, like one apply) must not be half seen: seeing it for the policy stream but
    not for the registry stream skipped the registry's first record for good (a service
    missing from the registry, the client's route empty, HTTP 404 in test_agent_renewal)."""
    from typing import Any

    from smc.events import SmiResourceApplied
    from smc.events._sqlite import SqliteLog

    db = tmp_path / "log.db"
    reader, writer = SqliteLog(db), SqliteLog(db)
    policy = make_event(
        SmiResourceApplied,
        source="t",
        actor="t",
        kind="HTTPRouteGroup",
        api_version="specs.smi-spec.io/v1alpha4",
        namespace="ns",
        name="routes",
        manifest_json="{}",
    )
    change = [service(1), policy, service(2)]  # registry, policy, registry: one transaction
    conn = reader._reader()

    class RacingConnection:
        """The reader's connection; the append commits right after its first query."""

        def __init__(self) -> None:
            self.statements = 0

        def execute(self, sql: str, params: Any = ()) -> Any:
            cursor = conn.execute(sql, params)
            if sql.lstrip().upper().startswith("SELECT"):
                self.statements += 1
                if self.statements == 1:
                    writer.append(change)
            return cursor

    racing = RacingConnection()
    reader._reader = lambda: racing  # type: ignore[assignment,method-assign,return-value]
    try:
        got: list[Record] = []
        pos = Position()
        for _ in range(5):
            recs = reader.read(start=pos, max_records=100)
            got.extend(recs)
            pos = pos.advanced(recs)
        assert racing.statements >= 1
        assert sorted((r.stream, r.offset) for r in got) == [
            ("smc.policy", 0),
            ("smc.registry", 0),
            ("smc.registry", 1),
        ], got
    finally:
        reader.close()
        writer.close()


def test_batch_scan_reads_each_event_id_by_its_own_length() -> None:
    """The whole-batch pass slices every record's event id by that record's length byte
    (as the per-record loop does), for ids of one length or several; a long id (varint
    length) is left to the loop."""
    import uuid

    from smc.events import default_codec
    from smc.projections._runner_scan import _ID_LENGTH, _event_ids

    codec = default_codec()
    ids = ["a", "bench-7", "bench-12345", str(uuid.uuid4()), "x" * 63]
    values = [codec.encode(service(i, event_id=eid)) for i, eid in enumerate(ids)]
    for some in (values, values[1:2] * 3, values[2:]):
        got = _event_ids(some, set(map(_ID_LENGTH, some)))
        assert got is not None
        assert [i.decode() for i in got] == [codec.decode(v).envelope.event_id for v in some]
    long = codec.encode(service(9, event_id="y" * 64))
    assert _event_ids([*values, long], set(map(_ID_LENGTH, [*values, long]))) is None


def test_all_new_registers_a_batch_only_when_every_id_is_new() -> None:
    """The whole-batch de-duplication adds a batch's id hashes only when none was seen and
    no two are alike; otherwise the seen ids are left exactly as they were, in the same
    order (the per-record loop then decides each record), whichever way the batch is not
    new."""
    from smc.projections._runner_scan import _all_new

    seen = dict.fromkeys([1, 2, 3])
    assert not _all_new(seen, iter([4, 2, 5]), 3)  # one seen before
    assert list(seen) == [1, 2, 3]
    assert not _all_new(seen, iter([4, 5, 4]), 3)  # two alike inside the batch
    assert list(seen) == [1, 2, 3]
    assert not _all_new(seen, iter([6, 6, 1]), 3)  # both at once
    assert list(seen) == [1, 2, 3]
    assert _all_new(seen, iter([4, 5, 6]), 3)
    assert list(seen) == [1, 2, 3, 4, 5, 6]
    assert _all_new(seen, iter([]), 0) and list(seen) == [1, 2, 3, 4, 5, 6]
