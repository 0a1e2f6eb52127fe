"""The state, appends and metrics every part of :class:`~smc.informers.VmGroupController` shares.

Role: :class:`_VmGroupBase` holds the controller's inputs (live mesh changes, providers, the
drain waiter, the readiness check, join tokens), what it knows of each group's instances, its
Prometheus series, and the plumbing the joins (:mod:`smc.informers._vmgroup_join`) and drains
(:mod:`smc.informers._vmgroup_drain`) use: the group list on the log, status records, appends
that wait until applied, gauges. Also the public types of the controller's interface.
Concurrency: coroutines on the serve loop (the projections are read there); appends run in a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from smc.api import LiveMeshChanges
from smc.api._changes import Plan
from smc.events import (
    Event,
    EventLog,
    Position,
    SmiResourceApplied,
    SmiResourceDeleted,
    VmGroupStatusChanged,
    deterministic_id,
    make_event,
)
from smc.informers._cloud import (
    CloudInstance,
    CloudProvider,
)
from smc.smi import ManifestErrors, VirtualMachineGroup, parse_manifest

log = logging.getLogger("smc.informers.vmgroup")


#: ``await drain_waiter(event_id, timeout)``: returns once every proxy ACKed the config that
#: carries ``event_id`` (raises TimeoutError after ``timeout``).
DrainWaiter = Callable[[str, float], Awaitable[Any]]

_UNSAFE = re.compile(r"[^a-z0-9.-]+")
#: Phases of an instance that is in the mesh (``joined``: warming up or serving at once).
_IN_MESH = ("joined", "serving")
#: ``ready_check(node_id)``: whether that proxy has ACKed its config (listeners) here.
ReadyCheck = Callable[[str], bool]


class JoinTokens(Protocol):
    """Makes a group's join tokens (:class:`smc.identity.GroupJoinTokens`)."""

    def make(self, group: VirtualMachineGroup, *, trust_domain: str) -> tuple[str, Event, datetime]:
        """``(token, JoinTokenIssued event, expiry)``."""
        ...

    def user_data(self, group: VirtualMachineGroup, token: str, expires_at: datetime) -> str:
        """What the group's instances boot with."""
        ...


def workload_name(group: str, instance_id: str) -> str:
    """The stable workload name of an instance: ``<group>-<instance id>`` (DNS-safe)."""
    iid = _UNSAFE.sub("-", instance_id.lower()).strip("-.") or "x"
    return f"{group}-{iid}"[:253].rstrip("-.")


@dataclass(frozen=True, kw_only=True, slots=True)
class PollResult:
    """One poll of one group: the events it appended and the drains it started."""

    group: str
    joined: int = 0
    draining: int = 0
    stale: bool = False
    events: int = 0


