"""``LiveMeshChanges``: the mesh-change service bound to a running projection runner.

Role: what the HTTP API and the VM providers call inside ``smc serve``. Each change is planned
against the live projections, appended, and only reported once the runner has applied every
event of it, so a read right after sees the change.

Group commit: requests that arrive while a write is in flight queue up; the next round takes
all of them (up to ``max_batch``), plans them one after another, each against the state the
earlier plans of the round leave (the overlay of a :class:`~smc.api._changes.CurrentResources`,
so two requests never plan against the same stale state and reference checks see each other's
changes; a plan reads only the keys it touches, whatever the size of the mesh), appends the
events of the whole round in one call (one SQLite transaction / one Kafka flush: one durable
write), waits until the runner applied them, and answers each request with its own results.
A failed append fails every request of its round (nothing of it was recorded); one request's
refused documents never affect another's.
Concurrency: coroutines on the asyncio loop that runs the :class:`ProjectionRunner` (planning
reads projections on that loop; the blocking append runs in ``asyncio.to_thread``); one round
at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from smc.api._changes import ChangeReport, CurrentResources, IdSeed, MeshChanges, Plan
from smc.api._errors import ChangeNotApplied
from smc.events import Appended, Event, LogError, Position
from smc.projections import ProjectionRunner
from smc.smi import ManifestError, Resource, resource_key

__all__ = ["LiveMeshChanges"]


@dataclass(kw_only=True)
class _Request:
    verb: str
    resources: Sequence[Resource]
    options: dict[str, Any]
    dry_run: bool
    done: asyncio.Future[ChangeReport] = field(repr=False)


class LiveMeshChanges:
    """Plan, append (grouped) and wait until applied (see the module docstring)."""

    def __init__(
        self,
        *,
        changes: MeshChanges,
        runner: ProjectionRunner,
        timeout: float = 30.0,
        max_batch: int = 512,
    ) -> None:
        self.changes = changes
        self.runner = runner
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        # appends get their own thread: a busy default pool (manifest decoding) never delays
        # the one durable write everyone waits for
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smc-append")
        #: Rounds committed and requests they carried (for metrics and the benchmark).
        self.rounds = 0
        self.grouped = 0
        runner.listeners.append(self._on_events)

    def _on_events(self, events: list[Event]) -> None:
        self._progress.set()

    async def wait_for(self, target: Position, *, timeout: float | None = None) -> None:
        """Return once the runner's position covers ``target``; raises ChangeNotApplied."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while not self.runner.position.covers(target):
            left = deadline - loop.time()
            if left <= 0:
                raise ChangeNotApplied(
                    f"events appended up to {target.to_json()} but projections are at "
                    f"{self.runner.position.to_json()} after {self.timeout:.0f}s"
                )
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=min(left, 0.05))

    async def _submit(
        self, verb: str, resources: Sequence[Resource], dry_run: bool, **options: Any
    ) -> ChangeReport:
        done: asyncio.Future[ChangeReport] = asyncio.get_running_loop().create_future()
        self._queue.append(
            _Request(verb=verb, resources=resources, options=options, dry_run=dry_run, done=done)
        )
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await asyncio.shield(done)

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            try:
                await self._round(batch)
            except asyncio.CancelledError:
                for r in batch:
                    if not r.done.done():
                        r.done.cancel()
                raise
            except BaseException as exc:
                for r in batch:
                    if not r.done.done():
                        r.done.set_exception(exc)

    def _plan(self, r: _Request, current: CurrentResources) -> Plan:
        if r.verb == "apply":
            plan = self.changes.plan_apply(r.resources, current=current, **r.options)
        else:
            plan = self.changes.plan_delete(r.resources, current=current, **r.options)
        if not r.dry_run:
            # what this plan leaves behind is the next plan's starting point
            given: dict[str, Resource] = {}
            for res in r.resources:
                given[resource_key(res)] = res  # the last document of a resource wins
            owner = r.options.get("owner")
            for d in plan.results:
                if d.status in ("created", "configured") and d.document in given:
                    current[d.document] = (given[d.document], owner)
                elif d.status == "deleted":
                    current.pop(d.document, None)
        return plan

    async def _round(self, batch: list[_Request]) -> None:
        await self.runner.caught_up.wait()
        current = CurrentResources(registry=self.changes.registry, policy=self.changes.policy)
        plans: list[tuple[_Request, Plan]] = []
        for r in batch:
            try:
                plan = self._plan(r, current)
            except Exception as exc:
                r.done.set_exception(exc)
                continue
            if r.dry_run:
                r.done.set_result(ChangeReport(plan=plan, appended=(), target=Position()))
            else:
                plans.append((r, plan))
        events = [ev for _, plan in plans for ev in plan.events]
        appended = await self._append(events, len(plans))
        self.rounds += 1
        self.grouped += len(plans)
        reports: list[tuple[_Request, ChangeReport]] = []
        at = 0
        for r, plan in plans:
            mine = appended[at : at + len(plan.events)]
            at += len(plan.events)
            reports.append((r, ChangeReport(plan=plan, appended=tuple(mine), target=_target(mine))))
        # a large change takes the runner longer to apply: its own time on top of the timeout
        await self.wait_for(_target(appended), timeout=self.timeout + len(events) / 1000)
        for r, report in reports:
            if not r.done.done():
                r.done.set_result(report)

    async def _append(self, events: list[Event], requests: int) -> list[Appended]:
        if not events:
            return []
        health = self.runner.health
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            appended = await loop.run_in_executor(self._writer, self.changes.log.append, events)
        except LogError as exc:
            health.appended(time.perf_counter() - started, requests, exc)
            raise
        health.appended(time.perf_counter() - started, requests, None)
        return appended

    async def apply(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        owner: str | None = None,
        id_seed: IdSeed | None = None,
        dry_run: bool = False,
    ) -> ChangeReport:
        """Create/update ``resources``; see :meth:`MeshChanges.plan_apply`."""
        return await self._submit(
            "apply",
            resources,
            dry_run,
            actor=actor,
            source=source,
            request_id=request_id,
            load_errors=load_errors,
            owner=owner,
            id_seed=id_seed,
        )

    async def delete(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        ignore_not_found: bool = False,
        id_seed: IdSeed | None = None,
        dry_run: bool = False,
    ) -> ChangeReport:
        """Delete ``resources``; see :meth:`MeshChanges.plan_delete`."""
        return await self._submit(
            "delete",
            resources,
            dry_run,
            actor=actor,
            source=source,
            request_id=request_id,
            load_errors=load_errors,
            ignore_not_found=ignore_not_found,
            id_seed=id_seed,
        )


def _target(appended: Sequence[Appended]) -> Position:
    offsets: dict[tuple[str, int], int] = {}
    for a in appended:
        tp = (a.stream, a.partition)
        offsets[tp] = max(offsets.get(tp, 0), a.offset + 1)
    return Position(offsets)
