"""Projections: deterministic replay, checkpoints, interleavings, duplicates, bad records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from eventgen import any_event, service
from hypothesis import given, settings
from hypothesis import strategies as st

from smc.events import (
    DecodeError,
    Event,
    Record,
    SqliteLog,
    VmGroupStatusChanged,
    VmInstanceChanged,
    default_codec,
    make_event,
)
from smc.projections import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    ProjectionError,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)


class _ListLog:
    """The smallest EventLog reader: records given in a fixed order (an interleaving)."""

    dedupes_on_append = False
    url = "list://"


def records_for(events: list[Event], *, partitions: int = 3) -> list[Record]:
    """Encode events into records partitioned by aggregate, as Kafka would."""
    codec = default_codec()
    next_off: dict[tuple[str, int], int] = {}
    out = []
    for ev in events:
        part = sum(ev.aggregate.encode()) % partitions
        tp = (type(ev).STREAM, part)
        off = next_off.get(tp, 0)
        next_off[tp] = off + 1
        out.append(
            Record(
                stream=tp[0],
                partition=part,
                offset=off,
                timestamp_ms=0,
                key=ev.aggregate,
                value=codec.encode(ev),
            )
        )
    return out


def runner() -> ProjectionRunner:
    return ProjectionRunner(log=_ListLog(), projections=all_projections())  # type: ignore[arg-type]


def digests_of(recs: list[Record]) -> dict[str, str]:
    r = runner()
    r.apply_records(recs)
    return r.digests()


def interleave(recs: list[Record], rnd: random.Random) -> list[Record]:
    """A random merge of the partitions that keeps each partition's order."""
    queues: dict[tuple[str, int], list[Record]] = {}
    for r in recs:
        queues.setdefault((r.stream, r.partition), []).append(r)
    out = []
    keys = list(queues)
    while keys:
        k = rnd.choice(keys)
        out.append(queues[k].pop(0))
        if not queues[k]:
            keys.remove(k)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(any_event, max_size=40), st.randoms(use_true_random=False))
def test_same_digest_under_any_interleaving(events: list[Event], rnd: random.Random) -> None:
    recs = records_for(events)
    assert digests_of(interleave(recs, rnd)) == digests_of(recs)


@settings(max_examples=100, deadline=None)
@given(st.lists(any_event, max_size=40), st.data())
def test_same_digest_from_any_checkpoint(events: list[Event], data: st.DataObject) -> None:
    recs = records_for(events)
    cut = data.draw(st.integers(min_value=0, max_value=len(recs)))
    full = digests_of(recs)
    first = runner()
    first.apply_records(recs[:cut])
    saved = json.loads(json.dumps(first.checkpoint().to_json()))
    second = runner()
    second.restore(Checkpoint.from_json(saved))
    assert second.position == first.position
    second.apply_records(recs[cut:])
    assert second.digests() == full


def test_vm_group_removal_and_instance_join_in_either_order() -> None:
    """An instance event and its group's removal are different aggregates (different
    partitions): read in either order, or with a checkpoint between them, the registry is the
    same (found by the interleaving property above: the group showed "ok" when the removal was
    read first)."""
    joined = make_event(
        VmInstanceChanged, source="api", actor="alice", namespace="ns1", group="b",
        instance_id="i-1", workload="a", phase="joined", cause="scale-out", provider="aws",
        address="10.0.0.1", state="running",
    )  # fmt: skip
    removed = make_event(
        VmGroupStatusChanged, source="api", actor="alice", namespace="ns1", group="b",
        status="removed", reason="deleted",
    )  # fmt: skip
    recs = records_for([joined, removed])
    assert recs[0].partition != recs[1].partition
    forward, backward = digests_of(recs), digests_of(recs[::-1])
    assert forward == backward
    first = runner()
    first.apply_records(recs[1:])  # the removal alone, then a checkpoint
    second = runner()
    second.restore(Checkpoint.from_json(json.loads(json.dumps(first.checkpoint().to_json()))))
    second.apply_records(recs[:1])
    assert second.digests() == forward
    registry = next(p for p in second.projections if isinstance(p, RegistryProjection))
    group = registry.vm_groups.groups[("ns1", "b")]
    assert (group.status, group.reason, list(group.instances)) == ("removed", "deleted", ["i-1"])


@settings(max_examples=100, deadline=None)
@given(st.lists(any_event, min_size=1, max_size=30), st.data())
def test_replaying_duplicates_changes_nothing(events: list[Event], data: st.DataObject) -> None:
    recs = records_for(events)
    dups = data.draw(st.lists(st.sampled_from(events), min_size=1, max_size=10))
    r = runner()
    r.apply_records(recs)
    before = r.digests()
    r.apply_records(records_for(events + dups)[len(events) :])
    assert r.digests() == before
    assert r.duplicates == len(dups)


def test_corrupt_record_stops_at_its_offset_with_nothing_half_applied() -> None:
    events = [service(i) for i in range(6)]
    recs = records_for(events, partitions=1)
    bad = Record(
        stream=recs[3].stream,
        partition=0,
        offset=3,
        timestamp_ms=0,
        key="k",
        value=recs[3].value[:-4],
    )
    r = runner()
    with pytest.raises(DecodeError, match=r"smc.registry\[0\]@3"):
        r.apply_records([*recs[:3], bad, *recs[4:]])
    assert r.applied == 3
    assert r.position.get(("smc.registry", 0)) == 3
    reg = r.projections[0]
    assert isinstance(reg, RegistryProjection)
    assert sorted(n for _, n in reg.services) == ["svc0", "svc1", "svc2"]


def test_failing_projection_leaves_state_and_position() -> None:
    class Exploding(RegistryProjection):
        name = "registry"

        def apply(self, event: Event) -> None:
            if getattr(event, "name", "") == "svc2":
                raise ValueError("boom")
            super().apply(event)

    r = ProjectionRunner(log=_ListLog(), projections=[Exploding()])  # type: ignore[arg-type]
    recs = records_for([service(i) for i in range(4)], partitions=1)
    with pytest.raises(ProjectionError, match=r"@2.*boom"):
        r.apply_records(recs)
    assert r.position.get(("smc.registry", 0)) == 2


def test_checkpoint_store_round_trip_and_rebuild_from_log(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db")
    log.append([service(i) for i in range(50)])
    r1 = ProjectionRunner(log=log, projections=all_projections())
    r1.catch_up()
    store = CheckpointStore(tmp_path / "cp.json")
    store.save(r1.checkpoint())
    log.append([service(i, actor="later") for i in range(50, 60)])
    r1.catch_up()
    r2 = ProjectionRunner(log=log, projections=all_projections())
    cp = store.load()
    assert cp is not None
    r2.restore(cp)
    r2.catch_up()
    r3 = ProjectionRunner(log=log, projections=all_projections())
    r3.catch_up()
    assert r1.digests() == r2.digests() == r3.digests()
    assert r2.applied == r3.applied == 60


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    r = runner()
    r.apply_records(records_for([service(1)]))
    data = r.checkpoint().to_json()
    data["states"]["registry"]["service_accounts"] = ["x/y"]
    with pytest.raises(CheckpointError, match="digest"):
        runner().restore(Checkpoint.from_json(data))
    with pytest.raises(CheckpointError, match="malformed"):
        Checkpoint.from_json({"format": 1})
    (tmp_path / "cp.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path / "cp.json").load()