class _VmGroupBase:
    """What the VM group controller knows and how it appends (see :mod:`smc.informers._vmgroup`)."""

    def __init__(
        self,
        *,
        live: LiveMeshChanges,
        providers: Mapping[str, CloudProvider],
        interval: float = 5.0,
        drain_waiter: DrainWaiter | None = None,
        drain_ack_timeout: float = 30.0,
        metrics: CollectorRegistry | None = None,
        ready_check: ReadyCheck | None = None,
        join_tokens: JoinTokens | None = None,
        read_only: bool = False,
        certs_log: EventLog | None = None,
    ) -> None:
        self.live = live
        #: Where certificate-stream events (join tokens) are appended: the CA's writer when
        #: the log is signed (only the CA may write them); default the API's log.
        self.certs_log = certs_log
        #: A follower replica: never polls nor appends, only exports the metrics of the log.
        self.read_only = read_only
        self.ready_check = ready_check
        self.join_tokens = join_tokens
        self._token_expiry: dict[tuple[str, str], datetime] = {}
        #: Join tokens made and handed to providers by this server.
        self.tokens_issued = 0
        self.registry = live.changes.registry
        self.policy = live.changes.policy
        self.providers = dict(providers)
        self.interval = interval
        self.drain_waiter = drain_waiter
        self.drain_ack_timeout = drain_ack_timeout
        self.actor = "vm-group-controller"
        self.metrics = metrics if metrics is not None else CollectorRegistry()
        self._known: dict[tuple[str, str], dict[str, CloudInstance]] = {}
        self._drains: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._seen_groups: set[tuple[str, str]] = set()
        self.polls = 0
        self._instances = Gauge(
            "smc_vmgroup_instances",
            "Instances of a VirtualMachineGroup in the mesh, by phase (joined, draining)",
            ["namespace", "group", "phase"],
            registry=self.metrics,
        )
        self._stale = Gauge(
            "smc_vmgroup_stale",
            "1 while a VirtualMachineGroup's provider cannot be read (last known instances kept)",
            ["namespace", "group"],
            registry=self.metrics,
        )
        self._changes = Counter(
            "smc_vmgroup_instance_changes",
            "Instance joins, drains and leaves appended by this server, by cause",
            ["namespace", "group", "phase", "cause"],
            registry=self.metrics,
        )
        self._calls = Counter(
            "smc_vmgroup_provider_calls",
            "Cloud API calls made by the VM group providers",
            ["provider"],
            registry=self.metrics,
        )
        self._poll_seconds = Histogram(
            "smc_vmgroup_poll_seconds",
            "Time to poll one VirtualMachineGroup's provider and append what changed",
            ["provider"],
            registry=self.metrics,
        )
        self._calls_seen: dict[str, int] = {}
        live.runner.listeners.append(self._on_events)

    # -- the loop -----------------------------------------------------------------------------
    def _on_events(self, events: list[Event]) -> None:
        for e in events:
            if (
                isinstance(e, SmiResourceApplied | SmiResourceDeleted)
                and e.kind == VirtualMachineGroup.KIND
            ):
                self._wake.set()

    def groups(self) -> list[VirtualMachineGroup]:
        """The VirtualMachineGroups on the log (ones that no longer parse are skipped)."""
        out = []
        for stored in self.policy.of_kind(VirtualMachineGroup.KIND):
            try:
                r = parse_manifest(stored.manifest(), document=f"{stored.namespace}/{stored.name}")
            except (ManifestErrors, ValueError):
                continue
            if isinstance(r, VirtualMachineGroup):
                out.append(r)
        return out

    def _count_calls(self, provider: CloudProvider) -> None:
        seen = self._calls_seen.get(provider.name, 0)
        if provider.stats.calls > seen:
            self._calls.labels(provider.name).inc(provider.stats.calls - seen)
            self._calls_seen[provider.name] = provider.stats.calls

    # -- status, appends, metrics ------------------------------------------------------------
    async def _set_status(self, group: VirtualMachineGroup, status: str, reason: str) -> None:
        key = (group.namespace, group.name)
        state = self.registry.vm_groups.groups.get(key)
        before = state.status if state is not None else "ok"
        if before == status and (state is not None or status == "ok"):
            return
        since = state.since if state is not None else ""
        count = len(state.instances) if state is not None else 0
        await self._append(
            [
                make_event(
                    VmGroupStatusChanged,
                    event_id=deterministic_id("vm-group", *key, "status", status, since),
                    actor=self.actor,
                    source=f"vm-provider:{group.provider}",
                    namespace=group.namespace,
                    group=group.name,
                    status=status,
                    reason=reason[:500],
                    instances=count,
                )
            ]
        )

    async def _append(self, events: list[Event], *, log: EventLog | None = None) -> None:
        if log is not None:
            appended = await asyncio.to_thread(log.append, events)
            offsets: dict[tuple[str, int], int] = {}
            for a in appended:
                tp = (a.stream, a.partition)
                offsets[tp] = max(offsets.get(tp, 0), a.offset + 1)
            await self.live.wait_for(Position(offsets))
            return
        report = await asyncio.to_thread(
            self.live.changes.commit, Plan(results=(), events=tuple(events))
        )
        await self.live.wait_for(report.target)

    def _update_gauges(self) -> None:
        self._instances.clear()
        self._stale.clear()
        for (ns, gname), g in self.registry.vm_groups.groups.items():
            phases = {"joined": 0, "serving": 0, "draining": 0}
            for s in g.instances.values():
                phases[s.phase] = phases.get(s.phase, 0) + 1
            for phase, n in phases.items():
                self._instances.labels(ns, gname, phase).set(n)
            self._stale.labels(ns, gname).set(1 if g.status == "stale" else 0)

    async def close(self) -> None:
        for p in self.providers.values():
            with contextlib.suppress(Exception):
                await p.close()
