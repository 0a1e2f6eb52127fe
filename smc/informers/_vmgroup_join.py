"""Instances of a VirtualMachineGroup joining the mesh, and what each poll changes.

Role: turns one listing of a group's cloud instances into events: ``WorkloadJoined`` +
``VmInstanceChanged`` for an instance that is new or changed (warming until its proxy ACKed
when the group's readiness is ``proxy``), the promotion of warmed-up instances, and a drain
(:mod:`smc.informers._vmgroup_drain`) for those that left. Event ids derive from the
instance, its incarnation and the change, so replicas append each change once.
Concurrency: coroutines on the serve loop; appends in a worker thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from smc.api._changes import MANAGED_BY_LABEL
from smc.events import (
    Event,
    ServiceAccountUpserted,
    VmInstanceChanged,
    WorkloadJoined,
    deterministic_id,
    make_event,
)
from smc.events import WorkloadPort as EvWorkloadPort
from smc.informers._cloud import (
    CloudInstance,
)
from smc.informers._vmgroup_base import _IN_MESH, PollResult, workload_name
from smc.informers._vmgroup_drain import _VmGroupDrains
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.projections._vmgroups import (
    DRAINING_LABEL,
    GROUP_LABEL,
    INSTANCE_LABEL,
    WARMING_LABEL,
    InstanceState,
)
from smc.smi import VirtualMachineGroup


class _VmGroupJoins(_VmGroupDrains):
    """The joins of the VM group controller."""

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
