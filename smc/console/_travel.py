"""Time travel for the console: the projections as they were at a past log position.

Role: :class:`TimeMachine` rebuilds fresh projections from the log up to a position with
:func:`smc.audit.state_at` (the fold ``smc log replay --until`` and ``smc proxy config --at`` run),
through a fresh integrity verifier when the serving runner verifies (so a forged record the live
state skips is skipped in the past too), with a log handle of its own, and keeps the last few
states so moving back and forth on the timeline does not replay again.
Concurrency: :meth:`TimeMachine.state_at` blocks (it reads the log): call it in a worker thread.
One rebuild runs at a time; the cache is guarded by a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from smc.audit import state_at
from smc.events import ChainVerifier, EventLog, Position
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.projections._policyview import PolicyView

__all__ = ["PastState", "TimeMachine"]


@dataclass(frozen=True, kw_only=True)
class PastState:
    """Projections rebuilt up to ``position`` (read them, never apply to them)."""

    position: Position
    runner: ProjectionRunner
    view: PolicyView


class TimeMachine:
    """Rebuilds and caches past states (see the module docstring)."""

    def __init__(
        self,
        open_log: Callable[[], EventLog],
        *,
        verifier: Callable[[], ChainVerifier | None] = lambda: None,
        keep: int = 4,
    ) -> None:
        self._open_log = open_log
        self.verifier = verifier
        self._keep = keep
        self._cache: OrderedDict[Position, PastState] = OrderedDict()
        self._lock = threading.Lock()
        self._build = threading.Lock()

    def open_log(self) -> EventLog:
        """A log handle of the console's own (close it after use)."""
        return self._open_log()

    def state_at(self, position: Position) -> PastState:
        """The projections after every record before ``position`` (worker thread)."""
        with self._build:
            with self._lock:
                hit = self._cache.get(position)
                if hit is not None:
                    self._cache.move_to_end(position)
                    return hit
            log = self._open_log()
            try:
                runner = state_at(log, position, verifier=self.verifier())
            finally:
                log.close()
            registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
            policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
            state = PastState(
                position=position,
                runner=runner,
                view=PolicyView(registry=registry, policy=policy),
            )
            with self._lock:
                self._cache[position] = state
                while len(self._cache) > self._keep:
                    self._cache.popitem(last=False)
            return state
