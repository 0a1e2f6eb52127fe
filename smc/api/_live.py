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
write), and answers each request with its own results once the runner applied them.
Rounds are pipelined: while one round waits for the runner, the next plans and appends, on
top of the writes of the rounds still in flight (kept as an overlay until the runner's
position covers them), so the write rate is bound by planning and the durable write, not by
the log's read-back latency (which matters on Kafka).
A failed append fails every request of its round (nothing of it was recorded); one request's
refused documents never affect another's.
Concurrency: coroutines on the asyncio loop that runs the :class:`ProjectionRunner` (planning
reads projections on that loop; the blocking append runs on one dedicated writer thread); one
round plans and appends at a time, and waiters are woken by the runner's listener.
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


_Entry = tuple[Resource, str | None]


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
        #: (target, future) of every caller waiting for the runner to reach a position.
        self._waiters: list[tuple[Position, asyncio.Future[None]]] = []
        #: Writes of rounds appended but not yet applied by the runner, oldest first: the
        #: next round plans on top of them (its own append does not wait for theirs).
        self._inflight: list[tuple[Position, dict[str, _Entry | None]]] = []
        self._finishing: set[asyncio.Task[None]] = set()
        # appends get their own thread: a busy default pool (manifest decoding) never delays
        # the one durable write everyone waits for
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smc-append")
        #: Rounds committed and requests they carried (for metrics and the benchmark).
        self.rounds = 0
        self.grouped = 0
        runner.listeners.append(self._on_events)

    def _on_events(self, events: list[Event]) -> None:
        position = self.runner.position
        waiting: list[tuple[Position, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if position.covers(target):
                fut.set_result(None)
            else:
                waiting.append((target, fut))
        self._waiters = waiting

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
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((target, fut))
            # woken by the runner's listener; the re-check every half second covers a
            # position that moved without events
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout=min(left, 0.5))

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

    def _plan(
        self, r: _Request, current: CurrentResources, writes: dict[str, _Entry | None]
    ) -> Plan:
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
                    current[d.document] = writes[d.document] = (given[d.document], owner)
                elif d.status == "deleted":
                    current.pop(d.document, None)
                    writes[d.document] = None
        return plan

    def _current(self) -> CurrentResources:
        """The projections' state with the writes of rounds still in flight on top."""
        position = self.runner.position
        self._inflight = [(t, w) for t, w in self._inflight if not position.covers(t)]
        current = CurrentResources(registry=self.changes.registry, policy=self.changes.policy)
        for _, writes in self._inflight:
            for key, entry in writes.items():
                if entry is None:
                    current.pop(key, None)
                else:
                    current[key] = entry
        return current

    async def _round(self, batch: list[_Request]) -> None:
        await self.runner.caught_up.wait()
        current = self._current()
        writes: dict[str, _Entry | None] = {}
        plans: list[tuple[_Request, Plan]] = []
        for r in batch:
            try:
                plan = self._plan(r, current, writes)
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
        target = _target(appended)
        if writes:
            self._inflight.append((target, writes))
        # the next round may plan and append while this one waits for the runner
        finish = asyncio.create_task(self._finish(reports, target, len(events)))
        self._finishing.add(finish)
        finish.add_done_callback(self._finishing.discard)

    async def _finish(
        self, reports: list[tuple[_Request, ChangeReport]], target: Position, events: int
    ) -> None:
        """Answer a round's requests once the runner applied its events."""
        try:
            # a large change takes the runner longer to apply: its own time on top
            await self.wait_for(target, timeout=self.timeout + events / 1000)
        except BaseException as exc:
            for r, _ in reports:
                if not r.done.done():
                    r.done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
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
