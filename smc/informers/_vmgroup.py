"""``VmGroupController``: VirtualMachineGroup instances join and leave the mesh on their own.

Role: inside ``smc serve``, for every ``VirtualMachineGroup`` on the log, polls the group's
cloud provider (:mod:`smc.informers._cloud`) every ``interval`` seconds (and at once when a
group is applied) and turns what changed into events:

- an instance that is running with an address and is not in the mesh (or whose address, tags
  or the group's template changed) -> ``WorkloadJoined(kind="vm")`` named
  ``<group>-<instance id>`` (node id ``<namespace>/<group>-<instance id>``) with the template's
  service account, ports and services, its tags and template labels, and
  ``VmInstanceChanged(phase="joined", cause=scale-out|discovered|...)``; a ServiceAccount
  upsert first when the identity is new. With ``readiness: proxy`` (the default) it joins
  labelled ``smc.dev/warming: "true"``: its proxy gets its config, no client sends it
  traffic, until ``ready_check`` sees that proxy ACK its listeners; then the label goes and
  ``VmInstanceChanged(phase="serving", cause="proxy-ready")`` is appended;
- an instance that left the group, stopped or was terminated -> a drain: ``WorkloadJoined``
  labelled ``smc.dev/draining: "true"`` (its endpoint leaves every service's EDS, its own
  proxy keeps its config and certificate) and ``VmInstanceChanged(phase="draining")``; once
  every connected proxy ACKed the config without it (``drain_waiter``), plus the group's
  ``drain`` time for in-flight requests, ``WorkloadLeft`` and ``VmInstanceChanged(phase=
  "left")``. Only then does the certificate controller revoke what the workload held;
- with ``join_tokens``, a group whose provider can set user data (an Auto Scaling group's
  launch template) gets a join token there (:mod:`smc.identity._groupjoin`), renewed at half
  its life; a booting instance's agent trades it once for its own certificate;
- a provider that cannot be read keeps the last known instances and appends
  ``VmGroupStatusChanged(status="stale")`` once (``ok`` again when it answers).

Event ids derive from the instance, its incarnation and the change, so replicas polling the
same cloud append each change once. Drains in progress are resumed after a restart from the
registry (phase ``draining``).
Concurrency: coroutines on the serve loop (the projections are read there); appends run in a
worker thread; provider calls in the provider's own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from smc.api import LiveMeshChanges
from smc.api._changes import MANAGED_BY_LABEL, Plan
from smc.events import (
    Event,
    EventLog,
    Position,
    ServiceAccountUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    VmGroupStatusChanged,
    VmInstanceChanged,
    WorkloadJoined,
    WorkloadLeft,
    deterministic_id,
    make_event,
)
from smc.events import WorkloadPort as EvWorkloadPort
from smc.informers._cloud import (
    CloudInstance,
    CloudProvider,
    GroupQuery,
    ProviderUnavailable,
    UserDataDelivery,
)
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.projections._vmgroups import (
    DRAINING_LABEL,
    GROUP_LABEL,
    INSTANCE_LABEL,
    WARMING_LABEL,
    GroupState,
    InstanceState,
)
from smc.smi import ManifestErrors, VirtualMachineGroup, parse_manifest

__all__ = [
    "DrainWaiter",
    "JoinTokens",
    "PollResult",
    "ReadyCheck",
    "VmGroupController",
    "workload_name",
]

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


class VmGroupController:
    """Keeps every VirtualMachineGroup's instances in the registry (see module docstring)."""

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

    async def run(self, *, stop: asyncio.Event) -> None:
        """Poll every ``interval`` seconds (or when a group changed) until ``stop``."""
        await self.live.runner.caught_up.wait()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.poll_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("VM group poll failed; retrying")
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                stopper.cancel()
        finally:
            for t in list(self._drains.values()):
                t.cancel()
            await asyncio.gather(*self._drains.values(), return_exceptions=True)

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

    async def poll_once(self) -> list[PollResult]:
        """Poll every group once; drains continue in the background."""
        await self.live.runner.caught_up.wait()
        self.polls += 1
        if self.read_only:
            self._update_gauges()
            return []
        groups = self.groups()
        results = list(await asyncio.gather(*(self._poll_group(g) for g in groups)))
        present = {(g.namespace, g.name) for g in groups}
        for key, state in list(self.registry.vm_groups.groups.items()):
            if key not in present:
                await self._remove_group(key, state)
        self._resume_drains()
        self._update_gauges()
        return results

    # -- one group ---------------------------------------------------------------------------
    async def _poll_group(self, group: VirtualMachineGroup) -> PollResult:
        key = (group.namespace, group.name)
        provider = self.providers.get(group.provider)
        if provider is None:
            reason = (
                f"provider {group.provider!r} is not configured on this server "
                f"(smc serve --cloud {group.provider}:...)"
            )
            await self._set_status(group, "stale", reason)
            return PollResult(group=group.name, stale=True)
        known = self._known.get(key, {})
        query = GroupQuery(
            cloud_group=group.cloud_group, selector=group.selector, region=group.region
        )
        started = time.perf_counter()
        try:
            listing = await provider.list_instances(query, known=known)
        except ProviderUnavailable as exc:
            self._count_calls(provider)
            log.warning("VM group %s/%s: %s", group.namespace, group.name, exc)
            await self._set_status(group, "stale", str(exc))
            return PollResult(group=group.name, stale=True)
        self._count_calls(provider)
        self._known[key] = {i.instance_id: i for i in listing}
        await self._set_status(group, "ok", "")
        await self._ensure_join_token(group, provider, query)
        result = await self._reconcile(group, listing)
        self._poll_seconds.labels(provider.name).observe(time.perf_counter() - started)
        return result

    async def _ensure_join_token(
        self, group: VirtualMachineGroup, provider: CloudProvider, query: GroupQuery
    ) -> None:
        """Give the group's user data a fresh join token when it has none or half the current
        one's life is gone (only the digest goes on the log)."""
        if self.join_tokens is None or not isinstance(provider, UserDataDelivery):
            return
        key = (group.namespace, group.name)
        now = datetime.now(UTC)
        expiry = self._token_expiry.get(key)
        if expiry is not None and now < expiry - timedelta(seconds=group.join_token_seconds / 2):
            return
        token, event, expires = self.join_tokens.make(
            group, trust_domain=self.policy.mesh.trust_domain
        )
        await self._append([event], log=self.certs_log)
        try:
            delivered = await provider.deliver_user_data(
                query, self.join_tokens.user_data(group, token, expires)
            )
        except ProviderUnavailable as exc:
            log.warning("VM group %s/%s: join token not delivered: %s", *key, exc)
            return
        if delivered:
            self._token_expiry[key] = expires
            self.tokens_issued += 1
        else:
            self._token_expiry[key] = datetime.max.replace(tzinfo=UTC)  # nowhere to put one

    def _count_calls(self, provider: CloudProvider) -> None:
        seen = self._calls_seen.get(provider.name, 0)
        if provider.stats.calls > seen:
            self._calls.labels(provider.name).inc(provider.stats.calls - seen)
            self._calls_seen[provider.name] = provider.stats.calls

    async def _reconcile(
        self, group: VirtualMachineGroup, listing: tuple[CloudInstance, ...]
    ) -> PollResult:
        key = (group.namespace, group.name)
        state = self.registry.vm_groups.groups.get(key)
        current = dict(state.instances) if state is not None else {}
        seen_before = state is not None or key in self._seen_groups
        self._seen_groups.add(key)
        events: list[Event] = []
        joined = 0
        by_id = {i.instance_id: i for i in listing}
        for inst in listing:
            if not inst.serving:
                continue
            had = current.get(inst.instance_id)
            labels = self._labels(group, inst, draining=False)
            w = self.registry.workloads.get(("vm", group.namespace, had.workload)) if had else None
            stored = dict(w.labels) if w is not None else {}
            warming = stored.pop(WARMING_LABEL, None) is not None
            if had is None:
                warming = group.readiness == "proxy" and self.ready_check is not None
            if warming:
                labels[WARMING_LABEL] = "true"
            if (
                had is not None
                and had.phase in _IN_MESH
                and w is not None
                and w.address == inst.address
                and stored == {k: v for k, v in labels.items() if k != WARMING_LABEL}
                and w.service_account == group.service_account
                and tuple((p.name, p.port, p.protocol) for p in w.ports)
                == tuple((p.name, p.port, p.protocol) for p in group.ports)
            ):
                continue
            if had is None:
                cause = "scale-out" if seen_before else "discovered"
            elif had.phase == "draining":
                continue  # a drain runs to its end; the instance rejoins on the next poll
            elif w is not None and w.address != inst.address:
                cause = "address-changed"
            else:
                cause = "updated"
            events.extend(self._join_events(group, inst, labels, cause))
            joined += 1
        drains = 0
        for iid, had in sorted(current.items()):
            if had.phase not in _IN_MESH:
                continue
            gone = by_id.get(iid)
            if gone is not None and gone.serving:
                continue
            cause = _leave_cause(group, gone)
            self._start_drain(group, iid, had.workload, cause, gone)
            drains += 1
        events.extend(self._promotions(group, current, by_id))
        if events:
            await self._append(events)
            for e in events:
                if isinstance(e, VmInstanceChanged):
                    self._changes.labels(e.namespace, e.group, e.phase, e.cause).inc()
        return PollResult(group=group.name, joined=joined, draining=drains, events=len(events))

    def _promotions(
        self,
        group: VirtualMachineGroup,
        current: Mapping[str, InstanceState],
        by_id: Mapping[str, CloudInstance],
    ) -> list[Event]:
        """Warming instances whose proxy has ACKed its config: their endpoint goes live."""
        if self.ready_check is None:
            return []
        out: list[Event] = []
        for iid, had in sorted(current.items()):
            inst = by_id.get(iid)
            if had.phase != "joined" or inst is None or not inst.serving:
                continue
            w = self.registry.workloads.get(("vm", group.namespace, had.workload))
            if w is None or (WARMING_LABEL, "true") not in w.labels:
                continue
            if not self.ready_check(f"{group.namespace}/{had.workload}"):
                continue
            labels = {k: v for k, v in w.labels if k != WARMING_LABEL}
            seed = ("vm-group", group.namespace, group.name, iid, had.since, "serving")
            ready_id = deterministic_id(*seed)
            common: dict[str, Any] = {
                "actor": self.actor,
                "source": f"vm-provider:{group.provider}",
                "correlation_id": f"{group.namespace}/{group.name}",
            }
            out.append(
                make_event(
                    WorkloadJoined,
                    event_id=ready_id,
                    kind="vm",
                    namespace=group.namespace,
                    name=had.workload,
                    address=w.address,
                    service_account=w.service_account,
                    labels=labels,
                    ports=w.ports,
                    **common,
                )
            )
            out.append(
                make_event(
                    VmInstanceChanged,
                    event_id=deterministic_id(*seed, "record"),
                    causation_id=ready_id,
                    namespace=group.namespace,
                    group=group.name,
                    instance_id=iid,
                    workload=had.workload,
                    phase="serving",
                    cause="proxy-ready",
                    provider=group.provider,
                    address=w.address,
                    state=inst.state,
                    **common,
                )
            )
        return out

    def _labels(
        self, group: VirtualMachineGroup, inst: CloudInstance, *, draining: bool
    ) -> dict[str, str]:
        labels = dict(inst.labels)
        labels.update(group.labels)
        for s in group.services:
            labels[BACKS_LABEL_PREFIX + s] = "true"
        labels[GROUP_LABEL] = group.name
        labels[INSTANCE_LABEL] = inst.instance_id[:63]
        labels[MANAGED_BY_LABEL] = f"vm-group.{group.name}"
        if draining:
            labels[DRAINING_LABEL] = "true"
        return labels

    def _join_events(
        self,
        group: VirtualMachineGroup,
        inst: CloudInstance,
        labels: dict[str, str],
        cause: str,
    ) -> list[Event]:
        name = workload_name(group.name, inst.instance_id)
        content = hashlib.sha256(
            repr(
                (inst.address, sorted(labels.items()), group.service_account, group.ports)
            ).encode()
        ).hexdigest()[:16]
        seed = ("vm-group", group.namespace, group.name, inst.instance_id, inst.incarnation)
        common: dict[str, Any] = {
            "actor": self.actor,
            "source": f"vm-provider:{group.provider}",
            "correlation_id": f"{group.namespace}/{group.name}",
        }
        out: list[Event] = []
        if (group.namespace, group.service_account) not in self.registry.service_accounts:
            out.append(
                make_event(
                    ServiceAccountUpserted,
                    event_id=deterministic_id(
                        "vm-group", group.namespace, group.name, "sa", group.service_account
                    ),
                    namespace=group.namespace,
                    name=group.service_account,
                    **common,
                )
            )
        joined_id = deterministic_id(*seed, "joined", content)
        out.append(
            make_event(
                WorkloadJoined,
                event_id=joined_id,
                kind="vm",
                namespace=group.namespace,
                name=name,
                address=inst.address or "",
                service_account=group.service_account,
                labels=labels,
                ports=tuple(
                    EvWorkloadPort(name=p.name, port=p.port, protocol=p.protocol)
                    for p in group.ports
                ),
                **common,
            )
        )
        out.append(
            make_event(
                VmInstanceChanged,
                event_id=deterministic_id(*seed, "joined-record", content),
                causation_id=joined_id,
                namespace=group.namespace,
                group=group.name,
                instance_id=inst.instance_id,
                workload=name,
                phase="joined",
                cause=cause,
                provider=group.provider,
                address=inst.address or "",
                state=inst.state,
                **common,
            )
        )
        return out

    # -- draining ----------------------------------------------------------------------------
    def _start_drain(
        self,
        group: VirtualMachineGroup | None,
        iid: str,
        workload: str,
        cause: str,
        inst: CloudInstance | None,
        *,
        namespace: str | None = None,
        group_name: str | None = None,
    ) -> None:
        ns = group.namespace if group is not None else namespace
        gname = group.name if group is not None else group_name
        assert ns is not None and gname is not None
        key = (ns, gname, iid)
        if key in self._drains and not self._drains[key].done():
            return
        self._drains[key] = asyncio.create_task(
            self._drain(ns, gname, group, iid, workload, cause, inst)
        )

    def _resume_drains(self) -> None:
        groups = {(g.namespace, g.name): g for g in self.groups()}
        for (ns, gname), state in self.registry.vm_groups.groups.items():
            for iid, s in state.instances.items():
                if s.phase == "draining":
                    self._start_drain(
                        groups.get((ns, gname)),
                        iid,
                        s.workload,
                        s.cause,
                        None,
                        namespace=ns,
                        group_name=gname,
                    )

    async def _drain(
        self,
        ns: str,
        gname: str,
        group: VirtualMachineGroup | None,
        iid: str,
        workload: str,
        cause: str,
        inst: CloudInstance | None,
    ) -> None:
        common: dict[str, Any] = {
            "actor": self.actor,
            "source": f"vm-provider:{group.provider if group else 'unknown'}",
            "correlation_id": f"{ns}/{gname}",
        }
        provider = group.provider if group is not None else ""
        drain_seconds = group.drain_seconds if group is not None else 10

        def record(
            seed: tuple[str, ...], caused_by: str, phase: str, why: str, address: str, state: str
        ) -> Event:
            """The group's record of this instance, caused by the workload event ``caused_by``."""
            return make_event(
                VmInstanceChanged,
                event_id=deterministic_id(*seed, "record"),
                causation_id=caused_by,
                namespace=ns,
                group=gname,
                instance_id=iid,
                workload=workload,
                phase=phase,
                cause=why,
                provider=provider,
                address=address,
                state=state,
                **common,
            )

        try:
            state = self.registry.vm_groups.groups.get((ns, gname))
            rec = state.instances.get(iid) if state is not None else None
            w = self.registry.workloads.get(("vm", ns, workload))
            if rec is None or w is None:
                return
            if rec.phase in _IN_MESH:
                labels = dict(w.labels)
                labels.pop(WARMING_LABEL, None)
                labels[DRAINING_LABEL] = "true"
                seed = ("vm-group", ns, gname, iid, rec.since, "draining")
                drained_id = deterministic_id(*seed)
                await self._append(
                    [
                        make_event(
                            WorkloadJoined,
                            event_id=drained_id,
                            kind="vm",
                            namespace=ns,
                            name=workload,
                            address=w.address,
                            service_account=w.service_account,
                            labels=labels,
                            ports=w.ports,
                            **common,
                        ),
                        record(
                            seed,
                            drained_id,
                            "draining",
                            cause,
                            w.address,
                            inst.state if inst is not None else "missing",
                        ),
                    ]
                )
                self._changes.labels(ns, gname, "draining", cause).inc()
                if self.drain_waiter is not None:
                    try:
                        await self.drain_waiter(drained_id, self.drain_ack_timeout)
                    except TimeoutError:
                        log.warning(
                            "VM group %s/%s: not every proxy ACKed the drain of %s in %.0fs",
                            ns,
                            gname,
                            workload,
                            self.drain_ack_timeout,
                        )
            await asyncio.sleep(drain_seconds)
            state = self.registry.vm_groups.groups.get((ns, gname))
            rec = state.instances.get(iid) if state is not None else None
            if rec is None or rec.phase != "draining":
                return
            seed = ("vm-group", ns, gname, iid, rec.since, "left")
            left_id = deterministic_id(*seed)
            await self._append(
                [
                    make_event(
                        WorkloadLeft,
                        event_id=left_id,
                        kind="vm",
                        namespace=ns,
                        name=workload,
                        **common,
                    ),
                    record(seed, left_id, "left", rec.cause, rec.address, rec.state),
                ]
            )
            self._changes.labels(ns, gname, "left", rec.cause).inc()
            self._update_gauges()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("VM group %s/%s: drain of %s failed", ns, gname, workload)
        finally:
            self._drains.pop((ns, gname, iid), None)

    async def wait_drained(self, timeout: float = 60.0) -> None:
        """Wait until no drain is in progress (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._drains:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._drains)} drains still running after {timeout}s")
            await asyncio.wait(list(self._drains.values()), timeout=deadline - time.monotonic())

    async def _remove_group(self, key: tuple[str, str], state: GroupState) -> None:
        ns, gname = key
        live = {iid: s for iid, s in state.instances.items()}
        for iid, s in sorted(live.items()):
            if s.phase in _IN_MESH:
                self._start_drain(
                    None, iid, s.workload, "group-deleted", None, namespace=ns, group_name=gname
                )
        if not live and state.status != "removed":
            await self._append(
                [
                    make_event(
                        VmGroupStatusChanged,
                        event_id=deterministic_id("vm-group", ns, gname, "removed", state.since),
                        actor=self.actor,
                        source="vm-group-controller",
                        namespace=ns,
                        group=gname,
                        status="removed",
                        reason="the VirtualMachineGroup was deleted",
                        instances=0,
                    )
                ]
            )
        self._known.pop(key, None)

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


def _leave_cause(group: VirtualMachineGroup, inst: CloudInstance | None) -> str:
    if inst is not None and inst.cause:
        return inst.cause
    if inst is None:
        return "scale-in" if group.cloud_group is not None else "gone"
    if inst.state in ("stopping", "stopped"):
        return "stopped"
    if inst.state == "terminating" and group.cloud_group is not None:
        return "scale-in"
    if inst.state in ("terminating", "terminated"):
        return "terminated"
    return "no-address"
