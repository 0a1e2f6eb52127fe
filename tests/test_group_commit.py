"""Group commit in ``LiveMeshChanges``: concurrent changes share one durable write, and each is
planned against the state the earlier ones of its round leave. Real SQLite log, real runner."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from smc.api import LiveMeshChanges, MeshChanges
from smc.events import Position
from smc.events._log import Record
from smc.events._sqlite import SqliteLog
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import Resource, load_documents

GROUP = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: shop}
spec: {matches: [{name: read, pathRegex: /items, methods: [GET]}]}
"""
TARGET = """\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: shop}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [read]}]
  sources: [{kind: ServiceAccount, name: web, namespace: shop}]
"""


def _svc(name: str, port: int) -> str:
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{ports: [{{name: http, port: {port}, protocol: http}}], selector: {{app: a}}}}\n"
    )


def _res(text: str) -> list[Resource]:
    loaded = load_documents(text, source="test")
    assert not loaded.errors, loaded.errors
    return list(loaded.resources)


@contextlib.asynccontextmanager
async def _live(
    tmp_path: Path, log: SqliteLog | None = None
) -> AsyncIterator[tuple[LiveMeshChanges, SqliteLog]]:
    log = log or SqliteLog(tmp_path / "log.db")
    registry, policy = RegistryProjection(), PolicyProjection()
    runner = ProjectionRunner(log=log, projections=[registry, policy])
    live = LiveMeshChanges(
        changes=MeshChanges(log=log, registry=registry, policy=policy), runner=runner
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop=stop))
    try:
        await asyncio.wait_for(runner.caught_up.wait(), 10)
        yield live, log
    finally:
        stop.set()
        await task
        log.close()


async def test_fifty_concurrent_applies_share_few_writes(tmp_path: Path) -> None:
    async with _live(tmp_path) as (live, log):
        reports = await asyncio.gather(
            *(
                live.apply(_res(_svc(f"s{i}", 80)), actor="t", source="api", request_id=f"r{i}")
                for i in range(50)
            )
        )
        assert [r.results[0].status for r in reports] == ["created"] * 50
        assert [r.results[0].document for r in reports] == [
            f"MeshService/shop/s{i}" for i in range(50)
        ]
        # every request got its own record back, at its own offset
        offsets = sorted(a.offset for r in reports for a in r.appended)
        assert offsets == list(range(50))
        assert live.grouped == 50 and live.rounds <= 3, (live.rounds, live.grouped)
        assert len(live.runner.projections[0].services) == 50  # type: ignore[attr-defined]
        assert log.end_position().get(("smc.registry", 0)) == 50


async def test_one_round_plans_each_change_on_the_previous_ones(tmp_path: Path) -> None:
    async with _live(tmp_path) as (live, _):
        # a TrafficTarget naming a route group created by the request queued before it
        group, target = await asyncio.gather(
            live.apply(_res(GROUP), actor="t", source="api", request_id="g"),
            live.apply(_res(TARGET), actor="t", source="api", request_id="t"),
        )
        assert group.ok and target.ok, target.as_dict()
        # the same service changed by two requests of one round: created, then configured
        first, second, dry = await asyncio.gather(
            live.apply(_res(_svc("api", 80)), actor="t", source="api", request_id="a1"),
            live.apply(_res(_svc("api", 81)), actor="t", source="api", request_id="a2"),
            live.apply(
                _res(_svc("api", 82)), actor="t", source="api", request_id="a3", dry_run=True
            ),
        )
        assert [first.results[0].status, second.results[0].status] == ["created", "configured"]
        assert dry.results[0].status == "configured" and not dry.appended
        svc = next(iter(live.runner.projections[0].services.values()))  # type: ignore[attr-defined]
        assert [p.port for p in svc.ports] == [81]  # the dry run changed nothing
        # one request deletes the group and its referrer; the next, in the same round, adds a
        # new referrer of the group: planned on the state after the deletion, it is pending
        # (applied with a warning naming the missing group), not silently "complete"
        deleted, pending = await asyncio.gather(
            live.delete(_res(TARGET + "---\n" + GROUP), actor="t", source="api", request_id="d"),
            live.apply(
                _res(TARGET.replace("name: t,", "name: t2,")),
                actor="t",
                source="api",
                request_id="t2",
            ),
        )
        assert [r.status for r in deleted.results] == ["deleted", "deleted"], deleted.as_dict()
        assert pending.results[0].status == "created", pending.as_dict()
        assert "routes" in str(pending.results[0].warnings), pending.as_dict()
        assert live.runner.position.covers(deleted.target)
        assert deleted.target != Position()


class _SlowReadLog(SqliteLog):
    """A real SQLite log whose reads lag (as Kafka's read-back does): the runner applies a
    round's events well after their append returned."""

    lag = 0.0

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        recs = super().read(start=start, max_records=max_records, timeout=timeout)
        if recs:
            time.sleep(self.lag)
        return recs


async def test_rounds_pipeline_on_top_of_the_writes_still_in_flight(tmp_path: Path) -> None:
    log = _SlowReadLog(tmp_path / "log.db")
    async with _live(tmp_path, log) as (live, _):
        runner = live.runner
        registry = runner.projections[0]
        assert isinstance(registry, RegistryProjection)
        log.lag = 0.5
        first = asyncio.create_task(
            live.apply(_res(_svc("api", 80)), actor="t", source="api", request_id="p1")
        )
        while live.rounds < 1:  # appended, not yet applied by the lagging runner
            await asyncio.sleep(0.005)
        assert "api" not in {n for _, n in registry.services}
        # planned before the runner applied the first round: on top of its writes
        again, other = await asyncio.gather(
            live.apply(_res(_svc("api", 80)), actor="t", source="api", request_id="p2"),
            live.apply(_res(_svc("api", 81)), actor="t", source="api", request_id="p3"),
        )
        created = await first
        assert created.results[0].status == "created"
        assert again.results[0].status == "unchanged", again.as_dict()
        assert other.results[0].status == "configured", other.as_dict()
        # each answer came once its own events were applied; one event per real change
        assert runner.position.covers(created.target) and runner.position.covers(other.target)
        assert log.end_position().get(("smc.registry", 0)) == 2
        assert [p.port for p in registry.services[("shop", "api")].ports] == [81]
        log.lag = 0.0
