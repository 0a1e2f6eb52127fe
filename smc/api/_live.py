"""``LiveMeshChanges``: the mesh-change service bound to a running projection runner.

Role: what the HTTP API and the VM providers call inside ``smc serve``. Each change is planned
against the live projections, appended in a worker thread, and only reported once the runner
has applied every event of it, so a read right after sees the change. Changes are serialised
(one at a time) so two concurrent requests never plan against the same stale state.
Concurrency: coroutines on the asyncio loop that runs the :class:`ProjectionRunner` (planning
reads projections on that loop; the blocking append runs in ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from smc.api._changes import ChangeReport, IdSeed, MeshChanges, Plan
from smc.api._errors import ChangeNotApplied
from smc.events import Event, LogError, LogUnavailable, Position
from smc.projections import ProjectionRunner
from smc.smi import ManifestError, Resource

__all__ = ["LiveMeshChanges"]


class LiveMeshChanges:
    """Plan, append and wait until applied; one change at a time."""

    def __init__(
        self, *, changes: MeshChanges, runner: ProjectionRunner, timeout: float = 30.0
    ) -> None:
        self.changes = changes
        self.runner = runner
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._progress = asyncio.Event()
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

    async def _run(self, make_plan: Plan, dry_run: bool) -> ChangeReport:
        if dry_run:
            return ChangeReport(plan=make_plan, appended=(), target=Position())
        health = self.runner.health
        try:
            report = await asyncio.to_thread(self.changes.commit, make_plan)
        except LogUnavailable as exc:
            health.report("append", exc)
            raise
        except LogError as exc:
            health.set_fatal(str(exc))
            raise
        health.report("append", None)
        await self.wait_for(report.target)
        return report

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
        async with self._lock:
            await self.runner.caught_up.wait()
            plan = self.changes.plan_apply(
                resources,
                actor=actor,
                source=source,
                request_id=request_id,
                load_errors=load_errors,
                owner=owner,
                id_seed=id_seed,
            )
            return await self._run(plan, dry_run)

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
        async with self._lock:
            await self.runner.caught_up.wait()
            plan = self.changes.plan_delete(
                resources,
                actor=actor,
                source=source,
                request_id=request_id,
                load_errors=load_errors,
                ignore_not_found=ignore_not_found,
                id_seed=id_seed,
            )
            return await self._run(plan, dry_run)
